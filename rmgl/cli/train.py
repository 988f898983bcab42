"""``rmgl train``, ``rmgl sweep``, ``rmgl demo`` and ``rmgl configs``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import DictConfig

from rmgl.cli.report import report_for_run
from rmgl.engine.config import builtin_config, builtin_configs, find_config, load_config
from rmgl.reporting import results_table, seeds_table


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model from a config (a built-in name or a YAML file)",
        description="Train from a config: a built-in name (rmgl configs lists them) or a YAML "
        "file; key=value arguments override it, e.g. optim.epochs=80.",
    )
    train.add_argument("config", help="built-in config name (e.g. market1501) or YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.branches=[2,3,4]")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from <output_dir>/<name>/last.safetensors"
    )
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the last checkpoint when the run has one, else start it: for "
        "torchrun --max-restarts, whose restarts repeat the same command",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of the same name"
    )
    train.set_defaults(func=run_train)

    sweep = subparsers.add_parser(
        "sweep",
        help="train several configs (and seeds) and collect one markdown table",
        description="Train each config with each seed; the table gives mean ± standard deviation "
        "over seeds. Differences inside the spread are ties.",
    )
    sweep.add_argument(
        "configs",
        nargs="+",
        help="config names or YAML files, e.g. ablation/2stripe_rp or configs/*.yaml",
    )
    sweep.add_argument(
        "--set", nargs="*", default=[], dest="overrides", help="overrides applied to every config"
    )
    sweep.add_argument(
        "--seeds", type=int, default=1, help="seeds per config: run.seed = 0 .. N-1 (default 1)"
    )
    sweep.add_argument(
        "--table",
        default="runs/sweep.md",
        help="markdown table to write (rewritten after each run)",
    )
    sweep.add_argument("--overwrite", action="store_true", help="replace runs of the same names")
    sweep.set_defaults(func=run_sweep)

    demo = subparsers.add_parser(
        "demo", help="generate the synthetic benchmark, train RMGL and two baselines, evaluate them"
    )
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size of the synthetic benchmark (identities x scale)",
    )
    demo.add_argument(
        "overrides", nargs="*", help="overrides applied to both demo runs, e.g. optim.epochs=2"
    )
    demo.set_defaults(func=run_demo)

    configs = subparsers.add_parser("configs", help="list the built-in configs (or print one)")
    configs.add_argument(
        "name",
        nargs="?",
        help="print this built-in config (a name from the list), or a .yaml config file after "
        "checking that it is one",
    )
    configs.set_defaults(func=run_configs)


def run_train(args: argparse.Namespace) -> int:
    from rmgl.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    resume = "auto" if args.auto_resume else args.resume
    with Trainer(cfg, resume=resume, overwrite=args.overwrite) as trainer:
        results = trainer.train()
        if trainer.is_main:
            for key, result in results.items():
                print(f"{key}:\n{result}")
    return 0


def train_one(cfg: DictConfig, dataset=None, overwrite: bool = False) -> dict:
    """Train ``cfg``; ``{"results": ..., "seconds": ...}`` for the result tables."""
    from rmgl.engine.trainer import Trainer

    tick = time.perf_counter()
    with Trainer(cfg, dataset=dataset, overwrite=overwrite) as trainer:
        results = trainer.train()
    return {"results": results, "seconds": time.perf_counter() - tick}


def run_sweep(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    configs = {
        path: load_config(path, args.overrides) for path in args.configs
    }  # all checked first
    table = Path(args.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for path, cfg in configs.items():
        name = f"{cfg.run.name} ({path})"
        for seed in range(args.seeds):
            overrides = [*args.overrides]
            if args.seeds > 1:
                overrides += [f"run.seed={seed}", f"run.name={cfg.run.name}_seed{seed}"]
            seeded = load_config(path, overrides)
            print(f"== {path}: {seeded.run.name}, seed {seeded.run.seed}")
            runs.setdefault(name, []).append(train_one(seeded, overwrite=args.overwrite))
            text = (
                seeds_table(runs)
                if args.seeds > 1
                else results_table({k: v[0] for k, v in runs.items()})
            )
            table.write_text(text + "\n")
    print(table.read_text(), end="")
    print(f"table: {table}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The README's main job: synthetic data -> RMGL and two baselines -> metrics and pictures."""
    from rmgl.data.datasets import load_dataset
    from rmgl.data.synthetic import SynthConfig, generate

    if args.scale <= 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    out = Path(args.out)
    data_dir = out / "synthetic"
    start = time.perf_counter()
    meta = generate(SynthConfig(seed=0, scale=args.scale), data_dir)
    print(
        f"synthetic benchmark: {len(meta['images'])} images in {data_dir} ({time.perf_counter() - start:.0f} s), "
        f"mosaic {data_dir / 'mosaic.png'}"
    )
    dataset = load_dataset("folder", data_dir)
    print(dataset.summary())
    # RMGL against the network its three additions are built on (same branches, no RP, ABP or
    # RSA) and a single global feature: what RP + ABP + RSA buy at this budget.
    runs = {
        "RMGL (Local-2 + Local-3)": ("demo", "rmgl"),
        "multi-branch baseline (2+3, no RP/ABP/RSA)": ("cpu/multibranch", "multibranch"),
        "global baseline": ("cpu/global", "baseline"),
    }
    configs = {
        name: load_config(
            config,
            [
                f"data.root={data_dir}",
                f"run.output_dir={out}",
                f"run.name={run_name}",
                *args.overrides,
            ],
        )
        for name, (config, run_name) in runs.items()
    }
    rows = {}
    for name, cfg in configs.items():
        print(
            f"\ntraining {name}: {cfg.model.backbone}, {cfg.data.height}x{cfg.data.width}, {cfg.optim.epochs} epochs"
        )
        rows[name] = train_one(cfg, dataset, overwrite=True)
    table = results_table(rows)
    print("\n" + table)
    (out / "demo_results.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(
        json.dumps(
            {
                name: {k: v.to_dict() for k, v in row["results"].items()}
                | {"train_seconds": row["seconds"]}
                for name, row in rows.items()
            },
            indent=2,
        )
    )
    rmgl_cfg = configs["RMGL (Local-2 + Local-3)"]
    report = report_for_run(out / rmgl_cfg.run.name, dataset, rerank=bool(rmgl_cfg.eval.rerank))
    print(f"\nreport of the RMGL run (open it in a browser): {report}")
    print(
        f"pictures: {out}/rmgl/eval/ranked_list.png, {out}/rmgl/eval/cmc.png; "
        f"TensorBoard: tensorboard --logdir {out}; total {time.perf_counter() - start:.0f} s"
    )
    return 0


def run_configs(args: argparse.Namespace) -> int:
    if args.name:
        print(config_text(args.name), end="")
        return 0
    for name in builtin_configs():
        first = find_config(name).read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:<32} {summary[:90]}")
    return 0


def config_text(name: str) -> str:
    """The text of a built-in config (a name resolves inside the package's configs only), or
    of a YAML config file given by path, which must load as a valid rmgl config: the command
    never prints an arbitrary file."""
    builtin = builtin_config(name)
    if builtin is not None:
        return builtin.read_text()
    path = Path(name)
    if not path.is_file():
        find_config(name)  # raises: not a file, not a built-in name (with suggestions)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(
            f"{name} is not a built-in config name and not a .yaml config file; "
            "'rmgl configs' lists the built-in ones"
        )
    load_config(path)  # a config with unknown keys or bad values is refused, naming the key
    return path.read_text()
