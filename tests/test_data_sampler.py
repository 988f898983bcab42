"""PK sampler: batch structure, exact epoch length, reproducibility, DDP partition, errors."""

from collections import Counter

import numpy as np
import pytest

from rmgl.data.sampler import PKSampler


def uneven_pids(num_ids=40, seed=0):
    counts = np.random.default_rng(seed).integers(1, 25, size=num_ids)  # some ids have < K images
    return np.repeat(np.arange(num_ids), counts)


def batches(sampler, P, K):
    indices = list(sampler)
    assert len(indices) == len(sampler), "len() must be the exact number of indices yielded"
    assert len(indices) % (P * K) == 0
    return np.array(indices).reshape(-1, P * K)


@pytest.mark.parametrize("P,K", [(12, 4), (5, 2), (8, 6)])
def test_every_batch_is_p_distinct_ids_times_k(P, K):
    pids = uneven_pids()
    sampler = PKSampler(pids, P, K, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in batches(sampler, P, K):
            counts = Counter(pids[batch].tolist())
            assert len(counts) == P and set(counts.values()) == {K}


def test_epoch_covers_the_data():
    pids = uneven_pids()
    P, K = 6, 4
    sampler = PKSampler(pids, P, K)
    seen = set(np.asarray(list(sampler)).tolist())
    groups = sum(max(1, -(-c // K)) for c in np.bincount(pids))
    # all groups but at most P - 1 are used, so nearly every image is visited each epoch
    assert len(sampler) >= (groups - P + 1) * K
    assert len(seen) >= 0.85 * len(pids)


def test_reproducible_and_epoch_dependent():
    pids = uneven_pids()
    a, b = PKSampler(pids, 8, 4, seed=7), PKSampler(pids, 8, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PKSampler(pids, 8, 4, seed=8)) != first
    state = a.state_dict()
    c = PKSampler(pids, 8, 4)
    c.load_state_dict(state)
    assert list(c) == list(a)


def test_identity_with_fewer_than_k_images_is_resampled():
    pids = np.array([0] + [1] * 4 + [2] * 4 + [3] * 4)  # id 0 has one image
    sampler = PKSampler(pids, 4, 4)
    (batch,) = batches(sampler, 4, 4)
    assert Counter(batch.tolist())[0] == 4  # the single image of id 0, four times


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_together_draw_the_one_process_batches(world_size):
    """Rank r's batch j is the r-th block of P identities of the batch j one process draws
    with P x world_size identities: the global batches are the same whatever the number of
    processes, every epoch."""
    pids = uneven_pids(num_ids=60, seed=2)
    P, K = 4, 4
    single = PKSampler(pids, P * world_size, K, seed=5)
    for epoch in range(3):
        single.set_epoch(epoch)
        expected = batches(single, P * world_size, K)
        per_rank = []
        for rank in range(world_size):
            sampler = PKSampler(pids, P, K, seed=5, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            per_rank.append(batches(sampler, P, K))
        assert len({len(b) for b in per_rank}) == 1, "every rank must run the same number of steps"
        assert np.array_equal(np.concatenate(per_rank, axis=1), expected)
        for step in range(len(expected)):
            ids = [set(pids[b[step]].tolist()) for b in per_rank]
            assert all(len(s) == P for s in ids) and len(set().union(*ids)) == P * world_size


def test_ddp_identity_split_changes_between_batches_and_epochs():
    """Identities are not tied to one rank (a fixed split gives every identity one rank for
    the whole run): within four epochs nearly every identity is drawn by both ranks."""
    pids = np.repeat(np.arange(40), 8)
    on_rank = [set(), set()]
    for rank in (0, 1):
        sampler = PKSampler(pids, 6, 4, seed=0, rank=rank, world_size=2)
        for epoch in range(4):
            sampler.set_epoch(epoch)
            on_rank[rank] |= set(pids[batches(sampler, 6, 4).ravel()].tolist())
    assert len(on_rank[0] & on_rank[1]) >= 30, len(on_rank[0] & on_rank[1])


def test_ddp_epoch_length_is_the_same_every_epoch():
    pids = uneven_pids(num_ids=60, seed=3)
    sampler = PKSampler(pids, 6, 4, seed=1, rank=1, world_size=2)
    lengths = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        lengths.add(len(sampler))
        assert len(list(sampler)) == len(sampler)
    assert len(lengths) == 1  # the LR schedule counts iterations per epoch
    assert sampler.num_batches == PKSampler(pids, 12, 4, seed=1).num_batches


def test_groups_hold_distinct_images_when_the_identity_has_enough():
    pids = np.repeat(np.arange(8), [5, 6, 7, 9, 4, 5, 6, 7])
    sampler = PKSampler(pids, 4, 4)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in batches(sampler, 4, 4):
            for group in batch.reshape(4, 4):
                assert len(set(group.tolist())) == 4


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match="at least P=12 identities, but the data has 10"):
        PKSampler(np.arange(10), 12, 4)
    with pytest.raises(ValueError, match="P=24 identities \\(12 for each of 2 processes\\)"):
        PKSampler(np.repeat(np.arange(20), 4), 12, 4, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        PKSampler(np.arange(40), 4, 4, rank=2, world_size=2)
