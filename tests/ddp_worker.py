"""Run under torchrun by tests/test_engine_train.py: one epoch of DDP training, then dump what
this rank saw (per step) and a fingerprint of its parameters."""

import json
import sys

import torch

from rmgl.engine import Callback, Trainer, load_config


class RecordBatches(Callback):
    def __init__(self):
        self.steps: list[list[int]] = []

    def on_step_end(self, trainer, step):
        self.steps.append(step.pids.tolist())


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    record = RecordBatches()
    with Trainer(load_config(config), progress=False, callbacks=[record]) as trainer:
        trainer.train()
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    with open(f"{out}/rank{trainer.rank}.json", "w") as f:
        json.dump(
            {
                "steps": record.steps,
                "iters": trainer.iters_per_epoch,
                "params": params.tolist()[:5000],
                "checksum": float(params.sum()),
                "abs": float(params.abs().sum()),
            },
            f,
        )


if __name__ == "__main__":
    main()
