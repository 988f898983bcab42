"""rmgl.deploy.Encoder (torch backend): the numbers of `rmgl eval`, from every kind of image."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from deploy_support import make_checkpoint
from PIL import Image

from rmgl.data.datasets import load_dataset
from rmgl.data.loading import UnreadableImageError, eval_loader, read_image
from rmgl.data.transforms import build_eval_transform
from rmgl.deploy import Encoder
from rmgl.deploy.encoder import require
from rmgl.engine import load_model
from rmgl.metrics import extract_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_checkpoint):
    return tiny_data, tiny_checkpoint


@pytest.fixture(scope="module")
def gallery(setup):
    root, _ = setup
    return load_dataset("folder", root).gallery[:12]


def test_torch_encoder_gives_the_evaluation_descriptors_bit_for_bit(setup, gallery):
    """Reference: extract_features over eval_loader with build_eval_transform, exactly what
    evaluate_model (rmgl eval) runs, at the same batch size."""
    _, checkpoint = setup
    model = load_model(checkpoint, "cpu")
    loader = eval_loader(
        gallery, build_eval_transform(model.preprocess.size), batch_size=5, workers=0
    )
    expected = extract_features(model, loader, progress=False).features.numpy()
    paths = [r.path for r in gallery]
    for encoder in (Encoder(model, batch_size=5), Encoder(checkpoint, device="cpu", batch_size=5)):
        got = encoder.encode(paths)
        assert got.dtype == np.float32 and got.shape == (12, model.descriptor_dim)
        assert np.array_equal(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # flip-averaging is on: the descriptor is not the plain normalised output
    with torch.no_grad():
        plain = torch.nn.functional.normalize(
            model(torch.stack([build_eval_transform((48, 16))(read_image(p)) for p in paths[:5]])),
            dim=1,
        )
    assert not np.allclose(plain.numpy(), expected[:5], atol=1e-3)


def test_every_input_kind_gives_the_same_descriptors(setup, gallery):
    _, checkpoint = setup
    encoder = Encoder(checkpoint, device="cpu", batch_size=4)
    paths = [r.path for r in gallery[:6]]
    expected = encoder.encode(paths)
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    prepared = [encoder.preprocess.transform()(read_image(p)) for p in paths]
    kinds = {
        "PIL": ([Image.open(p) for p in paths], False),
        "RGB arrays": (rgb, False),
        "BGR arrays": (
            [a[:, :, ::-1] for a in rgb],
            True,
        ),  # a negative-stride view, as cv2 code makes
        "uint8 tensors": ([read_image(p) for p in paths], False),
        "BGR uint8 tensors": ([read_image(p).flip(0) for p in paths], True),
        "prepared float tensors": (prepared, False),
        "one 4-D tensor": (torch.stack(prepared), False),
        "a generator": ((p for p in paths), False),
    }
    for name, (images, bgr) in kinds.items():
        assert np.array_equal(encoder.encode(images, bgr=bgr), expected), name
    assert np.array_equal(encoder.encode([paths[0], rgb[1], prepared[2]]), expected[:3])
    # the flag matters: BGR pixels read as RGB are another image
    assert not np.allclose(encoder.encode([a[:, :, ::-1] for a in rgb]), expected, atol=1e-4)
    assert encoder.encode([]).shape == (0, encoder.descriptor_dim)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 5, 3), dtype=np.float32), "H x W x 3 uint8"),
        (np.zeros((10, 5), dtype=np.uint8), "H x W x 3 uint8"),
        (torch.zeros(3, 10, 5), "prepared input and must be 3 x 48 x 16"),
        (torch.zeros(1, 48, 16), "3 x H x W"),
        (torch.zeros(3, 48, 16, dtype=torch.float64), "uint8 \\(raw RGB\\) or float32"),
        (42, "cannot encode a int"),
    ],
)
def test_bad_images_are_one_line_errors(setup, image, message):
    encoder = Encoder(setup[1], device="cpu")
    with pytest.raises(ValueError, match=message) as err:
        encoder.encode([image])
    assert "\n" not in str(err.value)


def test_unreadable_file_names_the_file(setup, tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImageError, match="0001_c1s1_000001_00.jpg"):
        Encoder(setup[1], device="cpu").encode([bad])


def test_bad_models_and_settings_are_one_line_errors(setup, tmp_path):
    not_checkpoint = tmp_path / "x.safetensors"
    not_checkpoint.write_bytes(b"\x00" * 64)
    cases = [
        (lambda: Encoder(not_checkpoint), "x.safetensors is not a readable rmgl checkpoint"),
        (lambda: Encoder(torch.nn.Linear(2, 2)), "needs an rmgl checkpoint path or the model"),
        (lambda: Encoder(setup[1], backend="tensorrt"), "backend must be one of"),
        (lambda: Encoder(setup[1], batch_size=0), "batch_size must be >= 1"),
        (
            lambda: Encoder(tmp_path / "m.onnx", backend="torch"),
            "is an ONNX model: use Encoder\\(..., backend='onnxruntime'\\)",
        ),
        (  # backend="auto" (the default) picks onnxruntime for an .onnx file
            lambda: Encoder(tmp_path / "m.onnx"),
            "ONNX model .*m.onnx does not exist",
        ),
        (
            lambda: Encoder(tmp_path / "m.onnx", backend="onnxruntime"),
            "ONNX model .*m.onnx does not exist",
        ),
        (
            lambda: Encoder(setup[1], backend="onnxruntime", amp="bf16"),
            "amp is a torch-backend setting",
        ),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            make()


def test_missing_onnxruntime_says_what_to_install(setup, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(
        ModuleNotFoundError, match=r"onnxruntime is not installed.*pip install 'rmgl\[deploy\]'"
    ):
        require("onnxruntime")
    with pytest.raises(ModuleNotFoundError, match=r"rmgl\[deploy\]"):
        Encoder(tmp_path / "m.onnx", backend="onnxruntime")


def test_bf16_is_an_explicit_choice_and_stays_close(setup, gallery):
    encoder = Encoder(setup[1], device="cpu", amp="bf16")
    assert encoder.amp == torch.bfloat16
    paths = [r.path for r in gallery[:4]]
    reduced, full = encoder.encode(paths), Encoder(setup[1], device="cpu").encode(paths)
    assert reduced.dtype == np.float32 and (reduced * full).sum(1).min() > 0.98


class InputRecorder(torch.nn.Module):
    """Returns the mean of each input channel as its descriptor, and keeps the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return x.mean(dim=(2, 3)) + self.weight


