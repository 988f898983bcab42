"""Trainer hooks: how logging, evaluation and checkpoint policies plug into the loop.

A :class:`Callback` overrides the hooks it needs; the trainer calls every callback's hook in
order. Logging and periodic evaluation are callbacks themselves, so a new logger or a new
evaluation schedule is a new callback, not an edit of the trainer.

Examples::

    from rmgl.engine import Callback, Trainer, load_config

    class PrintLoss(Callback):
        def on_epoch_end(self, trainer, epoch, summary):
            print(epoch + 1, summary["loss"])

    trainer = Trainer(load_config("demo", ["data.root=runs/demo/synthetic"]),
                      callbacks=[PrintLoss()])
    trainer.train()
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rmgl.data.transforms import RandomShift

if TYPE_CHECKING:
    from rmgl.engine.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What one training iteration did (every rank sees its own).

    ``losses`` are 0-d tensors on the training device, this rank's values: reading one
    (``float(v)``, ``.item()``) makes the host wait for the GPU, which the training loop
    itself does only once per ``run.log_every`` iterations. :meth:`Callback.on_log` gets
    them as numbers (over the global batch under DDP).
    """

    epoch: int  # 0-based
    iteration: int  # 0-based, within the epoch
    global_step: int  # 0-based, over the run
    lr: float  # backbone LR used for this step
    losses: dict[str, torch.Tensor]  # "loss" and every named term (detached, on the device)
    images_per_s: float  # running rate over the epoch, all ranks (host clock)
    pids: torch.Tensor  # identities of this rank's batch (CPU)


# the keys of an on_log row that are not loss terms
LOG_KEYS = ("epoch", "iter", "global_step", "lr", "images_per_s")


class Callback:
    """Base class: every hook does nothing. Hooks run on every rank; use
    ``trainer.is_main`` to act on rank 0 only."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the epoch's first batch is drawn, also for the first epoch of a resumed run.
        DataLoader workers are created after it, so a change to the training transform here
        applies to this epoch. Anything set here must depend on ``epoch`` alone, so that a
        resumed run trains exactly as an uninterrupted one."""

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None: ...

    def on_log(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        """Every ``run.log_every`` iterations and at the end of each epoch, with one row per
        iteration since the last call: ``epoch``, ``iter``, ``global_step``, ``lr``,
        ``images_per_s`` (at the call) and every loss term as a float. Under DDP the terms are
        the means over the processes, i.e. the values of the global batch."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        """After the epoch's ``last`` checkpoint is written, so a failing callback (an
        evaluation on a broken gallery, say) never costs the epoch's training."""

    def on_train_end(self, trainer: Trainer) -> None: ...


