"""What a training run tells its user: one epoch numbering (from 1) in train.log,
metrics.jsonl, evaluations.jsonl and launches.jsonl; an ETA in every epoch line; and
run.log_every setting how often the losses are read (log callbacks, TensorBoard)."""

import json
import re

import pytest

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.engine.callbacks import Callback, format_duration
from rmgl.engine.config import load_config
from rmgl.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """
data: {{dataset: folder, root: {root}, height: 48, width: 16, num_identities: 4, num_instances: 2, workers: 0, test_batch_size: 64}}
model: {{backbone: resnet18, pretrained: none, branches: [2]}}
optim: {{epochs: 2, warmup_epochs: 1, milestones: [2], lr: 0.02}}
eval: {{every: 1, rerank: false}}
run: {{name: tiny, output_dir: {out}, log_every: 3}}
"""


class LogCalls(Callback):
    def __init__(self):
        self.calls: list[list[tuple[int, int]]] = []

    def on_log(self, trainer, rows):
        self.calls.append([(r["epoch"], r["iter"]) for r in rows])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(
        SynthConfig(seed=5, train_ids=8, test_ids=5, distractors=2, junk=1),
        root,
        workers=1,
        progress=False,
    )
    out = tmp_path_factory.mktemp("runs")
    config = out / "tiny.yaml"
    config.write_text(TINY.format(root=root, out=out))
    calls = LogCalls()
    with Trainer(load_config(config), progress=False, callbacks=[calls]) as trainer:
        trainer.train()
        iterations = trainer.iters_per_epoch
    return out / "tiny", calls, iterations


def test_one_epoch_numbering_in_every_log_and_record(trained):
    run, _, _ = trained
    log = (run / "train.log").read_text()
    logged = [int(e) for e in re.findall(r"epoch (\d+)/2: ", log)]
    evaluated = [int(e) for e in re.findall(r"epoch (\d+) plain:", log)]
    assert logged == [1, 2] and evaluated == [1, 2]
    evaluations = [json.loads(line) for line in (run / "evaluations.jsonl").open()]
    assert [r["epoch"] for r in evaluations] == evaluated
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert sorted({r["epoch"] for r in metrics}) == [1, 2]
    launches = [json.loads(line) for line in (run / "launches.jsonl").open()]
    assert [r["epoch"] for r in launches] == [1]


def test_every_epoch_line_gives_its_time_and_the_runs_eta(trained):
    run, _, _ = trained
    lines = [line for line in (run / "train.log").read_text().splitlines() if "/2: loss" in line]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"; took \d+:\d\d, run ETA \d+:\d\d$", line), line
    assert lines[-1].endswith("run ETA 0:00")  # nothing left after the last epoch


def test_log_every_sets_how_often_the_losses_are_read(trained):
    _, calls, n = trained
    per_epoch = -(-n // 3)  # every 3rd iteration and the epoch's last
    assert n > 3 and len(calls.calls) == 2 * per_epoch
    first = calls.calls[:per_epoch]
    assert [len(rows) for rows in first] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert [row for rows in first for row in rows] == [(0, i) for i in range(n)]


def test_format_duration():
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(0.4) == "0:00"
