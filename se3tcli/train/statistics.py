"""Normalisation and atom references from the training split, and the model a run starts from: new, or
fine-tuned from a checkpoint (``--init-from``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from se3tcli.data.dataset import LabelledData
from se3tcli.data.qm9 import QM9Data
from se3tcli.data.splits import element_counts, fit_atom_refs
from se3tcli.model.config import ModelConfig
from se3tcli.model.transformer import SE3Transformer
from se3tcli.targets import TARGETS, has_atom_refs


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
            if has_atom_refs(target):
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
    checkpoint: dict[str, Any], source: SE3Transformer, config: ModelConfig, labelled: LabelledData
) -> tuple[dict[str, Any], SE3Transformer]:
    """``(statistics, model)`` a fine-tuning run starts from: ``source`` (the ``--init-from`` model, whose
    settings ``config`` shares) with its encoder and the readout rows of the targets it has, and freshly
    initialised rows for the targets it lacks, normalised with statistics of this run's training split.

    On the checkpoint's own data set the split must be its own (``labelled``: this run's data): another
    seed or limit draws another split, whose validation and test molecules the checkpoint may have been
    trained on, so its errors would look better than they are.
    """
    data = labelled.description
    trained_on = checkpoint.get("training", {}).get("data", {})
    if trained_on.get("dataset") == data["dataset"] and any(
        trained_on.get(key) != data[key] for key in ("seed", "limit")
    ):
        raise ValueError(
            f"the --init-from model was trained on the {data['dataset']} split of --seed "
            f"{trained_on.get('seed')} (--limit {trained_on.get('limit')}); --seed {data['seed']} (--limit "
            f"{data['limit']}) would draw another split, whose validation and test molecules it may have "
            "been trained on: use the checkpoint's --seed and --limit"
        )
    kept = checkpoint_statistics(checkpoint)
    fitted = fit_statistics(labelled.data, labelled.split["train"], config.elements)
    statistics: dict[str, dict] = {part: {} for part in fitted}  # mean, std, loss_scale, atom_refs
    for target in config.targets:
        origin = kept if target in source.targets else fitted  # what the target's row was trained with
        for part, values in statistics.items():
            if target in origin[part]:
                values[target] = origin[part][target]
    model = build_model(config, statistics)
    transfer_weights(source, model)
    return statistics, model


# The readout's last layer: one output row per scalar target (see model/heads.py).
_ROWS = ("readout.mlp.2.weight", "readout.mlp.2.bias")


@torch.no_grad()
def transfer_weights(source: SE3Transformer, model: SE3Transformer) -> None:
    """Copy ``source``'s weights into ``model`` (same settings, other targets): every weight the two
    share (encoder, the readout's hidden layer, the dipole head where both have it), and the output row
    of each scalar target both predict; ``model``'s other rows and its statistics buffers stay."""
    theirs, mine = source.state_dict(), model.state_dict()
    statistics = {f"readout.{name}" for name in ("extensive", "mean", "std", "atom_refs")}
    for key, value in theirs.items():
        if key in mine and key not in statistics and key not in _ROWS:
            mine[key].copy_(value)
    row_of = {t: i for i, t in enumerate(source.readout.scalar_targets)}
    for i, target in enumerate(model.readout.scalar_targets):
        if target in row_of:
            for key in _ROWS:
                mine[key][i] = theirs[key][row_of[target]]
