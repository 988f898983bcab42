"""The training loop (paper §IV-A): PK batches, the per-iteration LR schedule, AMP, DDP.

One :class:`Trainer` per process. Everything around the loop lives elsewhere: the device,
process group and seeds in :mod:`rmgl.engine.runtime`, the run folder (logs, metrics,
TensorBoard, checkpoints) in :mod:`rmgl.engine.run_record`, logging and periodic evaluation
in :mod:`rmgl.engine.callbacks`. Under ``torchrun`` the ranks share each global batch
(``data.num_identities`` is the global P; the PK sampler draws the one-process batches), the
triplet terms mine over the gathered global batch and DDP averages gradients; only rank 0
writes and evaluates.

The step never waits for the device: the loss terms stay there and are read once every
``run.log_every`` iterations, when they are logged and checked for NaN.

Examples::

    from rmgl.engine import Trainer, load_config

    cfg = load_config("demo", ["data.root=runs/demo/synthetic", "optim.epochs=1"])
    with Trainer(cfg, overwrite=True) as trainer:
        results = trainer.train()      # {"plain": RankResult, "rerank": RankResult}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import rmgl
from rmgl.data.datasets import load_dataset
from rmgl.data.holdout import hold_out_identities, write_split_csv
from rmgl.data.loading import check_readable, train_loader
from rmgl.data.records import ReidDataset
from rmgl.data.transforms import AugmentConfig, build_train_transform
from rmgl.engine.callbacks import (
    ABPWarmup,
    Callback,
    MetricsLogger,
    PeriodicEvaluation,
    RSASchedule,
    StepInfo,
)
from rmgl.engine.checkpoint import check_compatible, optimizer_state, save_checkpoint
from rmgl.engine.config import check_resume_changes, from_yaml_text, to_yaml
from rmgl.engine.evaluation import evaluate_model, resolve_protocol
from rmgl.engine.load import Preprocess, init_from_checkpoint, model_config, read_checkpoint
from rmgl.engine.run_record import RunRecord
from rmgl.engine.runtime import (
    amp_dtype,
    autocast,
    epoch_seed,
    gather_global_batch,
    seed_everything,
    setup_runtime,
)
from rmgl.engine.schedule import build_optimizer, build_scheduler
from rmgl.losses import build_loss
from rmgl.metrics import RankResult
from rmgl.model import build_model

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


RESUME_AUTO = "auto"  # resume when the run has a checkpoint, else start it (torchrun restarts)


def identities_per_rank(num_identities: int, world_size: int) -> int:
    """``data.num_identities`` is the global P: two GPUs training the paper's 12 x 4 batch take
    6 identities each, so the batch, the number of steps and the LR schedule are the same as on
    one GPU."""
    if num_identities % world_size:
        raise ValueError(
            f"data.num_identities={num_identities} (identities per batch, all processes together) "
            f"does not divide among {world_size} processes; use a multiple of {world_size}"
        )
    return num_identities // world_size


class Trainer:
    """Trains one config; ``callbacks`` are added after the built-in schedules (RSA, ABP
    warm-up), logging and evaluation.

    The model, loss and optimiser come from :meth:`build_model`, :meth:`build_loss` and
    :meth:`build_optimizer`: by default what ``model.name`` and ``loss.name`` choose in the
    registries (:mod:`rmgl.model`, :mod:`rmgl.losses`) and the paper's SGD; a subclass may
    override any of them."""

    def __init__(
        self,
        cfg: DictConfig,
        dataset: ReidDataset | None = None,
        resume: bool | str = False,
        overwrite: bool = False,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """``resume``: True continues the run from its ``last`` checkpoint; ``"auto"`` does
        so when the run has one and otherwise starts it (replacing a folder whose run never
        reached its first checkpoint): what a ``torchrun --max-restarts`` launch needs, whose
        restarts run the same command."""
        self.cfg = cfg
        self.runtime = setup_runtime(cfg.run.device)
        self.device = self.runtime.device
        self.progress = progress and self.is_main
        self.record = RunRecord(cfg.run.output_dir, cfg.run.name, writes=self.is_main)
        resume, overwrite = self._resolve_resume(resume, overwrite)
        self.record.check_start(resume, overwrite)
        checkpoint = read_checkpoint(self.record.last) if resume else None
        if checkpoint is not None:
            check_resume_changes(
                from_yaml_text(checkpoint.config_yaml), cfg, checkpoint.trainer["epoch"] + 1
            )
        seed_everything(cfg.run.seed + self.rank)

        self.dataset = dataset or load_dataset(cfg.data.dataset, cfg.data.root)
        self.held_out = not self.dataset.query and not self.dataset.gallery
        if self.held_out:  # only training identities: evaluate on some of them
            self.dataset = hold_out_identities(
                self.dataset, float(cfg.data.holdout_ids), int(cfg.run.seed)
            )
        if self.is_main:  # evaluation must not fail after hours of training
            check_readable(self.dataset.query, "query")
            check_readable(self.dataset.gallery, "gallery")
        self.preprocess = Preprocess.from_config(cfg)  # training and evaluation alike
        self.size = self.preprocess.size
        aug = AugmentConfig(**OmegaConf.to_container(cfg.data.augment))
        self.loader = train_loader(
            self.dataset.train,
            build_train_transform(self.size, aug, self.preprocess.mean, self.preprocess.std),
            identities_per_rank(cfg.data.num_identities, self.runtime.world_size),
            cfg.data.num_instances,
            cfg.data.workers,
            cfg.run.seed,
            self.rank,
            self.runtime.world_size,
        )
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ValueError(
                "the training split is too small for one PK batch; lower data.num_identities"
            )

        self.model = self.build_model(resumed=checkpoint is not None).to(self.device)
        if cfg.run.sync_bn:
            self.model = self._sync_batchnorm(self.model)
        self.amp_dtype = amp_dtype(cfg.run.amp, self.device)
        if self.device.type == "cuda" and cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = self.build_optimizer(self.model)
        self.scheduler = build_scheduler(self.optimizer, self.iters_per_epoch, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = self.build_loss()
        self.ddp = self.model
        if self.runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        # Only the training forward is compiled: evaluation runs the plain module (eval mode
        # would trace a second graph) and checkpoints keep the plain module's parameter names.
        self.train_forward = self.ddp
        if cfg.run.compile:
            self.train_forward = torch.compile(self.ddp, mode=cfg.run.compile_mode)
        # CUDA graphs replay into the same output buffers: each step must say it is a new one
        self.marks_steps = cfg.run.compile and cfg.run.compile_mode == "reduce-overhead"
        self.start_epoch = 0
        self.best_map = -1.0
        self.results: dict[str, RankResult] = {}
        if checkpoint is not None:
            self._restore(checkpoint)
        aug_cfg = cfg.data.augment
        self.callbacks: list[Callback] = [
            # schedules first: every later callback sees the epoch's settings
            RSASchedule(aug_cfg.rsa, aug_cfg.rsa_start_epoch, aug_cfg.rsa_ramp_epochs),
            ABPWarmup(cfg.model.get("abp_warmup_epochs", 0)),
            MetricsLogger(cfg.run.log_every),
            PeriodicEvaluation(cfg.eval.every, cfg.eval.rerank),
            *callbacks,
        ]
        self.record.start(to_yaml(cfg), resume, overwrite, self.start_epoch)
        if self.held_out and self.is_main:
            split = write_split_csv(self.dataset, self.record.dir / "split.csv")
            log.info(
                "%s has only training identities: %d of them are held out for evaluation "
                "(data.holdout_ids=%g, seed run.seed=%d): %d query and %d gallery images, "
                "listed in %s (data.dataset=csv data.root=%s trains on the same split)",
                self.dataset.root,
                len({r.pid for r in self.dataset.query}),
                cfg.data.holdout_ids,
                cfg.run.seed,
                len(self.dataset.query),
                len(self.dataset.gallery),
                split,
                split,
            )
        self.record.launch_row(
            {
                "epoch": self.start_epoch + 1,  # 1-based, as in train.log and every record
                "resumed": checkpoint is not None,
                "nodes": self.runtime.nodes,
                "processes": self.runtime.world_size,
                "device": self.device.type,
                "rmgl": rmgl.__version__,
                "torch": torch.__version__,
            }
        )
        if self.is_main:
            log.info(
                "%s: %d train ids, %d images; %d iterations/epoch on %s x %d process(es), "
                "%d node(s)",
                self.dataset.name,
                self.dataset.num_train_pids,
                len(self.dataset.train),
                self.iters_per_epoch,
                self.device,
                self.runtime.world_size,
                self.runtime.nodes,
            )
            if checkpoint is not None:
                log.info("resumed from %s at epoch %d", self.record.last, self.start_epoch + 1)
                if self.best_map_reset:
                    log.warning(self.best_map_reset)
                self._check_world_size(checkpoint.trainer)

    # --- set-up --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def out_dir(self) -> Path:
        return self.record.dir

    # The three builders a subclass may override (a model, loss or optimiser outside the
    # registries); the defaults build what the config's names choose.
    def build_model(self, resumed: bool) -> torch.nn.Module:
        """The model ``model.name`` names, for the dataset's training identities, started
        from ``model.init_from`` when set (a resumed run's weights come from its checkpoint)."""
        options = model_config(self.cfg)
        init_from = options.init_from
        if init_from or resumed:
            options = replace(options, pretrained="none")  # the weights come from a checkpoint
        model = build_model(options, self.dataset.num_train_pids)
        if init_from and not resumed:
            message = init_from_checkpoint(model, self.cfg.model, init_from)
            if self.is_main:
                log.info(message)
        return model

    def build_loss(self) -> torch.nn.Module:
        """The loss ``loss.name`` names; under DDP it may mine over the global batch."""
        gather = gather_global_batch if self.runtime.distributed else None
        return build_loss(OmegaConf.to_object(self.cfg.loss), gather=gather)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """SGD over the paper's parameter groups (:func:`rmgl.engine.schedule.build_optimizer`)."""
        return build_optimizer(model, self.cfg.optim)

    def _resolve_resume(self, resume: bool | str, overwrite: bool) -> tuple[bool, bool]:
        """(resume, overwrite) after deciding ``"auto"``; rank 0 decides for every rank, and a
        rank that cannot see the checkpoint rank 0 resumes from says so."""
        if resume not in (True, False, RESUME_AUTO):
            raise ValueError(f"resume must be True, False or {RESUME_AUTO!r}, got {resume!r}")
        if resume == RESUME_AUTO:
            found = [self.record.last.is_file()]
            if self.runtime.distributed:
                dist.broadcast_object_list(found, src=0)
            resume, overwrite = found[0], overwrite or not found[0]
        if resume and self.runtime.distributed and not self.record.last.is_file():
            raise FileNotFoundError(
                f"rank {self.rank} cannot see {self.record.last}, which the run resumes from: "
                "run.output_dir must be a folder every node sees (a shared mount)"
            )
        if self.runtime.restart and not resume and not overwrite:
            restarted = (
                f"torchrun restarted the group ({self.runtime.restart} restart(s)); give "
                "rmgl train --auto-resume so that a restart continues from the last checkpoint"
            )
            if self.record.dir.is_dir() and any(self.record.dir.iterdir()):
                raise FileExistsError(f"{self.record.dir} already holds a run: {restarted}")
        return bool(resume), overwrite

    def _sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """BatchNorm over the global batch (``run.sync_bn``); one process has nothing to sync."""
        if not self.runtime.distributed:
            if self.is_main:
                log.info("run.sync_bn: one process, nothing to synchronise")
            return model
        if self.device.type != "cuda":
            raise ValueError(
                "run.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernel); "
                "leave it off for CPU processes"
            )
        # the converted layers keep the parameters, buffers and state-dict names
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def _check_world_size(self, state: dict) -> None:
        """A resume with another number of processes is allowed and said: the global batches,
        the steps per epoch and the LR schedule do not depend on it, but the random
        augmentations (seeded per rank) and, without run.sync_bn, the BatchNorm statistics
        (per process) do, so the run is no longer the one an unchanged group would train."""
        before = state.get("world_size", 1)
        if before != self.runtime.world_size:
            log.warning(
                "resumed with %d process(es) where the checkpoint was trained with %d: the same "
                "global batches, steps and learning rates (data.num_identities is the global P); "
                "the augmentations and BatchNorm statistics follow the new number of processes",
                self.runtime.world_size,
                before,
            )

    def _restore(self, ckpt) -> None:
        self.model.load_state_dict(check_compatible(self.model, ckpt.model_state()))
        self.optimizer.load_state_dict(optimizer_state(ckpt))
        state = ckpt.trainer
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.sampler.load_state_dict(state["sampler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.best_map = state.get("best_map", -1.0)
        # best.safetensors is chosen by comparing mAPs: only those of one metric and protocol
        saved = from_yaml_text(ckpt.config_yaml).eval
        changes = [
            f"eval.{key} {before} -> {after}"
            for key, before, after in (
                ("metric", saved.metric, self.cfg.eval.metric),
                (
                    "protocol",
                    resolve_protocol(saved.protocol, self.dataset),
                    resolve_protocol(self.cfg.eval.protocol, self.dataset),
                ),
            )
            if before != after
        ]
        self.best_map_reset = None
        if changes and self.best_map >= 0:
            self.best_map_reset = (
                f"resumed with {', '.join(changes)}: the best mAP so far "
                f"({100 * self.best_map:.2f} %) was measured under the old setting, so it is "
                "not compared with new ones; the next evaluation replaces best.safetensors"
            )
            self.best_map = -1.0

    # --- the loop ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the PK sampler; returns the epoch's mean losses and images/s."""
        self.ddp.train()
        seed_everything(epoch_seed(self.cfg.run.seed, self.rank, epoch))
        self.loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        pending: list[tuple[int, float, torch.Tensor]] = []  # (iteration, lr, loss terms)
        names: list[str] = []
        start, seen = time.perf_counter(), 0
        desc = f"epoch {epoch + 1}/{self.cfg.optim.epochs}"
        bar = tqdm(self.loader, desc=desc, disable=not self.progress, leave=False)
        for it, (images, pids, _) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            targets = pids.to(self.device, non_blocking=True)
            if self.device.type == "cuda" and self.cfg.run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.marks_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device, self.amp_dtype):
                output = self.train_forward(images)
            loss, terms = self.criterion(_float_output(output), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            seen += images.shape[0] * self.runtime.world_size
            losses = {"loss": loss.detach(), **terms}
            names = list(losses)
            pending.append((it, lr, torch.stack(list(losses.values()))))
            rate = seen / (time.perf_counter() - start)
            step = StepInfo(epoch, it, epoch * self.iters_per_epoch + it, lr, losses, rate, pids)
            for callback in self.callbacks:
                callback.on_step_end(self, step)
            if (it + 1) % self.cfg.run.log_every == 0 or it + 1 == self.iters_per_epoch:
                rows = self._read_losses(epoch, names, pending, rate)
                pending = []
                for row in rows:
                    for k in names:
                        sums[k] = sums.get(k, 0.0) + row[k]
                for callback in self.callbacks:
                    callback.on_log(self, rows)
                if self.progress:
                    last = rows[-1]
                    bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        means = {k: v / self.iters_per_epoch for k, v in sums.items()}
        means["images_per_s"] = seen / (time.perf_counter() - start)
        return means

    def _read_losses(
        self,
        epoch: int,
        names: list[str],
        pending: list[tuple[int, float, torch.Tensor]],
        rate: float,
    ) -> list[dict]:
        """The loss terms of the iterations in ``pending`` as numbers: the one point where the
        host waits for the device. Under DDP they are averaged over the processes first (the
        global batch's values, and a NaN on any rank reaches every rank, so all stop
        together). Raises :class:`TrainingDiverged` at the first non-finite loss."""
        values = torch.stack([v for _, _, v in pending])
        if self.runtime.distributed:
            dist.all_reduce(values)
            values /= self.runtime.world_size
        rows = []
        for (it, lr, _), numbers in zip(pending, values.tolist()):
            row = {
                "epoch": epoch,
                "iter": it,
                "global_step": epoch * self.iters_per_epoch + it,
                "lr": lr,
                "images_per_s": rate,
                **dict(zip(names, numbers)),
            }
            if not all(math.isfinite(v) for v in numbers):
                self._diverged(row, names, stopped_at=pending[-1][0])
            rows.append(row)
        return rows

    def _diverged(self, row: dict, names: list[str], stopped_at: int) -> None:
        where = (
            f" (mean over {self.runtime.world_size} processes)" if self.runtime.distributed else ""
        )
        late = (
            f"; training stopped at iteration {stopped_at + 1}, where the losses were next read "
            f"(every run.log_every={self.cfg.run.log_every} iterations)"
            if stopped_at != row["iter"]
            else ""
        )
        terms = ", ".join(f"{k}={row[k]:.3g}" for k in names if k != "loss")
        raise TrainingDiverged(
            f"loss is {row['loss']}{where} at epoch {row['epoch'] + 1}, iteration {row['iter'] + 1} "
            f"(terms: {terms}){late}; the last good checkpoint {self.record.last} is kept. Lower "
            "optim.lr or disable AMP."
        )

    def save(self, name: str, epoch: int) -> Path | None:
        """Write ``<run>/<name>.safetensors`` (rank 0 only) with everything resume needs."""
        if not self.is_main:
            return None
        state = {
            "epoch": epoch,
            "best_map": self.best_map,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.loader.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "num_classes": self.dataset.num_train_pids,
            "world_size": self.runtime.world_size,
            "nodes": self.runtime.nodes,
        }
        path = self.record.checkpoint(name)
        return save_checkpoint(path, self.model, to_yaml(self.cfg), state, self.optimizer)

    def evaluate(
        self, rerank: bool | None = None, out_dir: Path | None = None
    ) -> dict[str, RankResult]:
        """Evaluate the current model on the dataset's query and gallery."""
        return evaluate_model(
            self.model,
            self.dataset,
            self.preprocess,
            rerank=self.cfg.eval.rerank if rerank is None else rerank,
            metric=self.cfg.eval.metric,
            batch_size=self.cfg.data.test_batch_size,
            workers=self.cfg.data.workers,
            out_dir=out_dir,
            progress=self.progress,
            amp=amp_dtype(self.cfg.run.amp, self.device, evaluation=True),
            protocol=self.cfg.eval.protocol,
        )

    def train(self) -> dict[str, RankResult]:
        """Train from ``start_epoch`` to ``optim.epochs``; the last evaluation's results."""
        for callback in self.callbacks:
            callback.on_train_start(self)
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            for callback in self.callbacks:
                callback.on_epoch_start(self, epoch)
            summary = self.train_epoch(epoch)
            self.save("last", epoch)  # before any evaluation: a failing one never costs the epoch
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, summary)
            self.runtime.barrier()
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.results

    def close(self) -> None:
        self.record.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _float_output(output):
    """Losses in float32 whatever the autocast dtype: a bf16 softmax over 751 classes is lossy."""
    if not is_dataclass(output):
        return output
    return replace(
        output,
        **{
            f.name: {k: v.float() for k, v in getattr(output, f.name).items()}
            for f in fields(output)
            if isinstance(getattr(output, f.name), dict)
        },
    )
