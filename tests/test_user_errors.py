"""Every mistake a user can make gets one line, ``rmgl <command>: error: ...``, exit code 1 and
no traceback; and nothing a user made is lost by a mistake.

Table-driven: each case builds its bad input in ``tmp_path``, runs the ``rmgl`` command in
process, and checks the exit code, the message and the absence of a traceback. Small data,
small models: no case trains more than a few iterations.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rmgl.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """
data: {{dataset: folder, root: {root}, height: 48, width: 16, num_identities: 4, num_instances: 2, workers: 0, test_batch_size: 64}}
model: {{backbone: resnet18, pretrained: none, branches: [2]}}
optim: {{epochs: 1, warmup_epochs: 1, milestones: [2]}}
eval: {{every: 0, rerank: false}}
run: {{name: tiny, output_dir: {out}, log_every: 1}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rmgl.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("err_synth")
    generate(
        SynthConfig(
            seed=6,
            train_ids=8,
            test_ids=6,
            distractors=2,
            junk=1,
            cameras_per_id=(2, 3),
            images_per_camera=(2, 2),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A real (tiny) trained checkpoint."""
    out = tmp_path_factory.mktemp("err_runs")
    config = out / "tiny.yaml"
    config.write_text(TINY.format(root=data, out=out))
    assert main(["train", str(config)]) == 0
    return out / "tiny" / "last.safetensors"


@dataclass
class Env:
    tmp: Path
    data: Path
    checkpoint: Path

    def config(self, extra: str = "", root: Path | None = None, name: str = "tiny.yaml") -> str:
        path = self.tmp / name
        path.write_text(TINY.format(root=root or self.data, out=self.tmp / "runs") + extra)
        return str(path)

    def copy_data(self) -> Path:
        copy = self.tmp / "data"
        shutil.copytree(self.data, copy)
        return copy

    def file(self, name: str, content: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content)
        return str(path)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _first(folder: Path) -> Path:
    """The first image of a real identity (not junk -1, not distractor 0)."""
    return next(p for p in sorted(folder.glob("*.jpg")) if int(p.name.split("_")[0]) > 0)


def _query_corrupt(env: Env) -> list[str]:
    root = env.copy_data()
    bad = _first(root / "query")
    _corrupt(bad)
    return ["train", env.config(root=root)]


def _all_train_images_of_one_identity(env: Env) -> list[str]:
    root = env.copy_data()
    pid = _first(root / "bounding_box_train").name.split("_")[0]
    for path in (root / "bounding_box_train").glob(f"{pid}_*.jpg"):
        _corrupt(path)
    return ["train", env.config(root=root)]


def _torchvision_weights_of_another_depth(env: Env) -> list[str]:
    from torchvision.models import resnet34

    path = env.tmp / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    return ["train", env.config(), f"model.pretrained={path}"]


def _plain_safetensors(env: Env) -> list[str]:
    path = env.tmp / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    return ["eval", "--checkpoint", str(path), "data.dataset=folder", f"data.root={env.data}"]


def _gallery_corrupt_eval(env: Env) -> list[str]:
    root = env.copy_data()
    _corrupt(_first(root / "bounding_box_test"))
    return ["eval", "--checkpoint", str(env.checkpoint), "data.dataset=folder", f"data.root={root}"]


def _gallery_truncated_eval_in_a_worker(env: Env) -> list[str]:
    """A JPEG whose header is fine but whose data is cut passes the cheap check and fails in a
    DataLoader worker: the message must still be the reader's own, not the worker wrapper's."""
    root = env.copy_data()
    bad = _first(root / "bounding_box_test")
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    return [
        "eval",
        "--checkpoint",
        str(env.checkpoint),
        "data.dataset=folder",
        f"data.root={root}",
        "--workers",
        "1",
    ]


def _resume_other_backbone(env: Env) -> list[str]:
    run = env.tmp / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copy(env.checkpoint, run / "last.safetensors")
    return ["train", env.config(), "--resume", "model.backbone=resnet34", "optim.epochs=2"]


def _resume_fewer_epochs(env: Env) -> list[str]:
    run = env.tmp / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copy(env.checkpoint, run / "last.safetensors")
    return ["train", env.config(), "--resume"]


def _output_dir_is_a_file(env: Env) -> list[str]:
    (env.tmp / "afile").write_text("x")
    return ["train", env.config(), f"run.output_dir={env.tmp / 'afile'}"]


def _init_from_other_architecture(env: Env) -> list[str]:
    return ["train", env.config(), f"model.init_from={env.checkpoint}", "model.branches=[2,3]"]


# (id, argv builder, message fragment). Every case must exit 1 with exactly that fragment
# in a one-line "rmgl <command>: error: ..." and no traceback.
CASES: list[tuple[str, Callable[[Env], list[str]], str]] = [
    # configs
    (
        "unknown config",
        lambda e: ["train", "nosuch"],
        "config nosuch is neither a file nor a built-in config",
    ),
    (
        "yaml list at top level",
        lambda e: ["train", e.file("l.yaml", b"- 1\n")],
        "top level must be a mapping",
    ),
    ("broken yaml", lambda e: ["train", e.file("b.yaml", b"data: [1,\n")], "not valid YAML"),
    (
        "section given a value",
        lambda e: ["train", e.file("s.yaml", b"data: 5\n")],
        "'data' is a section with keys",
    ),
    (
        "section overridden by a value",
        lambda e: ["train", e.config(), "data=5"],
        "'data' is a section, not a value",
    ),
    (
        "unknown key",
        lambda e: ["train", e.config(), "optim.epoch=2"],
        "did you mean 'optim.epochs'?",
    ),
    (
        "wrong type",
        lambda e: ["train", e.config(), "optim.epochs=abc"],
        "bad value for 'optim.epochs'",
    ),
    (
        "list expected",
        lambda e: ["train", e.config(), "model.branches=2"],
        "'model.branches' must be a list",
    ),
    (
        "zero epochs",
        lambda e: ["train", e.config(), "optim.epochs=0"],
        "optim.epochs=0 must be >= 1",
    ),
    (
        "negative warm-up",
        lambda e: ["train", e.config(), "optim.warmup_epochs=-1"],
        "optim.warmup_epochs=-1.0 must be >= 0",
    ),
    (
        "probability above 1",
        lambda e: ["train", e.config(), "data.augment.flip=2"],
        "a probability in [0, 1]",
    ),
    ("zero size", lambda e: ["train", e.config(), "data.width=0"], "data.width=0 must be > 0"),
    (
        "zero log interval",
        lambda e: ["train", e.config(), "run.log_every=0"],
        "run.log_every=0 must be >= 1",
    ),
    (
        "label smoothing 1",
        lambda e: ["train", e.config(), "loss.label_smoothing=1"],
        "must be in [0, 1)",
    ),
    (
        "bad metric",
        lambda e: ["train", e.config(), "eval.metric=bogus"],
        "eval.metric='bogus' is not one of",
    ),
    (
        "bad backbone",
        lambda e: ["train", e.config(), "model.backbone=resnet7"],
        "model.backbone='resnet7' is not one of",
    ),
    ("bad amp", lambda e: ["train", e.config(), "run.amp=fp8"], "run.amp='fp8' is not one of"),
    (
        "zero test batch",
        lambda e: ["train", e.config(), "data.test_batch_size=0"],
        "data.test_batch_size=0 must be >= 1",
    ),
    (
        "only_rp at output",
        lambda e: ["train", e.config(), "model.only_rp=true", "model.rp_position=output"],
        "only_rp=true needs a receptive partition",
    ),
    ("empty run name", lambda e: ["train", e.config(), "run.name="], "is not a usable run name"),
    (
        "run name escaping",
        lambda e: ["train", e.config(), "run.name=../x"],
        "is not a usable run name",
    ),
    (
        "missing base",
        lambda e: ["train", e.file("c.yaml", b"base: nothere.yaml\n")],
        "config nothere.yaml is neither",
    ),
    (
        "cuda without gpu",
        lambda e: ["train", e.config(), "run.device=cuda"],
        "no CUDA device is available",
    ),
    ("unknown device", lambda e: ["train", e.config(), "run.device=tpu"], "unknown device 'tpu'"),
    (
        "P larger than the identities",
        lambda e: ["train", e.config(), "data.num_identities=100"],
        "at least P=100 identities",
    ),
    # data
    (
        "unknown dataset",
        lambda e: ["train", e.config(), "data.dataset=nosuch"],
        "unknown dataset 'nosuch'",
    ),
    ("missing root", lambda e: ["train", e.config(root=e.tmp / "missing")], "bounding_box_train"),
    ("corrupt query image", _query_corrupt, "query image"),
    (
        "identity with no readable image",
        _all_train_images_of_one_identity,
        "every image of training identity",
    ),
    (
        "data-info on a file",
        lambda e: ["data-info", "folder", "data.root=" + e.file("f.txt", b"x")],
        "bounding_box_train",
    ),
    # weights and checkpoints
    (
        "pretrained missing",
        lambda e: ["train", e.config(), f"model.pretrained={e.tmp / 'no.pth'}"],
        "neither one of",
    ),
    (
        "pretrained random bytes",
        lambda e: [
            "train",
            e.config(),
            f"model.pretrained={e.file('r.pth', bytes(range(256)) * 8)}",
        ],
        "is not readable as a torchvision ResNet state dict",
    ),
    (
        "pretrained empty safetensors",
        lambda e: ["train", e.config(), f"model.pretrained={e.file('e.safetensors', b'')}"],
        "is not readable as a torchvision ResNet state dict",
    ),
    (
        "pretrained another depth",
        _torchvision_weights_of_another_depth,
        "do not fit a torchvision resnet18",
    ),
    (
        "pretrained is an rmgl checkpoint",
        lambda e: ["train", e.config(), f"model.pretrained={e.checkpoint}"],
        "is an rmgl checkpoint, not backbone weights; to start from a trained rmgl model use model.init_from",
    ),
    (
        "init_from random bytes",
        lambda e: ["train", e.config(), f"model.init_from={e.file('x.safetensors', b'garbage')}"],
        "is not a readable rmgl checkpoint",
    ),
    (
        "init_from other architecture",
        _init_from_other_architecture,
        "is another architecture (branches: checkpoint [2] vs config [2, 3])",
    ),
    (
        "eval empty checkpoint",
        lambda e: [
            "eval",
            "--checkpoint",
            e.file("z.safetensors", b""),
            "data.dataset=folder",
            f"data.root={e.data}",
        ],
        "is not a readable rmgl checkpoint",
    ),
    (
        "eval truncated checkpoint",
        lambda e: [
            "eval",
            "--checkpoint",
            e.file("t.safetensors", e.checkpoint.read_bytes()[:5000]),
            "data.dataset=folder",
            f"data.root={e.data}",
        ],
        "is not a readable rmgl checkpoint",
    ),
    (
        "eval torch file",
        lambda e: [
            "eval",
            "--checkpoint",
            e.file("w.pth", b"PK\x03\x04junk"),
            "data.dataset=folder",
            f"data.root={e.data}",
        ],
        "is not a readable rmgl checkpoint",
    ),
    ("eval plain safetensors", _plain_safetensors, "is not an rmgl checkpoint"),
    (
        "eval checkpoint is a folder",
        lambda e: [
            "eval",
            "--checkpoint",
            str(e.tmp),
            "data.dataset=folder",
            f"data.root={e.data}",
        ],
        "is a folder",
    ),
    ("eval corrupt gallery image", _gallery_corrupt_eval, "gallery image"),
    (
        "eval truncated gallery image in a worker",
        _gallery_truncated_eval_in_a_worker,
        "cannot read image",
    ),
    (
        "eval bad batch size",
        lambda e: [
            "eval",
            "--checkpoint",
            str(e.checkpoint),
            "data.dataset=folder",
            f"data.root={e.data}",
            "--batch-size",
            "0",
        ],
        "--batch-size must be >= 1",
    ),
    # runs and outputs
    ("resume without checkpoint", lambda e: ["train", e.config(), "--resume"], "no checkpoint at"),
    (
        "resume with another backbone",
        _resume_other_backbone,
        "model.backbone: resnet18 -> resnet34",
    ),
    ("resume with no epochs left", _resume_fewer_epochs, "already trained 1 epochs"),
    ("output folder is a file", _output_dir_is_a_file, "is a file"),
    (
        "output folder not writable",
        lambda e: ["train", e.config(), "run.output_dir=/proc/rmgl_runs"],
        "cannot",
    ),
    # other commands
    (
        "synth bad scale",
        lambda e: ["synth", "--out", str(e.tmp / "s"), "--scale", "-1"],
        "--scale must be > 0",
    ),
    (
        "synth bad twin fraction",
        lambda e: ["synth", "--out", str(e.tmp / "s"), "--twin-fraction", "2"],
        "--twin-fraction must be in [0, 1]",
    ),
    (
        "rf bad height",
        lambda e: ["rf", "--height", "0"],
        "height, width and stripes must be positive",
    ),
    ("sweep bad seeds", lambda e: ["sweep", e.config(), "--seeds", "0"], "--seeds must be >= 1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line(case, data, checkpoint, tmp_path, capsys, monkeypatch):
    _, build, fragment = case
    monkeypatch.chdir(tmp_path)
    argv = build(Env(tmp_path, data, checkpoint))
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1, f"exit {code}; stderr: {captured.err[-1500:]}"
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"rmgl {argv[0]}: error: "), captured.err[
        -1500:
    ]
    assert fragment in captured.err, captured.err[-1500:]


def test_a_refused_resume_rewrites_nothing(data, checkpoint, tmp_path, capsys):
    env = Env(tmp_path, data, checkpoint)
    argv = _resume_other_backbone(env)
    run = tmp_path / "runs" / "tiny"
    (run / "config.yaml").write_text("what ran\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(argv) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_overwrite_with_an_empty_run_name_never_deletes_the_output_folder(
    data, checkpoint, tmp_path
):
    keep = tmp_path / "runs" / "other" / "last.safetensors"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"precious")
    env = Env(tmp_path, data, checkpoint)
    assert main(["train", env.config(), "run.name=", "--overwrite"]) == 1
    assert keep.read_bytes() == b"precious"


def test_diverging_run_stops_with_the_documented_message(data, tmp_path, capsys):
    env = Env(tmp_path, data, tmp_path)
    code = main(["train", env.config(), "optim.lr=1e12", "optim.warmup_epochs=0", "optim.epochs=2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "rmgl train: error: loss is" in err and "Lower optim.lr" in err


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(data, tmp_path, monkeypatch):
    import errno

    import rmgl.engine.checkpoint as checkpoint_module
    from rmgl.engine import Trainer, load_config

    env = Env(tmp_path, data, tmp_path)
    cfg = load_config(env.config(), ["optim.epochs=2"])
    with Trainer(cfg, progress=False) as trainer:
        trainer.train_epoch(0)
        trainer.save("last", 0)
        good = trainer.record.last.read_bytes()
        real = checkpoint_module.save_file

        def full_disk(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
        with pytest.raises(
            OSError,
            match=r"could not write checkpoint .*last.safetensors \(No space left on device\); the previous last.safetensors is intact",
        ):
            trainer.save("last", 1)
        monkeypatch.setattr(checkpoint_module, "save_file", real)
    assert trainer.record.last.read_bytes() == good
    assert not list(trainer.record.dir.glob("*.tmp")), "the partial file is removed"


def test_leftover_temporary_checkpoints_are_removed_when_a_run_resumes(data, checkpoint, tmp_path):
    env = Env(tmp_path, data, checkpoint)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copy(checkpoint, run / "last.safetensors")
    (run / "last.safetensors.tmp").write_bytes(b"half")
    assert main(["train", env.config(), "--resume", "optim.epochs=2"]) == 0
    assert not (run / "last.safetensors.tmp").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["epoch"] == 2 for r in rows)


def test_genuine_bugs_keep_their_traceback(monkeypatch, capsys):
    import rmgl.cli.model as model_cli

    def broken(args):
        raise KeyError("a bug in rmgl")

    monkeypatch.setattr(model_cli, "run_rf", broken)
    from rmgl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["rf"])
    assert args.func is broken
    with pytest.raises(KeyError):
        main(["rf"])


def test_overrides_may_follow_options_and_unknown_options_are_usage_errors(capsys):
    from rmgl.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "demo", "--bogus"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "unrecognized arguments: --bogus" in err
        and "Traceback" not in err
    )
    assert build_parser().parse_args(["train", "demo", "a=1"]).overrides == ["a=1"]


def test_odd_but_valid_images_train_and_evaluate(data, tmp_path, caplog):
    """Grayscale, palette, RGBA, CMYK, 16-bit, 1x1 and huge-aspect images are all images: they
    are converted to RGB and resized, not rejected."""
    from PIL import Image

    env = Env(tmp_path, data, tmp_path)
    root = env.copy_data()
    train = sorted((root / "bounding_box_train").glob("*.jpg"))
    modes = [
        ("L", ".jpg"),
        ("P", ".png"),
        ("RGBA", ".png"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("1x1", ".png"),
        ("wide", ".png"),
    ]
    for path, (mode, suffix) in zip(train, modes):
        with Image.open(path) as image:
            if mode == "1x1":
                odd = image.convert("RGB").resize((1, 1))
            elif mode == "wide":
                odd = image.convert("RGB").resize((900, 3))
            elif mode == "I;16":
                odd = image.convert("L").convert("I;16")
            else:
                odd = image.convert(mode)
        path.unlink()
        odd.save(path.with_suffix(suffix))
    with caplog.at_level("WARNING"):
        assert main(["train", env.config(root=root)]) == 0
    assert "skipping unreadable" not in caplog.text, "every odd image must be read, not skipped"


class _Payload:
    """Unpickling this would create a file: a stand-in for code in a malicious weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_weights_and_checkpoints_never_run_code(data, checkpoint, tmp_path, capsys):
    import pickle

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}, protocol=2))
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil_zip.pth")
    env = Env(tmp_path, data, checkpoint)
    for path in (evil, tmp_path / "evil_zip.pth"):
        assert main(["train", env.config(), f"model.pretrained={path}"]) == 1
        assert (
            main(["eval", "--checkpoint", str(path), "data.dataset=folder", f"data.root={data}"])
            == 1
        )
        assert main(["train", env.config(), f"model.init_from={path}", "run.name=x"]) == 1
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling ran code"
    assert "Traceback" not in err and err.count("error:") == 6


