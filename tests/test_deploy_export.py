"""`rmgl export`: an ONNX graph equal to the torch model (data-dependent ABP boundaries that
differ per sample, dynamic batch, flip and L2 inside), its sidecar, the onnxruntime encoder
from the exported file alone, and plain weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_support import make_checkpoint, make_synthetic
from safetensors.numpy import load_file

from rmgl.cli import main
from rmgl.deploy import Encoder, read_features, read_sidecar
from rmgl.deploy import export as export_module
from rmgl.deploy.export import OPSET, export_onnx
from rmgl.engine import load_model
from rmgl.model import abp_boundaries

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEIGHT, WIDTH = 96, 32  # 6 rows after layer4: room for ABP boundaries to differ per sample


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One CLI export (parity checked on the checkpoint's own dataset images)."""
    root = make_synthetic(tmp_path_factory.mktemp("exp_synth"))
    folder = tmp_path_factory.mktemp("exp")
    checkpoint = make_checkpoint(folder / "ck.safetensors", root, HEIGHT, WIDTH)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--format",
                "onnx",
                "--out",
                str(folder / "m.onnx"),
            ]
        )
        == 0
    )
    return root, checkpoint, folder / "m.onnx"


def band_images(count: int = 5) -> list[np.ndarray]:
    """Grey crops with a bright band at a different height in each: channel peaks, and so
    ABP boundaries, move from sample to sample."""
    images = []
    for i in range(count):
        image = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
        top = i * HEIGHT // count
        image[top : top + HEIGHT // count] = 230
        image[:, : WIDTH // 4] = 10  # not mirror-symmetric, so that the flip counts
        images.append(image)
    return images


def test_export_writes_a_dynamic_batch_graph_and_its_sidecar(exported, capsys):
    _, checkpoint, path = exported
    meta = read_sidecar(path)
    model = load_model(checkpoint, "cpu")
    assert meta["opset"] == OPSET == 18 and meta["precision"] == "fp32" and meta["flip"] is True
    assert meta["input"]["height"] == HEIGHT and meta["input"]["width"] == WIDTH
    assert meta["input"]["mean"] == list(model.preprocess.mean) and meta["input"]["std"] == list(
        model.preprocess.std
    )
    assert meta["output"] == {
        "name": "descriptor",
        "dtype": "float32",
        "dim": model.descriptor_dim,
        "l2_normalized": True,
    }
    assert meta["feature_names"] == model.feature_names and meta["source_checkpoint"] == str(
        checkpoint.resolve()
    )
    assert meta["rmgl_version"] and meta["architecture"]["branches"] == [2, 3]
    parity = meta["parity"]
    assert (
        parity["images"] >= 16
        and parity["max_abs_diff"] <= 1e-4
        and parity["min_cosine"] >= 0.99999
    )
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain == ""] == [OPSET]
    batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # symbolic
    assert not list(path.parent.glob("*.partial*"))


def test_onnx_equals_torch_with_per_sample_abp_boundaries_at_batch_5_and_1(exported):
    _, checkpoint, path = exported
    model = load_model(checkpoint, "cpu")
    torch_encoder = Encoder(model, batch_size=5)
    onnx_encoder = Encoder(path, backend="onnxruntime", device="cpu", batch_size=5)
    images = band_images()
    inputs = torch.stack([torch_encoder.prepare(image) for image in images])
    with torch.no_grad():
        maps = model.branch_maps(inputs)
    for branch, found in zip(model.branches, maps):  # the case this test exists for
        bounds = abp_boundaries(found.original, branch.stripes)
        assert len({tuple(b) for b in bounds.tolist()}) >= 2, (branch.stripes, bounds.tolist())
    expected = torch_encoder.encode(images)
    for got in (
        onnx_encoder.encode(images),
        np.concatenate([onnx_encoder.encode([i]) for i in images]),
    ):
        assert np.abs(got - expected).max() <= 1e-4
        assert (got * expected).sum(1).min() >= 0.99999
    # an export with uniform stripes, or without the flip, would be far outside that tolerance
    model.abp = "train"
    uniform = Encoder(model, batch_size=5).encode(images)
    model.abp = "both"
    assert np.abs(uniform - expected).max() > 1e-2
    with torch.no_grad():
        unflipped = torch.nn.functional.normalize(model(inputs), dim=1).numpy()
    assert np.abs(unflipped - expected).max() > 1e-2


def test_abp_boundaries_export_exactly(tmp_path):
    """The boundary computation alone, as a graph: integer outputs equal to torch's on maps
    with ties, channels that do not vote and a sample with no votes at all."""

    class Bounds(torch.nn.Module):
        def forward(self, x):
            return abp_boundaries(x, 3)

    program = torch.onnx.export(
        Bounds().eval(),
        (torch.rand(2, 16, 8, 3),),
        dynamo=True,
        opset_version=OPSET,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        verbose=False,
    )
    program.save(str(tmp_path / "bounds.onnx"))
    session = ort.InferenceSession(
        str(tmp_path / "bounds.onnx"), providers=["CPUExecutionProvider"]
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 4, (6, 16, 8, 3), generator=g).float()  # small integers: many ties
    x[0] = -1.0
    x[1, :8] = 0.0
    x[2] = 0.0
    x[2, :, 7, 2] = 1.0  # every vote in the last row: clamped boundaries
    expected = abp_boundaries(x, 3)
    assert len({tuple(b) for b in expected.tolist()}) >= 3
    for batch in (x, x[3:4]):
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        assert np.array_equal(got, abp_boundaries(batch, 3).numpy())


def test_onnxruntime_encoder_and_extract_need_only_the_exported_files(exported, tmp_path, capsys):
    root, checkpoint, path = exported
    alone = tmp_path / "deploy"
    alone.mkdir()
    shutil.copy(path, alone / "reid.onnx")
    shutil.copy(path.with_suffix(".json"), alone / "reid.json")
    gallery = sorted((root / "bounding_box_test").glob("*.jpg"))[:7]
    expected = Encoder(checkpoint, device="cpu").encode(gallery)
    encoder = Encoder(alone / "reid.onnx", backend="onnxruntime")
    assert encoder.descriptor_dim == expected.shape[1] and encoder.preprocess.size == (
        HEIGHT,
        WIDTH,
    )
    np.testing.assert_allclose(encoder.encode(gallery), expected, atol=1e-4)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in gallery))
    assert (
        main(
            [
                "extract",
                "--onnx",
                str(alone / "reid.onnx"),
                "--images",
                str(listing),
                "--out",
                str(tmp_path / "f"),
                "--workers",
                "0",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    found = read_features(tmp_path / "f")
    np.testing.assert_allclose(found.features, expected, atol=1e-4)
    assert found.meta["backend"] == "onnxruntime" and found.meta["onnx"] == str(
        (alone / "reid.onnx").resolve()
    )
    assert found.meta["checkpoint"] is None
    (alone / "reid.json").unlink()
    with pytest.raises(FileNotFoundError, match="reid.onnx has no sidecar .*reid.json"):
        Encoder(alone / "reid.onnx", backend="onnxruntime")


def test_a_disagreeing_export_fails_loudly_and_leaves_nothing(exported, tmp_path, monkeypatch):
    _, checkpoint, path = exported
    model = load_model(checkpoint, "cpu")
    images = band_images(3)
    meta = json.loads(path.with_suffix(".json").read_text())
    copy = tmp_path / "copy.onnx"
    shutil.copy(path, copy)
    with torch.no_grad():  # the torch model drifts away from the exported graph
        model.branches[0].heads["orig_global"].reduction[1].bias.add_(0.5)
    with pytest.raises(
        ValueError,
        match=r"disagrees with the torch model on 3 images \(max abs diff .*allowed: max_abs_diff 0.0001",
    ):
        export_module._check_parity(model, copy, meta, images, fp16=False)

    def fake_export(graph, example, partial, opset):
        shutil.copy(path, partial)

    monkeypatch.setattr(export_module, "_torch_export", fake_export)
    with pytest.raises(ValueError, match="disagrees"):
        export_onnx(model, tmp_path / "out.onnx", images=images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]


def test_parity_runs_on_the_cuda_provider_without_tf32_when_there_is_one(
    exported, tmp_path, monkeypatch
):
    """The graph is checked on the provider an Encoder picks by default: CUDA when this
    onnxruntime has it (faked here; the session itself runs on the CPU), with TF32 off."""
    _, checkpoint, path = exported
    model = load_model(checkpoint, "cpu")
    meta = json.loads(path.with_suffix(".json").read_text())
    copy = tmp_path / "copy.onnx"
    shutil.copy(path, copy)
    requested = []
    real_session = ort.InferenceSession

    def session(file, options=None, providers=None):
        requested.append(providers)
        return real_session(file, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    report = export_module._check_parity(model, copy, meta, band_images(3), fp16=False)
    assert report["provider"] == "CUDAExecutionProvider"
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})
    assert requested == [[cuda, "CPUExecutionProvider"]]
    requested.clear()
    Encoder(path, backend="onnxruntime", device="cuda:1")
    assert requested[0][0] == ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"})


def test_mean_and_std_reach_the_sidecar_and_the_onnxruntime_encoder(
    exported, tmp_path, monkeypatch
):
    """An exported model's sidecar carries its preprocess' mean/std, and the onnxruntime
    encoder prepares images with the sidecar's values (it refused anything but ImageNet's)."""
    from rmgl.engine.load import Preprocess

    _, checkpoint, path = exported
    model = load_model(checkpoint, "cpu")
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    model.preprocess = Preprocess(HEIGHT, WIDTH, mean, std)
    # the graph does not depend on the normalisation: reuse the exported one (fast)
    monkeypatch.setattr(
        export_module,
        "_torch_export",
        lambda graph, example, partial, opset: shutil.copy(path, partial),
    )
    meta = export_onnx(model, tmp_path / "custom.onnx", check=False)
    assert (meta["input"]["mean"], meta["input"]["std"]) == (list(mean), list(std))
    encoder = Encoder(tmp_path / "custom.onnx", backend="onnxruntime", device="cpu")
    pixels = torch.tensor([51, 102, 204], dtype=torch.uint8)[:, None, None].expand(3, 40, 20)
    expected = (pixels[:, :1, :1].float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std
    )[:, None, None]
    torch.testing.assert_close(encoder.prepare(pixels.clone()), expected.expand(3, HEIGHT, WIDTH))


def test_weights_export_is_a_plain_state_dict_with_a_description(exported, tmp_path, capsys):
    _, checkpoint, _ = exported
    out = tmp_path / "w.safetensors"
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "weights", "--out", str(out)])
        == 0
    )
    state = load_file(str(out))  # safetensors alone, no rmgl
    model = load_model(checkpoint, "cpu")
    own = model.state_dict()
    assert set(state) == set(own) and all(np.array_equal(state[k], own[k].numpy()) for k in own)
    notes = out.with_suffix(".md").read_text()
    assert (
        f"resized to {HEIGHT} x {WIDTH}" in notes
        and "`b3.rp.s3`" in notes
        and "`branches`: `[2, 3]`" in notes
    )
    assert f"{model.descriptor_dim} numbers" in notes


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_export_requests_are_one_line_errors(exported, tmp_path, capsys, monkeypatch):
    _, checkpoint, _ = exported
    base = ["export", "--checkpoint", str(checkpoint)]
    cases = [
        (["--format", "onnx", "--out", str(tmp_path / "m.pt")], "--out must name an .onnx file"),
        (
            ["--format", "weights", "--out", str(tmp_path / "w.safetensors"), "--fp16"],
            "--fp16 and --images apply to --format onnx",
        ),
        (["--format", "weights", "--out", str(tmp_path / "w.bin")], "must end in .safetensors"),
        (
            ["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--images", str(tmp_path)],
            "holds no images",
        ),
        (
            ["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--opset", "11"],
            "opset must be between 18",
        ),
    ]
    for args, message in cases:
        assert main([*base, *args]) == 1, args
        assert message in one_error_line(capsys)
    moved = tmp_path / "ck.safetensors"
    cfg_root = load_model(checkpoint, "cpu").config.data.root
    shutil.copy(checkpoint, moved)
    monkeypatch.chdir(tmp_path)
    shutil.move(cfg_root, str(tmp_path / "elsewhere"))  # the checkpoint's dataset is gone
    try:
        assert (
            main(["export", "--checkpoint", str(moved), "--format", "onnx", "--out", "m.onnx"]) == 1
        )
        line = one_error_line(capsys)
        assert "the parity check needs real images" in line and line.endswith(
            "give --images FOLDER"
        )
    finally:
        shutil.move(str(tmp_path / "elsewhere"), cfg_root)
    (tmp_path / "bad.safetensors").write_bytes(b"x" * 10)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "bad.safetensors"),
                "--format",
                "onnx",
                "--out",
                "m.onnx",
            ]
        )
        == 1
    )
    assert "bad.safetensors is not a readable rmgl checkpoint" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main([*base, "--format", "onnx", "--out", "m.onnx"]) == 1
    assert "pip install 'rmgl[deploy]'" in one_error_line(capsys)


