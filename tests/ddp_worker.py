"""Run under torchrun by tests/test_engine_train.py: one epoch of DDP training, then dump what
this rank saw and a fingerprint of its parameters."""

import json
import sys

import torch

from rmgl.engine.config import load_config
from rmgl.engine.trainer import Trainer


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    seen: list[int] = []
    trainer = Trainer(load_config(config), progress=False, batch_hook=lambda pids: seen.extend(pids.tolist()))
    trainer.train()
    trainer.close()
    params = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    with open(f"{out}/rank{trainer.rank}.json", "w") as f:
        json.dump({"pids": sorted(set(seen)), "batches": len(seen), "params": params.tolist()[:5000],
                   "checksum": float(params.sum()), "abs": float(params.abs().sum())}, f)


if __name__ == "__main__":
    main()