class MetricsLogger(Callback):
    """Per-iteration rows in metrics.jsonl, TensorBoard scalars every ``every`` iterations
    (``run.log_every``: the losses are read from the device that often), and one readable
    log line per epoch with the epoch's time and the time the run still needs."""

    def __init__(self, every: int = 20) -> None:
        self.every = every
        self._started: float | None = None
        self._first_epoch = 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self._started is None:  # the first epoch of this launch (a resume starts later)
            self._started, self._first_epoch = time.perf_counter(), epoch
        self._epoch_started = time.perf_counter()

    def on_log(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if not trainer.is_main:
            return
        record = trainer.record
        for row in rows:
            losses = {k: v for k, v in row.items() if k not in LOG_KEYS}
            record.metrics_row(  # epochs counted from 1, as in train.log
                {"epoch": row["epoch"] + 1, "iter": row["iter"], "lr": row["lr"], **losses}
            )
            if row["global_step"] % self.every == 0:
                record.scalars("train", losses, row["global_step"])
                record.scalars(
                    "train",
                    {"lr": row["lr"], "images_per_s": row["images_per_s"]},
                    row["global_step"],
                )

    def on_epoch_end(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        if trainer.is_main:
            now = time.perf_counter()
            epochs = trainer.cfg.optim.epochs
            # the mean time of this launch's epochs so far, evaluations included
            per_epoch = (now - self._started) / (epoch + 1 - self._first_epoch)
            remaining = per_epoch * (epochs - epoch - 1)
            log.info(
                "epoch %d/%d: %s; took %s, run ETA %s",
                epoch + 1,
                epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if "/" not in k),
                format_duration(now - self._epoch_started),
                format_duration(remaining),
            )
            trainer.record.flush()


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``; ``65`` -> ``"1:05"``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PeriodicEvaluation(Callback):
    """Evaluate every ``every`` epochs (0 = only at the end) and always after the last;
    keep ``best.safetensors`` at the best plain mAP. Each evaluation is a row of
    evaluations.jsonl (``"eval": "plain"`` / ``"rerank"``, with the metric and protocol its
    numbers were measured with): the learning curve."""

    def __init__(self, every: int = 10, rerank: bool = False) -> None:
        self.every = every
        self.rerank = rerank

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch + 1 == epochs or (self.every > 0 and (epoch + 1) % self.every == 0)

    def on_epoch_end(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        if not (trainer.is_main and self.due(epoch, trainer.cfg.optim.epochs)):
            return
        results = trainer.evaluate(rerank=self.rerank, out_dir=trainer.record.eval_dir)
        trainer.results = results
        for key, result in results.items():
            log.info("epoch %d %s:\n%s", epoch + 1, key, result)
            values = {"mAP": result.mAP, "rank1": result.rank(1), "mINP": result.mINP}
            trainer.record.scalars(f"eval_{key}", values, epoch + 1)
            setting = {"metric": trainer.cfg.eval.metric, "protocol": result.protocol}
            trainer.record.evaluation_row({"epoch": epoch + 1, "eval": key, **values, **setting})
        if results["plain"].mAP > trainer.best_map:
            trainer.best_map = results["plain"].mAP
            trainer.save("best", epoch)
            trainer.save("last", epoch)  # so a resumed run knows the best mAP so far
        trainer.record.flush()


def rsa_probability(epoch: int, p: float, start: int = 0, ramp: int = 0) -> float:
    """The RSA probability of 0-based ``epoch``: 0 for the first ``start`` epochs, then rising
    by p/ramp per epoch until it reaches ``p`` in the ramp's last epoch, ``p`` afterwards
    (``p`` throughout with the defaults)."""
    if epoch < start:
        return 0.0
    if ramp == 0:
        return p
    return p * min(1.0, (epoch - start + 1) / ramp)


def _random_shift(transform) -> RandomShift:
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, RandomShift):
            return step
    raise ValueError(
        "the training transform has no RandomShift whose probability could be scheduled"
    )


class RSASchedule(Callback):
    """Sets the training transform's RSA probability every epoch (``data.augment.rsa_start_epoch``,
    ``rsa_ramp_epochs``), as a function of the epoch alone so that a resumed run matches."""

    def __init__(self, p: float, start: int = 0, ramp: int = 0) -> None:
        self.p, self.start, self.ramp = p, start, ramp

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        shift = _random_shift(trainer.loader.dataset.transform)
        shift.p = rsa_probability(epoch, self.p, self.start, self.ramp)
        if trainer.is_main and (self.start or self.ramp):
            log.info("epoch %d: RSA probability %.4g", epoch + 1, shift.p)


class ABPWarmup(Callback):
    """Uniform stripe boundaries in training for the first ``epochs`` epochs, ABP afterwards
    (``model.abp_warmup_epochs``). Sets the model's runtime flag ``abp_warmup``, which is not
    part of its state dict, from the epoch alone."""

    def __init__(self, epochs: int = 0) -> None:
        self.epochs = epochs

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        trainer.model.abp_warmup = epoch < self.epochs
        if trainer.is_main and self.epochs and epoch in (trainer.start_epoch, self.epochs):
            log.info(
                "epoch %d: %s stripes in training",
                epoch + 1,
                "uniform" if epoch < self.epochs else "ABP",
            )
