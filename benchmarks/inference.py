"""Inference speed: torch eager against ONNX Runtime, for the descriptor a user gets.

    python benchmarks/inference.py                         # both models, CPU, 2 threads
    python benchmarks/inference.py --models demo --repeats 11 --threads 1

Both sides compute the same thing from prepared inputs: the flip-averaged, L2-normalised
descriptor (torch: ``Encoder(backend="torch")``, i.e. ``extract_features``, the evaluation's
code; ONNX Runtime: the graph ``rmgl export`` writes, with flip and normalisation inside). Models are built with random weights (speed does not depend on them) and exported
with the parity check on random prepared inputs.

Latency is the time of one call with one image, throughput the images per second of one
call with ``--batch`` images. Torch and ONNX Runtime calls alternate inside every round, so
both see the same machine load, and each figure is the median over the rounds. Goal:
ONNX Runtime latency <= 0.7 x torch eager.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rmgl.deploy import Encoder
from rmgl.deploy.export import export_onnx
from rmgl.engine.load import Preprocess
from rmgl.model import RMGLConfig, build_model

MODELS = {
    # name: (label, backbone, height, width); branches [2, 3], the paper's other settings
    "r50": ("RMGL-R50 384x128", "resnet50", 384, 128),
    "demo": ("demo: RMGL-R18 96x32", "resnet18", 96, 32),
}


def make_model(backbone: str, height: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(RMGLConfig(backbone=backbone, pretrained="none"), 751).eval()
    model.preprocess = Preprocess(height, width)
    return model


def timed(call, inputs: torch.Tensor) -> float:
    start = time.perf_counter()
    call(inputs)
    return time.perf_counter() - start


def measure(name: str, repeats: int, batch: int, threads: int, folder: Path) -> list[str]:
    label, backbone, height, width = MODELS[name]
    model = make_model(backbone, height, width)
    onnx_path = folder / f"{name}.onnx"
    started = time.perf_counter()
    report = export_onnx(model, onnx_path, images=[torch.randn(3, height, width) for _ in range(4)])
    print(
        f"{label}: exported in {time.perf_counter() - started:.0f} s, parity max abs diff "
        f"{report['parity']['max_abs_diff']:.1e}",
        flush=True,
    )
    backends = {
        "torch eager": Encoder(model, batch_size=batch),
        "onnxruntime": Encoder(
            onnx_path, backend="onnxruntime", device="cpu", batch_size=batch, threads=threads
        ),
    }
    rows = []
    for size, rounds in ((1, repeats), (batch, max(3, repeats // 2))):
        inputs = torch.randn(size, 3, height, width)
        for encoder in backends.values():  # warm-up: allocations, ORT's first-run planning
            encoder.encode_batch(inputs)
        times: dict[str, list[float]] = {key: [] for key in backends}
        for _ in range(rounds):
            for key, encoder in backends.items():
                times[key].append(timed(encoder.encode_batch, inputs))
        median = {key: statistics.median(values) for key, values in times.items()}
        ratio = median["onnxruntime"] / median["torch eager"]
        if size == 1:
            cells = [f"{median[k] * 1e3:.1f} ms" for k in backends]
            rows.append(f"| {label} | latency, batch 1 | {cells[0]} | {cells[1]} | {ratio:.2f} |")
        else:
            cells = [f"{size / median[k]:.1f} img/s" for k in backends]
            rows.append(
                f"| {label} | throughput, batch {size} | {cells[0]} | {cells[1]} | {ratio:.2f} |"
            )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo", "r50"])
    parser.add_argument(
        "--repeats", type=int, default=7, help="rounds for latency (half as many for throughput)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads for torch and for ONNX Runtime"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"{datetime.date.today()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += measure(name, args.repeats, args.batch, args.threads, Path(folder))
    print("\n| model | measure | torch eager | onnxruntime | onnxruntime / torch (time) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
