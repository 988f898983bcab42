"""``rmgl train``, ``rmgl sweep``, ``rmgl demo`` and ``rmgl configs``."""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rmgl.cli.overrides import add_overrides, split_overrides

if TYPE_CHECKING:
    from omegaconf import DictConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model from a config (a built-in name or a YAML file)",
        description="Train from a config: a built-in name (rmgl configs lists them) or a YAML "
        "file; key=value arguments override it, e.g. optim.epochs=80.",
    )
    train.add_argument("config", help="built-in config name (e.g. market1501) or YAML file")
    add_overrides(train, "dotted overrides, e.g. optim.epochs=80 model.branches=[2,3,4]")
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
        "over seeds. Differences inside the spread are ties. KEY=VALUE arguments override every "
        "config: rmgl sweep ablation/2stripe_rp ablation/2stripe_baseline optim.epochs=2",
    )
    sweep.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG_OR_KEY=VALUE",
        help="config names or YAML files (e.g. ablation/2stripe_rp or configs/*.yaml), then "
        "KEY=VALUE overrides applied to every config",
    )
    add_overrides(sweep, "", positional=False)
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per config: run.seed = 0 .. N-1")
    sweep.add_argument(
        "--table",
        default="runs/sweep.md",
        help="markdown table to write (rewritten after each run)",
    )
    sweep.add_argument("--overwrite", action="store_true", help="replace runs of the same names")
    sweep.set_defaults(func=run_sweep)

    demo = subparsers.add_parser(
        "demo",
        help="generate the synthetic benchmark, train RMGL and two baselines, evaluate them",
        description="Generate the synthetic benchmark, train RMGL and two baselines on it (a "
        "multi-branch network without RP, ABP and RSA, and a single global feature), evaluate "
        "the three and write a results table, pictures and the RMGL run's HTML report.",
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the data and the runs")
    demo.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size of the synthetic benchmark (identities x scale)",
    )
    add_overrides(demo, "overrides applied to all three demo runs, e.g. optim.epochs=2")
    demo.set_defaults(func=run_demo)

    configs = subparsers.add_parser(
        "configs",
        help="list the built-in configs, or print one resolved",
        description="Without NAME: every built-in config with its first comment line. With NAME "
        "(a built-in name or a YAML file): the resolved config, every key with the value a run "
        "of it uses (defaults, the YAML chain and KEY=VALUE overrides merged), after checking it.",
    )
    configs.add_argument(
        "name",
        nargs="?",
        help="a built-in config name from the list, or a .yaml config file",
    )
    configs.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides to apply before printing, as rmgl train takes them",
    )
    configs.add_argument(
        "--source", action="store_true", help="print the file as written instead (with comments)"
    )
    configs.set_defaults(func=run_configs)


def run_train(args: argparse.Namespace) -> int:
    from rmgl.engine.config import load_config
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
    from rmgl.engine.config import load_config
    from rmgl.reporting import results_table, seeds_table

    names, overrides = split_overrides(args.configs)
    args.configs, args.overrides = names, [*overrides, *args.overrides]
    if not args.configs:
        raise ValueError(
            "give at least one config name or YAML file before the KEY=VALUE overrides"
        )
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
    from rmgl.cli.report import report_for_run
    from rmgl.data.datasets import load_dataset
    from rmgl.data.synthetic import SynthConfig, generate
    from rmgl.engine.config import load_config
    from rmgl.reporting import results_table

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
    from rmgl.engine.config import builtin_configs, find_config

    if args.name:
        if args.source and args.overrides:
            raise ValueError("--source prints the file as written: give no KEY=VALUE overrides")
        print(config_text(args.name, args.overrides, source=args.source), end="")
        return 0
    if args.overrides or args.source:
        raise ValueError("KEY=VALUE overrides and --source need a config NAME")
    names = builtin_configs()
    width = max(len(name) for name in names) + 2
    for name in names:
        first = find_config(name).read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(configs_row(name, summary, width))
    return 0


def configs_row(name: str, summary: str, width: int, columns: int = 100) -> str:
    """``name`` and its summary, the summary wrapped at word boundaries under itself."""
    lines = textwrap.wrap(summary, max(30, columns - width)) or [""]
    pad = " " * width
    return "\n".join([f"{name:<{width}}{lines[0]}", *(pad + line for line in lines[1:])]).rstrip()


def config_text(name: str, overrides: list[str] | None = None, source: bool = False) -> str:
    """The resolved config ``name`` as YAML (every key, defaults merged), or with ``source``
    the text of the built-in config or YAML file as written. A file given by path must load
    as a valid rmgl config: the command never prints an arbitrary file."""
    from rmgl.engine.config import builtin_config, find_config, load_config, to_yaml

    builtin = builtin_config(name)
    if builtin is not None:
        cfg = load_config(builtin, overrides)
        return builtin.read_text() if source else resolved_header(name, overrides) + to_yaml(cfg)
    path = Path(name)
    if not path.is_file():
        find_config(name)  # raises: not a file, not a built-in name (with suggestions)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(
            f"{name} is not a built-in config name and not a .yaml config file; "
            "'rmgl configs' lists the built-in ones"
        )
    cfg = load_config(path, overrides)  # unknown keys or bad values are refused, naming the key
    return path.read_text() if source else resolved_header(name, overrides) + to_yaml(cfg)


def resolved_header(name: str, overrides: list[str] | None) -> str:
    extra = f" {' '.join(overrides)}" if overrides else ""
    return (
        f"# {name}{extra}, resolved: every key with the value a run uses "
        f"(rmgl configs {name} --source prints the file as written)\n"
    )
