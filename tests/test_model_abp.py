"""Activation balanced pooling (paper §III-C, Eq. 8-11) against a plain per-sample reference,
and the one-operator-per-head rule of the ABP modes (docs/model.md, "Activation balanced pooling")."""

from __future__ import annotations

import math

import pytest
import torch

from rmgl.model import BranchMaps, RMGLConfig, abp_boundaries, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_boundaries(x: torch.Tensor, stripes: int) -> list[int]:
    """Eq. 8-10 as docs/model.md states them, written as loops over one sample (C, H, W)."""
    channels, height, width = x.shape
    votes = [0] * height
    for c in range(channels):
        best = max(float(v) for v in x[c].flatten())
        if best <= 0:
            continue
        row = next(h for h in range(height) for w in range(width) if float(x[c, h, w]) == best)
        votes[row] += 1
    total = sum(votes)
    if total == 0:
        return [k * height // stripes for k in range(stripes + 1)]
    hx = [0]
    for v in votes:
        hx.append(hx[-1] + v)  # hx[h] = Hx(h), rows 1-based
    bounds = [0]
    for k in range(1, stripes):
        target = math.ceil(k * total / stripes)
        hk = max(h for h in range(height + 1) if hx[h] <= target)
        bounds.append(min(max(hk, bounds[-1] + 1), height - (stripes - k)))
    return bounds + [height]


def reference_pool(x: torch.Tensor, bounds: list[int], mode: str) -> list[torch.Tensor]:
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = x[:, a:b, :]
        out.append(part.mean(dim=(1, 2)) if mode == "avg" else part.amax(dim=(1, 2)))
    return out


def _map_with_votes(rows: list[int], height: int, width: int = 2, extra: int = 0) -> torch.Tensor:
    """A (1, C, H, W) map whose channel c has its single positive peak in row rows[c];
    ``extra`` channels that are never positive follow."""
    x = torch.full((1, len(rows) + extra, height, width), -1.0)
    for c, r in enumerate(rows):
        x[0, c, r, c % width] = 1.0 + c
    if extra:
        x[0, len(rows) :] = 0.0  # maximum exactly 0: not significant, must not vote
    return x


@pytest.mark.parametrize(
    ("rows", "height", "stripes", "expected"),
    [
        ([0, 0, 1, 3, 5, 5], 6, 2, [0, 3, 6]),  # Hx = 2,3,3,4,4,6; ceil(6/2) = 3 -> h1 = 3
        ([0, 0, 1, 3, 5, 5], 6, 3, [0, 1, 5, 6]),  # targets 2 and 4
        ([2, 2, 2, 2, 5, 5], 6, 2, [0, 2, 6]),  # Hx(3) = 4 > 3: the busy row opens stripe 2
        ([5] * 6, 6, 3, [0, 4, 5, 6]),  # all votes at the bottom: clamped to leave rows
        ([0] * 6, 6, 3, [0, 1, 2, 6]),  # all votes at the top: each stripe keeps a row
        # Hx = 0,4,5,6,7,7,8,8; targets 2, 4, 6 -> h = 1, 2, 4 (no clamp needed)
        ([1, 1, 1, 1, 2, 3, 4, 6], 8, 4, [0, 1, 2, 4, 8]),
    ],
)
def test_boundaries_on_constructed_maps(rows, height, stripes, expected):
    x = _map_with_votes(rows, height)
    assert (
        reference_boundaries(x[0], stripes) == expected
    )  # the reference agrees with the hand value
    assert abp_boundaries(x, stripes)[0].tolist() == expected


def test_ties_count_the_first_occurrence_in_row_major_order():
    x = torch.full((1, 4, 6, 2), -1.0)
    x[0, 0, 1, 1] = 5.0  # tie: (row 1, col 1) comes before (row 4, col 0) in row-major order
    x[0, 0, 4, 0] = 5.0
    x[0, 1, 0, 0] = 5.0
    x[0, 2, 0, 1] = 5.0
    x[0, 3, 5, 1] = 5.0
    # votes (1-based rows) 2, 1, 1, 6: Hx = 2, 3, ...; ceil(4/2) = 2 -> h1 = 1
    assert abp_boundaries(x, 2)[0].tolist() == [0, 1, 6]
    x[0, 0, 1, 1] = 4.0  # no tie any more: the vote moves to row 5 (1-based), Hx(4) = 2 -> h1 = 4
    assert abp_boundaries(x, 2)[0].tolist() == [0, 4, 6]


def test_non_positive_channels_do_not_vote():
    only_bottom = _map_with_votes([5, 5], 6)
    with_zeros = _map_with_votes([5, 5], 6, extra=10)  # ten channels whose max is 0, row 0 first
    assert (
        abp_boundaries(with_zeros, 2).tolist()
        == abp_boundaries(only_bottom, 2).tolist()
        == [[0, 5, 6]]
    )
    negative = torch.full((2, 4, 6, 2), -0.5)
    negative[1] = 0.0
    assert abp_boundaries(negative, 3).tolist() == [[0, 2, 4, 6]] * 2  # M = 0: uniform


def _network_abp_pool(x: torch.Tensor, stripes: int, mode: str) -> list[torch.Tensor]:
    """The original path's K stripes of map ``x`` pooled as the network pools them with ABP
    (``Branch.pool``: ABP boundaries, the branch's own pooling operator per stripe)."""
    model = build_model(
        RMGLConfig(
            backbone="resnet18", pretrained="none", branches=[stripes], rp_position="output",
            abp="both", abp_pool=mode, reduction_dim=4,
        ),
        2,
    )  # fmt: skip
    pooled = model.branches[0].pool(BranchMaps(original=x), abp=True)
    return [pooled[f"orig_s{k + 1}"] for k in range(stripes)]


@pytest.mark.parametrize(("height", "stripes"), [(6, 2), (6, 3), (8, 3), (5, 4), (4, 4), (24, 3)])
def test_vectorised_equals_per_sample_loop(height, stripes):
    g = torch.Generator().manual_seed(height * 10 + stripes)
    # small integers give many ties; negative values and dead channels appear as well
    x = torch.randint(-2, 4, (6, 16, height, 3), generator=g).float()
    x[0] = -1.0  # a sample with no significant activation
    x[1, :8] = 0.0
    bounds = abp_boundaries(x, stripes)
    for i in range(x.shape[0]):
        ref = reference_boundaries(x[i], stripes)
        assert bounds[i].tolist() == ref, i
    for mode in ("avg", "max"):
        pooled = _network_abp_pool(x, stripes, mode)
        for i in range(x.shape[0]):
            ref = reference_pool(x[i], reference_boundaries(x[i], stripes), mode)
            for k in range(stripes):
                assert torch.allclose(pooled[k][i], ref[k]), (mode, i, k)


def test_stripes_never_empty_and_cover_the_map():
    g = torch.Generator().manual_seed(0)
    for height in (3, 6, 12, 24):
        for stripes in range(1, min(height, 6) + 1):
            x = torch.relu(torch.randn(32, 8, height, 2, generator=g) * 2 - 1)
            b = abp_boundaries(x, stripes)
            assert (b[:, 0] == 0).all() and (b[:, -1] == height).all()
            assert (b[:, 1:] - b[:, :-1] >= 1).all()


def test_gradient_flows_through_pooled_values_only():
    x = torch.relu(torch.randn(2, 4, 6, 2)).requires_grad_()
    bounds = abp_boundaries(x, 2)
    assert not bounds.requires_grad
    pooled = _network_abp_pool(x, 2, "avg")
    pooled[0].sum().backward()
    for i in range(2):
        rows = int(bounds[i, 1])
        assert torch.allclose(
            x.grad[i, :, :rows], torch.full_like(x.grad[i, :, :rows], 1 / (rows * 2))
        )
        assert (x.grad[i, :, rows:] == 0).all()


def _model(abp: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(RMGLConfig(backbone="resnet18", pretrained="none", abp=abp, **options), 5)


def _features(model: torch.nn.Module, x: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
    """The reduced features by name, in training or eval mode. BatchNorm keeps its running
    statistics in both, so the two modes differ only where the model itself switches."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        if training:
            return model(x).features
        descriptor = model(x)
    return {n: descriptor[:, i * 256 : (i + 1) * 256] for i, n in enumerate(model.feature_names)}


def _by_hand(model: torch.nn.Module, x: torch.Tensor, operator: str, abp: bool) -> dict:
    """Expected orig.s* features: ``operator`` over uniform (or ABP) stripes, computed from
    ``branch_maps`` with plain slicing, then each stripe's own head."""
    expected = {}
    with torch.no_grad():
        for branch, m in zip(model.branches, model.branch_maps(x), strict=True):
            k_total, h = branch.stripes, m.original.shape[2]
            uniform = [k * h // k_total for k in range(k_total + 1)]
            for i in range(x.shape[0]):
                b = reference_boundaries(m.original[i], k_total) if abp else uniform
                for k in range(k_total):
                    part = m.original[i : i + 1, :, b[k] : b[k + 1]]
                    v = part.mean(dim=(2, 3)) if operator == "avg" else part.amax(dim=(2, 3))
                    name = f"b{k_total}.orig.s{k + 1}"
                    expected.setdefault(name, []).append(branch.heads[f"orig_s{k + 1}"](v))
    return {name: torch.cat(rows) for name, rows in expected.items()}


def test_model_pools_original_stripes_with_abp():
    """The orig.s* features are ABP stripes of the original map, each through its own head."""
    model = _model("both").eval()
    x = torch.randn(2, 3, 96, 32)
    got = _features(model, x, training=False)
    for name, expected in _by_hand(model, x, "avg", abp=True).items():
        assert torch.allclose(got[name], expected, atol=1e-6), name


@pytest.mark.parametrize("abp_pool", ["avg", "max"])
def test_abp_train_pools_uniform_stripes_with_the_abp_operator_at_test_time(abp_pool):
    """abp='train': the heads trained on ABP stripes pooled with ``abp_pool`` see, in eval
    mode, uniform stripes pooled with the same ``abp_pool`` (not the model's ``pooling``)."""
    model = _model("train", abp_pool=abp_pool, pooling="max")
    x = torch.randn(2, 3, 96, 32)
    got = _features(model, x, training=False)
    for name, expected in _by_hand(model, x, abp_pool, abp=False).items():
        assert torch.allclose(got[name], expected, atol=1e-6), name
    # and in training mode the same heads see ABP stripes with that operator
    got = _features(model, x, training=True)
    for name, expected in _by_hand(model, x, abp_pool, abp=True).items():
        assert torch.allclose(got[name], expected, atol=1e-6), name


def test_abp_test_pools_uniform_stripes_with_the_abp_operator_in_training():
    model = _model("test", abp_pool="avg", pooling="max")
    x = torch.randn(2, 3, 96, 32)
    got = _features(model, x, training=True)
    for name, expected in _by_hand(model, x, "avg", abp=False).items():
        assert torch.allclose(got[name], expected, atol=1e-6), name
    got = _features(model, x, training=False)
    for name, expected in _by_hand(model, x, "avg", abp=True).items():
        assert torch.allclose(got[name], expected, atol=1e-6), name


def test_each_head_has_one_operator_whatever_the_mode():
    """The stripe heads' operator is ``abp_pool`` unless ABP is off in both modes."""
    for abp, operator in (("off", "max"), ("train", "avg"), ("test", "avg"), ("both", "avg")):
        model = _model(abp, abp_pool="avg", pooling="max")
        for branch in model.branches:
            for part, pool in branch.pools.items():
                assert pool.mode == (operator if part.startswith("orig_s") else "max"), (abp, part)


def test_abp_modes_switch_only_the_original_stripes():
    x = torch.randn(2, 3, 96, 32)
    off, train, test, both = (
        _features(_model(abp), x, training=False) for abp in ("off", "train", "test", "both")
    )
    for name in off:
        assert torch.equal(test[name], both[name]), name  # eval mode: ABP in both
        if ".orig.s" in name:
            assert not torch.equal(off[name], both[name]), name  # max uniform vs avg ABP
            assert not torch.equal(off[name], train[name]), name  # max vs avg, both uniform
        else:
            assert torch.equal(off[name], both[name]) and torch.equal(off[name], train[name])
    # with abp_pool = pooling the operator is the same, so uniform boundaries give 'off' exactly
    off_max = _features(_model("off", pooling="max"), x, training=False)
    train_max = _features(_model("train", abp_pool="max", pooling="max"), x, training=False)
    assert all(torch.equal(off_max[n], train_max[n]) for n in off_max)


def test_nan_maps_give_valid_boundaries_not_an_index_error():
    """A diverging run feeds NaN maps to ABP; the boundaries must stay valid so that the
    trainer's divergence stop (on the loss) is what the user sees."""
    x = torch.rand(3, 8, 12, 4)
    x[0] = float("nan")  # a whole sample
    x[1, :4] = float("nan")  # some channels
    bounds = abp_boundaries(x, 3)
    assert bounds.shape == (3, 4) and (bounds[:, 0] == 0).all() and (bounds[:, -1] == 12).all()
    assert (bounds[:, 1:] > bounds[:, :-1]).all()
    assert bounds[0].tolist() == [0, 4, 8, 12]  # no channel votes: uniform stripes
    torch.testing.assert_close(bounds[1], abp_boundaries(x[1:2, 4:], 3)[0])  # NaN channels ignored
