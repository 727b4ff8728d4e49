"""Labelled data sets for training and evaluation: QM9 or the user's own SDF/extXYZ/CSV files.

Both end up as a :class:`~se3tcli.data.qm9.QM9Data` container (flat arrays of atoms, offsets, targets),
which holds any set of labelled molecules, plus a reproducible train/val/test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from se3tcli.data.labels import is_own_prediction, label_conflict, label_value
from se3tcli.data.qm9 import QM9Data, load_qm9
from se3tcli.data.splits import QM9_SPLIT_SIZES, random_split
from se3tcli.notices import NOTICES
from se3tcli.targets import QM9_TARGETS

QM9_NAME = "qm9"


@dataclass
class LabelledData:
    data: QM9Data  # the molecules used by the run (all, or a --limit subset), targets in display units
    split: dict[str, np.ndarray]  # indices into data
    description: dict  # how to rebuild exactly this data and split (stored in checkpoints)


def _limit_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 3:
        raise ValueError("--limit must be at least 3 (one molecule each for train, val and test)")
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:limit])


def load_labelled(
    dataset: str,
    targets: Sequence[str],
    seed: int,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> LabelledData:
    """Load ``qm9`` or a labelled SDF/extXYZ/CSV file; split it reproducibly (same arguments, same split)."""
    if dataset.lower() == QM9_NAME:
        missing = [t for t in targets if t not in QM9_TARGETS]
        if missing:
            raise ValueError(f"QM9 has no target {missing[0]!r} (a new target needs a labelled file)")
        full = load_qm9(cache_dir)
        sizes: tuple[int, int, int] | None = QM9_SPLIT_SIZES
        name = QM9_NAME
    else:
        full = read_labelled_file(Path(dataset), targets)
        sizes = None
        name = str(Path(dataset).resolve())  # absolute, so evaluate works from any folder
    columns = [full.target_names.index(t) for t in targets]
    subset = _limit_indices(len(full), limit, seed)
    data = full.subset(subset)
    data = QM9Data(
        numbers=data.numbers,
        positions=data.positions,
        offsets=data.offsets,
        targets=data.targets[:, columns],
        index=data.index,
        target_names=tuple(targets),
    )
    if limit is not None and sizes is not None:
        sizes = None if limit < sum(sizes) else sizes
    split = random_split(len(data), sizes, seed)
    description = {
        "dataset": name,
        "seed": seed,
        "limit": limit,
        "sizes": {k: len(v) for k, v in split.items()},
    }
    return LabelledData(data, split, description)


def read_labelled_file(path: Path, targets: Sequence[str]) -> QM9Data:
    """Molecules of an SDF/extXYZ/CSV file whose SD tags / info keys / columns give every requested target.

    Values are taken as already in each target's display unit. Records that fail to read or lack a
    target are skipped; a file with no usable record raises ``ValueError``.
    """
    from se3tcli.io import read_molecules  # RDKit/ASE are needed only for files

    numbers, positions, values, counts, records = [], [], [], [], []
    skipped = 0
    own_predictions = dict.fromkeys(targets, 0)  # records whose label is se3t's prediction, per target
    conflicts: dict[str, list[str]] = {t: [] for t in targets}  # per target: records with differing labels
    for molecule in read_molecules([path]):
        row = _target_values(molecule.properties, targets) if molecule.ok else None
        if row is None:
            skipped += 1
            continue
        for target in targets:
            own_predictions[target] += is_own_prediction(molecule.properties, target)
            if conflict := label_conflict(molecule.properties, target):
                conflicts[target].append(f"record {molecule.record}: {conflict}")
        numbers.append(molecule.numbers.astype(np.int8))
        positions.append(molecule.positions.astype(np.float32))
        values.append(row)
        counts.append(len(molecule.numbers))
        records.append(molecule.record)
    if len(values) < 3:
        raise ValueError(
            f"{path}: only {len(values)} records carry all of {', '.join(targets)} "
            f"({skipped} skipped); need >= 3"
        )
    if skipped:
        wanted = ", ".join(targets)
        NOTICES.warning(f"{path}: {skipped} records skipped (unreadable, or without a number for {wanted})")
    for target, found in conflicts.items():
        if found:
            NOTICES.warning(
                f"{path}: {len(found)} record(s) give {target} under several keys with different values "
                f"(first: {found[0]}); the first key's value is used"
            )
    predicted = [f"{t} ({n} records)" for t, n in own_predictions.items() if n]
    if predicted:
        NOTICES.warning(
            f"{path}: labels of {', '.join(predicted)} are se3t's own predictions (its output, without "
            "references): scores against them measure agreement with that run, not accuracy"
        )
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return QM9Data(
        numbers=np.concatenate(numbers),
        positions=np.concatenate(positions),
        offsets=offsets,
        targets=np.asarray(values, dtype=np.float64),
        index=np.asarray(records, dtype=np.int32),  # 1-based record numbers in the file
        target_names=tuple(targets),
    )


def _target_values(properties: dict, targets: Sequence[str]) -> list[float] | None:
    """The record's value of every target (display units), or None if one is missing."""
    row = [label_value(properties, target) for target in targets]
    return None if any(value is None for value in row) else row