# ---- issue 25 cases 1 and 2: outputs are never inputs, and never replaced unasked


def test_an_export_never_overwrites_its_checkpoint_or_a_users_file(exported, tmp_path, capsys):
    _, checkpoint, path = exported
    training = tmp_path / "last.safetensors"
    shutil.copy(checkpoint, training)
    before = training.read_bytes()
    (tmp_path / "results.json").write_text('{"mine": true}\n')  # a user's file
    (tmp_path / "w.safetensors").write_bytes(b"old weights")
    base = ["export", "--checkpoint", str(training)]
    cases = [
        (
            ["--format", "weights", "--out", str(training)],
            "is .*last.safetensors, one of this command's inputs",
        ),
        (
            ["--format", "weights", "--out", str(training), "--overwrite"],
            "one of this command's inputs",
        ),
        (
            ["--format", "weights", "--out", str(checkpoint), "--overwrite"],
            "is an rmgl training checkpoint",
        ),
        (
            ["--format", "weights", "--out", str(tmp_path / "w.safetensors")],
            "w.safetensors already exists; pass --overwrite",
        ),
        (
            ["--format", "onnx", "--out", str(tmp_path / "results.onnx")],
            "results.json exists and was not written by rmgl export",
        ),
        (
            ["--format", "onnx", "--out", str(tmp_path / "results.onnx"), "--overwrite"],
            "move that file or choose another --out",
        ),
    ]
    for args, message in cases:
        assert main([*base, *args]) == 1, args
        assert re.search(message, one_error_line(capsys)), args
    assert training.read_bytes() == before and checkpoint.read_bytes() != b""
    assert (tmp_path / "results.json").read_text() == '{"mine": true}\n'
    assert (tmp_path / "w.safetensors").read_bytes() == b"old weights"
    assert (
        main(
            [*base, "--format", "weights", "--out", str(tmp_path / "w.safetensors"), "--overwrite"]
        )
        == 0
    )
    assert set(load_file(str(tmp_path / "w.safetensors"))) and (tmp_path / "w.md").is_file()
    (tmp_path / "w.md").write_text("# my own notes\n")
    assert (
        main(
            [*base, "--format", "weights", "--out", str(tmp_path / "w.safetensors"), "--overwrite"]
        )
        == 1
    )
    assert "w.md exists and was not written by rmgl export" in one_error_line(capsys)


