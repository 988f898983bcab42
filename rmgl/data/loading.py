"""Image datasets and loaders.

Training must survive a bad file: a corrupt or unreadable image is logged with its path,
counted, and replaced by another image of the same identity (so the PK batch keeps its
shape). Evaluation must not change the metric quietly: there an unreadable image is an error
that names the file.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from rmgl.data.records import ImageRecord
from rmgl.data.sampler import PKSampler

log = logging.getLogger(__name__)


class UnreadableImageError(RuntimeError):
    """An image file could not be read or decoded."""


def read_image(path: str) -> torch.Tensor:
    """Decode ``path`` to a (3, H, W) uint8 RGB tensor, or raise :class:`UnreadableImageError`.

    Pillow decodes every common format and reports truncated files; torchvision's own
    decoders are deprecated from 0.29 on. Decoding a re-ID crop costs well under 1 ms,
    small beside resizing and augmenting it.
    """
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def check_readable(records: Sequence[ImageRecord], split: str) -> None:
    """Fail now, naming the file, if an image of ``split`` is missing or not an image.

    Cheap (the file header only, well under a millisecond per image), so that a broken query
    or gallery image is found before training starts rather than at the first evaluation.
    An empty split is refused too: there is nothing to evaluate."""
    if not records:
        raise ValueError(
            f"the dataset has no {split} images, so there is nothing to evaluate; for data with "
            "only training identities, evaluate on the split that rmgl train held out: "
            "data.dataset=csv data.root=runs/<name>/split.csv (docs/own-data.md)"
        )
    for record in records:
        try:
            with Image.open(record.path) as image:
                image.size  # noqa: B018 (the header is parsed here)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(
                f"{split} image {record.path} cannot be read ({err}); evaluation needs every "
                f"{split} image: fix or remove the file"
            ) from None


class ReidImageDataset(Dataset):
    """``(image, pid, camid)`` items from records; ``train`` selects the skip-on-error policy."""

    def __init__(
        self, records: Sequence[ImageRecord], transform: Callable | None = None, train: bool = False
    ):
        self.records = list(records)
        self.transform = transform
        self.train = train
        self._skipped = multiprocessing.Value("i", 0)  # shared with DataLoader workers
        self._bad: set[int] = set()
        self._same_pid: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(self.records):
            self._same_pid[record.pid].append(index)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        """Unreadable images met so far, in this process and its workers."""
        return self._skipped.value

    def _load(self, index: int) -> torch.Tensor:
        image = read_image(self.records[index].path)
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        record = self.records[index]
        if not self.train:
            return self._load(index), record.pid, record.camid
        candidates = self._same_pid[record.pid]
        start = candidates.index(index)
        for candidate in candidates[start:] + candidates[:start]:
            if candidate in self._bad:
                continue
            try:
                return self._load(candidate), record.pid, record.camid
            except UnreadableImageError as err:
                self._bad.add(candidate)
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning(
                    "skipping unreadable training image (%s); using another image of identity %d",
                    err,
                    record.pid,
                )
        raise UnreadableImageError(
            f"every image of training identity {record.pid} is unreadable "
            f"({len(candidates)} files, e.g. {record.path}); fix or remove them"
        )


def train_loader(
    records: Sequence[ImageRecord],
    transform: Callable,
    num_identities: int = 12,
    num_instances: int = 4,
    workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """PK-sampled training loader; call ``loader.sampler.set_epoch(e)`` every epoch."""
    dataset = ReidImageDataset(records, transform, train=True)
    sampler = PKSampler(
        [r.pid for r in records], num_identities, num_instances, seed, rank, world_size
    )
    return DataLoader(
        dataset,
        batch_size=num_identities * num_instances,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        # Workers are re-created (and re-seeded from torch's generator) every epoch, so a
        # resumed run draws the same augmentations as an uninterrupted one.
        persistent_workers=False,
    )


def eval_loader(
    records: Sequence[ImageRecord], transform: Callable, batch_size: int = 128, workers: int = 2
) -> DataLoader:
    """Loader over query or gallery records in their given order (never shuffled)."""
    return DataLoader(
        ReidImageDataset(records, transform, train=False),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