def test_mean_and_std_reach_every_evaluation_path(setup, tmp_path):
    """A checkpoint trained with data.mean/std other than ImageNet's: load_model's preprocess,
    the evaluation's extraction and the torch Encoder all normalise with them."""
    from rmgl.engine.evaluation import extract_query_gallery
    from rmgl.engine.load import Preprocess

    root, _ = setup
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    checkpoint = make_checkpoint(
        tmp_path / "ck.safetensors",
        root,
        overrides=(f"data.mean={list(mean)}", f"data.std={list(std)}"),
    )
    model = load_model(checkpoint, "cpu")
    assert model.preprocess == Preprocess(48, 16, mean, std)
    pixels = torch.tensor([51, 102, 204], dtype=torch.uint8)[:, None, None].expand(3, 60, 20)
    expected = (pixels[:, :1, :1].float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std
    )[:, None, None]
    encoder = Encoder(model)
    torch.testing.assert_close(encoder.prepare(pixels.clone()), expected.expand(3, 48, 16))

    recorder = InputRecorder()
    dataset = load_dataset("folder", root)
    extract_query_gallery(
        recorder, dataset, model.preprocess, batch_size=4, workers=0, progress=False
    )
    raw = read_image(dataset.query[0].path)
    torch.testing.assert_close(
        recorder.inputs[0][0], build_eval_transform((48, 16), mean, std)(raw)
    )
    default = build_eval_transform((48, 16))(raw)
    assert not torch.allclose(recorder.inputs[0][0], default, atol=1e-2)
