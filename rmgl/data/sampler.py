"""PK sampling: every batch holds P identities x K images, as batch-hard triplet mining needs.

An epoch visits every image of every identity about once: each identity's shuffled images
are cut into groups of K (the last group topped up by resampling that identity, and an
identity with fewer than K images resampled with replacement). Groups are laid out identity
by identity in a random identity order, and batch ``j`` takes the groups at positions
``j, j + B, j + 2B, ...`` (B = number of batches). An identity owns a contiguous run of at
most B positions, so no batch can hold it twice: the P identities are always distinct and
the epoch length is known exactly before the first batch.

With distributed training every rank computes the same plan, the one-process plan for the
global batch of P x world_size identities, and rank ``r`` takes the ``r``-th block of P
identities of every batch. The ranks together train on exactly the batches one process
would draw with that P, so the split of identities between ranks changes with every batch,
any two identities can meet in a batch (and be each other's negatives once the triplet term
gathers the batch), and the number of steps per epoch does not depend on the number of
processes. No communication is needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[int]):
    """Yields dataset indices, P*K per batch; use with ``DataLoader(batch_size=P*K)``.

    Args:
        pids: identity label of every dataset item.
        num_identities: P, identities per batch of this process.
        num_instances: K, images per identity in a batch.
        seed: shuffling seed; combined with the epoch set by :meth:`set_epoch`.
        rank, world_size: under DDP the global batch holds P x world_size identities and
            this process takes the ``rank``-th P of them.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_identities: int = 12,
        num_instances: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_identities < 1 or num_instances < 1:
            raise ValueError(f"P and K must be positive, got P={num_identities}, K={num_instances}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_by_pid[int(pid)].append(index)
        self.pids = sorted(self.index_by_pid)
        self.P, self.K = num_identities, num_instances
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.global_P = num_identities * world_size
        if len(self.pids) < self.global_P:
            shared = f" ({self.P} for each of {world_size} processes)" if world_size > 1 else ""
            raise ValueError(
                f"PK sampling needs at least P={self.global_P} identities{shared}, but the data "
                f"has {len(self.pids)}. Lower P (e.g. data.num_identities)."
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call before each epoch (as with DistributedSampler)."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    # --- the plan of one epoch -------------------------------------------------------------
    def _identity_order(self) -> list[int]:
        """The identities in a seed-dependent order (each epoch permutes it again)."""
        rng = np.random.default_rng([self.seed, 1])
        return [self.pids[i] for i in rng.permutation(len(self.pids))]

    def _num_groups(self, pid: int) -> int:
        return max(1, math.ceil(len(self.index_by_pid[pid]) / self.K))

    def _num_batches(self, pids: list[int]) -> int:
        groups = [self._num_groups(p) for p in pids]
        batches = sum(groups) // self.global_P
        while True:  # an identity may fill at most one group per batch
            capped = sum(min(g, batches) for g in groups) // self.global_P
            if capped == batches:
                return batches
            batches = capped

    def __len__(self) -> int:
        return self.num_batches * self.P * self.K

    @property
    def num_batches(self) -> int:
        """Batches per epoch: the same every epoch, on every rank, for every world size."""
        return self._num_batches(self.pids)

    def __iter__(self) -> Iterator[int]:
        num_batches = self.num_batches
        # one generator for every rank (the plan is global); the trailing 0 keeps the plan
        # of a single process what it has always been
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        order = self._identity_order()
        pids = [order[i] for i in rng.permutation(len(order))]
        layout: list[list[int]] = []
        for pid in pids:
            indices = list(rng.permutation(self.index_by_pid[pid]))
            if len(indices) < self.K:
                indices += list(rng.choice(indices, size=self.K - len(indices), replace=True))
            elif len(indices) % self.K:
                # top up the last group from the other groups' images, never its own
                full = len(indices) - len(indices) % self.K
                indices += list(
                    rng.choice(indices[:full], size=self.K - len(indices) % self.K, replace=False)
                )
            groups = [indices[i : i + self.K] for i in range(0, len(indices), self.K)]
            layout.extend(groups[:num_batches])
        mine = range(self.rank * self.P, (self.rank + 1) * self.P)  # this rank's identity slots
        batches = [
            [index for m in mine for index in layout[j + m * num_batches]]
            for j in range(num_batches)
        ]
        for j in rng.permutation(num_batches):
            yield from (int(i) for i in batches[j])
