"""Checkpoints that load with ``torch.load(path, weights_only=True)``, and the bundled models.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (never pickled classes)::

    {format, version, config, state_dict, normalization, atom_refs, targets, elements, training, metrics}

``last.pt`` files also carry ``resume`` (optimizer, scheduler, RNG states, position in the run).
A bundled model ``NAME.pt`` sits beside its model card ``NAME.json``, whose ``sha256`` is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from se3tcli.files import atomic_write
from se3tcli.graph import collate
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.targets import TARGETS

FORMAT = "se3t-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODEL = "qm9-default"


class CheckpointError(ValueError):
    """A file that is not a usable se3t checkpoint (the message is one line naming the file)."""


@dataclass
class LoadedModel:
    model: SE3Transformer
    path: Path
    checkpoint: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.model.targets

    @property
    def units(self) -> dict[str, str]:
        return {t: TARGETS[t].unit for t in self.targets}

    @property
    def training_domain(self) -> dict[str, Any]:
        return self.checkpoint.get("training", {}).get("domain", {})

    @property
    def typical_errors(self) -> dict[str, float]:
        """MAE per target in its display unit: the card's test errors, else the checkpoint's validation
        errors; targets without either are absent."""
        errors = {}
        for target, e in (self.checkpoint.get("metrics", {}).get("val") or {}).items():
            if isinstance(e, dict) and isinstance(e.get("mae"), (int, float)):
                errors[target] = float(e["mae"])
        for target, e in (self.card.get("test_errors") or {}).items():
            if target in TARGETS and isinstance(e, dict) and isinstance(e.get("mae"), (int, float)):
                errors[target] = float(e["mae"]) / TARGETS[target].error_factor
        return {t: v for t, v in errors.items() if t in self.targets and v > 0}


def checkpoint_dict(
    model: SE3Transformer,
    normalization: dict[str, dict[str, float]],
    atom_refs: dict[str, list[float]],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config = model.config
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": cpu_state_dict(model),
        "normalization": normalization,
        "atom_refs": atom_refs,
        "targets": {t: TARGETS[t].unit for t in config.targets},
        "elements": list(config.elements),
        "training": training or {},
        "metrics": metrics or {},
    }


def cpu_state_dict(model: SE3Transformer) -> dict[str, torch.Tensor]:
    """The model's weights and buffers, detached, on the CPU: what a checkpoint stores."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(data: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        torch.save(data, handle)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# torch.load's boilerplate around the unpickler's complaint (one line even suggests weights_only=False).
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation of torch.load")


def _short_reason(exc: BaseException) -> str:
    """One line out of torch.load's long messages: the unpickler's own complaint when there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines]
    useful = [
        line
        for line, raw in zip(useful, lines, strict=True)
        if line and not raw.startswith(_TORCH_BOILERPLATE)
    ]
    reason = useful[0].split(" Please use")[0] if useful else type(exc).__name__
    if "PytorchStreamReader" in str(exc):  # torch's zip reader: a file cut short or not a checkpoint
        reason = "truncated or corrupt file: not a complete checkpoint archive"
    elif isinstance(exc, (EOFError, OSError, zipfile.BadZipFile)):
        reason = f"truncated or corrupt file: {reason}"
    return reason[:200]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint dict; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever a corrupt or hostile file makes the restricted unpickler raise
        raise CheckpointError(f"{path}: not a loadable se3t checkpoint ({_short_reason(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a se3t checkpoint (no '{FORMAT}' format marker)")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('version')} is not supported")
    missing = [k for k in ("config", "state_dict", "normalization", "atom_refs", "targets") if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    problem = _domain_problem(data.get("training", {}))
    if problem:
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({problem})")
    return data


def _domain_problem(training: object) -> str | None:
    """What is wrong with a checkpoint's ``training`` record where predict relies on it, or None."""
    if not isinstance(training, dict):
        return "'training' is not a mapping"
    domain = training.get("domain", {})
    if not isinstance(domain, dict):
        return "'training.domain' is not a mapping"
    elements = domain.get("elements", [])
    if not isinstance(elements, list) or not all(isinstance(z, int) for z in elements):
        return "'training.domain.elements' is not a list of atomic numbers"
    for key in ("max_atoms", "max_heavy_atoms"):
        if not isinstance(domain.get(key, 0), int | None):
            return f"'training.domain.{key}' is not a whole number"
    counts = domain.get("train_molecules_by_heavy_atoms", {})
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, int) for k, v in counts.items()
    ):
        return "'training.domain.train_molecules_by_heavy_atoms' is not a count per size"
    return None


