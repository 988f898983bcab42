"""Every GPU measurement and parity check in one command, one verdict line each, one table.

    python benchmarks/gpu_check.py --out gpu_check.md      # on a GPU machine: ~5 minutes
    python benchmarks/gpu_check.py --cpu-reduced --out x.md  # CPU, tiny sizes (the tests run it)

GPU time comes in short windows, so this runs everything at once, each check guarded (a
failure is a FAIL row, never the end of the run):

1. training throughput of RMGL-R50 at 384x128 (bf16 autocast, channels_last; also with
   ``torch.compile``, default mode and reduce-overhead, i.e. CUDA graphs) and the projected
   60-epoch Market-1501 schedule (goal <= 10 min);
2. the data pipeline (decode + augment at 384x128 through a DataLoader) against that rate;
3. a short real training run (synthetic data, 2 epochs, interrupted after the first and
   resumed): the loss falls and the resumed run continues from the checkpoint;
4. bf16 AMP feature extraction against float32 with the trained model: descriptor
   difference and the change of the ranking metrics;
5. re-ranking on the GPU against the CPU at Market-1501 scale (float64 features within
   1e-5; float32 features bit for bit, as their distances are exact-rounded; time), and
   its time at MSMT17 scale, full and bf16-candidate passes;
6. ``pairwise_distance`` on the GPU against the CPU (bit for bit, duplicates tie) and its
   time against the float32 product it replaced;
7. feature extraction in true float32 while the caller allows TF32 (flags inside, restored,
   error against float64 next to TF32's);
8. descriptors per second of one GPU (float32 and bf16, batch 256): what one encoder actor
   of ``rmgl extract --engine ray`` can reach;
9. the real Trainer (data loading, sampler, logging, checkpoints) for a few hundred steps of
   RMGL-R50, eager, compiled and with CUDA graphs: the rate a user's run gets.

Without CUDA, ``--cpu-reduced`` runs the same code on tiny sizes on the CPU so that it cannot
rot, and every GPU row says SKIPPED (no GPU) with what was exercised instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rmgl.engine.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

MARKET_TRAIN_IMAGES = 12936
GOAL_MINUTES = 10.0
GOAL_RATE = 60 * MARKET_TRAIN_IMAGES / (GOAL_MINUTES * 60)  # images/s for the 10-min goal


@dataclass
class Row:
    check: str
    verdict: str  # PASS / FAIL / SKIPPED / INFO (a measurement without a goal)
    measured: str
    goal: str


class Context:
    """What the checks share: device, mode, a scratch folder and the trained model."""

    def __init__(self, reduced: bool, device: torch.device, scratch: Path) -> None:
        self.reduced, self.device, self.scratch = reduced, device, scratch
        self.gpu = device.type == "cuda"
        self.trained = None  # (model, dataset, cfg) from the training check
        self.train_rate = 0.0  # images/s of the trainer's setting (batch 48, channels_last)

    def verdict(self, ok: bool) -> str:
        """On CPU every GPU row is SKIPPED, whatever the reduced run measured."""
        if not self.gpu:
            return "SKIPPED (no GPU)"
        return "PASS" if ok else "FAIL"

    def info(self) -> str:
        """A measurement without a goal of its own (SKIPPED on CPU, like every GPU row)."""
        return "INFO" if self.gpu else "SKIPPED (no GPU)"


def check_train_throughput(ctx: Context) -> list[Row]:
    """The trainer's recipe at the paper's batch (48), the same without channels_last, and
    a 4x larger batch (at 48 images a step is bound by kernel launches on a fast GPU)."""
    from train_throughput import SETTINGS, measure

    if ctx.reduced:
        setting = dict(SETTINGS["demo"], P=2, K=2, size=(48, 16), name="RMGL-R18 48x16 (reduced)")
        rate = measure(setting, ctx.device, 1, 1)
        ctx.train_rate = rate
        return [_throughput_row(ctx, setting, rate, "float32 (CPU)")]
    rows = []
    for P, channels_last in ((12, True), (12, False), (48, True)):
        setting = dict(SETTINGS["r50"], P=P)
        recipe = "bf16 AMP" + (", channels_last" if channels_last else ", NCHW")
        try:  # one row's failure (e.g. out of memory at batch 192) keeps the others
            rate = measure(setting, ctx.device, 10, 10, channels_last=channels_last, windows=3)
        except Exception as error:
            traceback.print_exc()
            rows.append(
                Row(
                    f"train {setting['name']}, batch {P * 4}, {recipe}",
                    "FAIL",
                    f"error: {error!r}"[:120],
                    "",
                )
            )
            continue
        if P == 12 and channels_last:
            ctx.train_rate = rate  # the trainer's setting, for the data-pipeline row
        rows.append(_throughput_row(ctx, setting, rate, recipe))
    return rows


COMPILE_MODES = (
    ("default", "torch.compile"),
    ("reduce-overhead", "torch.compile reduce-overhead (CUDA graphs)"),
)


def check_train_throughput_compiled(ctx: Context) -> list[Row]:
    """The trainer's recipe with ``torch.compile``, default mode and ``reduce-overhead`` (CUDA
    graphs: the step was launch-bound). Late in the run, because compiling takes the longest
    and is the likeliest to fail on a new torch (a FAIL row then, after the rest)."""
    from train_throughput import SETTINGS, measure

    setting = dict(SETTINGS["r50"])
    rows = []
    for mode, recipe in COMPILE_MODES:
        name = f"train {setting['name']}, batch {setting['P'] * setting['K']}, {recipe}"
        if ctx.reduced:  # compiling takes minutes on a CPU; the GPU run does it
            rows.append(Row(name, ctx.verdict(True), "not run", ""))
            continue
        torch._dynamo.reset()
        try:
            rate = measure(setting, ctx.device, 10, 10, compile=True, compile_mode=mode, windows=3)
        except Exception as error:
            traceback.print_exc()
            rows.append(Row(name, "FAIL", f"error: {error!r}"[:120], ""))
            continue
        rows.append(_throughput_row(ctx, setting, rate, f"bf16 AMP, channels_last, {recipe}"))
    return rows


class StepClock(Callback):
    """Images/s of the real training loop after ``warmup`` steps, timed within each epoch
    (the GPU is synchronised at the first and the last timed step of an epoch only, so the
    clock adds no wait to the steps between)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.images, self.seconds, self.start, self.first = 0, 0.0, None, 0
        self.compile_seconds, self.began = 0.0, time.perf_counter()

    def on_train_start(self, trainer) -> None:
        self.began = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.start = None

    def on_step_end(self, trainer, step) -> None:
        if step.global_step < self.warmup:
            return
        if self.start is None:
            self.sync()
            if step.global_step == self.warmup:  # the warm-up steps include compiling
                self.compile_seconds = time.perf_counter() - self.began
            self.start, self.first = time.perf_counter(), step.iteration
        elif step.iteration == trainer.iters_per_epoch - 1:
            self.sync()
            self.seconds += time.perf_counter() - self.start
            self.images += (
                (step.iteration - self.first) * len(step.pids) * trainer.runtime.world_size
            )
            self.start = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def check_trainer(ctx: Context) -> list[Row]:
    """The real Trainer (data loading, PK sampler, logging, checkpoints, the evaluation at the
    end) for a few hundred steps of RMGL-R50 at 384x128, batch 48, bf16: eager, compiled
    (``run.compile=true``) and with CUDA graphs (``run.compile_mode=reduce-overhead``). The
    rate is timed after 20 warm-up steps (which include compiling), within epochs."""
    from rmgl.data.datasets import load_dataset
    from rmgl.data.synthetic import SynthConfig, generate
    from rmgl.engine.config import load_config
    from rmgl.engine.trainer import Trainer

    root = ctx.scratch / "trainer_data"
    generate(
        _tiny_synth() if ctx.reduced else SynthConfig(seed=1, scale=2.0),
        root,
        progress=False,
        **({"workers": 1} if ctx.reduced else {}),
    )
    dataset = load_dataset("folder", root)
    if ctx.reduced:
        size = ["data.height=48", "data.width=16", "model.backbone=resnet18"]
        size += ["data.num_identities=4", "data.num_instances=2", "data.workers=0"]
        epochs, warmup, name = 2, 2, "RMGL-R18 48x16 (reduced), batch 8"
    else:
        workers = max(1, min(16, (os.cpu_count() or 2) - 1))
        size = [f"data.workers={workers}"]
        epochs, warmup, name = 6, 20, "RMGL-R50 384x128 (paper), batch 48"
    rows = []
    for mode, recipe in (("off", "eager"), *COMPILE_MODES):
        precision = "bf16 AMP" if ctx.gpu else "float32 (CPU)"  # run.amp=auto
        title = f"trainer {name}, {precision}, {recipe}"
        if ctx.reduced and mode != "off":
            rows.append(Row(title, ctx.verdict(True), "not run", ""))
            continue
        compiled = (
            ["run.compile=false"]
            if mode == "off"
            else [
                "run.compile=true",
                f"run.compile_mode={mode}",
            ]
        )
        cfg = load_config(
            None,
            [
                "data.dataset=folder",
                f"data.root={root}",
                "model.pretrained=none",
                f"optim.epochs={epochs}",
                "optim.warmup_epochs=1",
                "eval.every=0",
                f"run.output_dir={ctx.scratch / 'runs'}",
                f"run.name=trainer_{mode}",
                f"run.device={ctx.device.type}",
                "run.log_every=50",
                *size,
                *compiled,
            ],
        )
        torch._dynamo.reset()
        clock = StepClock(warmup, ctx.device)
        try:
            with Trainer(cfg, dataset, overwrite=True, progress=False, callbacks=[clock]) as t:
                t.train()
                steps = epochs * t.iters_per_epoch
        except Exception as error:
            traceback.print_exc()
            rows.append(Row(title, "FAIL", f"error: {error!r}"[:120], ""))
            continue
        minutes = 60 * MARKET_TRAIN_IMAGES / clock.rate / 60
        rows.append(
            Row(
                title,
                ctx.verdict(minutes <= GOAL_MINUTES),
                f"{clock.rate:,.1f} img/s over {steps} steps ({warmup} warm-up steps: "
                f"{clock.compile_seconds:.0f} s); 60 epochs of Market-1501: {minutes:,.1f} min",
                f">= {GOAL_RATE:,.0f} img/s, <= {GOAL_MINUTES:.0f} min",
            )
        )
    return rows


