"""CMC curves of evaluation results."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rmgl.metrics.ranking import RankResult

__all__ = ["plot_cmc"]


def plot_cmc(
    results_by_name: Mapping[str, RankResult], path: str | Path, title: str = "CMC"
) -> Path:
    """Write the CMC curves of several results (one line each, legend = name) as a PNG."""
    if not results_by_name:
        raise ValueError("plot_cmc needs at least one result")
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, result in results_by_name.items():
        ranks = range(1, result.max_rank + 1)
        axes.plot(
            ranks,
            100 * result.cmc,
            label=f"{name} (R1 {100 * result.rank(1):.1f}, mAP {100 * result.mAP:.1f})",
        )
    axes.set_xlabel("rank")
    axes.set_ylabel("matching rate (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
