"""The rows of a MOTChallenge text file (``det.txt``, ``gt.txt``, tracker results).

One comma-separated line per box, ``frame, id, left, top, width, height, score, x, y, z``;
blank lines and ``#`` comments are skipped. Readers of detections and of tracks check their
own columns on top of this (frame ranges, boxes inside the image); every error is one line
``path:line: what is wrong``.

Examples::

    for line, values in read_mot_rows(Path("cam1/det.txt"), min_columns=7):
        frame, box, score = values[0], values[2:6], values[6]
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["MotFileError", "mot_error", "read_mot_rows"]


class MotFileError(ValueError):
    """A MOT file that cannot be read or a line that breaks the format."""


def mot_error(path: Path, line: int, problem: str) -> MotFileError:
    """The error for ``line`` of ``path``, in the one format of MOT line errors."""
    return MotFileError(f"{path}:{line}: {problem}")


def read_mot_rows(
    path: Path, min_columns: int, max_columns: int | None = None
) -> list[tuple[int, list[float]]]:
    """``(line number, numbers)`` of each line of a MOT text file: ``min_columns`` to
    ``max_columns`` (None: any number above) finite numbers per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MotFileError(f"{path}: unreadable ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < min_columns or (max_columns is not None and len(cells) > max_columns):
            expected = (
                f"at least {min_columns}"
                if max_columns is None
                else f"{min_columns} to {max_columns}"
            )
            raise mot_error(
                path,
                number,
                f"{len(cells)} comma-separated values, expected {expected} "
                "(frame,id,left,top,width,height,score,...)",
            )
        try:
            values = [float(c) for c in cells]
        except ValueError:
            raise mot_error(path, number, f"not a number in {line[:60]!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise mot_error(path, number, f"a value is not finite in {line[:60]!r}")
        rows.append((number, values))
    return rows