def _throughput_row(ctx: Context, setting: dict, rate: float, recipe: str) -> Row:
    minutes = 60 * MARKET_TRAIN_IMAGES / rate / 60
    batch = setting["P"] * setting["K"]
    return Row(
        f"train {setting['name']}, batch {batch}, {recipe}",
        ctx.verdict(minutes <= GOAL_MINUTES),
        f"{rate:,.1f} img/s; 60 epochs of Market-1501: {minutes:,.1f} min",
        f">= {GOAL_RATE:,.0f} img/s, <= {GOAL_MINUTES:.0f} min",
    )


def check_data_pipeline(ctx: Context) -> list[Row]:
    from data_pipeline import with_workers

    from rmgl.data.datasets import read_folder
    from rmgl.data.loading import ReidImageDataset
    from rmgl.data.synthetic import SynthConfig, generate
    from rmgl.data.transforms import AugmentConfig, build_train_transform

    root = ctx.scratch / "pipeline"
    config = _tiny_synth() if ctx.reduced else SynthConfig(seed=0)
    generate(config, root, progress=False, **({"workers": 1} if ctx.reduced else {}))
    dataset = ReidImageDataset(
        read_folder(root).train, build_train_transform((384, 128), AugmentConfig()), train=True
    )
    workers = 1 if ctx.reduced else max(1, min(16, (os.cpu_count() or 2) - 1))
    rate = with_workers(dataset, workers, 16 if ctx.reduced else 4000)
    need = ctx.train_rate or GOAL_RATE
    return [
        Row(
            f"data pipeline 384x128 (RSA + flip), DataLoader {workers} workers",
            ctx.verdict(rate >= need),
            f"{rate:,.0f} img/s",
            f">= training rate ({need:,.0f} img/s)",
        )
    ]


