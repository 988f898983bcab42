"""Parameters, FLOPs and training-step time of RMGL variants and reference models.

    python benchmarks/model.py                      # everything, CPU, batch 8 at 384x128
    python benchmarks/model.py --skip-timing        # only the parameter / FLOP table
    python benchmarks/model.py --device cuda --batch 48

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matrix
products, 2 FLOPs per multiply-add; pooling, BN, ReLU, ABP and reshapes are not counted).
The timing section runs forward + loss + backward of RMGL-R50 and of a plain ResNet-50
(last stride 1, global average pooling, one 751-way classifier, cross-entropy) alternately
in the same process and compares the time ratio with the FLOP ratio of the same two steps:

    overhead = (t_RMGL / t_R50) / (FLOPs_RMGL / FLOPs_R50)       goal: <= 1.15

The reference models are approximations written here for counting, not re-implementations:
PCB-style = ResNet-50 (last stride 1) + 6 uniform stripes (avg pooling) + 6 heads
(1x1 conv 256 + BN + ReLU + classifier); MGN-style = ResNet-50 shared up to layer3[0], three
branches with their own layer3[1:] + layer4 (last stride 2 for the global branch, 1 for the
2- and 3-part branches), 8 pooled features (3 global + 2 + 3 parts), each with a 256-d
reduction head and a classifier (the original MGN also classifies the 2048-d globals).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from rmgl.losses import RMGLLoss
from rmgl.model import RMGLConfig, build_model
from rmgl.model.backbone import ResNetBackbone, set_last_stride
from rmgl.model.network import ReductionHead

NUM_CLASSES = 751  # Market-1501 training identities


class PlainResNet(nn.Module):
    """ResNet-50 + global average pooling + one classifier (the usual re-ID baseline)."""

    def __init__(self, last_stride: int) -> None:
        super().__init__()
        self.backbone = ResNetBackbone("resnet50", last_stride)
        self.classifier = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        feature = self.backbone(x).mean(dim=(2, 3))
        return self.classifier(feature) if self.training else feature


class PCBStyle(nn.Module):
    """ResNet-50 (last stride 1), 6 uniform stripes, one 256-d head per stripe."""

    def __init__(self, stripes: int = 6) -> None:
        super().__init__()
        self.backbone = ResNetBackbone("resnet50", 1)
        self.stripes = stripes
        self.heads = nn.ModuleList(ReductionHead(2048, 256, NUM_CLASSES) for _ in range(stripes))

    def forward(self, x: Tensor) -> Tensor:
        parts = self.backbone(x).chunk(self.stripes, dim=2)
        feats = [head(p.mean(dim=(2, 3))) for head, p in zip(self.heads, parts, strict=True)]
        if self.training:
            return [head.classifier(f) for head, f in zip(self.heads, feats, strict=True)]
        return torch.cat(feats, dim=1)


class MGNStyle(nn.Module):
    """Three branches from layer3[1:] on (global, 2 parts, 3 parts), 8 features of 256-d."""

    def __init__(self) -> None:
        super().__init__()
        bb = ResNetBackbone("resnet50", last_stride=2)
        self.trunk = nn.Sequential(
            bb.conv1, bb.bn1, bb.relu, bb.maxpool, bb.layer1, bb.layer2, bb.layer3[0]
        )
        rest_of_layer3 = nn.Sequential(*bb.layer3[1:])
        layer4_s1 = copy.deepcopy(bb.layer4)
        set_last_stride(layer4_s1, 1)
        self.branches = nn.ModuleList(
            nn.Sequential(copy.deepcopy(rest_of_layer3), copy.deepcopy(l4))
            for l4 in (bb.layer4, layer4_s1, layer4_s1)
        )
        self.parts = (1, 2, 3)
        self.heads = nn.ModuleList(ReductionHead(2048, 256, NUM_CLASSES) for _ in range(8))

    def forward(self, x: Tensor) -> Tensor:
        x = self.trunk(x)
        pooled = []
        for branch, parts in zip(self.branches, self.parts, strict=True):
            y = branch(x)
            pooled.append(y.amax(dim=(2, 3)))
            if parts > 1:
                pooled += [p.amax(dim=(2, 3)) for p in y.chunk(parts, dim=2)]
        feats = [head(p) for head, p in zip(self.heads, pooled, strict=True)]
        if self.training:
            return [head.classifier(f) for head, f in zip(self.heads, feats, strict=True)]
        return torch.cat(feats, dim=1)


def rmgl(**options) -> nn.Module:
    return build_model(RMGLConfig(pretrained="none", **options), NUM_CLASSES)


VARIANTS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("RMGL [2,3] RP after_layer1 (paper)", lambda: rmgl()),
    ("RMGL [2,3,4]", lambda: rmgl(branches=(2, 3, 4))),
    ("RMGL [1,2,3]", lambda: rmgl(branches=(1, 2, 3))),
    ("RMGL [2] single branch", lambda: rmgl(branches=(2,))),
    ("RMGL [3] single branch", lambda: rmgl(branches=(3,))),
    ("RMGL [2,3] RP input", lambda: rmgl(rp_position="input")),
    ("RMGL [2,3] RP after_stem", lambda: rmgl(rp_position="after_stem")),
    ("RMGL [2,3] RP after_layer2", lambda: rmgl(rp_position="after_layer2")),
    ("RMGL [2,3] RP after_layer3", lambda: rmgl(rp_position="after_layer3")),
    ("RMGL [2,3] output only (no RP)", lambda: rmgl(rp_position="output")),
    ("RMGL [2,3] only RP", lambda: rmgl(only_rp=True)),
    ("ResNet-50, last stride 1", lambda: PlainResNet(1)),
    ("ResNet-50, last stride 2", lambda: PlainResNet(2)),
    ("PCB-style (R50 + 6 stripes)", PCBStyle),
    ("MGN-style (3 branches)", MGNStyle),
]


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def descriptor_dim(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return model.eval()(x).shape[1]


def parameter_table(height: int, width: int) -> None:
    print(
        f"\n### Parameters and FLOPs (input {height}x{width}, {NUM_CLASSES} classes, inference forward of one image)\n"
    )
    print("| model | params (M) | params w/o classifiers (M) | GFLOPs | descriptor |")
    print("|---|---:|---:|---:|---:|")
    x = torch.randn(1, 3, height, width)
    for name, make in VARIANTS:
        torch.manual_seed(0)
        model = make().eval()
        total = sum(p.numel() for p in model.parameters())
        classifiers = sum(
            p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
        )
        with torch.no_grad():
            flops = count_flops(lambda m=model: m(x))
        dim = descriptor_dim(model, x)
        print(
            f"| {name} | {total / 1e6:.2f} | {(total - classifiers) / 1e6:.2f} | {flops / 1e9:.2f} | {dim:,} |"
        )


def training_step(
    model: nn.Module, images: Tensor, targets: Tensor, criterion: nn.Module | None
) -> None:
    model.zero_grad(set_to_none=True)
    out = model(images)
    if criterion is not None:
        loss, _ = criterion(out, targets)
    else:
        loss = F.cross_entropy(out, targets)
    loss.backward()


def timing(batch: int, height: int, width: int, repeats: int, device: str) -> None:
    torch.manual_seed(0)
    images = torch.randn(batch, 3, height, width, device=device)
    targets = torch.arange(batch, device=device) // 2  # P x K = batch/2 identities x 2 images
    models = {
        "ResNet-50 (last stride 1)": (PlainResNet(1).to(device).train(), None),
        "RMGL-R50 [2,3]": (rmgl().to(device).train(), RMGLLoss()),
    }
    flops = {
        name: count_flops(lambda m=m, c=c: training_step(m, images, targets, c))
        for name, (m, c) in models.items()
    }
    # wall-clock time, and the process's CPU time: with one thread (--threads 1) the CPU time
    # hardly depends on what other jobs do to the machine, the wall clock does
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(clock, name): [] for clock in clocks for name in models}
    for step in range(repeats + 1):  # step 0 warms up; models alternate so load drift hits both
        for name, (model, criterion) in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = {clock: now() for clock, now in clocks.items()}
            training_step(model, images, targets, criterion)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                for clock, now in clocks.items():
                    times[clock, name].append(now() - start[clock])
    print(
        f"\n### Training step (forward + loss + backward), batch {batch}, {height}x{width}, "
        f"{device}, {torch.get_num_threads()} thread(s)\n"
    )
    print("| model | GFLOPs / step | clock | median s / step | all runs (s) |")
    print("|---|---:|---|---:|---|")
    for name in models:
        for clock in clocks:
            t = times[clock, name]
            runs = ", ".join(f"{v:.2f}" for v in t)
            print(
                f"| {name} | {flops[name] / 1e9:.1f} | {clock} | {statistics.median(t):.3f} | {runs} |"
            )
    base, ours = list(models)
    flop_ratio = flops[ours] / flops[base]
    print(f"\nFLOP ratio {flop_ratio:.3f}")
    for clock in clocks:
        ratio = statistics.median(times[clock, ours]) / statistics.median(times[clock, base])
        # each RMGL step ran right after a ResNet-50 step: the ratio within a pair is the
        # least disturbed by load that changes over minutes
        paired = [a / b for a, b in zip(times[clock, ours], times[clock, base], strict=True)]
        print(
            f"{clock:>4}: time ratio {ratio:.3f} (medians), per pair "
            + ", ".join(f"{r:.2f}" for r in paired)
            + f"; overhead = time ratio / FLOP ratio = {ratio / flop_ratio:.3f} from medians, "
            f"{statistics.median(paired) / flop_ratio:.3f} median of pairs (goal <= 1.15)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-params", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, device {args.device}"
    )
    if not args.skip_params:
        parameter_table(args.height, args.width)
    if not args.skip_timing:
        timing(args.batch, args.height, args.width, args.repeats, args.device)


if __name__ == "__main__":
    main()
