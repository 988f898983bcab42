"""Study switches of the loss (docs/model.md, section 7): CE and triplet reductions over the
heads. The default (sum) is Eq. 4 exactly, as before."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from rmgl.engine import ConfigError, load_config
from rmgl.losses import RMGLLoss
from rmgl.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (48, 16)  # ResNet-18: 12 rows before layer2, a 3x1 final map
PIDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _model(**options) -> nn.Module:
    torch.manual_seed(0)
    options.setdefault("backbone", "resnet18")
    return build_model(7, pretrained="none", **options)


def _images(n: int = 8, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.ce_reduction=avg"], "loss.ce_reduction='avg' is not one of: sum, mean"),
    (["loss.triplet_reduction=max"], "loss.triplet_reduction='max' is not one of: sum, mean"),
])
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


# --- losses ------------------------------------------------------------------------------
def test_loss_reductions_and_the_names_of_the_terms():
    model = _model()
    out = model.train()(_images())
    total, terms = RMGLLoss()(out, PIDS)
    assert torch.equal(total.detach(), sum(terms.values()))  # Eq. 4, unit weights, as before
    ce = [v for k, v in terms.items() if k.startswith("ce/")]
    triplet = [v for k, v in terms.items() if k.startswith("triplet/")]
    assert (len(ce), len(triplet)) == (14, 2) and len(terms) == 16
    for ce_mode, triplet_mode, expected in [
        ("mean", "mean", sum(ce) / 14 + sum(triplet) / 2),
        ("mean", "sum", sum(ce) / 14 + sum(triplet)),
        ("sum", "mean", sum(ce) + sum(triplet) / 2),
    ]:
        got, got_terms = RMGLLoss(ce_reduction=ce_mode, triplet_reduction=triplet_mode)(out, PIDS)
        assert got_terms.keys() == terms.keys() and all(torch.equal(got_terms[k], terms[k]) for k in terms)
        assert torch.allclose(got, expected)
    # the CE's share of the gradient: a classifier's gradient is 1/14 of its summed one
    weight = model.branches[0].heads["orig_global"].classifier.weight
    summed = torch.autograd.grad(total, weight, retain_graph=True)[0]
    averaged = torch.autograd.grad(RMGLLoss(ce_reduction="mean")(out, PIDS)[0], weight)[0]
    assert torch.allclose(averaged * 14, summed, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="ce_reduction must be one of"):
        RMGLLoss(ce_reduction="avg")
