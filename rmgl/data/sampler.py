"""PK sampling: every batch holds P identities x K images, as batch-hard triplet mining needs.

An epoch visits every image of every identity about once: each identity's shuffled images
are cut into groups of K (the last group topped up by resampling that identity, and an
identity with fewer than K images resampled with replacement). Groups are laid out identity
by identity in a random identity order, and batch ``j`` takes the groups at positions
``j, j + B, j + 2B, ...`` (B = number of batches). An identity owns a contiguous run of at
most B positions, so no batch can hold it twice: the P identities are always distinct and
the epoch length is known exactly before the first batch.

With distributed training, the identities are split between ranks (disjoint, drawn from the
shared seed) and every rank computes every rank's batch count, keeping the smallest, so all
ranks run the same number of steps, every epoch, without communicating.
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
        num_identities: P, identities per batch.
        num_instances: K, images per identity in a batch.
        seed: shuffling seed; combined with the epoch set by :meth:`set_epoch`.
        rank, world_size: this process's share of the identities under DDP.
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
        per_rank = len(self.pids) // world_size
        if per_rank < self.P:
            raise ValueError(
                f"PK sampling needs at least P={self.P} identities per process, but {len(self.pids)} "
                f"identities shared by {world_size} process(es) leave {per_rank}. Lower P "
                "(e.g. data.num_identities) or use fewer processes."
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call before each epoch (as with DistributedSampler)."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    # --- the plan of one epoch -------------------------------------------------------------
    def _rank_pids(self) -> list[list[int]]:
        """Disjoint identity lists, one per rank. The split depends on the seed only, so every
        epoch has the same length (the LR schedule counts iterations)."""
        order = [
            self.pids[i] for i in np.random.default_rng([self.seed, 1]).permutation(len(self.pids))
        ]
        return [order[r :: self.world_size] for r in range(self.world_size)]

    def _num_groups(self, pid: int) -> int:
        return max(1, math.ceil(len(self.index_by_pid[pid]) / self.K))

    def _num_batches(self, rank_pids: list[int]) -> int:
        groups = [self._num_groups(p) for p in rank_pids]
        batches = sum(groups) // self.P
        while True:  # an identity may fill at most one group per batch
            capped = sum(min(g, batches) for g in groups) // self.P
            if capped == batches:
                return batches
            batches = capped

    def __len__(self) -> int:
        return self.num_batches * self.P * self.K

    @property
    def num_batches(self) -> int:
        return min(self._num_batches(p) for p in self._rank_pids())

    def __iter__(self) -> Iterator[int]:
        num_batches = self.num_batches
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        mine = self._rank_pids()[self.rank]
        pids = [mine[i] for i in rng.permutation(len(mine))]
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
        batches = [
            [index for m in range(self.P) for index in layout[j + m * num_batches]]
            for j in range(num_batches)
        ]
        for j in rng.permutation(num_batches):
            yield from (int(i) for i in batches[j])
