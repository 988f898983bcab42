"""The training loop: SPEC §8 schedule, AMP, DDP, exact resume, periodic evaluation.

One :class:`Trainer` per process. Under ``torchrun`` every process trains on its own
identities (PK sampler) and DDP averages gradients; only rank 0 writes logs and checkpoints
and evaluates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rmgl.data.datasets import load_dataset
from rmgl.data.loading import train_loader
from rmgl.data.records import ReidDataset
from rmgl.data.transforms import AugmentConfig, build_train_transform
from rmgl.engine.checkpoint import (
    check_compatible,
    load_checkpoint,
    optimizer_state,
    save_checkpoint,
)
from rmgl.engine.config import to_yaml
from rmgl.engine.evaluation import evaluate_model
from rmgl.engine.schedule import build_scheduler
from rmgl.losses import RMGLLoss
from rmgl.metrics import RankResult
from rmgl.model import build_model

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_context(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device), initialising the process group under torchrun.

    The device is chosen before the process group exists, so NCCL knows it; the timeout is
    long because ranks wait while rank 0 evaluates (MSMT17 with re-ranking takes minutes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world)
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return dist.get_rank(), world, device


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={name} but no CUDA device is available; use run.device=cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if world_size > 1 and name != "cpu":
        raise ValueError(f"under torchrun use run.device=auto, cuda or cpu (each rank takes its LOCAL_RANK GPU), not {name}")
    return torch.device(name)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Every (run seed, rank, epoch) gets its own generator state, so an epoch draws the same
    augmentations whether the run was interrupted before it or not, on every rank."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def parameter_groups(model: torch.nn.Module, lr: float, head_mult: float) -> list[dict]:
    """Backbone at ``lr``; reduction layers and classifiers (the ``heads``) at ``lr * head_mult``."""
    backbone, heads = [], []
    for name, param in model.named_parameters():
        (heads if ".heads." in f".{name}" else backbone).append(param)
    return [
        {"params": backbone, "lr": lr, "name": "backbone"},
        {"params": heads, "lr": lr * head_mult, "name": "heads"},
    ]


class Trainer:
    def __init__(self, cfg: DictConfig, dataset: ReidDataset | None = None, resume: bool = False,
                 progress: bool = True, batch_hook: Callable[[torch.Tensor], None] | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.rank, self.world_size, self.device = distributed_context(cfg.run.device)
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.batch_hook = batch_hook
        self.out_dir = Path(cfg.run.output_dir) / cfg.run.name
        if not resume and (self.out_dir / "last.safetensors").exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds a run: continue it with --resume, "
                    "choose another run.name, or replace it with --overwrite"
                )
            if self.is_main:
                shutil.rmtree(self.out_dir)
        seed_everything(cfg.run.seed + self.rank)

        self.dataset = dataset or load_dataset(cfg.data.dataset, cfg.data.root)
        self.size = (cfg.data.height, cfg.data.width)
        aug = AugmentConfig(**OmegaConf.to_container(cfg.data.augment))
        self.loader = train_loader(
            self.dataset.train, build_train_transform(self.size, aug), cfg.data.num_identities,
            cfg.data.num_instances, cfg.data.workers, cfg.run.seed, self.rank, self.world_size,
        )
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training split is too small for one PK batch; lower data.num_identities")

        model_options = OmegaConf.to_container(cfg.model)
        self.model = build_model(self.dataset.num_train_pids, **model_options).to(self.device)
        self.amp_dtype = self._amp_dtype(cfg.run.amp)
        if self.device.type == "cuda" and cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, cfg.optim.lr, cfg.optim.head_lr_mult),
            lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = build_scheduler(self.optimizer, self.iters_per_epoch, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.criterion = RMGLLoss(cfg.loss.triplet_margin, cfg.loss.soft_margin, cfg.loss.label_smoothing)
        self.ddp = (
            torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world_size > 1 else self.model
        )
        self.start_epoch = 0
        self.best_map = -1.0
        self.results: dict[str, RankResult] = {}
        if self.is_main:
            self._setup_outputs()
        if resume:
            self._resume()

    # --- set-up --------------------------------------------------------------------------
    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"run.amp must be auto, bf16, fp16 or off, got {amp!r}")
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda" and amp == "fp16":
            raise ValueError("run.amp=fp16 needs a GPU; use bf16 or off on the CPU")
        return torch.float16 if amp == "fp16" else torch.bfloat16

    def _setup_outputs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(to_yaml(self.cfg))
        handler = logging.FileHandler(self.out_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logging.getLogger("rmgl").addHandler(handler)
        logging.getLogger("rmgl").setLevel(logging.INFO)
        self._log_handler = handler
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        self.metrics_file = open(self.out_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        log.info("%s: %d train ids, %d images; %d iterations/epoch on %s x %d process(es)",
                 self.dataset.name, self.dataset.num_train_pids, len(self.dataset.train),
                 self.iters_per_epoch, self.device, self.world_size)

    def _resume(self) -> None:
        path = self.out_dir / "last.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
        ckpt = load_checkpoint(path)
        state = check_compatible(self.model, ckpt.model_state())
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(optimizer_state(ckpt))
        trainer = ckpt.trainer
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.loader.sampler.load_state_dict(trainer["sampler"])
        if trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        self.start_epoch = trainer["epoch"] + 1
        if self.is_main:  # drop the rows of the epoch that was interrupted
            metrics = self.out_dir / "metrics.jsonl"
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["epoch"] < self.start_epoch]
            metrics.write_text("".join(line + "\n" for line in kept))
        self.best_map = trainer.get("best_map", -1.0)
        log.info("resumed from %s at epoch %d", path, self.start_epoch + 1)

    # --- the loop ----------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.ddp.train()
        seed_everything(epoch_seed(self.cfg.run.seed, self.rank, epoch))
        self.loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        start, seen = time.perf_counter(), 0
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", disable=not self.progress, leave=False)
        for it, (images, pids, _) in enumerate(bar):
            if self.batch_hook is not None:
                self.batch_hook(pids)
            images = images.to(self.device, non_blocking=True)
            pids = pids.to(self.device, non_blocking=True)
            if self.device.type == "cuda" and self.cfg.run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                output = self.ddp(images)
            loss, terms = self.criterion(_float_output(output), pids)
            if not self._finite_everywhere(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} (on this rank) at epoch {epoch + 1}, iteration {it + 1} "
                    f"(terms: {', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); the last good "
                    f"checkpoint {self.out_dir / 'last.safetensors'} is kept. Lower optim.lr or disable AMP."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            seen += images.shape[0] * self.world_size
            step = epoch * self.iters_per_epoch + it
            values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.is_main:
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                self.metrics_file.write(json.dumps({"epoch": epoch, "iter": it, "lr": lr, **values}) + "\n")
                if step % self.cfg.run.log_every == 0:
                    for k, v in values.items():
                        self.writer.add_scalar(f"train/{k}", v, step)
                    self.writer.add_scalar("train/lr", lr, step)
                    self.writer.add_scalar("train/images_per_s", rate, step)
        means = {k: v / self.iters_per_epoch for k, v in sums.items()}
        means["images_per_s"] = seen / (time.perf_counter() - start)
        return means

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """False when the loss is NaN/inf on any rank, so that all ranks stop together
        instead of the healthy ones hanging in the gradient all-reduce."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _save(self, name: str, epoch: int) -> None:
        trainer = {
            "epoch": epoch,
            "best_map": self.best_map,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.loader.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "num_classes": self.dataset.num_train_pids,
        }
        save_checkpoint(self.out_dir / f"{name}.safetensors", self.model, to_yaml(self.cfg), trainer, self.optimizer)

    def evaluate(self, epoch: int | None = None, rerank: bool | None = None, out_dir: Path | None = None) -> dict[str, RankResult]:
        rerank = self.cfg.eval.rerank if rerank is None else rerank
        results = evaluate_model(
            self.model, self.dataset, self.size, rerank=rerank, metric=self.cfg.eval.metric,
            batch_size=self.cfg.data.test_batch_size, workers=self.cfg.data.workers,
            out_dir=out_dir, progress=self.progress,
        )
        for key, result in results.items():
            log.info("%s%s:\n%s", f"epoch {epoch + 1} " if epoch is not None else "", key, result)
            if epoch is not None:
                for metric, value in (("mAP", result.mAP), ("rank1", result.rank(1)), ("mINP", result.mINP)):
                    self.writer.add_scalar(f"eval_{key}/{metric}", value, epoch + 1)
        return results

    def train(self) -> dict[str, RankResult]:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            means = self.train_epoch(epoch)
            last = epoch + 1 == cfg.optim.epochs
            if self.is_main:
                log.info("epoch %d/%d: %s", epoch + 1, cfg.optim.epochs,
                         ", ".join(f"{k} {v:.4g}" for k, v in means.items() if "/" not in k))
                due = last or (cfg.eval.every > 0 and (epoch + 1) % cfg.eval.every == 0)
                if due:
                    self.results = self.evaluate(epoch, out_dir=self.out_dir / "eval")
                    if self.results["plain"].mAP > self.best_map:
                        self.best_map = self.results["plain"].mAP
                        self._save("best", epoch)
                self._save("last", epoch)
                self.metrics_file.flush()
            if self.world_size > 1:
                dist.barrier()
        return self.results

    def close(self) -> None:
        if self.is_main:
            self.writer.close()
            self.metrics_file.close()
            logging.getLogger("rmgl").removeHandler(self._log_handler)
            self._log_handler.close()


def _float_output(output):
    """Losses in float32 whatever the autocast dtype: a bf16 softmax over 751 classes is lossy."""
    from dataclasses import fields, is_dataclass, replace

    if not is_dataclass(output):
        return output
    return replace(output, **{
        f.name: {k: v.float() for k, v in getattr(output, f.name).items()}
        for f in fields(output) if isinstance(getattr(output, f.name), dict)
    })

