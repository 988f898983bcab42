"""``rmgl train``, ``rmgl eval`` and ``rmgl demo``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from rmgl.data.datasets import READERS, load_dataset
from rmgl.engine.checkpoint import check_compatible, load_checkpoint
from rmgl.engine.config import from_yaml_text, load_config
from rmgl.engine.evaluation import evaluate_model

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from a config file",
                                  description="Train from a YAML config; key=value arguments override it, e.g. optim.epochs=80.")
    train.add_argument("config", help="YAML file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.branches=[2,3,4]")
    train.add_argument("--resume", action="store_true", help="continue from <output_dir>/<name>/last.safetensors")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser("eval", help="evaluate a checkpoint on a dataset (cross-dataset works)")
    ev.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    ev.add_argument("--dataset", required=True, help=f"one of: {', '.join(READERS)}")
    ev.add_argument("--root", required=True)
    ev.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    ev.add_argument("--out", help="folder for results.json, cmc.png, ranked_list.png (default: beside the checkpoint)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--workers", type=int, default=2)
    ev.set_defaults(func=run_eval)

    sweep = subparsers.add_parser("sweep", help="train a list of configs and collect their results in one markdown table")
    sweep.add_argument("configs", nargs="+", help="YAML files, e.g. configs/ablation/*.yaml")
    sweep.add_argument("--set", nargs="*", default=[], dest="overrides", help="overrides applied to every config")
    sweep.add_argument("--table", default="runs/sweep.md", help="markdown table to write (rewritten after each run)")
    sweep.set_defaults(func=run_sweep)

    demo = subparsers.add_parser("demo", help="generate the synthetic benchmark, train RMGL and a baseline, evaluate both")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help="overrides applied to both demo runs, e.g. optim.epochs=2")
    demo.set_defaults(func=run_demo)


def run_train(args: argparse.Namespace) -> int:
    from rmgl.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    if trainer.is_main and results:
        for key, result in results.items():
            print(f"{key}:\n{result}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from rmgl.engine.trainer import resolve_device
    from rmgl.model import build_model

    ckpt = load_checkpoint(args.checkpoint)
    cfg = from_yaml_text(ckpt.config_yaml)
    num_classes = ckpt.trainer.get("num_classes", 1)
    model = build_model(num_classes, **{**OmegaConf.to_container(cfg.model), "pretrained": "none"})
    model.load_state_dict(check_compatible(model, ckpt.model_state()))
    model.to(resolve_device(args.device, 0))
    dataset = load_dataset(args.dataset, args.root)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{dataset.name}"
    with torch.no_grad():
        results = evaluate_model(model, dataset, (cfg.data.height, cfg.data.width), rerank=args.rerank,
                                 metric=cfg.eval.metric, batch_size=args.batch_size, workers=args.workers, out_dir=out)
    for key, result in results.items():
        print(f"{dataset.name} {key}:\n{result}")
    print(f"wrote {out / 'results.json'}, {out / 'cmc.png'}, {out / 'ranked_list.png'}")
    return 0


def results_table(rows: dict[str, dict]) -> str:
    """One markdown row per (run, evaluation): rank-1/5/10, mAP, mINP in percent, train time."""
    lines = ["| run | eval | R1 | R5 | R10 | mAP | mINP | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        for key, result in row["results"].items():
            lines.append(
                f"| {name} | {key} | {100 * result.rank(1):.1f} | {100 * result.rank(5):.1f} | "
                f"{100 * result.rank(10):.1f} | {100 * result.mAP:.1f} | {100 * result.mINP:.1f} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines)


def train_one(cfg, dataset=None, overwrite: bool = False) -> dict:
    from rmgl.engine.trainer import Trainer

    tick = time.perf_counter()
    trainer = Trainer(cfg, dataset=dataset, overwrite=overwrite)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    return {"results": results, "seconds": time.perf_counter() - tick}


def run_sweep(args: argparse.Namespace) -> int:
    rows = {}
    table = Path(args.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    for path in args.configs:
        cfg = load_config(path, args.overrides)
        print(f"== {path} ({cfg.run.name})")
        rows[f"{cfg.run.name} ({path})"] = train_one(cfg)
        table.write_text(results_table(rows) + "\n")
    print(results_table(rows))
    print(f"table: {table}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The README's main job: synthetic data -> RMGL and a global baseline -> metrics and pictures."""
    from rmgl.data.synthetic import SynthConfig, generate

    out = Path(args.out)
    data_dir = out / "synthetic"
    start = time.perf_counter()
    meta = generate(SynthConfig(seed=0), data_dir)
    print(f"synthetic benchmark: {len(meta['images'])} images in {data_dir} ({time.perf_counter() - start:.0f} s), "
          f"mosaic {data_dir / 'mosaic.png'}")
    dataset = load_dataset("folder", data_dir)
    print(dataset.summary())
    runs = {
        "RMGL (Local-2 + Local-3)": ["run.name=rmgl"],
        "global baseline": ["run.name=baseline", "model.branches=[1]", "model.rp_position=output", "model.abp=off"],
    }
    rows = {}
    for name, extra in runs.items():
        cfg = load_config(DEMO_CONFIG, [f"data.root={data_dir}", f"run.output_dir={out}", *extra, *args.overrides])
        print(f"\ntraining {name}: {cfg.model.backbone}, {cfg.data.height}x{cfg.data.width}, {cfg.optim.epochs} epochs")
        rows[name] = train_one(cfg, dataset, overwrite=True)
    table = results_table(rows)
    print("\n" + table)
    (out / "demo_results.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(json.dumps(
        {name: {k: v.to_dict() for k, v in row["results"].items()} | {"train_seconds": row["seconds"]} for name, row in rows.items()}, indent=2))
    print(f"\npictures: {out}/rmgl/eval/ranked_list.png, {out}/rmgl/eval/cmc.png; "
          f"TensorBoard: tensorboard --logdir {out}; total {time.perf_counter() - start:.0f} s")
    return 0
