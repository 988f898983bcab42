"""Run records read back in one epoch numbering: rows written by an older rmgl count epochs
from 0 and carry no ``epoch_base`` marker; the readers (resume, the report's training curves,
benchmarks/accuracy_study.py) move them to the numbering from 1 that train.log uses."""

import json
from pathlib import Path

import pytest

from rmgl.reporting.run_logs import counts_from_zero, read_rows, upgrade_run


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def old_run(folder: Path, epochs: int = 2, iters: int = 3) -> Path:
    """A run folder as an rmgl from before the marker wrote it: 0-based, no marker, one
    evaluation per epoch, one launch."""
    folder.mkdir(parents=True)
    write_jsonl(folder / "launches.jsonl", [{"epoch": 0, "resumed": False, "nodes": 1}])
    write_jsonl(
        folder / "metrics.jsonl",
        [{"epoch": e, "iter": i, "loss": 10.0 - e} for e in range(epochs) for i in range(iters)],
    )
    write_jsonl(
        folder / "evaluations.jsonl",
        [{"epoch": e, "eval": "plain", "mAP": 0.1 * (e + 1), "rank1": 0.2} for e in range(epochs)],
    )
    return folder


def test_an_old_run_reads_from_epoch_1(tmp_path):
    run = old_run(tmp_path / "old")
    assert counts_from_zero(run)
    evaluations = read_rows(run / "evaluations.jsonl")
    # the hand-written rows: epoch 0 had mAP 0.1, epoch 1 had 0.2; now epochs 1 and 2
    assert [(r["epoch"], r["mAP"]) for r in evaluations] == [(1, 0.1), (2, pytest.approx(0.2))]
    assert all(r["epoch_base"] == 1 for r in evaluations)
    assert sorted({r["epoch"] for r in read_rows(run / "metrics.jsonl")}) == [1, 2]
    assert [r["epoch"] for r in read_rows(run / "launches.jsonl")] == [1]


def test_marked_rows_and_unmarked_rows_from_1_are_left_as_they_are(tmp_path):
    marked = tmp_path / "new"
    marked.mkdir()
    rows = [{"epoch": 1, "eval": "plain", "mAP": 0.5, "epoch_base": 1}]
    write_jsonl(marked / "evaluations.jsonl", rows)
    assert read_rows(marked / "evaluations.jsonl") == rows
    # unmarked, but the run's first launch is epoch 1: written from 1 without the marker
    between = tmp_path / "between"
    between.mkdir()
    write_jsonl(between / "launches.jsonl", [{"epoch": 1}])
    write_jsonl(between / "evaluations.jsonl", [{"epoch": 3, "eval": "plain", "mAP": 0.5}])
    assert not counts_from_zero(between)
    assert [r["epoch"] for r in read_rows(between / "evaluations.jsonl")] == [3]
    # only an evaluations file, unmarked: an old rmgl's
    alone = tmp_path / "alone"
    alone.mkdir()
    write_jsonl(alone / "evaluations.jsonl", [{"epoch": 9, "eval": "plain", "mAP": 0.5}])
    assert [r["epoch"] for r in read_rows(alone / "evaluations.jsonl")] == [10]


def test_a_row_cut_short_is_skipped(tmp_path):
    run = old_run(tmp_path / "cut")
    with open(run / "evaluations.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "ev')
    assert [r["epoch"] for r in read_rows(run / "evaluations.jsonl")] == [1, 2]


def test_upgrade_rewrites_each_file_whole_and_once(tmp_path):
    run = old_run(tmp_path / "old")
    assert {p.name for p in upgrade_run(run)} == {
        "launches.jsonl",
        "metrics.jsonl",
        "evaluations.jsonl",
    }
    rows = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["epoch_base"] == 1 for r in rows)
    assert upgrade_run(run) == []  # a second time changes nothing: no epoch moves twice
    assert [r["epoch"] for r in read_rows(run / "evaluations.jsonl")] == [1, 2]
    assert not list(run.glob("*.tmp"))


def test_the_accuracy_study_reads_old_runs_in_the_new_numbering(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_study.py"
    spec = importlib.util.spec_from_file_location("accuracy_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    old_run(tmp_path / "runs" / "a_seed0", epochs=3)
    curves = study.read_curves(tmp_path / "runs")
    assert [r["epoch"] for r in curves["a"][0]] == [1, 2, 3]
    assert study.finished(curves["a"], 3) == curves["a"]  # its last epoch is optim.epochs


def test_resuming_an_old_run_gives_one_numbering(tiny_data, tmp_path):
    """A 1-epoch run whose records are turned into the old format, resumed for a second
    epoch: every record then counts from 1, the first epoch's rows once each."""
    from test_engine_train import write_config

    from rmgl.engine.config import load_config
    from rmgl.engine.trainer import Trainer

    config = write_config(tmp_path, tiny_data, epochs=1)
    with Trainer(load_config(config, ["eval.every=1"]), progress=False) as trainer:
        trainer.train()
    run = tmp_path / "runs" / "tiny"
    for name in ("launches.jsonl", "metrics.jsonl", "evaluations.jsonl"):
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert all(r.pop("epoch_base") == 1 for r in rows)  # new rows carry the marker
        write_jsonl(run / name, [{**r, "epoch": r["epoch"] - 1} for r in rows])
    iterations = len((run / "metrics.jsonl").read_text().splitlines())

    cfg = load_config(config, ["eval.every=1", "optim.epochs=2"])
    with Trainer(cfg, resume=True, progress=False) as trainer:
        trainer.train()

    def epochs(name):
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert all(r["epoch_base"] == 1 for r in rows), name
        return [r["epoch"] for r in rows]

    assert epochs("launches.jsonl") == [1, 2]
    assert epochs("evaluations.jsonl") == [1, 2]
    metrics = epochs("metrics.jsonl")
    assert metrics == [1] * iterations + [2] * iterations