def test_onnx_export_writes_the_pair_or_leaves_the_old_pair(exported, tmp_path, monkeypatch):
    """Issue 18 item 9: the model and its sidecar. Every failure before the renames leaves
    the previous pair untouched; a crash between the two renames leaves a pair that
    read_sidecar refuses (the sidecar records the model's SHA-256)."""
    _, checkpoint, path = exported
    model = load_model(checkpoint, "cpu")
    out = tmp_path / "reid.onnx"
    shutil.copy(path, out)
    shutil.copy(path.with_suffix(".json"), out.with_suffix(".json"))
    old = (out.read_bytes(), out.with_suffix(".json").read_bytes())
    images = band_images(2)

    def other_graph(graph, example, partial, opset):  # a graph whose bytes differ
        shutil.copy(path, partial)
        with open(partial, "ab") as handle:
            handle.write(b"\0")

    monkeypatch.setattr(export_module, "_torch_export", other_graph)
    with pytest.raises(ValueError, match="reid.onnx already exists; pass --overwrite"):
        export_onnx(model, out, images=images)

    def failing(graph, example, partial, opset):
        raise OSError(28, "No space left on device")

    for step in ("export", "parity"):
        if step == "export":
            monkeypatch.setattr(export_module, "_torch_export", failing)
        else:
            monkeypatch.setattr(export_module, "_torch_export", other_graph)
            monkeypatch.setattr(
                export_module,
                "_check_parity",
                lambda *a: (_ for _ in ()).throw(ValueError("disagrees")),
            )
        with pytest.raises((OSError, ValueError)):
            export_onnx(model, out, images=images, overwrite=True)
        assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["reid.json", "reid.onnx"]
    monkeypatch.setattr(export_module, "_check_parity", lambda *a: {"images": 2})
    real_replace = os.replace

    def crash_at_the_second_rename(source, target):
        if str(target).endswith(".onnx"):
            raise KeyboardInterrupt  # killed between the sidecar's rename and the model's
        return real_replace(source, target)

    monkeypatch.setattr(export_module.os, "replace", crash_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, out, images=images, overwrite=True)
    monkeypatch.setattr(export_module.os, "replace", real_replace)
    assert out.read_bytes() == old[0] and out.with_suffix(".json").read_bytes() != old[1]
    with pytest.raises(ValueError, match="reid.json describes another model than .*reid.onnx"):
        Encoder(out)
    meta = export_onnx(model, out, images=images, overwrite=True)  # exporting again mends it
    assert read_sidecar(out)["onnx_sha256"] == meta["onnx_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reid.json", "reid.onnx"]


def test_onnx_descriptors_count_as_the_checkpoints_own(exported, tmp_path):
    """The sidecar records the checkpoint's SHA-256, so a gallery extracted with the ONNX
    export and one extracted with the checkpoint are the same model for the index."""
    from rmgl.deploy.features import descriptor_model, model_differences
    from rmgl.deploy.files import sha256_file

    _, checkpoint, path = exported
    assert read_sidecar(path)["source_checkpoint_sha256"] == sha256_file(checkpoint)
    onnx, torch_encoder = Encoder(path), Encoder(checkpoint, device="cpu")
    assert onnx.backend == "onnxruntime" and torch_encoder.backend == "torch"  # backend auto
    differences = model_differences(
        descriptor_model(torch_encoder.provenance()), descriptor_model(onnx.provenance())
    )
    assert differences == []
