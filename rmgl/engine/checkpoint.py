"""Checkpoints: one safetensors file per checkpoint, written atomically (write, then rename).

A checkpoint holds the model weights (``model.*``), the optimizer's tensors (``optim.*``) and,
as text metadata, the resolved config (YAML) and the trainer state
(epoch, scheduler, sampler, optimizer hyper-parameters, grad-scaler; JSON). No RNG state is
stored: the trainer seeds every epoch from (run seed, rank, epoch). Nothing is
unpickled when loading, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "rmgl-checkpoint-v1"
TMP_SUFFIX = ".tmp"  # a checkpoint being written; never read, removed when a run starts


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    config_yaml: str
    trainer: dict

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config_yaml: str,
    trainer: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint atomically; a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    trainer = dict(trainer or {})
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        trainer["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
    metadata = {"format": FORMAT, "config": config_yaml, "trainer": json.dumps(trainer)}
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync(tmp)  # the data must be on disk before the rename can be
        os.replace(tmp, path)
    # a full disk, a lost mount, a folder made read-only; safetensors reports the I/O errors
    # of its own writes as SafetensorError, not OSError
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        kept = (
            f"the previous {path.name} is intact"
            if path.exists()
            else f"no earlier {path.name} existed"
        )
        raise OSError(
            f"could not write checkpoint {path} ({_reason(err)}); {kept}. Free space or "
            "fix the folder, then continue with --resume"
        ) from err
    _fsync(path.parent)
    return path


def _reason(err: Exception) -> str:
    """The operating system's words for a failed write: an OSError's strerror, or the text
    safetensors wraps it in ("Error while serializing: I/O error: No space left on device
    (os error 28)" -> "No space left on device")."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", text)
    return found.group(1) if found else text


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an rmgl checkpoint (format {metadata.get('format')!r}); "
            "for plain weights use rmgl.engine.checkpoint.load_weights"
        )
    config_yaml, trainer = _checked_metadata(path, metadata)
    return Checkpoint(load_file(str(path)), config_yaml, trainer)


def _checked_metadata(path: Path, metadata: dict) -> tuple[str, dict]:
    """The config text and trainer state of a checkpoint, checked where they are read, so
    that every command loading checkpoints (eval, export, extract, search, report, inspect,
    resume, init_from) refuses a bad one with the same one line naming the file. The config
    is parsed by a safe YAML loader: a payload tag (``!!python/object/apply:...``) is never
    constructed, only reported."""
    from rmgl.engine.config import from_yaml_text

    config_yaml, trainer_json = metadata.get("config"), metadata.get("trainer")
    if not isinstance(config_yaml, str) or not isinstance(trainer_json, str):
        raise ValueError(f"{path} is a damaged rmgl checkpoint (no config or trainer state)")
    from_yaml_text(config_yaml, f"checkpoint {path}")
    try:
        trainer = json.loads(trainer_json)
    except ValueError as err:
        raise ValueError(
            f"checkpoint {path}: the stored trainer state is not JSON ({err})"
        ) from None
    if not isinstance(trainer, dict):
        raise ValueError(f"checkpoint {path}: the stored trainer state is not a JSON object")
    return config_yaml, trainer


def optimizer_state(ckpt: Checkpoint) -> dict:
    """The optimizer state dict stored in ``ckpt``, ready for ``optimizer.load_state_dict``."""
    info = ckpt.trainer["optimizer"]
    state: dict[int, dict] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from an rmgl checkpoint, a ``.safetensors`` file or a torch file
    (read with ``weights_only=True``: no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if any(k.startswith("model.") for k in tensors):
            return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        return tensors
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def check_compatible(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    drop_classifiers: bool = False,
    classifier_prefix: str = "classifier",
) -> dict[str, torch.Tensor]:
    """Check that ``state`` fits ``model`` and say exactly how it does not.

    With ``drop_classifiers`` the classifier weights are left out (evaluation on another
    dataset, whose identities differ), and the model's own classifiers are kept.
    """
    own = model.state_dict()
    if drop_classifiers:
        state = {k: v for k, v in state.items() if classifier_prefix not in k}
        own = {k: v for k, v in own.items() if classifier_prefix not in k}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        lines = ["the checkpoint does not fit this model (different architecture or class count):"]
        if missing:
            lines.append(f"  missing from checkpoint ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  not in model ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if wrong:
            lines.append(f"  shape mismatch ({len(wrong)}): {'; '.join(wrong[:5])}")
        if wrong and all(classifier_prefix in w for w in wrong) and not missing and not unexpected:
            lines.append(
                "  only the classifiers differ (another class count): load with drop_classifiers=True to evaluate"
            )
        raise ValueError("\n".join(lines))
    return state
