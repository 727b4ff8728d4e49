"""Normalisation and atom references from the training split, and the model a run starts from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from se3tcli.checkpoint import model_from_checkpoint, read_checkpoint
from se3tcli.data.qm9 import QM9Data
from se3tcli.data.splits import element_counts, fit_atom_refs
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.targets import ATOM_REF_TARGETS, TARGETS


def fit_statistics(data: QM9Data, train_idx: np.ndarray, elements: Sequence[int]) -> dict[str, Any]:
    """Normalisation and atom references from the training split (display units).

    Extensive targets: ``y ≈ Σ_atoms ref[z] + n * mean``; ``mean``/``std`` are per atom.
    ``loss_scale`` is the std of what the network must learn, so the loss is a normalised L1.
    """
    train = data.subset(train_idx)
    n_atoms = train.n_atoms().astype(np.float64)
    counts = element_counts(train.numbers, train.offsets, elements)  # [n_train, n_elements]
    mean, std, scale, refs = {}, {}, {}, {}
    for column, target in enumerate(data.target_names):
        y = train.targets[:, column]
        if TARGETS[target].extensive:
            if target in ATOM_REF_TARGETS:
                ref = fit_atom_refs(train.numbers, train.offsets, y, elements)
                refs[target] = [float(v) for v in ref]
                y = y - counts @ ref
            per_atom = y / n_atoms
            mean[target] = float(per_atom.mean())
            std[target] = float(per_atom.std() or 1.0)
            scale[target] = float((y - n_atoms * mean[target]).std() or 1.0)
        else:
            mean[target] = float(y.mean())
            std[target] = float(y.std() or 1.0)
            scale[target] = std[target]
    return {"mean": mean, "std": std, "loss_scale": scale, "atom_refs": refs}


def checkpoint_statistics(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """:func:`fit_statistics`'s dict as a checkpoint stores it."""
    return checkpoint["normalization"] | {"atom_refs": checkpoint["atom_refs"]}


def build_model(config: ModelConfig, statistics: dict[str, Any]) -> SE3Transformer:
    model = SE3Transformer.from_config(config)
    refs = {t: np.asarray(v) for t, v in statistics["atom_refs"].items()}
    model.set_statistics(statistics["mean"], statistics["std"], refs)
    return model


def initial_model(
    path: str, config: ModelConfig, data: dict[str, Any]
) -> tuple[dict[str, Any], SE3Transformer]:
    """Weights and statistics of a checkpoint whose model matches ``config`` (for ``--init-from``).

    On the same data set the split must be the checkpoint's own (``data``: this run's data description):
    another seed or limit draws another split, whose validation and test molecules the checkpoint may
    have been trained on, so its errors would look better than they are.
    """
    state = read_checkpoint(path)
    model = model_from_checkpoint(state, path)
    if model.config != config:
        differing = sorted(k for k, v in config.to_dict().items() if model.config.to_dict()[k] != v)
        raise ValueError(
            f"{path}: --init-from model differs from the requested one in {', '.join(differing)}"
        )
    trained_on = state.get("training", {}).get("data", {})
    if trained_on.get("dataset") == data["dataset"] and any(
        trained_on.get(key) != data[key] for key in ("seed", "limit")
    ):
        raise ValueError(
            f"{path} was trained on the {data['dataset']} split of --seed {trained_on.get('seed')} "
            f"(--limit {trained_on.get('limit')}); --seed {data['seed']} (--limit {data['limit']}) would "
            "draw another split, whose validation and test molecules it may have been trained on: use the "
            "checkpoint's --seed and --limit"
        )
    return checkpoint_statistics(state), model
