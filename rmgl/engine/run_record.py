"""The record of one training run: its folder and everything written there.

Layout of ``<run.output_dir>/<run.name>/``::

    config.yaml          the resolved config that ran (rewritten only when a run starts)
    train.log            readable log
    metrics.jsonl        one JSON row per iteration (losses, LR)
    evaluations.jsonl    one JSON row per evaluation (epoch, mAP, rank-1, mINP): the learning curve
                         (every row of the three .jsonl files counts epochs from 1 and says so
                         with "epoch_base": 1; rmgl.reporting.run_logs reads older runs too)
    launches.jsonl       one JSON row per start, resume and torchrun restart: the first epoch it
                         trained, nodes, processes, device, rmgl and torch versions, time
    tensorboard/         scalars for ``tensorboard --logdir``
    last.safetensors     checkpoint after every epoch (resume from here)
    best.safetensors     checkpoint at the best evaluated mAP
    eval/                results.json, cmc.png, ranked_list.png of the latest evaluation

Only rank 0 writes; the other ranks hold a record that writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rmgl.reporting.run_logs import marked, upgrade_run

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".safetensors"


def check_run_name(name: str) -> str:
    """A run name is one non-empty path component: ``--overwrite`` deletes ``output_dir/name``,
    so an empty name or ``..`` must never reach it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(
            f"run.name={name!r} is not a usable run name: give one folder name such as "
            "run.name=market_r50 (no slashes, not empty, not '.' or '..')"
        )
    return name


class RunRecord:
    """Paths, logs, metrics and TensorBoard of one run folder."""

    def __init__(self, output_dir: str | Path, name: str, writes: bool = True) -> None:
        self.dir = Path(output_dir) / check_run_name(name)
        self.writes = writes
        self.writer = None
        self._files: dict[str, Any] = {}
        self._handler: logging.Handler | None = None

    # --- paths ---------------------------------------------------------------------------
    def checkpoint(self, name: str) -> Path:
        return self.dir / f"{name}{CHECKPOINT_SUFFIX}"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def evaluations_path(self) -> Path:
        return self.dir / "evaluations.jsonl"

    @property
    def launches_path(self) -> Path:
        return self.dir / "launches.jsonl"

    # --- starting --------------------------------------------------------------------------
    def check_start(self, resume: bool, overwrite: bool) -> None:
        """Refuse to mix two runs in one folder, and an output folder that cannot be written;
        called before anything is written."""
        _check_writable(self.dir.parent)
        if self.dir.exists() and not self.dir.is_dir():
            raise FileExistsError(
                f"the run folder {self.dir} is a file; choose another run.name or output_dir"
            )
        if resume:
            if not self.last.is_file():
                raise FileNotFoundError(
                    f"--resume: no checkpoint at {self.last}; start without --resume"
                )
            return
        holds_run = self.dir.is_dir() and any(self.dir.iterdir())
        if holds_run and not overwrite:
            what = "a run" if self.last.is_file() else "an earlier run that has no checkpoint"
            raise FileExistsError(
                f"{self.dir} already holds {what}: continue it with --resume, choose another "
                "run.name, or replace it with --overwrite"
            )

    def start(self, config_yaml: str, resume: bool, overwrite: bool, resume_epoch: int = 0) -> None:
        """Create (or, with ``overwrite``, replace) the folder, write ``config.yaml`` and open
        the logs. On resume the rows of the interrupted epoch are dropped from metrics.jsonl."""
        if not self.writes:
            return
        if overwrite and not resume and self.dir.is_dir():
            shutil.rmtree(self.dir)  # only ever the run's own folder (see check_run_name)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(config_yaml)
        for leftover in self.dir.glob(f"*{CHECKPOINT_SUFFIX}.tmp"):
            leftover.unlink()  # a checkpoint whose writing was interrupted
        if resume:
            upgrade_run(self.dir)  # an old run's rows counted epochs from 0
            for path in (self.metrics_path, self.evaluations_path):
                _drop_rows_from(path, resume_epoch + 1)  # the files count epochs from 1
        self._handler = logging.FileHandler(self.dir / "train.log")
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
        logging.getLogger("rmgl").addHandler(self._handler)
        logging.getLogger("rmgl").setLevel(logging.INFO)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir / "tensorboard"))
        for path in (self.metrics_path, self.evaluations_path):
            self._files[path.stem] = open(path, "a")  # noqa: SIM115 (closed in close())

    # --- writing -------------------------------------------------------------------------
    def metrics_row(self, row: dict[str, Any]) -> None:
        """One training iteration (needs ``epoch``)."""
        if "metrics" in self._files:
            self._files["metrics"].write(json.dumps(marked(row)) + "\n")

    def evaluation_row(self, row: dict[str, Any]) -> None:
        """One evaluation (needs ``epoch``)."""
        if "evaluations" in self._files:
            self._files["evaluations"].write(json.dumps(marked(row)) + "\n")

    def launch_row(self, row: dict[str, Any]) -> None:
        """How this start (or resume, or restart) runs, kept for every launch of the run, so
        the record says on how many nodes and processes each epoch was trained."""
        if self.writes:
            stamped = marked({**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            with open(self.launches_path, "a") as handle:
                handle.write(json.dumps(stamped) + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        for file in self._files.values():
            file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for file in self._files.values():
            file.close()
        self._files.clear()
        if self._handler is not None:
            logging.getLogger("rmgl").removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def _drop_rows_from(path: Path, epoch: int) -> None:
    """Drop the rows of 1-based ``epoch`` and later: a resumed run rewrites them."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["epoch"] < epoch]
        path.write_text("".join(line + "\n" for line in kept))


def _check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that a file can be written in it."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"cannot create the output folder {folder}: {existing} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".rmgl-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cannot write in the output folder {folder} ({err.strerror or err}); choose a "
            "writable run.output_dir"
        ) from None
