"""Result tables and result files: what a person reads in the terminal or a markdown page,
and what a script reads back (``results.json``)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rmgl.metrics import RankResult

COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def result_values(result: RankResult) -> dict[str, float]:
    """The table's columns of one result, in percent."""
    values = [result.rank(k) if k <= result.max_rank else math.nan for k in (1, 5, 10)]
    return dict(zip(COLUMNS, [100 * v for v in (*values, result.mAP, result.mINP)], strict=True))


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown row per (run, evaluation): rank-1/5/10, mAP, mINP in percent, train time.

    ``rows`` maps a run name to ``{"results": {"plain": RankResult, ...}, "seconds": float}``.
    """
    lines = [
        "| run | eval | " + " | ".join(COLUMNS) + " | train s |",
        "|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, row in rows.items():
        for key, result in row["results"].items():
            cells = " | ".join(f"{v:.1f}" for v in result_values(result).values())
            lines.append(f"| {name} | {key} | {cells} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def seeds_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Mean ± sample standard deviation over seeds, one markdown row per (config, evaluation).

    ``runs`` maps a config name to one ``{"results": ..., "seconds": ...}`` per seed. With a
    single seed the spread is shown as "n=1": a difference is a tie until it exceeds the
    spread.
    """
    lines = [
        "| config | eval | seeds | " + " | ".join(COLUMNS) + " | train s |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, seeds in runs.items():
        for key in seeds[0]["results"]:
            per_seed = [result_values(s["results"][key]) for s in seeds]
            cells = []
            for column in COLUMNS:
                values = [v[column] for v in per_seed]
                spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.1f}{spread}")
            seconds = statistics.fmean(s["seconds"] for s in seeds)
            lines.append(f"| {name} | {key} | {len(seeds)} | {' | '.join(cells)} | {seconds:.0f} |")
    return "\n".join(lines)


def write_results_json(
    path: str | Path, results: Mapping[str, RankResult], **provenance: Any
) -> Path:
    """``results.json``: every result, and what produced it (checkpoint, dataset, root,
    protocol, precision, ...), so that two files can never be confused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"provenance": provenance, "results": {k: v.to_dict() for k, v in results.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