def _tiny_synth():
    from rmgl.data.synthetic import SynthConfig

    return SynthConfig(
        seed=4,
        train_ids=8,
        test_ids=6,
        distractors=4,
        junk=2,
        cameras_per_id=(2, 3),
        images_per_camera=(2, 3),
    )


def check_training_run(ctx: Context) -> list[Row]:
    """Two epochs, interrupted after the first (as a kill would), then resumed."""
    import json

    from rmgl.data.datasets import load_dataset
    from rmgl.data.synthetic import SynthConfig, generate
    from rmgl.engine.callbacks import Callback
    from rmgl.engine.config import load_config
    from rmgl.engine.trainer import Trainer

    root = ctx.scratch / "train_data"
    generate(
        _tiny_synth() if ctx.reduced else SynthConfig(seed=0, scale=0.5),
        root,
        progress=False,
        **({"workers": 1} if ctx.reduced else {}),
    )
    dataset = load_dataset("folder", root)
    size = ["data.height=48", "data.width=16"] if ctx.reduced else []
    overrides = [
        f"data.root={root}",
        f"run.output_dir={ctx.scratch / 'runs'}",
        "run.name=gpu_check",
        "optim.epochs=2",
        "optim.milestones=[1]",
        "data.workers=0" if ctx.reduced else "data.workers=4",
        f"run.device={ctx.device.type}",
        "eval.every=0",
        "eval.rerank=false",
        *size,
    ] + (["data.num_identities=4", "data.num_instances=2"] if ctx.reduced else [])
    cfg = load_config("demo", overrides)

    class Interrupt(Callback):
        def on_epoch_end(self, trainer, epoch, summary):  # after the checkpoint is written
            raise KeyboardInterrupt

    start = time.perf_counter()
    try:
        with Trainer(cfg, dataset, overwrite=True, progress=False, callbacks=[Interrupt()]) as t:
            t.train()
    except KeyboardInterrupt:
        pass
    with Trainer(cfg, dataset, resume=True, progress=False) as trainer:
        resumed_at = trainer.start_epoch
        trainer.train()
        ctx.trained = (trainer.model, dataset, cfg)
    seconds = time.perf_counter() - start
    rows = [
        json.loads(line)
        for line in (ctx.scratch / "runs" / "gpu_check" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    first, last = (
        np.mean(losses[: max(1, len(losses) // 4)]),
        np.mean(losses[-max(1, len(losses) // 4) :]),
    )
    ok = resumed_at == 1 and last < first
    return [
        Row(
            "short training run (2 epochs, killed after 1, resumed)",
            ctx.verdict(ok),
            f"resumed at epoch {resumed_at + 1}; loss {first:.3f} -> {last:.3f}; {seconds:.0f} s",
            "resumes at epoch 2; loss falls",
        )
    ]


EXTRACTION_GOAL = 1000  # crops/s per GPU: the rate a city deployment's extraction is planned at


def check_extraction_rate(ctx: Context) -> list[Row]:
    """Descriptors per second of one GPU (``Encoder.encode_batch``: flip-averaged, the
    evaluation's code) on prepared inputs, so decoding is left out: what one
    ``rmgl extract --engine ray --num-gpus 1`` actor can reach when its decoding processes
    keep up. Float32 (what rmgl eval uses) and bf16, random weights."""
    from rmgl.deploy import Encoder
    from rmgl.engine.load import Preprocess
    from rmgl.model import RMGLConfig, build_model

    backbone, (height, width), batch = (
        ("resnet18", (48, 16), 8)
        if ctx.reduced
        else (
            "resnet50",
            (384, 128),
            256,
        )
    )
    torch.manual_seed(0)
    model = build_model(RMGLConfig(backbone=backbone, pretrained="none"), 751).eval().to(ctx.device)
    model.preprocess = Preprocess(height, width)
    inputs = torch.randn(batch, 3, height, width)
    rows = []
    for amp, precision in ((None, "float32"), (torch.bfloat16, "bf16")):
        encoder = Encoder(model, device=ctx.device, batch_size=batch, amp=amp)
        encoder.encode_batch(inputs)  # warm-up (cuDNN picks its kernels)
        rounds = 1 if ctx.reduced else 10
        start = time.perf_counter()
        for _ in range(rounds):
            encoder.encode_batch(inputs)  # returns numpy: each call waits for the GPU
        rate = rounds * batch / (time.perf_counter() - start)
        rows.append(
            Row(
                f"extraction {backbone} {height}x{width}, batch {batch}, {precision}, "
                "prepared inputs",
                ctx.verdict(rate >= EXTRACTION_GOAL),
                f"{rate:,.0f} img/s",
                f">= {EXTRACTION_GOAL:,} img/s per GPU",
            )
        )
    return rows


def check_amp_extraction(ctx: Context) -> list[Row]:
    from rmgl.data.loading import eval_loader
    from rmgl.data.records import same_image_index
    from rmgl.data.transforms import build_eval_transform
    from rmgl.metrics import evaluate_features, extract_features

    if ctx.trained is None:
        return [Row("AMP feature extraction vs float32", "FAIL", "no trained model", "")]
    model, dataset, cfg = ctx.trained
    transform = build_eval_transform(
        (cfg.data.height, cfg.data.width), tuple(cfg.data.mean), tuple(cfg.data.std)
    )
    amp = torch.bfloat16
    outputs = {}
    for precision in (None, amp):
        query, gallery = (
            extract_features(
                model, eval_loader(records, transform, 64, 0), amp=precision, progress=False
            )
            for records in (dataset.query, dataset.gallery)
        )
        result = evaluate_features(
            query.features,
            gallery.features,
            query.pids,
            gallery.pids,
            query.camids,
            gallery.camids,
            protocol=dataset.protocol,
            query_in_gallery=same_image_index(dataset.query, dataset.gallery),
        )
        outputs[precision] = (torch.cat([query.features, gallery.features]), result)
    (f32, r32), (f16, r16) = outputs[None], outputs[amp]
    diff = float((f32 - f16).abs().max())
    d_r1, d_map = 100 * (r16.cmc[0] - r32.cmc[0]), 100 * (r16.mAP - r32.mAP)
    ok = abs(d_r1) <= 0.5 and abs(d_map) <= 0.5
    return [
        Row(
            "AMP (bf16) feature extraction vs float32",
            ctx.verdict(ok),
            f"max abs descriptor diff {diff:.1e}; R1 {100 * r32.cmc[0]:.2f} -> {100 * r16.cmc[0]:.2f},"
            f" mAP {100 * r32.mAP:.2f} -> {100 * r16.mAP:.2f}",
            "R1 and mAP change <= 0.5 points",
        )
    ]


def check_rerank(ctx: Context) -> list[Row]:
    """Re-ranking on the GPU against the CPU.

    With float64 features the GPU's full pass must equal the CPU's within 1e-5 (float64
    block products round by kernel). With float32 features every distance is the float32
    nearest to the exact value on both devices, so the GPU's full and bf16-candidate passes
    must equal the CPU's full pass bit for bit.
    """
    from rerank import SCALES, clustered_features

    from rmgl.metrics import k_reciprocal_rerank

    gpu = ctx.device if ctx.gpu else torch.device("cpu")  # on a CPU-only machine, the CPU
    cpu = torch.device("cpu")
    scale, dim = ("small", 128) if ctx.reduced else ("market", 3584)
    num_q, num_g, ids = SCALES[scale]
    query, gallery = clustered_features(num_q, num_g, ids, dim=dim)
    size = f"{num_q:,} + {num_g:,}, {dim}-d"

    def timed(device, precision, dtype):
        start = time.perf_counter()
        out = k_reciprocal_rerank(
            query.astype(dtype), gallery.astype(dtype), device=device, candidate_precision=precision
        )
        return time.perf_counter() - start, out

    def differ(a, b):
        d = np.abs(a - b)
        return float(d.max()), int((d > 1e-5).any(axis=1).sum())

    rows = []
    _, ref64 = timed(cpu, "full", np.float64)
    _, out64 = timed(gpu, "full", np.float64)
    worst = differ(out64, ref64)[0]
    rows.append(
        Row(
            f"re-ranking {scale} ({size}), float64: {gpu.type} full pass vs cpu full",
            ctx.verdict(worst <= 1e-5),
            f"max abs diff {worst:.1e}",
            "<= 1e-5",
        )
    )
    t_cpu, ref32 = timed(cpu, "full", np.float32)
    t_full, full32 = timed(gpu, "full", np.float32)
    t_bf16, bf32 = timed(gpu, "bfloat16", np.float32)
    same = np.array_equal(full32, ref32) and np.array_equal(bf32, ref32)
    (d_full, q_full), (d_bf, q_bf) = differ(full32, ref32), differ(bf32, ref32)
    rows.append(
        Row(
            f"re-ranking {scale} ({size}), float32: {gpu.type} full / bf16 vs cpu full",
            ctx.verdict(same),
            f"{t_full:.1f} s / {t_bf16:.1f} s vs {t_cpu:.1f} s; query rows that differ from the"
            f" cpu: full {q_full}, bf16 {q_bf} of {num_q:,} (max {max(d_full, d_bf):.1e})",
            "bit for bit",
        )
    )
    if not ctx.reduced:
        num_q, num_g, ids = SCALES["msmt17"]
        query, gallery = clustered_features(num_q, num_g, ids, dim=dim)
        t_full, _ = timed(gpu, "full", np.float32)
        t_bf16, _ = timed(gpu, "bfloat16", np.float32)
        rows.append(
            Row(
                f"re-ranking msmt17 ({num_q:,} + {num_g:,}, {dim}-d), float32, {gpu.type}",
                ctx.verdict(t_full <= 300),
                f"full {t_full:.1f} s, bf16 candidates {t_bf16:.1f} s",
                "<= 5 min",
            )
        )
    return rows


def check_distances(ctx: Context) -> list[Row]:
    """pairwise_distance on the device: the same bits as on the CPU for the three metrics
    (exact-rounded distances), duplicated gallery rows tying exactly; and its time at
    Market-1501 scale against the float32 product it replaced."""
    from rmgl.metrics import pairwise_distance

    def features(num, dim, ids, seed):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(ids, dim, generator=g)
        x = centres[torch.randint(0, ids, (num,), generator=g)] + torch.randn(num, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    num_q, num_g, dim = (100, 800, 64) if ctx.reduced else (1500, 20000, 512)
    query, gallery = features(num_q, dim, 50, 0), features(num_g, dim, 50, 1)
    gallery[num_g // 2 : num_g // 2 + num_g // 10] = gallery[: num_g // 10]
    differ, ties = 0, True
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        cpu = pairwise_distance(query, gallery, metric, device="cpu")
        dev = pairwise_distance(query, gallery, metric, memory_budget_mb=1, device=ctx.device)
        differ += int((cpu != dev).sum())
        ties &= bool(
            np.array_equal(dev[:, num_g // 2 : num_g // 2 + num_g // 10], dev[:, : num_g // 10])
        )
    rows = [
        Row(
            f"distances ({num_q:,} x {num_g:,}, {dim}-d, 3 metrics): {ctx.device.type} vs cpu",
            ctx.verdict(differ == 0 and ties),
            f"{differ} entries differ; duplicates tie: {ties}",
            "bit for bit",
        )
    ]
    num_q, num_g, dim = (200, 2000, 256) if ctx.reduced else (3368, 15913, 2048)
    query = features(num_q, dim, 100, 2).to(ctx.device)
    gallery = features(num_g, dim, 100, 3).to(ctx.device)

    def timed(run):
        run()  # warm-up
        if ctx.gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if ctx.gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def float32_product():
        with torch.no_grad():
            norms = (gallery * gallery).sum(1)[None]
            d = torch.addmm(norms, query, gallery.T, alpha=-2).add_(
                (query * query).sum(1, keepdim=True)
            )
            return d.clamp_(min=0).sqrt_().cpu().numpy()

    exact = timed(lambda: pairwise_distance(query, gallery, device=ctx.device))
    plain = timed(float32_product)
    rows.append(
        Row(
            f"distance time ({num_q:,} x {num_g:,}, {dim}-d): exact-rounded vs float32 product",
            ctx.info(),
            f"{exact:.2f} s vs {plain:.2f} s ({exact / plain:.1f}x)",
            "information",
        )
    )
    return rows


def check_true_float32(ctx: Context) -> list[Row]:
    """extract_features without amp runs convolutions in true float32 although the caller
    allowed TF32 (and gives the caller's setting back): its error against a float64 forward,
    next to the error of the same forward in TF32."""
    from rmgl.metrics import extract_features

    backends = torch.backends
    if not hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
        return [Row("extraction in true float32", "SKIPPED (torch < 2.9)", "", "")]
    torch.manual_seed(0)
    width = 32 if ctx.reduced else 256
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, padding=1),
        torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(),
    ).to(ctx.device)
    images = torch.randn(16, 3, 64, 32)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append(backends.cudnn.conv.fp32_precision)
    )
    previous = backends.cudnn.conv.fp32_precision
    backends.cudnn.conv.fp32_precision = "tf32"
    try:
        ours = extract_features(model, [(images, torch.zeros(16), torch.zeros(16))], progress=False)
        hook.remove()
        restored = backends.cudnn.conv.fp32_precision == "tf32"
        with torch.no_grad():
            x = images.to(ctx.device)
            tf32 = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1).cpu()
            model64, x64 = model.double(), x.double()
            reference = torch.nn.functional.normalize(model64(x64) + model64(x64.flip(3)), dim=1)
    finally:
        backends.cudnn.conv.fp32_precision = previous
    ours_err = float((ours.features - reference.float().cpu()).abs().max())
    tf32_err = float((tf32 - reference.float().cpu()).abs().max())
    ok = restored and set(seen) == {"ieee"} and ours_err < 1e-5
    return [
        Row(
            "extraction in true float32 while the caller allows TF32",
            ctx.verdict(ok),
            f"inside: {sorted(set(seen))}, restored: {restored}; max error vs float64 "
            f"{ours_err:.1e} (TF32 forward: {tf32_err:.1e})",
            "ieee inside, restored, error < 1e-5",
        )
    ]


CHECKS: list[tuple[str, Callable[[Context], list[Row]]]] = [
    ("training throughput", check_train_throughput),
    ("data pipeline", check_data_pipeline),
    ("training run", check_training_run),
    ("AMP extraction", check_amp_extraction),
    ("extraction rate", check_extraction_rate),
    ("re-ranking", check_rerank),
    ("distances", check_distances),
    ("true float32", check_true_float32),
    ("training throughput, torch.compile", check_train_throughput_compiled),
    ("the real trainer, eager and compiled", check_trainer),
]


def _write_table(path: Path, header: str, table: list[Row]) -> None:
    lines = [header, ""] + [f"| {r.check} | {r.verdict} | {r.measured} | {r.goal} |" for r in table]
    lines.insert(3, "| --- | --- | --- | --- |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.md", help="markdown table written here")
    parser.add_argument(
        "--cpu-reduced", action="store_true", help="tiny sizes on the CPU (for the tests)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.cpu_reduced:
        print("no CUDA device: every GPU row would be skipped; running the reduced CPU mode")
        args.cpu_reduced = True
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU only ({platform.machine()}, {os.cpu_count()} cores): GPU rows SKIPPED")
    )
    header = (
        f"device: {name}; torch {torch.__version__}; {datetime.date.today()}; "
        f"mode: {'reduced (CPU)' if args.cpu_reduced else 'full'}"
    )
    print(header)
    table = [Row("check", "verdict", "measured", "goal")]
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        ctx = Context(args.cpu_reduced, device, Path(scratch))
        for title, check in CHECKS:
            start = time.perf_counter()
            try:
                rows = check(ctx)
            except Exception as error:
                traceback.print_exc()
                rows = [Row(title, "FAIL", f"error: {error!r}"[:120], "")]
            seconds = time.perf_counter() - start
            for row in rows:
                failed += row.verdict == "FAIL"
                print(
                    f"{row.verdict:<17} {row.check}: {row.measured} (goal {row.goal or '-'})"
                    f" [{seconds:.0f} s]",
                    flush=True,
                )
            table += rows
            _write_table(Path(args.out), header, table)  # after every check: a run cut
            # short by its time limit still leaves the rows it finished
    print(f"table written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
