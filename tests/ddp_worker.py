"""Run under torchrun by tests/test_engine_distributed.py.

    ddp_worker.py CONFIG OUT [--step-check] [--kill-at EPOCH] [trainer options]

``--step-check`` first runs one DDP step of a tiny RMGL model on this rank's half of a fixed
global batch and, on rank 0, the same step in one process on the whole batch, and writes
the differences (``OUT/step.json``). Then the config is trained and every rank dumps what it
saw (per step) and a fingerprint of its parameters (``OUT/rank<R>.json``). ``--kill-at E``
kills rank 1 with SIGKILL at the first step of 0-based epoch E, in the group's first attempt
only (what a lost worker looks like to torchrun). ``--auto-resume`` is the trainer's.
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from rmgl.engine import Callback, Trainer, load_config


class RecordBatches(Callback):
    def __init__(self):
        self.steps: list[list[int]] = []

    def on_step_end(self, trainer, step):
        self.steps.append(step.pids.tolist())


class KillRankOne(Callback):
    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def on_step_end(self, trainer, step):
        if (step.epoch, step.iteration, trainer.rank) == (self.epoch, 0, 1):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 48, 16, generator=generator)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return images, targets


def tiny_model():
    """RMGL on ResNet-18 whose BatchNorm layers use their running statistics: each sample's
    output then depends on that sample only, so one process and two can be compared exactly
    (the batch statistics differ by construction; run.sync_bn is their GPU remedy)."""
    from rmgl.model import RMGLConfig, build_model

    torch.manual_seed(0)
    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def step_check(out: str) -> None:
    from rmgl.engine.runtime import gather_global_batch, setup_runtime
    from rmgl.losses import RMGLLoss

    runtime = setup_runtime("cpu")
    rank, world = runtime.rank, runtime.world_size
    images, targets = global_batch()
    rows = slice(rank * 4, rank * 4 + 4)
    found = {}
    for gathered in (True, False):
        model = tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        criterion = RMGLLoss(gather=gather_global_batch if gathered else None)
        loss, terms = criterion(ddp(images[rows]), targets[rows])
        loss.backward()
        values = torch.stack([loss.detach(), *terms.values()])
        dist.all_reduce(values)  # the mean over the processes is the global batch's value
        found[gathered] = (dict(zip(["loss", *terms], (values / world).tolist())), grads(model))
    if rank == 0:
        model = tiny_model()
        loss, terms = RMGLLoss()(model(images), targets)
        loss.backward()
        one = dict(zip(["loss", *terms], torch.stack([loss.detach(), *terms.values()]).tolist()))
        reference = grads(model)
        scale = float(reference.abs().max())
        result = {"one_process": one}
        for gathered, (losses, g) in found.items():
            key = "gathered" if gathered else "per_rank"
            result[key] = {
                "losses": losses,
                "grad_max_rel_diff": float((g - reference).abs().max()) / scale,
            }
        with open(f"{out}/step.json", "w") as f:
            json.dump(result, f)
    dist.barrier()


def main() -> None:
    config, out, *options = sys.argv[1:]
    if "--step-check" in options:
        step_check(out)
    callbacks = [record := RecordBatches()]
    if "--kill-at" in options:
        epoch = int(options[options.index("--kill-at") + 1])
        callbacks.append(KillRankOne(epoch, os.path.join(out, "killed")))
    resume = "auto" if "--auto-resume" in options else False
    cfg = load_config(config)
    with Trainer(cfg, progress=False, callbacks=callbacks, resume=resume) as trainer:
        trainer.train()
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    with open(f"{out}/rank{trainer.rank}.json", "w") as f:
        json.dump(
            {
                "steps": record.steps,
                "iters": trainer.iters_per_epoch,
                "start_epoch": trainer.start_epoch,
                "params": params.tolist()[:5000],
                "checksum": float(params.sum()),
                "abs": float(params.abs().sum()),
            },
            f,
        )


if __name__ == "__main__":
    main()
