"""Datasets listed in CSV files: any images, any naming, cameras optional.

Layout, either one file with a ``split`` column::

    path,pid,camid,split
    images/a_001.jpg,1,0,train
    images/b_007.jpg,2,1,query

or a folder (itself, or up to two levels down) holding ``train.csv``, ``query.csv`` and
``gallery.csv`` with the same columns but no ``split``. The header row is required; ``camid``
is optional. Paths are relative to the CSV file's folder (absolute paths work too). A pid is
an integer (``-1`` junk, dropped; ``0`` distractor, gallery only; ``007`` is 7) or a name
such as ``alice``; names are numbered after the largest integer pid (see
:func:`~rmgl.data.datasets.common.identity_numbers`).
Without a ``camid`` column every image gets camera 0 and the dataset's protocol is
``any_camera``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from rmgl.data.datasets.common import (
    INTEGER,
    SPLITS,
    DatasetLayoutError,
    LabelledImage,
    check_identity_label,
    find_dataset_dir,
    labelled_splits,
    one_camera_note,
)
from rmgl.data.records import ReidDataset

SPLIT_FILES = {split: f"{split}.csv" for split in SPLITS}
LAYOUT_HINT = (
    "Expected one CSV file with the header path,pid[,camid],split, or a folder holding "
    "train.csv, query.csv and gallery.csv with the header path,pid[,camid]."
)


class _Table:
    """The rows of one CSV file, checked, with the split each belongs to."""

    def __init__(self, csv_path: Path, split: str | None):
        self.path = csv_path
        self.split = split  # None: the file has a split column
        self.has_camid = False
        self.rows: dict[str, list[LabelledImage]] = {s: [] for s in SPLITS}
        self._first_line: dict[tuple[str, str], int] = {}  # (split, image path) -> line
        self._read()

    def _read(self) -> None:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
                reader = csv.reader(handle)
                columns = self._columns(next(reader, None))
                for fields in reader:
                    if any(f.strip() for f in fields):
                        self._add(dict(zip(columns, fields)), len(fields), columns, reader.line_num)
        except UnicodeDecodeError:
            raise DatasetLayoutError(
                f"{self.path}: not UTF-8 text; save the CSV as UTF-8"
            ) from None
        except csv.Error as err:
            raise DatasetLayoutError(f"{self.path}:{reader.line_num}: {err}") from None

    def _columns(self, header: list[str] | None) -> list[str]:
        """The header's column names, checked against the columns this file may have."""
        allowed = ["path", "pid", "camid"] + (["split"] if self.split is None else [])
        if not header or not any(h.strip() for h in header):
            raise DatasetLayoutError(
                f"{self.path}:1: no header row; the first line must name the columns: "
                f"{','.join(allowed)} (camid optional)"
            )
        columns = [h.strip().lower() for h in header]
        for name in columns:
            if name == "split" and self.split is not None:
                raise DatasetLayoutError(
                    f"{self.path}:1: column 'split' only belongs in a single CSV file; "
                    f"this file holds the {self.split} split, remove the column"
                )
            if name not in allowed:
                raise DatasetLayoutError(
                    f"{self.path}:1: unknown column {name!r}; the columns are "
                    f"{', '.join(allowed)} (camid optional); is the header row missing?"
                )
            if columns.count(name) > 1:
                raise DatasetLayoutError(f"{self.path}:1: column {name!r} appears twice")
        for name in allowed:
            if name not in columns and name != "camid":
                alternative = " (or give a folder of train.csv, query.csv, gallery.csv)"
                raise DatasetLayoutError(
                    f"{self.path}:1: missing column {name!r}; the header row must name "
                    f"{', '.join(allowed)} (camid optional)"
                    + (alternative if name == "split" else "")
                )
        self.has_camid = "camid" in columns
        return columns

    def _add(self, row: dict[str, str], num_fields: int, columns: list[str], line: int) -> None:
        where = f"{self.path}:{line}"
        if num_fields != len(columns):
            raise DatasetLayoutError(
                f"{where}: expected {len(columns)} fields ({','.join(columns)}), found {num_fields}"
            )
        split = self._split(row, where)
        path = self._image_path(row["path"], where)
        key = (split, os.path.normcase(path))
        if key in self._first_line:
            raise DatasetLayoutError(
                f"{where}: {row['path'].strip()} is listed twice in the {split} split "
                f"(first on line {self._first_line[key]}); list each image once per split"
            )
        self._first_line[key] = line
        label = check_identity_label(row["pid"], where)
        camid = self._camid(row["camid"], where) if self.has_camid else 0
        self.rows[split].append(LabelledImage(path, label, camid))

    def _split(self, row: dict[str, str], where: str) -> str:
        if self.split is not None:
            return self.split
        split = row["split"].strip().lower()
        if split not in SPLITS:
            raise DatasetLayoutError(
                f"{where}: split {row['split']!r} is not one of train, query, gallery"
            )
        return split

    def _image_path(self, raw: str, where: str) -> str:
        """Absolute path of an existing image; relative paths start at the CSV's folder."""
        raw = raw.strip()
        if not raw:
            raise DatasetLayoutError(f"{where}: empty path; give the image file")
        path = Path(os.path.abspath(self.path.parent / Path(raw).expanduser()))
        if not path.is_file():
            raise DatasetLayoutError(
                f"{where}: image {raw} not found at {path}; relative paths start at the "
                f"CSV file's folder {os.path.abspath(self.path.parent)}"
            )
        return str(path)

    @staticmethod
    def _camid(raw: str, where: str) -> int:
        raw = raw.strip()
        if not INTEGER.fullmatch(raw) or int(raw) < 0:
            raise DatasetLayoutError(
                f"{where}: camid {raw!r} is not a camera number; expected an integer >= 0 "
                "(or drop the camid column when there are no cameras)"
            )
        return int(raw)


def _has_cameras(tables: list[_Table]) -> bool:
    """Whether the data has cameras: every file has a camid column, or none has."""
    with_camid = [t for t in tables if t.has_camid]
    without = [t for t in tables if not t.has_camid]
    if with_camid and without:
        raise DatasetLayoutError(
            f"{without[0].path}:1: no camid column, but {with_camid[0].path} has one; "
            "give cameras in every file or in none"
        )
    return bool(with_camid)


def read_csv_dataset(root: str | Path) -> ReidDataset:
    """Read a dataset from one CSV file or a folder of ``train.csv``, ``query.csv`` and
    ``gallery.csv``. Errors name the file, the line and what was expected."""
    root = Path(root).expanduser()
    if root.is_file():
        tables = [_Table(root, split=None)]
        sources = {split: f"{root} (rows with split {split})" for split in SPLITS}
    else:
        base = find_dataset_dir(root, list(SPLIT_FILES.values()), LAYOUT_HINT)
        tables = [_Table(base / name, split=split) for split, name in SPLIT_FILES.items()]
        sources = {split: str(base / name) for split, name in SPLIT_FILES.items()}
        root = base
    has_camid = _has_cameras(tables)
    images = {split: [row for t in tables for row in t.rows[split]] for split in SPLITS}
    splits, notes = labelled_splits(images, sources)
    if has_camid:
        notes += one_camera_note(splits["query"], splits["gallery"])
    else:
        notes.append("no camid column: every image is camera 0, evaluated with any_camera")
    return ReidDataset(
        "csv",
        root=str(root),
        notes=notes,
        protocol="cross_camera" if has_camid else "any_camera",
        **splits,
    )
