"""Where a run executes: the device, the DDP process group, seeds and numeric precision.

Kept apart from the training loop so that evaluation, feature extraction and tools built on
rmgl choose devices and precision by the same rules as training.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Runtime:
    """This process's place in a run: its rank, the number of processes, its device, the
    number of nodes (machines) and, under ``torchrun --max-restarts``, how many times the
    group has been restarted."""

    rank: int
    world_size: int
    device: torch.device
    nodes: int = 1
    restart: int = 0

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
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    device = resolve_device(device_name, local_rank, world)
    if world == 1:
        return Runtime(0, 1, device, restart=restart)
    check_restartable_launch()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(hours=2))
        except (RuntimeError, ValueError) as err:  # torch's DistNetworkError is a RuntimeError
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(
                f"could not form the process group at {where} ({reason}); if the port is in use, "
                "give torchrun another --master-port or --rdzv-endpoint port"
            ) from None
    peers = [None] * world
    dist.all_gather_object(peers, describe_process())
    return Runtime(
        dist.get_rank(), world, device, nodes=check_same_software(peers), restart=restart
    )


def check_restartable_launch() -> None:
    """Refuse ``torchrun --max-restarts`` while torchrun shares its rendezvous store with the
    workers (its default): a restarted group then reads the previous group's addresses from
    that store and its processes wait for each other forever (pytorch/pytorch#135712).
    Better one line now than a hang at the first restart."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError(
            f"torchrun --max-restarts={restarts} needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            "torchrun's environment: with the shared rendezvous store a restarted group can hang "
            "(pytorch/pytorch#135712). Run: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ..."
        )


def describe_process() -> dict:
    """What every process tells the others when the group forms: where it runs and the
    software it runs."""
    import rmgl

    return {
        "host": socket.gethostname(),
        "node": int(os.environ.get("GROUP_RANK", "0")),
        "rmgl": rmgl.__version__,
        "torch": torch.__version__,
    }


def check_same_software(peers: list[dict]) -> int:
    """The number of nodes among ``peers`` (one :func:`describe_process` per rank), after
    checking that every rank runs rank 0's rmgl and torch: a node with other versions would
    train differently (or hang in a collective), so the run stops on every rank at once.

    Examples::

        >>> same = {"host": "a", "node": 0, "rmgl": "0.1.0", "torch": "2.14.1"}
        >>> check_same_software([same, {**same, "host": "b", "node": 1}])
        2
    """
    first = peers[0]
    for rank, peer in enumerate(peers):
        for key in ("rmgl", "torch"):
            if peer[key] != first[key]:
                raise ValueError(
                    f"rank {rank} on {peer['host']} (node {peer['node']}) runs {key} {peer[key]} "
                    f"but rank 0 on {first['host']} runs {key} {first[key]}; install the same "
                    "rmgl and torch on every node"
                )
    return len({(peer["host"], peer["node"]) for peer in peers})


class _GatherRows(torch.autograd.Function):
    """``all_gather`` of equal-sized row blocks whose backward hands every process the
    gradient of its own rows, summed over the processes (each process's loss uses every
    row). torch's own ``torch.distributed.nn.functional.all_gather`` does the same but is
    deprecated, and its replacement is not public."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        ctx.start, ctx.count = dist.get_rank() * rows.shape[0], rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.count]


def gather_global_batch(rows: Tensor) -> tuple[Tensor, int]:
    """Every process's ``rows`` concatenated in rank order (the global batch) and where this
    process's own rows start. Every process must pass the same number of rows (a PK batch
    does). Gradients flow back to each process's own rows."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows, 0
    return _GatherRows.apply(rows), dist.get_rank() * rows.shape[0]


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
