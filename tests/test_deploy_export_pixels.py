"""`rmgl export --pixels uint8|float255`: ONNX graphs for trackers that feed raw pixels (input
`images` RGB 0-255 NCHW at the model's size, normalisation inside, output `output`, dynamic
batch), parity-checked like every export; the sidecar names the variant and the onnxruntime
Encoder feeds each variant its pixels, so `rmgl extract --onnx` gives the same descriptors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_support import make_checkpoint, make_synthetic
from torchvision.transforms import v2

from rmgl.cli import main
from rmgl.data.loading import read_image
from rmgl.deploy import Encoder, read_features, read_sidecar
from rmgl.deploy.export import _sidecar
from rmgl.deploy.trackers import TrackerEncoder
from rmgl.engine import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One CLI export per raw-pixel variant (parity checked on the checkpoint's dataset)."""
    root = make_synthetic(tmp_path_factory.mktemp("pix_synth"))
    folder = tmp_path_factory.mktemp("pix")
    # one branch: half the graph, half the export time (the variants do not depend on it)
    checkpoint = make_checkpoint(folder / "ck.safetensors", root, overrides=("model.branches=[2]",))
    paths = {}
    for variant in ("uint8", "float255"):
        paths[variant] = folder / f"{variant}.onnx"
        argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx"]
        assert main([*argv, "--out", str(paths[variant]), "--pixels", variant]) == 0
    return root, checkpoint, paths


def test_the_graphs_take_raw_pixels_with_the_names_trackers_expect(exported):
    root, checkpoint, paths = exported
    model = load_model(checkpoint, "cpu")
    height, width = model.preprocess.size
    files = sorted((root / "bounding_box_test").glob("*.jpg"))[:3]
    expected = Encoder(model).encode(files)
    # the pixels by hand: the evaluation's antialiased resize of the uint8 image, nothing else
    pixels = torch.stack(
        [v2.Resize((height, width), antialias=True)(read_image(str(f))) for f in files]
    ).numpy()
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 3, height, width)
    for variant, dtype in (("uint8", "tensor(uint8)"), ("float255", "tensor(float)")):
        meta = read_sidecar(paths[variant])
        assert meta["pixels"] == variant and meta["output"]["name"] == "output"
        assert meta["input"]["name"] == "images" and meta["input"]["layout"] == "NCHW"
        assert meta["input"]["dtype"] == ("uint8" if variant == "uint8" else "float32")
        assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["images"] >= 16
        session = ort.InferenceSession(str(paths[variant]), providers=["CPUExecutionProvider"])
        (given,), (output,) = session.get_inputs(), session.get_outputs()
        assert (given.name, given.type, output.name) == ("images", dtype, "output")
        graph = onnx.load(str(paths[variant]))
        batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # dynamic batch
        feed = pixels if variant == "uint8" else pixels.astype(np.float32)
        for part in (feed, feed[1:2]):
            got = session.run(None, {"images": part})[0]
            index = slice(0, 3) if len(part) == 3 else slice(1, 2)
            np.testing.assert_allclose(got, expected[index], atol=1e-5)


def test_extract_gives_the_same_descriptors_for_every_variant(exported, tmp_path):
    root, checkpoint, paths = exported
    listing = tmp_path / "list.txt"
    files = sorted((root / "bounding_box_test").glob("*.jpg"))[:7]
    listing.write_text("\n".join(str(f) for f in files))
    found = {}
    for name, model in (("torch", ["--checkpoint", str(checkpoint)]),) + tuple(
        (v, ["--onnx", str(p)]) for v, p in paths.items()
    ):
        out = tmp_path / name
        argv = ["extract", *model, "--images", str(listing), "--out", str(out)]
        assert main([*argv, "--workers", "0", "--batch-size", "3"]) == 0
        found[name] = read_features(out).features
    for variant in paths:
        np.testing.assert_allclose(found[variant], found["torch"], atol=1e-5)
    # a tracker's boxes on the uint8 graph: the torch model's descriptors
    frame = np.ascontiguousarray(read_image(str(files[0])).permute(1, 2, 0).numpy()[..., ::-1])
    boxes = np.array([[0, 0, frame.shape[1], frame.shape[0]], [2, 5, 14, 40]])
    np.testing.assert_allclose(
        TrackerEncoder(paths["uint8"]).get_features(boxes, frame),
        TrackerEncoder(checkpoint, device="cpu").get_features(boxes, frame),
        atol=1e-5,
    )


def test_sidecar_variants_and_bad_requests(exported, tmp_path, capsys):
    _, checkpoint, paths = exported
    assert _sidecar(load_model(checkpoint, "cpu"), 18, False)["pixels"] == "normalized"
    copy = tmp_path / "m.onnx"
    shutil.copy(paths["uint8"], copy)
    meta = json.loads(paths["uint8"].with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**meta, "pixels": "rgba16"}))
    with pytest.raises(ValueError, match=r"m.json says the model takes 'rgba16' inputs"):
        Encoder(copy)
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "weights"]
    assert main([*argv, "--out", str(tmp_path / "w.safetensors"), "--pixels", "uint8"]) == 1
    assert "--pixels applies to --format onnx" in capsys.readouterr().err


# ---- docs/trackers.md: its Python examples and rmgl commands run, in the order of the page


