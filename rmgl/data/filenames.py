"""What counts as an image file, and what a Market-1501 style file name says.

One definition for the dataset readers (training and evaluation) and the extractor
(``rmgl extract``): an image one of them reads is never skipped by the other, and a name
gives the same identity, camera and frame in both.

Examples::

    >>> from rmgl.data.filenames import is_image_file, parse_market_name
    >>> is_image_file("crops/0002_c1s1_000451_03.WEBP")
    True
    >>> parse_market_name("0002_c1s1_000451_03.jpg")
    (2, 0, 451)
"""

from __future__ import annotations

import os
import re

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File endings read as images (compared lower-cased), all of them formats Pillow decodes."""

# Market-1501 / DukeMTMC names: 0002_c1s1_000451_03.jpg, 0001_c2_f0046182.jpg
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
MARKET_FRAME = re.compile(r"^-?\d+_c\d+s\d+_(\d+)")
DUKE_FRAME = re.compile(r"^-?\d+_c\d+_f(\d+)")


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` ends in one of :data:`IMAGE_SUFFIXES`, in any letter case."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_SUFFIXES


def parse_market_name(name: str) -> tuple[int | None, int | None, int | None]:
    """(pid, camid, frame) from a Market-1501 or DukeMTMC file name, None where the name
    does not say. ``camid`` is 0-based (``c1`` -> 0), as in :class:`rmgl.data.ImageRecord`;
    a camera ``c0`` is not a Market name. ``name`` is a file name, not a path.

    Examples::

        >>> parse_market_name("0002_c1s1_000451_03.jpg")
        (2, 0, 451)
        >>> parse_market_name("0001_c2_f0046182.jpg")
        (1, 1, 46182)
        >>> parse_market_name("-1_c3s1_000401_03.jpg")
        (-1, 2, 401)
        >>> parse_market_name("frame_17.png")
        (None, None, None)
    """
    match = MARKET_NAME.match(name)
    if match is None or int(match.group(2)) < 1:
        return None, None, None
    frame = MARKET_FRAME.match(name) or DUKE_FRAME.match(name)
    return int(match.group(1)), int(match.group(2)) - 1, int(frame.group(1)) if frame else None