def _payload_checkpoint(checkpoint: Path, out: Path, marker: Path) -> Path:
    """The real checkpoint with a YAML payload tag in its embedded config: constructing it
    would create ``marker``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata["config"] = (
        f"run_me: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path [{str(marker)!r}]]\n"
        + metadata["config"]
    )
    save_file(load_file(str(checkpoint)), str(out), metadata=metadata)
    return out


def test_a_checkpoint_with_a_yaml_payload_is_one_line_in_every_command(
    data, checkpoint, tmp_path, capsys, monkeypatch
):
    """Issue 25 case 11 / issue 18 item 11: the safe loader refuses the tag where a
    checkpoint's config is parsed (rmgl.engine.checkpoint.load_checkpoint), so every command
    that loads checkpoints says so in one line naming the file, and nothing runs."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"
    evil = _payload_checkpoint(checkpoint, tmp_path / "evil.safetensors", marker)
    env = Env(tmp_path, data, checkpoint)
    image = str(next((data / "query").glob("*.jpg")))
    gallery = tmp_path / "feats"
    gallery.mkdir()
    import numpy as np

    np.save(gallery / "features.npy", np.eye(1, 8, dtype=np.float32))
    (gallery / "images.csv").write_text("index,path,pid,camid,frame\n0,/a.jpg,,,\n")
    (gallery / "extract.json").write_text(
        json.dumps(
            {"format": "rmgl-features-v1", "count": 1, "descriptor_dim": 8, "complete": True}
        )
    )
    assert (
        main(["index", "build", "--features", str(gallery), "--out", str(tmp_path / "g.idx")]) == 0
    )
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    shutil.copy(evil, run / "last.safetensors")
    (tmp_path / "img1").mkdir()
    shutil.copy(image, tmp_path / "img1" / "000001.jpg")
    (tmp_path / "det.txt").write_text("1,-1,0,0,8,16,0.9,-1,-1,-1\n")
    commands = [
        ["eval", "--checkpoint", str(evil), "data.dataset=folder", f"data.root={data}"],
        ["export", "--checkpoint", str(evil), "--format", "weights", "--out", "w.safetensors"],
        ["export", "--checkpoint", str(evil), "--format", "onnx", "--out", "m.onnx"],
        ["extract", "--checkpoint", str(evil), "--images", image, "--out", "f", "--workers", "0"],
        [
            "extract-dets",
            "--checkpoint",
            str(evil),
            "--frames",
            "img1",
            "--dets",
            "det.txt",
            "--out",
            "dets.npy",
        ],
        [
            "search",
            "--index",
            "g.idx",
            "--images",
            image,
            "--checkpoint",
            str(evil),
            "--out",
            "h.json",
        ],
        ["report", "--checkpoint", str(evil), "data.dataset=folder", f"data.root={data}"],
        ["inspect", image, "--checkpoint", str(evil)],
        ["train", env.config(), "--resume", "optim.epochs=2"],
        ["train", env.config(), f"model.init_from={evil}", "run.name=fine"],
    ]
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert "Traceback" not in err and len(errors) == 1, (argv, err[-2000:])
        assert (
            "the stored config is not valid YAML (could not determine a constructor for the tag"
            in err
        ), argv
        assert "evil.safetensors" in err or "last.safetensors" in err, argv
    assert not marker.exists(), "the payload ran"