class _BotSortStandIn:
    """BoxMOT's tracker as the page uses it: update(dets (N, 6), img, embs (N, D))."""

    calls: list = []

    def __init__(self, **options) -> None:
        self.options = options

    def update(self, dets, img, embs=None):
        assert dets.ndim == 2 and dets.shape[1] == 6 and img.dtype == np.uint8
        assert embs is not None and embs.shape[0] == len(dets)
        _BotSortStandIn.calls.append(embs)
        return np.zeros((0, 8))


class _DeepSortStandIn:
    """deep-sort-realtime's tracker: update_tracks(raw, embeds=list of vectors, frame=...)."""

    calls: list = []

    def __init__(self, max_age=30, embedder="mobilenet", **options) -> None:
        assert embedder is None  # with embeds given, no built-in network
        self.max_age = max_age

    def update_tracks(self, raw_detections, embeds=None, frame=None):
        assert isinstance(embeds, list) and len(embeds) == len(raw_detections)
        assert all(len(d[0]) == 4 and d[0][2] > 0 and d[0][3] > 0 for d in raw_detections)
        _DeepSortStandIn.calls.append(embeds)
        return []


def _stand_in_modules(monkeypatch) -> None:
    import sys
    import types

    from PIL import Image

    cv2 = types.ModuleType("cv2")
    cv2.imread = lambda path: np.ascontiguousarray(
        np.asarray(Image.open(path).convert("RGB"))[..., ::-1]
    )
    boxmot = types.ModuleType("boxmot")
    boxmot.BotSort = _BotSortStandIn
    dsr = types.ModuleType("deep_sort_realtime")
    dsr_tracker = types.ModuleType("deep_sort_realtime.deepsort_tracker")
    dsr_tracker.DeepSort = _DeepSortStandIn
    dsr.deepsort_tracker = dsr_tracker
    for name, module in (
        ("cv2", cv2),
        ("boxmot", boxmot),
        ("deep_sort_realtime", dsr),
        ("deep_sort_realtime.deepsort_tracker", dsr_tracker),
    ):
        monkeypatch.setitem(sys.modules, name, module)


def test_the_examples_of_docs_trackers_run(exported, tmp_path, monkeypatch):
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    from rmgl.cli import build_parser

    root, checkpoint, paths = exported
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo/rmgl").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "runs/demo/rmgl/best.safetensors")
    for name in ("reid", "reid_uint8"):
        shutil.copy(paths["uint8"], tmp_path / f"{name}.onnx")
        shutil.copy(paths["uint8"].with_suffix(".json"), tmp_path / f"{name}.json")
    (tmp_path / "MOT17-02-FRCNN/img1").mkdir(parents=True)
    (tmp_path / "MOT17-02-FRCNN/det").mkdir()
    people = sorted((root / "bounding_box_test").glob("*.jpg"))
    frame = Image.new("RGB", (180, 140), (90, 120, 60))
    for i, x in enumerate((12, 70)):
        frame.paste(Image.open(people[i]).convert("RGB").resize((40, 100)), (x, 30))
    for number in (1, 2):
        frame.save(tmp_path / f"MOT17-02-FRCNN/img1/{number:06d}.jpg", quality=95)
    (tmp_path / "MOT17-02-FRCNN/det/det.txt").write_text(
        "1,-1,12,30,40,100,0.91,-1,-1,-1\n1,-1,70,28,40,97,0.84,-1,-1,-1\n2,-1,14,30,40,100,0.9,-1,-1,-1\n"
    )
    _stand_in_modules(monkeypatch)
    _BotSortStandIn.calls.clear()
    _DeepSortStandIn.calls.clear()

    page = (Path(__file__).parents[1] / "docs/trackers.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", page, flags=re.S)
    namespace: dict = {}
    python_blocks = commands = 0
    for language, code in blocks:
        if language == "python":
            exec(compile(code, "docs/trackers.md", "exec"), namespace)
            python_blocks += 1
        elif language == "bash":
            for line in code.strip().splitlines():
                argv = shlex.split(line)[1:]
                if argv[0] == "export":  # the module's fixture runs these exports
                    build_parser().parse_args(argv)
                else:
                    assert main(argv) == 0, line
                    commands += 1
    assert python_blocks == 5 and commands == 2
    reid, frame_bgr = namespace["reid"], namespace["frame"]
    assert namespace["embs"].shape == (2, reid.descriptor_dim)
    np.testing.assert_allclose(_BotSortStandIn.calls[0], namespace["embs"])
    assert len(_DeepSortStandIn.calls[0]) == 2
    np.testing.assert_allclose(
        np.stack(_DeepSortStandIn.calls[0]),
        reid.get_features(np.array([[12, 30, 52, 130], [70, 28, 110, 125]]), frame_bgr),
        atol=1e-6,
    )
    assert namespace["descriptors"].shape == (2, reid.descriptor_dim)  # the raw-pixel graph
    table = np.load("dets/MOT17-02-FRCNN.npy")
    assert table.shape == (3, 10 + reid.descriptor_dim)
    # the offline file's rows of frame 1 are the encoder's descriptors of the same boxes
    np.testing.assert_allclose(table[:2, 10:], namespace["embs"], atol=1e-5)
