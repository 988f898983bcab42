"""The one evaluation set-up of rmgl eval, the trainer and the report: the model's settings
and the ranking, on tiny features (no model run)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rmgl.engine.evaluation import model_settings, rank_query_gallery
from rmgl.engine.load import Preprocess
from rmgl.metrics import ExtractedFeatures, evaluate_rank, k_reciprocal_rerank, pairwise_distance


def _loaded(metric="cosine", size=(64, 32)):
    """What load_model attaches to a model: its preprocessing and its config."""
    return SimpleNamespace(
        preprocess=Preprocess(*size), config=SimpleNamespace(eval=SimpleNamespace(metric=metric))
    )


def test_model_settings_are_the_models_own_unless_given():
    model = _loaded("cosine", (64, 32))
    assert model_settings(model) == (Preprocess(64, 32), "cosine")
    assert model_settings(model, (96, 48), "euclidean") == (Preprocess(96, 48), "euclidean")
    assert model_settings(model, Preprocess(8, 4, flip=False))[0].flip is False
    bare = torch.nn.Identity()  # a model not from load_model: the input size must be given
    assert model_settings(bare, (32, 16)) == (Preprocess(32, 16), "euclidean")
    with pytest.raises(ValueError, match="carries no preprocess .* preprocess=\\(256, 128\\)"):
        model_settings(bare)


def _features(seed, n, pids, cams):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32))
    return ExtractedFeatures(torch.nn.functional.normalize(x, dim=1), pids, cams)


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
def test_ranking_is_the_metrics_of_the_full_matrix(protocol):
    q_pids, q_cams = np.array([1, 2, 3, 1]), np.array([0, 1, 0, 1])
    g_pids = np.array([1, 1, 2, 2, 3, 3, 0, 4])
    g_cams = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    query, gallery = _features(0, 4, q_pids, q_cams), _features(1, 8, g_pids, g_cams)
    query_in_gallery = np.array([0, -1, -1, -1])  # query 0 is gallery image 0
    labels = (q_pids, g_pids, q_cams, g_cams)
    distmat = pairwise_distance(query.features, gallery.features, metric="cosine")
    reference = evaluate_rank(
        distmat, *labels, protocol=protocol, query_in_gallery=query_in_gallery
    )
    reranked = evaluate_rank(
        k_reciprocal_rerank(query.features, gallery.features),
        *labels,
        protocol=protocol,
        query_in_gallery=query_in_gallery,
    )
    streamed = rank_query_gallery(query, gallery, protocol, query_in_gallery, "cosine", rerank=True)
    held = rank_query_gallery(query, gallery, protocol, query_in_gallery, "cosine", distmat=distmat)
    assert set(streamed) == {"plain", "rerank"} and set(held) == {"plain"}
    for got in (streamed["plain"], held["plain"]):
        np.testing.assert_allclose(got.cmc, reference.cmc, atol=1e-6)
        assert got.mAP == pytest.approx(reference.mAP, abs=1e-6)
        assert got.protocol == protocol
    np.testing.assert_allclose(streamed["rerank"].cmc, reranked.cmc, atol=1e-6)
    # results already computed are kept, not computed again
    kept = rank_query_gallery(query, gallery, protocol, query_in_gallery, rerank=True, results=held)
    assert kept["plain"] is held["plain"] and "rerank" in kept and "rerank" not in held


def test_the_former_module_name_still_works_with_a_warning():
    from rmgl.engine import failure_report

    with pytest.warns(DeprecationWarning, match="import report_model from rmgl.engine.failure"):
        from rmgl.engine.report import report_model
    assert report_model is failure_report.report_model
    with pytest.raises(ImportError):
        from rmgl.engine.report import no_such_name  # noqa: F401
