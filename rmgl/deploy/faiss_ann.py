"""faiss for the gallery index: the index kinds and their parameters, training (PCA,
HNSW graph, IVF-PQ lists), search-time settings and id selectors, and faiss files on disk.

:class:`rmgl.deploy.index.GalleryIndex` uses these; nothing here knows about manifests,
stores or feature folders.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from rmgl.deploy.files import fsync_folder
from rmgl.deploy.vectors import CHUNK_BYTES, VectorFile

__all__ = [
    "KINDS",
    "IndexParams",
    "add_rows",
    "configure_search",
    "faiss_name",
    "is_faiss_name",
    "search_parameters",
    "train_index",
    "write_faiss",
]

KINDS = ("flat", "pcaflat", "hnsw", "ivfpq")


@dataclass
class IndexParams:
    """Parameters of an index; defaults suit a gallery of 100k-1M 3,584-d descriptors.

    ``pca``: dimension of the approximate stage (None, or >= dim: no reduction);
    ``rerank_factor``: shortlist size = n * rerank_factor, re-scored exactly;
    ``exact_below``: filtered searches allowing at most this many items scan them exactly;
    ``nlist`` / ``pq_m``: None = chosen from the gallery size / reduced dimension;
    ``scan_dtype``: precision of the ``pcaflat`` scan; ``bfloat16`` is ~3x faster on CPUs
    with AVX512-BF16 (much slower on others) and only changes the shortlist, whose
    distances are then re-scored exactly.
    """

    kind: str = "flat"
    pca: int | None = 256
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 512
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    nprobe: int = 32
    rerank_factor: int = 10
    train_size: int = 50_000
    exact_below: int = 20_000
    scan_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in (
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "nprobe",
            "rerank_factor",
            "train_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"pca must be >= 1 or None, got {self.pca}")
        if self.exact_below < 0:
            raise ValueError(f"exact_below must be >= 0, got {self.exact_below}")
        if self.scan_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"scan_dtype must be float32 or bfloat16, got {self.scan_dtype!r}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must lie in 1..16, got {self.pq_bits}")

    @classmethod
    def from_dict(cls, values: dict) -> IndexParams:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def train_index(settings: IndexParams, vectors: VectorFile, dim: int, total: int, manifest: dict):
    """An empty, trained faiss index for ``settings`` (training sample read from disk)."""
    import faiss

    if settings.kind == "flat":
        return faiss.IndexFlatIP(dim)
    rng = np.random.default_rng(settings.seed)
    sample_ids = np.sort(rng.choice(total, size=min(total, settings.train_size), replace=False))
    sample = vectors.rows(sample_ids)
    reduced_dim = dim if settings.pca is None else min(settings.pca, dim, len(sample))
    transform = None
    if reduced_dim < dim:
        transform = pca_transform(sample, reduced_dim, settings.seed)
        sample = transform.apply(sample)
    if settings.kind == "pcaflat":
        inner = faiss.IndexFlatL2(reduced_dim)
        resolved = {"reduced_dim": reduced_dim}
    elif settings.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(reduced_dim, settings.hnsw_m, faiss.METRIC_L2)
        inner.hnsw.efConstruction = settings.ef_construction
        resolved = {"reduced_dim": reduced_dim}
    else:
        nlist = settings.nlist or auto_nlist(total)
        if nlist > len(sample):
            raise ValueError(f"nlist {nlist} is larger than the training sample ({len(sample)})")
        pq_m = settings.pq_m or auto_pq_m(reduced_dim)
        if reduced_dim % pq_m:
            raise ValueError(f"pq_m {pq_m} does not divide the reduced dimension {reduced_dim}")
        bits = min(settings.pq_bits, max(1, int(math.log2(len(sample)))))
        quantizer = faiss.IndexFlatL2(reduced_dim)
        inner = faiss.IndexIVFPQ(quantizer, reduced_dim, nlist, pq_m, bits, faiss.METRIC_L2)
        inner.train(sample)  # faiss keeps Python references to the quantizer and the parts
        resolved = {"reduced_dim": reduced_dim, "nlist": nlist, "pq_m": pq_m, "pq_bits": bits}
    manifest["resolved"] = resolved
    if transform is None:
        return inner
    return faiss.IndexPreTransform(transform, inner)


def pca_transform(sample: np.ndarray, out_dim: int, seed: int):
    """PCA to ``out_dim`` followed by a random rotation, as a faiss ``LinearTransform``.

    Computed here (covariance, then subspace iteration for the leading eigenvectors) rather
    than by faiss' ``PCAMatrix``, which diagonalises the full D x D covariance: 3-4x slower
    at D = 3,584. The rotation spreads the variance evenly over the PQ sub-vectors; it does
    not change L2 distances.
    """
    import faiss
    import torch

    data = torch.from_numpy(np.asarray(sample, dtype=np.float32))
    mean = data.mean(0)
    centred = data - mean
    cov = (centred.T @ centred).double() / max(1, len(data) - 1)
    generator = torch.Generator().manual_seed(seed)
    width = min(cov.shape[0], out_dim + 32)
    basis = torch.linalg.qr(
        torch.randn(cov.shape[0], width, generator=generator, dtype=torch.float64)
    )[0]
    for _ in range(8):
        basis = torch.linalg.qr(cov @ basis)[0]
    values, vectors = torch.linalg.eigh(basis.T @ cov @ basis)
    top = basis @ vectors[:, torch.argsort(values, descending=True)[:out_dim]]  # (D, out_dim)
    rotation = torch.linalg.qr(
        torch.randn(out_dim, out_dim, generator=generator, dtype=torch.float64)
    )[0]
    matrix = (top @ rotation).T.float().contiguous().numpy()  # (out_dim, D)
    bias = -(matrix @ mean.numpy())
    transform = faiss.LinearTransform(cov.shape[0], out_dim, True)
    faiss.copy_array_to_vector(matrix.reshape(-1), transform.A)
    faiss.copy_array_to_vector(bias.astype(np.float32), transform.b)
    transform.is_trained = True
    return transform


def auto_nlist(total: int) -> int:
    """About 4 sqrt(N) lists (a power of two), with at least 39 training points each."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(total))))
    return int(max(1, min(nlist, total // 39)))


def auto_pq_m(dim: int) -> int:
    """Sub-quantizers of about 4 dimensions: the largest divisor of dim up to dim // 4."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def configure_search(index, params: IndexParams) -> None:
    import faiss

    inner = (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )
    if params.kind == "hnsw":
        inner.hnsw.efSearch = params.ef_search
    elif params.kind == "ivfpq":
        inner.nprobe = params.nprobe


def search_parameters(index, params: IndexParams, selector, shortlist: int, fraction: float):
    """faiss search parameters carrying the id selector (wrapped for a PCA pre-transform).

    With a filter, both approximate kinds only return allowed items but the nearest allowed
    ones lie farther away: HNSW walks the whole graph with a result list of allowed items
    only, IVF scans the probed lists skipping the others. Their effort (efSearch, nprobe) is
    therefore widened by 1 / (fraction allowed), at most 16x; filters allowing fewer than
    ``exact_below`` items never come here (exact scan).
    """
    import faiss

    widen = min(16.0, 1.0 / max(fraction, 1e-9))
    if params.kind == "hnsw":
        inner = faiss.SearchParametersHNSW()
        inner.efSearch = int(widen * max(params.ef_search, shortlist))
    elif params.kind == "ivfpq":
        inner = faiss.SearchParametersIVF()
        inner.nprobe = int(widen * params.nprobe)
    else:
        inner = faiss.SearchParameters()
    if selector is not None:
        inner.sel = selector
    if isinstance(index, faiss.IndexPreTransform):
        wrapped = faiss.SearchParametersPreTransform()
        wrapped.index_params = inner
        wrapped._inner = inner  # keep the Python object (and its selector) alive
        return wrapped
    return inner


def faiss_name(generation: int) -> str:
    return f"index-{generation}.faiss"


def is_faiss_name(name: str) -> bool:
    if name == "index.faiss":
        return True
    number = name.removeprefix("index-").removesuffix(".faiss")
    return name.startswith("index-") and name.endswith(".faiss") and number.isdigit()


def write_faiss(index, path: Path) -> None:
    """A new faiss file, complete on disk before anything refers to it."""
    import faiss

    temporary = path.with_name(path.name + ".tmp")
    try:
        faiss.write_index(index, str(temporary))
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except RuntimeError as err:  # faiss reports a failed write (a full disk) this way
        temporary.unlink(missing_ok=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else "write failed"
        raise OSError(f"could not write {path} ({first})") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def add_rows(faiss_index, vectors: VectorFile, start: int, stop: int) -> None:
    rows_per_chunk = max(1, CHUNK_BYTES // vectors.row_bytes)
    for first in range(start, stop, rows_per_chunk):
        faiss_index.add(vectors.range(first, min(first + rows_per_chunk, stop)))
