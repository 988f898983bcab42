"""Descriptors of a whole image list into a feature folder, streaming and resumable.

Memory stays bounded whatever the list's length: images are decoded batch by batch (in
DataLoader workers), each batch's descriptors go straight into the memory-mapped
``features.npy``, and the list itself is packed (:mod:`rmgl.deploy.inputs`).

Examples::

    from rmgl.deploy import Encoder, extract_to_folder, read_image_list

    encoder = Encoder("runs/demo/rmgl/best.safetensors", device="cpu")
    meta = extract_to_folder(encoder, read_image_list("data/gallery"), "runs/gallery_features")
    meta["count"], meta["failed"]
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import rmgl
from rmgl.data.loading import UnreadableImageError
from rmgl.deploy.encoder import Encoder, prepare_file
from rmgl.deploy.features import FeatureWriter, is_sharded, read_meta
from rmgl.deploy.inputs import ImageList

log = logging.getLogger(__name__)

# What a resumed extraction must share with the run it continues: the same images in the same
# order and the same descriptor function (model file, backend, precision, flip, sizes).
RESUME_KEYS = (
    "input_fingerprint",
    "model_sha256",
    "backend",
    "precision",
    "flip",
    "descriptor_dim",
    "input_size",
)


class _Decoded(Dataset):
    """Prepared image ``start + i``, or a blank and the reason it could not be read."""

    def __init__(self, images: ImageList, start: int, transform, size: tuple[int, int]) -> None:
        self.images, self.start, self.transform = images, start, transform
        self.blank = torch.zeros(3, *size)

    def __len__(self) -> int:
        return len(self.images) - self.start

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        index = self.start + i
        try:
            return index, prepare_file(self.images.paths[index], self.transform), ""
        except UnreadableImageError as err:
            return index, self.blank, str(err)


def extract_to_folder(
    encoder: Encoder,
    images: ImageList,
    out: str | os.PathLike,
    strict: bool = False,
    resume: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the feature folder ``out`` (format: :mod:`rmgl.deploy.features`) for ``images``.

    Unreadable images are listed in ``failed.csv`` and get no row; with ``strict`` the first
    one stops the run (the folder stays unfinished: fix the file, then resume). ``resume``
    continues an unfinished folder made from the same list and model. Returns extract.json.
    """
    out = Path(out)
    if len(images) == 0:
        raise ValueError(f"{images.source} holds no images")
    repeated = images.first_duplicate()
    if repeated is not None:
        i, j = repeated
        raise ValueError(
            f"{images.source} lists {images.paths[j]} twice (entries {i + 1} and {j + 1}); each "
            "image must be listed once, or the gallery would hold it twice"
        )
    if is_sharded(out):
        raise ValueError(
            f"{out} was written by rmgl extract --engine ray; continue it with --engine ray "
            "--resume, or give another --out"
        )
    writer = _open_writer(encoder, images, out, resume)
    if writer is None:
        return read_meta(out)
    started = time.perf_counter()
    done_before = writer.inputs_done
    dataset = _Decoded(images, done_before, encoder.preprocess.transform(), encoder.preprocess.size)
    loader = DataLoader(dataset, batch_size=encoder.batch_size, shuffle=False, num_workers=workers)
    try:
        with tqdm(
            total=len(images),
            initial=done_before,
            unit="img",
            desc="extract",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            for indices, batch, reasons in loader:
                _add_batch(writer, encoder, images, indices.tolist(), batch, list(reasons), strict)
                bar.update(len(indices))
        if writer.meta["count"] == 0:
            raise ValueError(
                f"none of the {len(images)} images of {images.source} could be read; the reasons "
                f"are in {out / 'failed.csv'}"
            )
        seconds = time.perf_counter() - started
        meta = writer.finish(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            images_per_second=round((len(images) - done_before) / max(seconds, 1e-9), 1),
        )
    finally:
        writer.close()
    return meta


def _add_batch(
    writer: FeatureWriter,
    encoder: Encoder,
    images: ImageList,
    indices: list[int],
    batch: torch.Tensor,
    reasons: list[str],
    strict: bool,
) -> None:
    readable = [i for i, reason in enumerate(reasons) if not reason]
    failed = [
        (indices[i], images.paths[indices[i]], reasons[i])
        for i, reason in enumerate(reasons)
        if reason
    ]
    if failed and strict:
        raise UnreadableImageError(
            f"{failed[0][2]}; --strict stops at the first unreadable image: fix it and continue "
            "with --resume, or run without --strict to skip and list such images"
        )
    features = (
        encoder.encode_batch(batch[readable])
        if readable
        else np.zeros((0, encoder.descriptor_dim), dtype=np.float32)
    )
    rows = [(indices[i], images.paths[indices[i]], *images.label(indices[i])) for i in readable]
    writer.add(features, rows, failed, inputs_done=indices[-1] + 1)


def _open_writer(
    encoder: Encoder, images: ImageList, out: Path, resume: bool
) -> FeatureWriter | None:
    """A writer for a new folder, or for the unfinished one ``resume`` continues; None when
    ``resume`` finds the folder already complete."""
    meta = _provenance(encoder, images)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the features")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise ValueError(
                f"{out} already holds files; continue an interrupted extraction with --resume, "
                "or give another --out"
            )
        saved = read_meta(out)
        changed = [
            f"{k} {_short(saved.get(k))} -> {_short(meta.get(k))}"
            for k in RESUME_KEYS
            if saved.get(k) != meta.get(k)
        ]
        if changed:
            raise ValueError(
                f"{out} was started with other settings ({'; '.join(changed)}); --resume needs "
                "the same image list, model, precision and flip, or the folder would mix two "
                "kinds of descriptors (use another --out for a new extraction)"
            )
        if saved.get("complete"):
            log.info("%s is already complete (%d descriptors); nothing to do", out, saved["count"])
            return None
        log.info("resuming %s at image %d of %d", out, saved["inputs_done"], saved["inputs"])
        return FeatureWriter.resume(out)
    return FeatureWriter.create(out, len(images), encoder.descriptor_dim, meta)


def _provenance(encoder: Encoder, images: ImageList) -> dict[str, Any]:
    return {
        **encoder.provenance(),
        "images_source": str(images.source),
        "input_fingerprint": images.fingerprint(),
        "batch_size": encoder.batch_size,
        "rmgl_version": rmgl.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _short(value: Any) -> str:
    """A recorded value for a message: hashes cut to 12 characters."""
    text = str(value)
    return text[:12] if isinstance(value, str) and len(value) == 64 else text


def extraction_provenance(encoder: Encoder, images: ImageList) -> dict[str, Any]:
    """What extract.json records about the model and the image list: the distributed
    extractor (:mod:`rmgl.deploy.distributed`) records the same."""
    return _provenance(encoder, images)
