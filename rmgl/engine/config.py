"""Typed configuration: dataclasses with defaults = the paper's recipe (§IV-A; every choice
the paper leaves open is in docs/model.md), loaded from YAML files (which may extend a
``base`` file or a built-in config) and dotted command-line overrides.

Unknown keys and wrong types are errors that name the key and suggest the closest valid one,
because a typo in an ablation config must not silently run the default.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rmgl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from rmgl.losses import LossConfig, RMGLLossConfig, loss_config_class
from rmgl.metrics.distance import METRICS
from rmgl.model import ModelConfig, RMGLConfig, model_config_class
from rmgl.model.receptive_field import current_rp_position


@dataclass
class DataConfig:
    dataset: str = "market1501"  # a registered reader: rmgl.data.datasets.dataset_names()
    root: str = "data/market1501"
    height: int = 384
    width: int = 128
    # input normalisation, (pixels / 255 - mean) / std per RGB channel, in training and
    # testing alike (and in exported models); ImageNet's by default, as the backbones expect
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    num_identities: int = 12  # P
    num_instances: int = 4  # K
    workers: int = 4
    test_batch_size: int = 128
    # data with only training identities (a folder without query/gallery): the share of the
    # identities held out as query and gallery, chosen with run.seed and written to
    # <run>/split.csv
    holdout_ids: float = 0.2
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    epochs: int = 60
    lr: float = 0.01
    head_lr_mult: float = 10.0  # reduction layers and classifiers
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: float = 3.0
    warmup_start_lr: float = 1e-5
    milestones: list[int] = field(default_factory=lambda: [30, 50])
    gamma: float = 0.1


@dataclass
class EvalConfig:
    every: int = 10  # epochs between evaluations (and always at the end); 0 = only at the end
    rerank: bool = False
    metric: str = "euclidean"  # euclidean | cosine
    protocol: str = "auto"  # auto (the dataset's) | cross_camera | any_camera


@dataclass
class RunConfig:
    name: str = "rmgl"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 training on GPU, float32 on CPU, float32 evaluation everywhere;
    # bf16 | fp16: training and evaluation in that precision; off: float32 throughout
    amp: str = "auto"
    channels_last: bool = True  # on GPU only
    # torch.compile the training forward: 533 -> 894 images/s for RMGL-R50 384x128 at batch 48
    # on an H200 (docs/performance.md); the first steps then compile (about 2 minutes there),
    # and again when an ABP warm-up ends
    compile: bool = False
    # torch.compile's mode: default | reduce-overhead (CUDA graphs: one launch per graph
    # instead of one per kernel) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # DDP: BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only) instead of
    # each process's share of it
    sync_bn: bool = False
    # iterations between reads of the losses from the device: metrics.jsonl rows, TensorBoard
    # scalars, the progress bar's loss and the NaN check happen that often (the step never
    # waits for the GPU in between); train.log has one line per epoch, with the run's ETA
    log_every: int = 20


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    # the options of the model and loss their `name` chooses (rmgl.model, rmgl.losses)
    model: ModelConfig = field(default_factory=RMGLConfig)
    loss: LossConfig = field(default_factory=RMGLLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


def config_schema(model: str = "rmgl", loss: str = "rmgl") -> DictConfig:
    """The structured config whose ``model`` / ``loss`` sections are the config dataclasses
    of the model and loss registered under those names."""
    sections = {}
    for key, name, config_class in (
        ("model", model, model_config_class),
        ("loss", loss, loss_config_class),
    ):
        try:
            sections[key] = config_class(name)()
        except (ValueError, ImportError) as err:
            raise ConfigError(f"{key}.name={name!r}: {err}") from None
    return OmegaConf.structured(Config(**sections))


def _chosen_name(section: str, nodes: list[DictConfig], overrides: list[str]) -> str:
    """The ``<section>.name`` the YAML chain and overrides choose (last one wins)."""
    name = "rmgl"
    for node in nodes:
        value = node.get(section) if isinstance(node, DictConfig) else None
        if isinstance(value, DictConfig) and "name" in value:
            name = str(value.name)
    for item in overrides:
        key, _, value = item.partition("=")
        if key == f"{section}.name":
            name = value.strip("'\"")
    return name


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            keys.extend(_dotted_keys(node[key], path + "."))
    return keys


def _explain(err: Exception, schema: DictConfig, source: str, key: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or key
    if isinstance(err, yaml.YAMLError):
        return ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}")
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(key, _dotted_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        expected = OmegaConf.select(schema, key, default=None) if key else None
        if isinstance(expected, ListConfig):
            example = OmegaConf.to_container(expected) or [1, 2]
            return ConfigError(
                f"{source}: '{key}' must be a list, e.g. {key}={json.dumps(example).replace(' ', '')}"
            )
        reason = str(err.msg).splitlines()[0] if err.msg else "wrong type"
        return ConfigError(f"{source}: bad value for '{key}': {reason}")
    return ConfigError(f"{source}: {err}")


def _check_sections(node: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """A section (``data:``, ``data.augment:``) given a plain value gets a message that
    names the section and its keys, instead of OmegaConf's bare validation error."""
    for key in schema.keys():
        expected = schema[key]
        if not isinstance(expected, DictConfig) or key not in node:
            continue
        given = node[key]
        if not isinstance(given, (DictConfig, dict)):
            keys = ", ".join(list(expected.keys())[:6])
            raise ConfigError(
                f"{source}: '{prefix}{key}' is a section with keys ({keys}, ...), not a value; "
                f"write it as a mapping, e.g. {prefix}{key}: {{{next(iter(expected.keys()))}: ...}}"
            )
        _check_sections(given, expected, source, f"{prefix}{key}.")


