"""Pooling operators: GeM with one learnable p per feature, row-masked pooling, and the
parameters kept out of weight decay (docs/model.md, "Pooling")."""

from __future__ import annotations

import pytest
import torch

from rmgl.losses import RMGLLoss
from rmgl.model import GlobalPool, RMGLConfig, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (96, 32)  # ResNet-18: 24 rows before layer2, 6 rows at the output


def _gem_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    options.setdefault("abp", "off")
    return build_model(
        RMGLConfig(backbone="resnet18", pretrained="none", pooling="gem", **options), 7
    )


def _gem_by_hand(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """(mean over H, W of max(x, eps)^p)^(1/p), one sample and channel at a time."""
    n, c = x.shape[:2]
    out = torch.empty(n, c, dtype=x.dtype)
    for i in range(n):
        for j in range(c):
            values = [max(float(v), eps) ** p for v in x[i, j].flatten()]
            out[i, j] = (sum(values) / len(values)) ** (1 / p)
    return out


def test_gem_matches_its_formula_and_p_one_is_average_pooling():
    x = torch.rand(3, 4, 5, 2, dtype=torch.float64) * 2
    x[0, 0] = 0.0  # clamped to eps, not a NaN from 0^(1/p)
    with torch.no_grad():
        for p in (1.0, 2.5, 3.0):
            assert torch.allclose(GlobalPool("gem", p=p).double()(x), _gem_by_hand(x, p))
        assert torch.allclose(GlobalPool("gem", p=1.0).double()(x), x.mean(dim=(2, 3)), atol=1e-6)


def test_gem_approaches_max_pooling_as_p_grows():
    x = torch.rand(3, 4, 6, 2, dtype=torch.float64) + 0.5
    peak = x.amax(dim=(2, 3))
    # max * (1/HW)^(1/p) <= GeM <= max: the gap closes as p grows
    gaps = []
    for p in (4.0, 32.0, 1024.0):
        with torch.no_grad():
            got = GlobalPool("gem", p=p).double()(x)
        assert (got <= peak + 1e-12).all()
        assert (got >= peak * (1 / 12) ** (1 / p) - 1e-12).all()
        gaps.append(float((peak - got).max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.005 * float(peak.min())


@pytest.mark.parametrize("mode", ["max", "avg", "gem"])
def test_row_mask_pools_only_the_marked_rows_of_each_sample(mode):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 6, 2, generator=g, dtype=torch.float64)
    rows = torch.zeros(4, 6, dtype=torch.bool)
    for i, (a, b) in enumerate([(0, 6), (1, 3), (5, 6), (2, 5)]):
        rows[i, a:b] = True
    pool = GlobalPool(mode).double()
    got = pool(x, rows)
    for i in range(4):
        assert torch.allclose(got[i : i + 1], pool(x[i : i + 1, :, rows[i]]))


def test_every_feature_has_its_own_p():
    model = _gem_model().eval()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert len(names) == len(model.feature_names) == 14
    assert len({params[n].data_ptr() for n in names}) == 14  # 14 separate tensors
    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        before = model(x)
        params["branches.1.pools.rp_s2.p"].fill_(1.5)  # one feature's exponent only
        after = model(x)
    changed = [
        name
        for i, name in enumerate(model.feature_names)
        if not torch.equal(before[:, i * 256 : (i + 1) * 256], after[:, i * 256 : (i + 1) * 256])
    ]
    assert changed == ["b3.rp.s2"]


def test_gradients_reach_every_p():
    model = _gem_model().train()
    out = model(torch.randn(4, 3, *SMALL))
    loss, _ = RMGLLoss()(out, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    params = dict(model.named_parameters())
    for name in model.no_weight_decay():
        grad = params[name].grad
        assert grad is not None and grad.abs() > 0, name


def test_no_weight_decay_lists_exactly_the_gem_exponents():
    model = _gem_model()
    expected = {
        f"branches.{b}.pools.{part}.p"
        for b, branch in enumerate(model.branches)
        for part in branch.heads
    }
    assert model.no_weight_decay() == expected
    assert expected == {n for n, _ in model.named_parameters() if n.endswith(".p")}
    # with ABP the original stripes are pooled with abp_pool (no exponent), the rest with GeM
    with_abp = _gem_model(abp="both", abp_pool="avg")
    assert with_abp.no_weight_decay() == {n for n in expected if ".orig_s" not in n}
    plain = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 7)
    assert plain.no_weight_decay() == set()
