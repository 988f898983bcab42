"""Feature extraction (flip averaging, normalisation) and chunked distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rmgl.metrics import extract_features, pairwise_distance


class TinyNet(nn.Module):
    """Not flip-invariant: a 3x3 convolution followed by a flatten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3)
        self.dropout = nn.Dropout(0.5)  # would make training-mode outputs random

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.conv(x).flatten(1))


def make_loader(num_batches=3, batch_size=4, extra=True):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for b in range(num_batches):
        images = torch.randn(batch_size, 3, 6, 4, generator=generator)
        pids = torch.arange(batch_size) + 10 * b
        camids = torch.full((batch_size,), b)
        batches.append(
            (images, pids, camids, ["path"] * batch_size) if extra else (images, pids, camids)
        )
    return batches


def test_flip_averaged_and_normalised():
    model = TinyNet().train()
    loader = make_loader()
    result = extract_features(model, loader, progress=False)
    images = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        model.eval()
        expected = model(images) + model(images.flip(3))
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(result.features, expected)
    assert torch.allclose(result.features.norm(dim=1), torch.ones(12))
    np.testing.assert_array_equal(
        result.pids, np.concatenate([np.arange(4) + 10 * b for b in range(3)])
    )
    np.testing.assert_array_equal(result.camids, np.repeat(np.arange(3), 4))


def test_restores_training_mode_and_flip_off():
    model = TinyNet().train()
    flipped = extract_features(model, make_loader(extra=False), progress=False)
    plain = extract_features(model, make_loader(extra=False), flip=False, progress=False)
    assert model.training
    assert not torch.allclose(flipped.features, plain.features)
    images = torch.cat([b[0] for b in make_loader()])
    with torch.no_grad():
        expected = nn.functional.normalize(model.eval()(images), dim=1)
    torch.testing.assert_close(plain.features, expected)


def test_rejects_bad_models_and_loaders():
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x.flatten(1), x.flatten(1)

    with pytest.raises(ValueError, match="one descriptor tensor"):
        extract_features(TwoOutputs(), make_loader(), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(TinyNet(), [], progress=False)
    with pytest.raises(ValueError, match="float16 autocast needs a CUDA"):
        extract_features(TinyNet(), make_loader(), device="cpu", amp=torch.float16, progress=False)
    with pytest.raises(ValueError, match="amp must be None"):
        extract_features(TinyNet(), make_loader(), device="cpu", amp=True, progress=False)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_pairwise_distance_matches_direct_formula(metric):
    generator = torch.Generator().manual_seed(2)
    query, gallery = (
        torch.randn(37, 16, generator=generator),
        torch.randn(53, 16, generator=generator),
    )
    if metric == "cosine":
        expected = (
            1 - nn.functional.normalize(query, dim=1) @ nn.functional.normalize(gallery, dim=1).T
        )
    else:
        expected = torch.cdist(query.double(), gallery.double()).float()
        if metric == "sqeuclidean":
            expected = expected**2
    # budget 0 -> one query row per chunk
    result = pairwise_distance(query, gallery, metric=metric, memory_budget_mb=0)
    assert result.shape == (37, 53) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        pairwise_distance(query.numpy(), gallery.numpy(), metric=metric), result, atol=1e-5
    )


def test_pairwise_distance_errors():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(torch.ones(2, 3), torch.ones(2, 3), metric="manhattan")
    with pytest.raises(ValueError, match="3-d"):
        pairwise_distance(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        pairwise_distance(torch.ones(0, 3), torch.ones(2, 3))


def test_self_distance_is_zero():
    features = torch.randn(20, 8)
    # squared: the |a|^2 + |b|^2 - 2ab form cancels to float32 rounding (~1e-6), never below 0
    squared = pairwise_distance(features, features, metric="sqeuclidean")
    assert squared.min() >= 0
    np.testing.assert_allclose(np.diag(squared), 0.0, atol=1e-4)


@pytest.fixture
def tf32_allowed():
    """TF32 allowed for convolutions and matrix products (the new API of torch >= 2.9, or the
    legacy flags), as a user's training set-up may leave it; the previous state restored."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        objects = [matmul, cudnn.conv]
        name, allowed = "fp32_precision", "tf32"
    else:
        objects = [matmul, cudnn]
        name, allowed = "allow_tf32", True
    previous = [getattr(obj, name) for obj in objects]
    for obj in objects:
        setattr(obj, name, allowed)
    yield lambda: [getattr(obj, name) for obj in objects], allowed
    for obj, value in zip(objects, previous):
        setattr(obj, name, value)


class FlagRecorder(TinyNet):
    """Records the TF32 state its forward runs under (and fails on request)."""

    def __init__(self, read, fail: bool = False) -> None:
        super().__init__()
        self.read, self.fail, self.seen = read, fail, []

    def forward(self, x):
        self.seen.append(self.read())
        if self.fail:
            raise RuntimeError("out of memory")
        return super().forward(x)


def test_extraction_runs_in_true_float32_and_restores_the_settings(tf32_allowed):
    read, allowed = tf32_allowed
    model = FlagRecorder(read)
    extract_features(model, make_loader(), progress=False)
    assert model.seen and all(value != allowed for flags in model.seen for value in flags)
    assert read() == [allowed, allowed]  # the caller's settings are back
    failing = FlagRecorder(read, fail=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_features(failing, make_loader(), progress=False)
    assert read() == [allowed, allowed]  # also after an error


def test_reduced_precision_extraction_keeps_the_callers_settings(tf32_allowed):
    read, allowed = tf32_allowed
    model = FlagRecorder(read)
    extract_features(model, make_loader(), amp=torch.bfloat16, progress=False)
    assert model.seen and all(flags == [allowed, allowed] for flags in model.seen)