BUILTIN_DIR = Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> list[str]:
    """Names of the configs shipped in the package, e.g. ``market1501``, ``ablation/2stripe_rp``."""
    return sorted(
        p.relative_to(BUILTIN_DIR).with_suffix("").as_posix() for p in BUILTIN_DIR.rglob("*.yaml")
    )


def builtin_config(name: str | Path) -> Path | None:
    """The built-in config called ``name`` (``market1501``, ``ablation/2stripe_rp``, with or
    without ``.yaml``), or None. Only files inside the package's config folder are names:
    ``../x`` never resolves to a file outside it."""
    stem = Path(name).as_posix().removesuffix(".yaml")
    candidate = (BUILTIN_DIR / f"{stem}.yaml").resolve()
    if BUILTIN_DIR not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file: an existing path (relative to ``relative_to`` when given), else a built-in
    config by name (``market1501``, ``ablation/2stripe_rp``, with or without ``.yaml``)."""
    path = Path(name)
    candidate = relative_to / path if relative_to is not None else path
    if candidate.is_file():
        return candidate
    builtin = builtin_config(path)
    if builtin is not None:
        return builtin
    stem = path.as_posix().removesuffix(".yaml")
    close = difflib.get_close_matches(stem, builtin_configs(), n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else "; 'rmgl configs' lists the built-in ones"
    )
    raise ConfigError(f"config {name} is neither a file nor a built-in config{hint}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML at ``path`` after the files it extends (``base:`` a path relative to the file,
    or the name of a built-in config)."""
    if path.resolve() in seen:
        raise ConfigError(
            f"config files extend each other in a loop: {' -> '.join(map(str, seen))}"
        )
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (data:, model:, ...)"
        )
    base = node.pop("base", None)
    chain = _read_yaml(find_config(base, path.parent), (*seen, path.resolve())) if base else []
    return [*chain, (path, node)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML chain <- ``key=value`` overrides, validated against :class:`Config`
    with the ``model`` and ``loss`` sections of the chosen ``model.name`` / ``loss.name``."""
    chain = _read_yaml(find_config(path)) if path else []
    nodes = [node for _, node in chain]
    schema = config_schema(
        _chosen_name("model", nodes, overrides or []), _chosen_name("loss", nodes, overrides or [])
    )
    cfg = schema
    for source, node in chain:
        _check_sections(node, schema, str(source))
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(source)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.epochs=80")
        key, value = item.split("=", 1)
        if isinstance(OmegaConf.select(schema, key, default=None), DictConfig):
            raise ConfigError(
                f"override {item!r}: '{key}' is a section, not a value; override one of its keys, "
                f"e.g. {key}.{next(iter(OmegaConf.select(schema, key).keys()))}=..."
            )
        try:
            if isinstance(OmegaConf.select(schema, key, default=None), str):
                # keep strings verbatim (YAML would turn abp=off into the boolean False),
                # less one pair of quotes the shell may have passed through
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={json.dumps(value)}"]))
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise _explain(err, schema, f"override {item!r}", key) from None
    # YAML reads a bare `off` as the boolean False; these two options spell "disabled" as off.
    if cfg.model.get("abp") == "False":
        cfg.model.abp = "off"
    if cfg.run.amp == "False":
        cfg.run.amp = "off"
    _current_names(cfg, warn=True)
    check_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _current_names(cfg: DictConfig, warn: bool) -> None:
    """Translate former option values that config files and stored checkpoints still hold;
    ``warn`` shows the user the new form to write."""
    if "rp_position" in cfg.model:
        cfg.model.rp_position = current_rp_position(
            cfg.model.rp_position, "model.rp_position", warn
        )


# Checked before anything runs, so that a bad value fails in a second with its name instead
# of after an epoch of training. The model's and the loss's options are declared (choices
# included) and checked by their config dataclasses, next to their code.
CHOICES = {
    "eval.metric": METRICS,
    "eval.protocol": ("auto", "cross_camera", "any_camera"),
    "run.amp": ("auto", "bf16", "fp16", "off"),
    "run.compile_mode": (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
}
# (key, test, what is expected)
RANGES = [
    ("data.height", lambda v: v > 0, "> 0"),
    ("data.width", lambda v: v > 0, "> 0"),
    ("data.num_identities", lambda v: v >= 1, ">= 1"),
    ("data.num_instances", lambda v: v >= 1, ">= 1"),
    ("data.workers", lambda v: v >= 0, ">= 0"),
    ("data.test_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.augment.rsa_start_epoch", lambda v: v >= 0, ">= 0"),
    ("data.augment.rsa_ramp_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.epochs", lambda v: v >= 1, ">= 1"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.head_lr_mult", lambda v: v > 0, "> 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_start_lr", lambda v: v > 0, "> 0"),
    ("optim.gamma", lambda v: v > 0, "> 0"),
    ("eval.every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("run.log_every", lambda v: v >= 1, ">= 1"),
    ("data.holdout_ids", lambda v: 0 < v < 1, "in (0, 1)"),
]
PROBABILITIES = (
    "flip",
    "rsa",
    "rsa_crop_prob",
    "random_erasing",
    "color_jitter",
    "random_crop",
    "rcrs",
)


def check_config(cfg: DictConfig) -> None:
    """Value checks the types cannot express; raises :class:`ConfigError` naming the key."""
    for section in ("model", "loss"):
        try:
            OmegaConf.to_object(cfg[section]).check(prefix=f"{section}.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    checks = RANGES + [
        (f"data.augment.{name}", lambda v: 0 <= v <= 1, "a probability in [0, 1]")
        for name in PROBABILITIES
        if name in cfg.data.augment
    ]
    for key, test, expected in checks:
        value = OmegaConf.select(cfg, key)
        if not test(value):
            raise ConfigError(f"{key}={value} must be {expected}")
    for key in ("data.mean", "data.std"):
        values = list(OmegaConf.select(cfg, key))
        if len(values) != 3 or (key == "data.std" and min(values) <= 0):
            raise ConfigError(
                f"{key}={values} must be three numbers, one per RGB channel"
                + (", all > 0" if key == "data.std" else "")
            )
    if cfg.model.init_from_same_identities and not cfg.model.init_from:
        raise ConfigError(
            "model.init_from_same_identities=true keeps the classifiers of model.init_from, "
            "which is not set"
        )
    if list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(
            f"optim.milestones={list(cfg.optim.milestones)} must be increasing epochs"
        )
    from rmgl.engine.run_record import check_run_name

    try:
        check_run_name(cfg.run.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# What a resumed run may change: how long it trains and how it is evaluated and logged, never
# what it learns from or how (that would make the record disagree with what ran).
RESUME_MAY_CHANGE = (
    "optim.epochs",
    "eval.every",
    "eval.rerank",
    "eval.metric",
    "eval.protocol",
    "data.workers",
    "data.test_batch_size",
    "data.root",
    "run.log_every",
    "run.device",
    "run.output_dir",
)


def check_resume_changes(saved: DictConfig, new: DictConfig, epochs_done: int) -> None:
    """Refuse a resume whose config changes the run; name each changed key."""
    changed = [
        f"{key}: {OmegaConf.select(saved, key)} -> {OmegaConf.select(new, key)}"
        for key in _leaf_keys(new)
        if key not in RESUME_MAY_CHANGE
        and OmegaConf.select(saved, key, default=None) != OmegaConf.select(new, key)
    ]
    if changed:
        raise ConfigError(
            f"--resume with settings that differ from the checkpoint's ({'; '.join(changed)}); "
            f"a resumed run may only change {', '.join(RESUME_MAY_CHANGE)}. Start a new run "
            "(another run.name) to change the others"
        )
    if new.optim.epochs <= epochs_done:
        raise ConfigError(
            f"--resume: the run has already trained {epochs_done} epochs and optim.epochs is "
            f"{new.optim.epochs}; raise optim.epochs to train longer"
        )


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        value = node[key]
        if isinstance(value, DictConfig):
            keys.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml_text(text: str, source: str = "config") -> DictConfig:
    """Rebuild a validated config from :func:`to_yaml` output (e.g. stored in a checkpoint).

    The text is read with a safe YAML loader: a tag such as ``!!python/object/apply:...``
    is never constructed. Anything that is not a valid config (such tags, broken YAML,
    unknown keys, wrong types) is a one-line :class:`ConfigError` that names ``source``.
    """
    try:
        node = OmegaConf.create(text)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{source}: the stored config is not valid YAML ({first})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{source}: the stored config is not a mapping of sections")
    schema = config_schema(_chosen_name("model", [node], []), _chosen_name("loss", [node], []))
    try:
        cfg = OmegaConf.merge(schema, node)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, source) from None
    _current_names(cfg, warn=False)  # a checkpoint is not the user's to edit
    return cfg
