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
from safetensors.torch import load_file, save_file

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.engine.config import load_config
from rmgl.engine.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

TINY = """
data: {{dataset: folder, root: {root}, height: 48, width: 16, num_identities: 4, num_instances: 2, workers: {workers}, test_batch_size: 64}}
model: {{backbone: resnet18, pretrained: none, branches: [2], reduction_dim: 32}}
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

    # resumed_from is the checkpoint's 0-based epoch; the records count from 1
    expected = losses_after(tmp_path / "runs" / "full" / "metrics.jsonl", resumed_from + 2)
    got = losses_after(tmp_path / "runs" / "killed" / "metrics.jsonl", resumed_from + 2)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert got[key]["loss"] == expected[key]["loss"], key
        assert got[key]["lr"] == expected[key]["lr"], key
    a = load_file(str(tmp_path / "runs" / "full" / "last.safetensors"))
    b = load_file(str(ckpt))
    for name in a:
        if name.startswith("model."):
            assert torch.equal(a[name], b[name]), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_data, tmp_path, monkeypatch, caplog
):
    config = write_config(tmp_path, tiny_data, epochs=1)
    trainer = Trainer(load_config(config), progress=False)
    trainer.train()
    trainer.close()
    ckpt = tmp_path / "runs" / "tiny" / "last.safetensors"
    # as if the first epoch had run on 2 processes: a resume on another number is said
    with safe_open(str(ckpt), framework="pt") as f:
        metadata = f.metadata()
    state = json.loads(metadata["trainer"])
    assert (state["world_size"], state["nodes"]) == (1, 1)
    metadata["trainer"] = json.dumps({**state, "world_size": 2})
    save_file(load_file(str(ckpt)), str(ckpt), metadata=metadata)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    # the losses are read every 3 iterations: the NaN of iteration 1 stops the run at the
    # read after iteration 3, before anything is written
    cfg = load_config(config, ["optim.epochs=2", "run.log_every=3"])
    with caplog.at_level("WARNING", logger="rmgl"):
        trainer = Trainer(cfg, resume=True, progress=False)
    assert "resumed with 1 process(es) where the checkpoint was trained with 2" in caplog.text
    assert (
        "where the checkpoint was trained with 2"
        in (tmp_path / "runs" / "tiny" / "train.log").read_text()
    )
    launches = (tmp_path / "runs" / "tiny" / "launches.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in launches] == [1, 2]
    assert trainer.iters_per_epoch > 3
    real = trainer.criterion.forward
    calls = []

    def poisoned(output, targets):
        calls.append(1)
        total, terms = real(output, targets)
        return total * float("nan"), terms

    monkeypatch.setattr(trainer.criterion, "forward", poisoned)
    with pytest.raises(
        TrainingDiverged,
        match=r"loss is nan at epoch 2, iteration 1 \(terms: ce/.*\); training stopped at "
        r"iteration 3, where the losses were next read \(every run.log_every=3 iterations\); "
        r"the last good checkpoint .*last.safetensors is kept",
    ):
        trainer.train()
    trainer.close()
    assert len(calls) == 3
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def two_processes(tiny_data, tmp_path_factory):
    """One 2-process gloo launch shared by the DDP tests: the one-step comparison with one
    process, then 2 epochs of training (the reference of the elastic-restart test)."""
    out = tmp_path_factory.mktemp("ddp")
    config = write_config(out, tiny_data, epochs=2)
    port = free_port()
    cmd = torchrun(
        "--nproc-per-node=2",
        f"--master-port={port}",
        "--master-addr=127.0.0.1",
        str(REPO / "tests" / "ddp_worker.py"),
        str(config),
        str(out),
        "--step-check",
    )
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, config


def test_ddp_step_equals_one_process_on_the_global_batch(two_processes):
    """Two gloo processes, each with half of a PK batch (two identities each), give the
    one-process triplet loss and gradients on the whole batch: each anchor mines among the
    gathered global batch, and gradients reach each rank's own features. Without the gather
    (each rank mining among its own two identities) they do not."""
    out, _ = two_processes
    step = json.loads((out / "step.json").read_text())
    one, gathered, per_rank = step["one_process"], step["gathered"], step["per_rank"]
    assert set(one) == set(gathered["losses"]) and any(k.startswith("triplet/") for k in one)
    for key, value in one.items():
        assert gathered["losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert gathered["grad_max_rel_diff"] < 1e-5, gathered
    # the check can fail: mining within each rank changes the triplet terms and gradients
    assert any(
        abs(per_rank["losses"][k] - one[k]) > 1e-3 for k in one if k.startswith("triplet/")
    ), per_rank
    assert per_rank["grad_max_rel_diff"] > 1e-3, per_rank


def test_ddp_two_processes_on_cpu(two_processes, tiny_data, tmp_path):
    out, config = two_processes
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["checksum"] == ranks[1]["checksum"]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) > 0
    # data.num_identities=4 x num_instances=2 is the global batch: 2 identities x 2 images per
    # rank, and the two halves are the batch one process draws with P=4
    single = Trainer(load_config(config, [f"run.output_dir={tmp_path}"]), progress=False)
    single.close()
    assert ranks[0]["iters"] == single.iters_per_epoch
    sampler = single.loader.sampler
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        pids = [single.dataset.train[i].pid for i in indices]
        expected += [pids[j : j + 8] for j in range(0, len(pids), 8)]
    assert [a + b for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])] == expected
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert len(a) == len(b) == 4 and len(set(a)) == len(set(b)) == 2
        assert not set(a) & set(b)
    run = out / "runs" / "tiny"
    assert (run / "last.safetensors").is_file()
    launches = [json.loads(line) for line in (run / "launches.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["nodes"], r["processes"]) for r in launches] == [(1, 1, 2)]


def test_two_nodes_restart_after_a_lost_worker_and_end_as_an_uninterrupted_run(
    two_processes, tiny_data, tmp_path
):
    """Two torchrun node agents on loopback (c10d rendezvous, gloo), one process each,
    --max-restarts=1: rank 1 is killed in the second epoch, both agents restart the group,
    the run resumes from its last checkpoint (--auto-resume) and ends with the weights of
    the uninterrupted 2-process run; launches.jsonl records both launches on 2 nodes."""
    reference, _ = two_processes
    config = write_config(tmp_path, tiny_data, epochs=2)  # the same run, its own folder
    port = free_port()
    nodes = [
        subprocess.Popen(
            torchrun(
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=elastic-test",
                "--max-restarts=1",
                str(REPO / "tests" / "ddp_worker.py"),
                str(config),
                str(tmp_path),
                "--kill-at",
                "1",
                "--auto-resume",
            ),
            env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:  # a hung rendezvous must not outlive the test
            if node.poll() is None:
                node.terminate()
                node.wait(timeout=60)
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    assert (tmp_path / "killed").is_file(), "rank 1 must have been killed once"
    elastic = tmp_path / "runs" / "tiny"
    launches = [json.loads(line) for line in (elastic / "launches.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["resumed"], r["nodes"], r["processes"]) for r in launches] == [
        (1, False, 2, 2),
        (2, True, 2, 2),
    ]
    a = load_file(str(reference / "runs" / "tiny" / "last.safetensors"))
    b = load_file(str(elastic / "last.safetensors"))
    for name in a:
        if name.startswith("model."):
            assert torch.equal(a[name], b[name]), name


def test_restarts_with_torchruns_shared_store_are_refused(monkeypatch):
    """torchrun --max-restarts with the rendezvous store shared with the workers hangs at the
    first restart (pytorch/pytorch#135712): refused at start, naming the fix."""
    from rmgl.engine.runtime import setup_runtime

    for key, value in {
        "WORLD_SIZE": "2",
        "TORCHELASTIC_MAX_RESTARTS": "1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        setup_runtime("cpu")


def test_nodes_with_other_software_are_refused():
    from rmgl.engine.runtime import check_same_software

    same = {"host": "a", "node": 0, "rmgl": "0.1.0", "torch": "2.14.1"}
    assert check_same_software([same, same]) == 1
    assert check_same_software([same, {**same, "host": "b", "node": 1}]) == 2
    with pytest.raises(ValueError, match=r"rank 1 on b \(node 1\) runs torch 2.13.0 but rank 0"):
        check_same_software([same, {**same, "host": "b", "node": 1, "torch": "2.13.0"}])


def test_sync_bn_converts_batchnorm_on_gpu_ranks_and_refuses_cpu_ranks():
    """run.sync_bn: on GPU ranks every BatchNorm becomes a SyncBatchNorm with the same
    parameters, buffers and state-dict names (checkpoints do not change); CPU ranks are
    refused (SyncBatchNorm has no CPU kernel); one process has nothing to synchronise."""
    from types import SimpleNamespace

    from rmgl.engine.runtime import Runtime
    from rmgl.model import RMGLConfig, build_model

    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gpu_rank = SimpleNamespace(runtime=Runtime(1, 2, torch.device("cuda", 1)), is_main=False)
    gpu_rank.device = gpu_rank.runtime.device
    synced = Trainer._sync_batchnorm(gpu_rank, model)
    kinds = {type(m) for m in synced.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    after = synced.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    cpu_rank = SimpleNamespace(runtime=Runtime(1, 2, torch.device("cpu")), is_main=False)
    cpu_rank.device = cpu_rank.runtime.device
    with pytest.raises(ValueError, match="run.sync_bn=true needs GPUs"):
        Trainer._sync_batchnorm(
            cpu_rank, build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4)
        )
    alone = SimpleNamespace(runtime=Runtime(0, 1, torch.device("cpu")), is_main=True)
    plain = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4)
    assert Trainer._sync_batchnorm(alone, plain) is plain


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
        "data.dataset=folder",
        f"data.root={tiny_data}",
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
    assert [(row["epoch"], row["eval"]) for row in curve] == [(1, "plain")]
    assert curve[0]["mAP"] == pytest.approx(results["plain"].mAP)
    assert (tmp_path / "ev" / "cmc.png").is_file() and (
        tmp_path / "ev" / "ranked_list.png"
    ).is_file()


def test_compiled_training_forward(tiny_data, tmp_path, monkeypatch):
    """run.compile=true compiles the training forward with run.compile_mode (here with
    dynamo's eager backend, so the test needs no C++ toolchain): the graph is really
    captured, the losses equal the plain run's, the checkpoint keeps the plain module's
    parameter names, and with reduce-overhead (CUDA graphs) every step is marked as a new
    one, as CUDA graph replays need."""
    real_compile = torch.compile
    compiled = []

    def eager_compile(module, **kwargs):
        compiled.append((module, kwargs))
        return real_compile(module, backend="eager", **kwargs)

    marks = []
    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: count this test's graphs only

    config = write_config(tmp_path, tiny_data, epochs=1, name="default.yaml")
    with Trainer(
        load_config(config, ["run.compile=true", "run.name=default"]), progress=False
    ) as t:
        assert compiled == [(t.model, {"mode": "default"})] and not t.marks_steps
    compiled.clear()
    counts = {}
    for name, flag in (("plain", "false"), ("compiled", "true")):
        config = write_config(tmp_path, tiny_data, epochs=1, name=f"{name}.yaml")
        overrides = [f"run.compile={flag}", "run.compile_mode=reduce-overhead", f"run.name={name}"]
        with Trainer(load_config(config, overrides), progress=False) as trainer:
            trainer.train()
            if flag == "true":
                # the training forward only, once
                assert compiled == [(trainer.model, {"mode": "reduce-overhead"})]
                assert len(marks) == trainer.iters_per_epoch
                counts = dict(torch._dynamo.utils.counters["stats"])
            else:
                assert not marks
    assert counts.get("unique_graphs", 0) >= 1, counts  # dynamo captured the model
    runs = tmp_path / "runs"
    plain, fast = (losses_after(runs / n / "metrics.jsonl", 0) for n in ("plain", "compiled"))
    assert plain.keys() == fast.keys()
    for key in plain:
        assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), key
    keys = [set(load_file(str(runs / n / "last.safetensors"))) for n in ("plain", "compiled")]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def test_training_step_never_waits_for_the_device(
    tiny_data, tmp_path, monkeypatch, one_torch_thread
):
    """The step keeps its losses on the device: the host reads them (one .tolist()) once per
    run.log_every iterations and never in between. Every way a tensor's value reaches the
    host is counted while epochs run; images are decoded in a DataLoader worker, so only the
    training step itself is in this process (less the DataLoader's own seed draw on a CPU
    generator when an epoch's iterator starts)."""
    config = write_config(tmp_path, tiny_data, epochs=2, workers=1)
    reads: list[str] = []
    loader_code = str(Path(torch.utils.data.__file__).parent)

    def counting(name, real):
        def wrapper(*args, **kwargs):
            if not sys._getframe(1).f_code.co_filename.startswith(loader_code):
                reads.append(name)
            return real(*args, **kwargs)

        return wrapper

    with Trainer(load_config(config, ["run.log_every=1000"]), progress=False) as trainer:
        n = trainer.iters_per_epoch
        assert n >= 4
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
            patch.setattr(
                torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize)
            )
            trainer.train_epoch(0)  # one read, at the end of the epoch
            once = list(reads)
            reads.clear()
            trainer.cfg = load_config(config, ["run.log_every=2"])
            trainer.train_epoch(1)  # one read every second iteration
    assert once == ["tolist"], once
    assert reads == ["tolist"] * -(-n // 2), reads
