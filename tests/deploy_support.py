"""Small data, feature folders and checkpoints for the deploy tests (rmgl.deploy): built in
about a second."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.engine import load_config
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.engine.load import model_config
from rmgl.model import build_model


def make_synthetic(root: Path) -> Path:
    """A tiny synthetic benchmark in Market-1501 layout (about 50 images)."""
    generate(
        SynthConfig(
            seed=5,
            train_ids=8,
            test_ids=6,
            distractors=4,
            junk=2,
            cameras_per_id=(2, 3),
            images_per_camera=(2, 3),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


# A smaller RMGL for tests that do not need the paper's two branches: one K = 2 branch with
# 32-d features (6 features, a 192-d descriptor); half the forward cost and checkpoint size.
SMALL_MODEL = ("model.branches=[2]", "model.reduction_dim=32")
SMALL_DIM = 6 * 32


def make_checkpoint(
    path: Path,
    data_root: Path | str,
    height: int = 48,
    width: int = 16,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
) -> Path:
    """An rmgl checkpoint of an untrained ResNet-18 RMGL (a checkpoint is a checkpoint: the
    deploy code only reads weights and config). BatchNorm statistics are randomised so that
    the network is not the identity-like function of a fresh model."""
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={data_root}",
            f"data.height={height}",
            f"data.width={width}",
            "model.backbone=resnet18",
            "model.pretrained=none",
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    model = build_model(model_config(cfg), 8)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return save_checkpoint(path, model, to_yaml(cfg), {"num_classes": 8, "epoch": 0})


# ---- feature folders as `rmgl extract` writes them


def clustered(num: int, dim: int, num_ids: int, seed: int, noise: float = 0.6):
    """L2-normalised features around one random centre per identity, their pids and cameras."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((num_ids, dim))
    pids = rng.integers(0, num_ids, num)
    x = centres[pids] + noise * rng.standard_normal((num, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), pids, rng.integers(0, 4, num)


MODEL = "a" * 64  # the SHA-256 of "the checkpoint" the test folders were extracted with


def extract_meta(features, complete=True, model=MODEL, **changes) -> dict:
    """extract.json as rmgl extract writes it (the fields the index and search read)."""
    return {
        "format": "rmgl-features-v1",
        "checkpoint": f"/runs/{model[:4]}/best.safetensors",
        "onnx": None,
        "model_sha256": model,
        "backend": "torch",
        "precision": "float32",
        "descriptor_dim": int(np.shape(features)[1]),
        "input_size": [384, 128],
        "flip": True,
        "count": len(features),
        "complete": complete,
        **changes,
    }


def write_folder(
    path: Path,
    features,
    pids=None,
    camids=None,
    frames=None,
    complete=True,
    paths=None,
    model=MODEL,
):
    """A feature folder exactly as `rmgl extract` writes it."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "features.npy", np.asarray(features, dtype=np.float32))
    n = len(features)
    with open(path / "images.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "pid", "camid", "frame"])
        for i in range(n):
            writer.writerow(
                [
                    i,
                    paths[i] if paths is not None else f"/cams/{path.name}/{i:05d}.jpg",
                    "" if pids is None else int(pids[i]),
                    "" if camids is None else int(camids[i]),
                    "" if frames is None or np.isnan(frames[i]) else frames[i],
                ]
            )
    (path / "extract.json").write_text(json.dumps(extract_meta(features, complete, model)))
    (path / "failed.csv").write_text("input_index,path,reason\n")
    return path


REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    """The environment of a child Python that imports this checkout's rmgl."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def run_together(tmp: Path, script: str, argvs: list[list[str]], go: Path) -> list[dict]:
    """One child per argv running ``script`` (``sys.argv[1:] = [*argv, go]``), all released
    at the same moment: each touches ``{go}.ready.{pid}`` when ready and waits for ``go``.
    Returns the JSON of each child's last output line."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, *argv, str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for argv in argvs
    ]
    deadline = time.time() + 120
    while len(list(tmp.glob(f"{go.name}.ready.*"))) < len(children):
        assert time.time() < deadline and all(c.poll() is None for c in children)
        time.sleep(0.05)
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results
