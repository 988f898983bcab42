"""Losses: batch-hard triplet against a brute-force loop, Eq. 4 sum, a few training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rmgl.losses import RMGLLoss, batch_hard_triplet_loss
from rmgl.model import RMGLConfig, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_triplet(
    x: torch.Tensor, y: torch.Tensor, margin: float, soft: bool
) -> torch.Tensor:
    """Eq. 3 anchor by anchor: hardest other positive, hardest negative, mean over anchors."""
    losses = []
    for a in range(len(x)):
        pos = [torch.norm(x[a] - x[p]) for p in range(len(x)) if p != a and y[p] == y[a]]
        neg = [torch.norm(x[a] - x[n]) for n in range(len(x)) if y[n] != y[a]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(F.softplus(gap) if soft else torch.clamp(gap + margin, min=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_equals_brute_force(seed, soft):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 16, generator=g) * 0.3
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4])  # 3 and 4 have no positive
    expected = brute_force_triplet(x, y, 0.6, soft)
    got = batch_hard_triplet_loss(x, y, margin=0.6, soft_margin=soft)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.item() > 0


def test_triplet_gradient_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    x1 = (torch.randn(8, 6, generator=g) * 0.2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch_hard_triplet_loss(x1, y).backward()
    brute_force_triplet(x2, y, 0.6, False).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)


def test_triplet_without_valid_anchor_is_zero_with_graph():
    x = torch.randn(3, 4, requires_grad=True)
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 0, 0]))
    assert loss.item() == 0.0 and loss.requires_grad


def _tiny_batch():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 96, 32)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return images, targets


def test_total_is_the_sum_of_named_terms():
    images, targets = _tiny_batch()
    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4).train()
    out = model(images)
    total, terms = RMGLLoss(label_smoothing=0.1)(out, targets)
    assert set(terms) == {f"ce/{n}" for n in model.feature_names} | {"triplet/b2", "triplet/b3"}
    assert torch.allclose(total.detach(), sum(terms.values()))
    expected = F.cross_entropy(out.logits["b3.rp.s2"], targets, label_smoothing=0.1)
    assert torch.allclose(terms["ce/b3.rp.s2"], expected.detach())
    expected = batch_hard_triplet_loss(out.branch_features["b2"], targets, 0.6)
    assert torch.allclose(terms["triplet/b2"], expected.detach())
    assert all(not t.requires_grad for t in terms.values())


def test_loss_decreases_over_a_few_sgd_steps():
    images, targets = _tiny_batch()
    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), 4).train()
    criterion = RMGLLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(6):
        total, _ = criterion(model(images), targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < 0.8 * history[0], history
