"""Where a run executes: the device, the DDP process group, seeds and numeric precision.

Kept apart from the training loop so that evaluation, feature extraction and tools built on
rmgl choose devices and precision by the same rules as training.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Runtime:
    """This process's place in a run: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run record and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime(device_name: str = "auto") -> Runtime:
    """The runtime of this process, initialising the process group under ``torchrun``.

    The device is chosen before the process group exists, so NCCL knows it; the timeout is
    long because ranks wait while rank 0 evaluates (MSMT17 with re-ranking takes minutes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world)
    if world == 1:
        return Runtime(0, 1, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return Runtime(dist.get_rank(), world, device)


def resolve_device(name: str = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` is the GPU when there is one; under DDP each rank takes its LOCAL_RANK GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name} was asked for but no CUDA device is available; use cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if world_size > 1 and name != "cpu":
        raise ValueError(
            f"under torchrun use run.device=auto, cuda or cpu (each rank takes its LOCAL_RANK "
            f"GPU), not {name}"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Every (run seed, rank, epoch) gets its own generator state, so an epoch draws the same
    augmentations whether the run was interrupted before it or not, on every rank."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def amp_dtype(amp: str, device: torch.device, evaluation: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``run.amp``, or None for full float32.

    ``auto`` trains in bf16 on a GPU and in float32 on the CPU, and always *evaluates* in
    float32: reduced precision creates ties between channel maxima, which moves ABP
    boundaries and so the descriptors. Evaluating in bf16/fp16 must be asked for explicitly.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"run.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and (evaluation or device.type != "cuda")):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("run.amp=fp16 needs a GPU; use bf16 or off on the CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``; a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
