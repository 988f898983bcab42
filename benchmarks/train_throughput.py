"""Training throughput (images/s) of full training steps: forward, losses, backward, SGD step.

Settings: RMGL-R50 at 384x128 (the paper's model, batch 48 = 12 x 4) and the demo config
(RMGL-R18 at 96x32, batch 32). Synthetic tensors stand in for images so the number is the
model's, not the loader's (see benchmarks/data_pipeline.py for that). On a GPU it uses
bf16 autocast and channels_last, as the trainer does, and projects the full 60-epoch
Market-1501 schedule (12,936 images per epoch).

    python benchmarks/train_throughput.py [--steps 5] [--device cpu|cuda] [--only r50|demo]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from rmgl.engine.schedule import parameter_groups
from rmgl.losses import RMGLLoss
from rmgl.model import RMGLConfig, build_model

MARKET_TRAIN_IMAGES = 12936
MARKET_IDS = 751

SETTINGS = {
    "r50": dict(name="RMGL-R50 384x128 (paper)", backbone="resnet50", size=(384, 128), P=12, K=4),
    "demo": dict(name="RMGL-R18 96x32 (demo)", backbone="resnet18", size=(96, 32), P=8, K=4),
}


def measure(
    setting: dict,
    device: torch.device,
    steps: int,
    warmup: int,
    compile: bool = False,
    compile_mode: str = "default",
    channels_last: bool | None = None,
    windows: int = 1,
    model_kwargs: dict | None = None,
    profile: bool = False,
) -> float:
    """Images/s of full training steps (bf16 autocast on CUDA, and channels_last unless
    ``channels_last=False``); ``compile`` wraps the model in ``torch.compile`` (the warm-up
    steps then compile; ``compile_mode`` is torch.compile's, ``reduce-overhead`` = CUDA graphs).
    With ``windows`` > 1, ``steps`` are timed that many times and the
    median is returned: a launch-bound GPU step varies with the host's load. ``model_kwargs``
    go to ``build_model`` (ablations); ``profile`` prints the profiler's table of 3 steps."""
    model = build_model(
        RMGLConfig(backbone=setting["backbone"], pretrained="none", **(model_kwargs or {})),
        MARKET_IDS,
    ).to(device)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_model = model
    if compile:
        model = torch.compile(model, mode=compile_mode)
    graphs = compile and compile_mode == "reduce-overhead"
    opt = torch.optim.SGD(
        parameter_groups(opt_model, 0.01, 10.0), lr=0.01, momentum=0.9, weight_decay=1e-3
    )
    criterion = RMGLLoss()
    batch = setting["P"] * setting["K"]
    images = torch.randn(batch, 3, *setting["size"], device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.arange(setting["P"], device=device).repeat_interleave(setting["K"])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step():
        if graphs:  # each call replays the graphs into the same buffers: mark the new step
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            output = model(images)
        loss, _ = criterion(output, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(windows):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * batch / (time.perf_counter() - start))
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with profiler(activities=activities) as prof:
            for _ in range(3):
                step()
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--windows", type=int, default=1, help="timed windows of --steps; the median is printed"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(SETTINGS))
    parser.add_argument(
        "--identities",
        "--r50-identities",
        dest="identities",
        type=int,
        default=None,
        help="P for RMGL-R50 (default 12 on GPU, 2 on CPU, where a 48-image step takes minutes)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True"
    )
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile's mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a string build_model argument, e.g. rp_position=output or abp=off (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, print PyTorch's profiler table of 3 steps (by GPU time on CUDA)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    SETTINGS["r50"]["P"] = args.identities or (12 if device.type == "cuda" else 2)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if any("=" not in item for item in args.model):
        parser.error("--model takes KEY=VALUE, e.g. --model rp_position=output")
    model_kwargs = dict(item.split("=", 1) for item in args.model)  # string values only
    what = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    )
    arguments = model_kwargs or "the paper's"
    print(f"device: {what}; torch {torch.__version__}; model arguments: {arguments}")
    print("| setting | batch | images/s | 60-epoch Market-1501 (projected) |\n|---|---|---|---|")
    for key, setting in SETTINGS.items():
        if args.only and key != args.only:
            continue
        rate = measure(
            setting,
            device,
            args.steps,
            args.warmup,
            compile=args.compile,
            compile_mode=args.compile_mode,
            windows=args.windows,
            model_kwargs=model_kwargs,
            profile=args.profile,
        )
        hours = 60 * MARKET_TRAIN_IMAGES / rate / 3600
        print(f"| {setting['name']} | {setting['P'] * setting['K']} | {rate:.1f} | {hours:.2f} h |")


if __name__ == "__main__":
    main()