def test_configs_prints_built_in_configs_and_yaml_configs_only(data, tmp_path, capsys):
    """Issue 25 case 10: a name resolves inside the built-in configs; a path must be a
    YAML file that is a valid config; no other file is ever printed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    not_a_config = tmp_path / "other.yaml"
    not_a_config.write_text("password: hunter2\n")
    (tmp_path / "configs").mkdir()
    valid = tmp_path / "mine.yaml"
    valid.write_text(TINY.format(root=data, out=tmp_path))
    relative = "../" * (len(Path(__file__).resolve().parts) + 3) + str(secret).lstrip("/")
    cases = [
        ("../../../../etc/passwd", "is not a built-in config name and not a .yaml config file"),
        (relative, "is not a built-in config name and not a .yaml config file"),
        (str(secret), "is not a built-in config name and not a .yaml config file"),
        (str(not_a_config), "unknown config key 'password'"),
        ("../market1501", "is neither a file nor a built-in config"),
    ]
    for name, message in cases:
        assert main(["configs", name]) == 1, name
        captured = capsys.readouterr()
        assert message in captured.err and "hunter2" not in captured.out + captured.err, name
        assert "Traceback" not in captured.err
    assert main(["configs", "ablation/2stripe_rp"]) == 0
    assert "rp_position: after_layer1" in capsys.readouterr().out
    assert main(["configs", str(valid), "--source"]) == 0
    assert capsys.readouterr().out == valid.read_text()