def model_from_checkpoint(data: dict[str, Any], path: str | Path = "<memory>") -> SE3Transformer:
    try:
        config = ModelConfig.from_dict(data["config"])
        model = SE3Transformer.from_config(config)
        model.load_state_dict(data["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        reason = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])  # what, then where
        raise CheckpointError(f"{path}: checkpoint does not match the model ({reason[:200]})") from None
    return model.eval()


def bundled_models() -> dict[str, Path]:
    """Bundled checkpoints by name (``models/NAME.pt``, installed as the package ``se3tcli.models``)."""
    folder = resources.files("se3tcli.models")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".pt"):
            found[entry.name[: -len(".pt")]] = Path(str(entry))
    return dict(sorted(found.items()))


def read_card(checkpoint_path: Path) -> dict[str, Any]:
    card_path = checkpoint_path.with_suffix(".json")
    if not card_path.is_file():
        return {}
    try:
        return json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_path}: unreadable model card ({exc})") from None


def resolve_model(name_or_path: str | None) -> tuple[Path, bool]:
    """``(path, bundled)`` for a bundled model name or a checkpoint path (None: the default model)."""
    if name_or_path is not None and not name_or_path.strip():
        raise CheckpointError("empty model name: give a bundled model's name or a checkpoint path")
    name = name_or_path or DEFAULT_MODEL
    bundled = bundled_models()
    if name in bundled:
        return bundled[name], True
    path = Path(name).expanduser()
    if path.exists():
        return path, False
    if name_or_path is None:
        raise CheckpointError(
            f"no bundled model '{DEFAULT_MODEL}' is installed; "
            "train one with 'se3t train' and pass --model PATH"
        )
    known = ", ".join(bundled) or "none"
    raise CheckpointError(f"{name}: no such checkpoint file or bundled model (bundled: {known})")


def load_model(name_or_path: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a bundled model by name (hash-checked against its card) or a checkpoint file."""
    path, bundled = resolve_model(name_or_path)
    card = read_card(path)
    if bundled:
        expected = card.get("checkpoint", {}).get("sha256")
        if not expected:
            raise CheckpointError(f"{path}: bundled model has no sha256 in its model card")
        if sha256_of(path) != expected:
            raise CheckpointError(f"{path}: sha256 does not match the model card; the file was modified")
    data = read_checkpoint(path)
    model = model_from_checkpoint(data, path).to(device)
    _check_finite(model, path)
    return LoadedModel(model=model, path=path, checkpoint=data, card=card)


def _check_finite(model: SE3Transformer, path: Path) -> None:
    """Refuse a model whose outputs are not finite on a probe (two atoms of its first element, 1.2 Å
    apart): broken weights would otherwise give rows without values."""
    device = next(model.parameters()).device
    element = model.config.elements[0]
    probe = (np.array([element, element]), np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]]))  # Å
    batch = collate([probe], model.config.cutoff)
    with torch.inference_mode():
        outputs = model(batch.to(device))
    broken = [name for name, value in outputs.items() if not bool(torch.isfinite(value).all())]
    if broken:
        broken_list = ", ".join(broken)
        raise CheckpointError(f"{path}: the model predicts non-finite {broken_list} for a probe molecule")
