"""benchmarks/accuracy_study.py on hand-made runs: the tables it prints for docs/results.md,
for runs evaluated every epoch and every few epochs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("accuracy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, name: str, maps: dict[int, float]) -> None:
    """A run folder whose evaluations.jsonl holds a plain row per evaluated epoch (1-based
    keys) and a re-ranked row the summary must ignore."""
    run = folder / name
    run.mkdir(parents=True)
    rows = []
    for epoch, value in maps.items():
        rows.append(
            {
                "epoch": epoch,
                "eval": "plain",
                "mAP": value,
                "rank1": value + 0.1,
                "mINP": value / 2,
            }
        )
        rows.append({"epoch": epoch, "eval": "rerank", "mAP": 0.99, "rank1": 0.99, "mINP": 0.99})
    # as rmgl writes them: epochs from 1, marked (tests/test_run_logs.py reads older runs)
    rows = [{**r, "epoch_base": 1} for r in rows]
    (run / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_few_epochs_gives_one_column_per_evaluated_epoch(study, tmp_path):
    write_run(tmp_path, "a_seed0", {3: 0.10, 6: 0.20})
    write_run(tmp_path, "a_seed1", {3: 0.30, 6: 0.40})
    write_run(tmp_path, "b_seed0", {2: 0.05, 4: 0.15, 6: 0.25})  # evaluated every 2nd epoch
    write_run(tmp_path, "b_seed1", {2: 0.05})  # stopped early: left out, and named
    text = study.summarise(study.read_curves(tmp_path), epochs=6)
    lines = text.splitlines()
    # final metrics: mean ± sample sd over the finished seeds
    assert "| a | 0, 1 | 40.0 ± 14.1 | 30.0 ± 14.1 | 15.0 ± 7.1 |" in lines
    assert "| b | 0 | 35.0 | 25.0 | 12.5 |" in lines
    # the curve table: the union of evaluated epochs; a cell only where the config evaluated
    assert "| config | ep 2 | ep 3 | ep 4 | ep 6 |" in lines
    assert "| a |  | 20.0 |  | 30.0 |" in lines
    assert "| b | 5.0 |  | 15.0 | 25.0 |" in lines
    assert lines[-1] == "not finished (left out): b_seed1"


def test_every_epoch_and_the_plot(study, tmp_path):
    for seed, top in ((0, 0.2), (1, 0.4)):
        write_run(tmp_path / "runs", f"m_seed{seed}", {e: top * e / 3 for e in (1, 2, 3)})
    curves = study.read_curves(tmp_path / "runs")
    assert study.mean_curve(list(curves["m"].values())) == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert "| m | 10.0 | 20.0 | 30.0 |" in study.summarise(curves, epochs=3).splitlines()
    study.plot(curves, 3, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
