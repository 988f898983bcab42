"""LR schedule (§IV-A; choices the paper leaves open in docs/model.md) and checkpoints (atomic, no pickle, clear incompatibility errors)."""

import math

import pytest
import torch
from torch import nn

from rmgl.engine.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_weights,
    optimizer_state,
    save_checkpoint,
)
from rmgl.engine.config import load_config
from rmgl.engine.schedule import build_scheduler, lr_factor, parameter_groups


def test_warmup_is_exponential_from_1e5_then_steps():
    cfg = load_config().optim
    ipe = 10

    def lr(it):
        return cfg.lr * lr_factor(
            it, ipe, cfg.lr, cfg.warmup_epochs, cfg.warmup_start_lr, list(cfg.milestones), cfg.gamma
        )

    assert lr(0) == pytest.approx(1e-5)
    assert lr(15) == pytest.approx(math.sqrt(1e-5 * 1e-2))  # halfway through 30 warm-up iterations
    assert lr(30) == pytest.approx(0.01) and lr(299) == pytest.approx(0.01)
    assert lr(300) == pytest.approx(0.001) and lr(499) == pytest.approx(0.001)
    assert lr(500) == pytest.approx(0.0001) and lr(599) == pytest.approx(0.0001)
    ratios = [lr(i + 1) / lr(i) for i in range(29)]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.heads = nn.ModuleDict(
            {
                "g": nn.ModuleDict(
                    {"reduction": nn.Linear(4, 2), "classifier": nn.Linear(2, classes)}
                )
            }
        )


def test_heads_get_ten_times_the_rate_through_the_schedule():
    model = Tiny()
    cfg = load_config().optim
    opt = torch.optim.SGD(
        parameter_groups(model, cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=0.9
    )
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    sched = build_scheduler(opt, 10, cfg)
    for _ in range(40):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and opt.param_groups[1][
        "lr"
    ] == pytest.approx(0.1)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model.heads["g"]["classifier"](
        model.heads["g"]["reduction"](model.body(torch.randn(5, 4)))
    ).sum()
    loss.backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "last.safetensors", model, "run:\n  name: x\n", {"epoch": 4}, opt
    )
    assert not list(tmp_path.glob("*.tmp"))
    ckpt = load_checkpoint(path)
    assert ckpt.trainer["epoch"] == 4 and "name: x" in ckpt.config_yaml
    fresh = Tiny()
    fresh.load_state_dict(check_compatible(fresh, ckpt.model_state()))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(optimizer_state(ckpt))
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(s1["momentum_buffer"], s2["momentum_buffer"])


def test_incompatible_checkpoints_are_explained(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", Tiny(classes=3), "")
    state = load_checkpoint(path).model_state()
    with pytest.raises(ValueError, match="(?s)shape mismatch.*classifier.*drop_classifiers"):
        check_compatible(Tiny(classes=5), state)
    assert "heads.g.classifier.weight" not in check_compatible(
        Tiny(classes=5), state, drop_classifiers=True
    )
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="(?s)missing from checkpoint"):
        check_compatible(other, state)


def test_plain_weights_files(tmp_path):
    model = Tiny()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_weights(tmp_path / "w.pth")
    assert set(loaded) == set(model.state_dict())
    torch.save({"evil": object()}, tmp_path / "pickle.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_weights(tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="not an rmgl checkpoint"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_checkpoint(tmp_path / "plain.safetensors")


# A checkpoint written onto a small real filesystem: first one that fits, then one that
# does not. Run in a private mount namespace (unshare), so that the tmpfs is nobody else's.
FULL_DISK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from rmgl.engine.checkpoint import save_checkpoint

folder = Path(sys.argv[1])
small = save_checkpoint(folder / "last.safetensors", torch.nn.Linear(8, 8), "run: {}\\n")
before = small.read_bytes()
try:
    save_checkpoint(folder / "last.safetensors", torch.nn.Linear(1000, 1000), "run: {}\\n")
    error = None
except Exception as err:
    error = {"type": type(err).__name__, "message": str(err)}
print(json.dumps({
    "error": error,
    "intact": small.read_bytes() == before,
    "files": sorted(p.name for p in folder.iterdir()),
}))
"""


def _in_private_tmpfs(folder, size_kb: int, argv: list[str]):
    """Run ``argv`` (which gets the mount point as its last argument) with a tmpfs of
    ``size_kb`` mounted on ``folder`` in a private user + mount namespace; None when this
    machine does not allow such namespaces."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    script = (
        f'mount -t tmpfs -o size={size_kb}k tmpfs "$1" && echo mounted >&2 && shift && exec "$@"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", str(folder), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done if "mounted" in done.stderr.splitlines()[:1] else None


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """safetensors raises its own SafetensorError for "No space left on device", which is not
    an OSError: it must still become the one-line OSError, with the previous file intact."""
    import json
    import sys
    from pathlib import Path

    folder = tmp_path / "disk"
    folder.mkdir()
    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    command = ["env", "OMP_NUM_THREADS=1", f"PYTHONPATH={repo}", sys.executable, str(script)]
    done = _in_private_tmpfs(folder, 256, [*command, str(folder)])
    if done is None:
        pytest.skip("this machine allows no private mount namespace (unshare) for a tmpfs")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"]["type"] == "OSError", result
    assert (
        "(No space left on device); the previous last.safetensors is intact"
        in (result["error"]["message"])
    )
    assert "\n" not in result["error"]["message"]
    assert result["intact"] and result["files"] == ["last.safetensors"]  # no partial file left


def test_safetensors_own_write_error_becomes_a_one_line_os_error(tmp_path, monkeypatch):
    """The same failure where no tmpfs can be mounted: the library's real exception type,
    with its real wording, raised by the writer."""
    from safetensors import SafetensorError

    import rmgl.engine.checkpoint as checkpoint_module

    path = save_checkpoint(tmp_path / "last.safetensors", nn.Linear(4, 4), "")
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(
        OSError,
        match=r"could not write checkpoint .*last.safetensors \(No space left on device\); "
        "the previous last.safetensors is intact",
    ):
        save_checkpoint(path, nn.Linear(4, 4), "")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
