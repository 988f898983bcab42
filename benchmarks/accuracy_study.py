"""Summarise a seeded study: mean ± spread of the final metrics and the learning curves.

The runs are ordinary rmgl runs named ``<name>_seed<N>``, trained with ``eval.every=1`` (one
curve point per epoch) or every few epochs (``eval.every=3``: points at epochs 3, 6, ...),
e.g. for the CPU study of ``docs/results.md``::

    rmgl synth --out data/realistic --realism realistic
    OMP_NUM_THREADS=1 rmgl sweep cpu/global cpu/pcb6 cpu/multibranch cpu/rmgl --seeds 3 \\
        data.root=data/realistic run.output_dir=runs/study eval.every=1 eval.rerank=false
    python benchmarks/accuracy_study.py runs/study --plot docs/images/study_curves.png

Prints two markdown tables: final rank-1 / mAP / mINP per configuration (mean ± sample
standard deviation over seeds, seeds listed), and mAP at every evaluated epoch (mean over
seeds; a configuration's columns are the epochs all its finished seeds evaluated). Runs that
have not reached the last epoch are left out and named.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from rmgl.reporting.run_logs import read_rows

RUN_NAME = re.compile(r"^(?P<name>.+)_seed(?P<seed>\d+)$")


def read_curves(runs: Path) -> dict[str, dict[int, list[dict]]]:
    """{config name: {seed: [evaluation rows by epoch]}} from every ``<name>_seed<N>`` run."""
    curves: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        match = RUN_NAME.match(run.name)
        path = run / "evaluations.jsonl"
        if not match or not path.is_file():
            continue
        rows = [r for r in read_rows(path) if r.get("eval") == "plain"]  # epochs from 1
        curves[match["name"]][int(match["seed"])] = sorted(rows, key=lambda r: r["epoch"])
    return curves


def mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return (
        f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"
        if len(values) > 1
        else f"{100 * mean:.1f}"
    )


def finished(seeds: dict[int, list[dict]], epochs: int) -> dict[int, list[dict]]:
    """The seeds whose run evaluated its last epoch."""
    return {s: rows for s, rows in seeds.items() if rows and rows[-1]["epoch"] == epochs}


def mean_curve(runs: list[list[dict]]) -> dict[int, float]:
    """{epoch (1-based): mean mAP} over the epochs every run evaluated."""
    by_epoch = [{r["epoch"]: r["mAP"] for r in rows} for rows in runs]
    shared = sorted(set.intersection(*(set(e) for e in by_epoch)))
    return {e: statistics.fmean(run[e] for run in by_epoch) for e in shared}


def summarise(curves: dict[str, dict[int, list[dict]]], epochs: int) -> str:
    lines = ["| config | seeds | R1 | mAP | mINP |", "|---|---|---|---|---|"]
    unfinished = []
    for name, seeds in curves.items():
        done = finished(seeds, epochs)
        unfinished += [f"{name}_seed{s}" for s in seeds if s not in done]
        if not done:
            continue
        final = [rows[-1] for rows in done.values()]
        cells = [mean_spread([r[k] for r in final]) for k in ("rank1", "mAP", "mINP")]
        lines.append(f"| {name} | {', '.join(map(str, sorted(done)))} | {' | '.join(cells)} |")
    means = {
        name: mean_curve(list(done.values()))
        for name, seeds in curves.items()
        if (done := finished(seeds, epochs))
    }
    columns = sorted({e for curve in means.values() for e in curve})
    lines += [
        "",
        "mAP at each evaluated epoch (mean over the finished seeds):",
        "",
        "| config | " + " | ".join(f"ep {e}" for e in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, curve in means.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * curve[e]:.1f}" if e in curve else "" for e in columns)
            + " |"
        )
    if unfinished:
        lines += ["", f"not finished (left out): {', '.join(unfinished)}"]
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[dict]]], epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for name, seeds in curves.items():
        done = list(finished(seeds, epochs).values())
        if not done:
            continue
        curve = mean_curve(done)
        line = axes.plot(
            list(curve),
            [100 * m for m in curve.values()],
            marker="o",
            label=f"{name} (n={len(done)})",
        )[0]
        for rows in done:
            axes.plot(
                [r["epoch"] for r in rows],
                [100 * r["mAP"] for r in rows],
                color=line.get_color(),
                alpha=0.25,
                lw=0.8,
            )
    axes.set_xlabel("epoch")
    axes.set_ylabel("mAP (%)")
    axes.set_title("learning curves: mean over seeds (thin: each seed)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding the <name>_seed<N> runs")
    parser.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="the schedule's length (runs that did not finish are left out)",
    )
    parser.add_argument("--plot", type=Path, help="also write the learning curves as a PNG")
    args = parser.parse_args()
    curves = read_curves(args.runs)
    print(summarise(curves, args.epochs))
    if args.plot:
        plot(curves, args.epochs, args.plot)
        print(f"\nlearning curves: {args.plot}")


if __name__ == "__main__":
    main()
