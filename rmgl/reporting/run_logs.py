"""Reading a run's JSON-lines records back (``metrics.jsonl``, ``evaluations.jsonl``,
``launches.jsonl``) in one epoch numbering, whichever rmgl wrote them.

Records count epochs from 1, as ``train.log`` does, and every row says so with
``"epoch_base": 1``. Rows written by an rmgl from before that counted from 0 and carry no
marker; :func:`read_rows` moves them to the numbering from 1, so a resumed or summarised old
run shows one numbering. One short exception: rmgl wrote rows from 1 without the marker for a
while; a run's own records tell which (its first launch or first iteration is epoch 0 only
when it counted from 0), see :func:`counts_from_zero`.

Examples::

    from rmgl.reporting.run_logs import read_rows

    rows = read_rows("runs/demo/rmgl/evaluations.jsonl")   # epochs from 1, old runs too
    [(row["epoch"], row["mAP"]) for row in rows if row["eval"] == "plain"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EPOCH_BASE_KEY = "epoch_base"
EPOCH_BASE = 1
RECORD_FILES = ("launches.jsonl", "metrics.jsonl", "evaluations.jsonl")


def marked(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the numbering marker: what the run record writes."""
    return {**row, EPOCH_BASE_KEY: EPOCH_BASE}


def parse_lines(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a last row cut short by an interrupted run is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def counts_from_zero(run_dir: str | Path) -> bool:
    """Whether the unmarked rows of ``run_dir`` count epochs from 0. A run's first launch
    row, or else its first iteration row, is epoch 0 when they do and 1 when they do not;
    a run with neither (only an evaluations file) is taken as written by an old rmgl."""
    run_dir = Path(run_dir)
    for name in ("launches.jsonl", "metrics.jsonl"):
        unmarked = [r for r in parse_lines(run_dir / name) if EPOCH_BASE_KEY not in r]
        if unmarked:
            return min(int(r["epoch"]) for r in unmarked) == 0
    return True


def read_rows(path: str | Path, from_zero: bool | None = None) -> list[dict[str, Any]]:
    """The rows of a run's record file with epochs counted from 1 and the marker set.
    ``from_zero``: whether unmarked rows count from 0 (default: :func:`counts_from_zero`
    of the file's run folder)."""
    path = Path(path)
    rows = parse_lines(path)
    if from_zero is None and any(EPOCH_BASE_KEY not in r for r in rows):
        from_zero = counts_from_zero(path.parent)
    shift = 1 if from_zero else 0
    return [
        row
        if EPOCH_BASE_KEY in row
        else marked({**row, "epoch": int(row["epoch"]) + shift} if "epoch" in row else row)
        for row in rows
    ]


def upgrade_run(run_dir: str | Path) -> list[Path]:
    """Rewrite the record files of ``run_dir`` that hold unmarked rows in the numbering from 1
    (each file replaced whole, never half-written), before a resumed run appends to them.
    Returns the files rewritten."""
    run_dir = Path(run_dir)
    from_zero = counts_from_zero(run_dir)
    rewritten = []
    for name in RECORD_FILES:
        path = run_dir / name
        rows = parse_lines(path)
        if not any(EPOCH_BASE_KEY not in r for r in rows):
            continue
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in read_rows(path, from_zero)))
        temporary.replace(path)
        rewritten.append(path)
    return rewritten
