"""Training end to end on a tiny synthetic benchmark: exact resume after a kill, NaN stop,
2-process DDP on CPU, and evaluation of a checkpoint with `rmgl eval`."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.engine.config import load_config
from rmgl.engine.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

TINY = """
data: {{dataset: folder, root: {root}, height: 48, width: 16, num_identities: 4, num_instances: 2, workers: {workers}, test_batch_size: 64}}
model: {{backbone: resnet18, pretrained: none, branches: [2, 3]}}
optim: {{epochs: {epochs}, warmup_epochs: 1, milestones: [2], lr: 0.02}}
eval: {{every: 0, rerank: false}}
run: {{name: tiny, output_dir: {out}, log_every: 1}}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_synth")
    generate(
        SynthConfig(
            seed=4,
            train_ids=8,
            test_ids=6,
            distractors=4,
            junk=2,
            cameras_per_id=(2, 3),
            images_per_camera=(2, 3),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


def write_config(tmp_path, root, epochs=3, workers=0, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(TINY.format(root=root, out=tmp_path / "runs", epochs=epochs, workers=workers))
    return path


def rmgl(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "rmgl.cli", *args],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def checkpoint_epoch(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["trainer"])["epoch"]
    except Exception:
        return -1


def losses_after(metrics: Path, first_epoch: int) -> dict:
    rows = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row["epoch"] >= first_epoch:
            rows[(row["epoch"], row["iter"])] = row  # a resumed run's rows replace the killed run's
    return rows


def test_resume_after_kill_equals_uninterrupted_run(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, epochs=3, workers=1)
    full = rmgl("train", str(config), "run.name=full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    killed = rmgl("train", str(config), "run.name=killed")
    ckpt = tmp_path / "runs" / "killed" / "last.safetensors"
    deadline = time.time() + 300
    while checkpoint_epoch(ckpt) < 0 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    resumed_from = checkpoint_epoch(ckpt)
    assert 0 <= resumed_from < 2, "the run must be killed before its last epoch"

    resumed = rmgl("train", str(config), "run.name=killed", "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert (
        f"resumed from {ckpt} at epoch {resumed_from + 2}"
        in (tmp_path / "runs" / "killed" / "train.log").read_text()
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == len({(r["epoch"], r["iter"]) for r in rows}), (
        "the interrupted epoch's rows are dropped"
    )

    expected = losses_after(tmp_path / "runs" / "full" / "metrics.jsonl", resumed_from + 1)
    got = losses_after(tmp_path / "runs" / "killed" / "metrics.jsonl", resumed_from + 1)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert got[key]["loss"] == expected[key]["loss"], key
        assert got[key]["lr"] == expected[key]["lr"], key
    a = load_file(str(tmp_path / "runs" / "full" / "last.safetensors"))
    b = load_file(str(ckpt))
    for name in a:
        if name.startswith("model."):
            assert torch.equal(a[name], b[name]), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    config = write_config(tmp_path, tiny_data, epochs=1)
    trainer = Trainer(load_config(config), progress=False)
    trainer.train()
    trainer.close()
    ckpt = tmp_path / "runs" / "tiny" / "last.safetensors"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    trainer = Trainer(load_config(config, ["optim.epochs=2"]), resume=True, progress=False)
    real = trainer.criterion.forward

    def poisoned(output, targets):
        total, terms = real(output, targets)
        return total * float("nan"), terms

    monkeypatch.setattr(trainer.criterion, "forward", poisoned)
    with pytest.raises(
        TrainingDiverged,
        match=r"loss is nan \(on this rank\) at epoch 2, iteration 1.*last good checkpoint",
    ):
        trainer.train()
    trainer.close()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_ddp_two_processes_on_cpu(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        str(REPO / "tests" / "ddp_worker.py"),
        str(config),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["checksum"] == ranks[1]["checksum"]
    seen = [{p for step in rank["steps"] for p in step} for rank in ranks]
    assert not seen[0] & seen[1], "ranks must see disjoint identities"
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) > 0
    # data.num_identities=4 x num_instances=2 is the global batch: 2 identities x 2 images per rank
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert len(a) == len(b) == 4 and len(set(a)) == len(set(b)) == 2
        assert len(set(a) | set(b)) == 4
    # the same number of steps per epoch as one process with P=4 (the LR schedule is per step)
    single = Trainer(load_config(config, ["run.name=single"]), progress=False)
    single.close()
    assert ranks[0]["iters"] == single.iters_per_epoch
    assert (tmp_path / "runs" / "tiny" / "last.safetensors").is_file()


def test_ddp_global_batch_must_divide(tiny_data, tmp_path):
    from rmgl.engine.trainer import identities_per_rank

    assert identities_per_rank(12, 2) == 6
    with pytest.raises(ValueError, match="does not divide among 2 processes"):
        identities_per_rank(5, 2)


def test_existing_run_is_not_silently_overwritten(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, epochs=1)
    Trainer(load_config(config), progress=False).close()
    (tmp_path / "runs" / "tiny" / "last.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(load_config(config), progress=False)
    Trainer(load_config(config), progress=False, overwrite=True).close()
    assert not (tmp_path / "runs" / "tiny" / "last.safetensors").exists()


def test_eval_command_on_a_checkpoint(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, epochs=1)
    trainer = Trainer(load_config(config, ["eval.every=1"]), progress=False)
    results = trainer.train()
    trainer.close()
    assert 0.0 <= results["plain"].mAP <= 1.0
    run = tmp_path / "runs" / "tiny"
    assert (run / "best.safetensors").is_file() and (run / "eval" / "ranked_list.png").is_file()
    assert any((run / "tensorboard").iterdir())
    proc = rmgl(
        "eval",
        "--checkpoint",
        str(run / "best.safetensors"),
        "--dataset",
        "folder",
        "--root",
        str(tiny_data),
        "--rerank",
        "--out",
        str(tmp_path / "ev"),
        "--workers",
        "0",
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(saved["results"]) == {"plain", "rerank"}
    assert saved["results"]["plain"]["mAP"] == pytest.approx(results["plain"].mAP, abs=1e-6)
    provenance = saved["provenance"]
    assert provenance["checkpoint"] == str((run / "best.safetensors").resolve())
    assert provenance["root"] == str(tiny_data) and provenance["dataset"] == "folder"
    assert provenance["protocol"] == "cross_camera" and provenance["precision"] == "float32"
    # the learning curve: one row per evaluation
    curve = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["eval"]) for row in curve] == [(0, "plain")]
    assert curve[0]["mAP"] == pytest.approx(results["plain"].mAP)
    assert (tmp_path / "ev" / "cmc.png").is_file() and (
        tmp_path / "ev" / "ranked_list.png"
    ).is_file()


def test_compiled_training_forward(tiny_data, tmp_path, monkeypatch):
    """run.compile=true compiles the training forward (here with dynamo's eager backend, so
    the test needs no C++ toolchain): the graph is really captured, the losses equal the
    plain run's, and the checkpoint keeps the plain module's parameter names."""
    real_compile = torch.compile
    compiled = []

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: count this test's graphs only
    counts = {}
    for name, flag in (("plain", "false"), ("compiled", "true")):
        config = write_config(tmp_path, tiny_data, epochs=1, name=f"{name}.yaml")
        cfg = load_config(config, [f"run.compile={flag}", f"run.name={name}"])
        with Trainer(cfg, progress=False) as trainer:
            trainer.train()
            if flag == "true":
                assert compiled == [trainer.model]  # the training forward only, once
                counts = dict(torch._dynamo.utils.counters["stats"])
    assert counts.get("unique_graphs", 0) >= 1, counts  # dynamo captured the model
    runs = tmp_path / "runs"
    plain, fast = (losses_after(runs / n / "metrics.jsonl", 0) for n in ("plain", "compiled"))
    assert plain.keys() == fast.keys()
    for key in plain:
        assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), key
    keys = [set(load_file(str(runs / n / "last.safetensors"))) for n in ("plain", "compiled")]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])
