"""Which training molecules an epoch visits: each once, plus repeats of molecules of rare sizes.

QM9 has 2 training molecules with one heavy atom (CH4, H2O) among 100,000; seen once per epoch, the model
never fits them (water's HOMO was 1.7 eV off after 32 epochs while the test MAE was 0.07 eV). A size
floor f repeats the molecules of every heavy-atom count held by fewer than f x len(train) training
molecules until the count has f x len(train) visits per epoch (a share just under f of the longer epoch).
"""

from __future__ import annotations

import math

import numpy as np

from se3tcli.data.qm9 import QM9Data


def heavy_atom_counts(data: QM9Data) -> np.ndarray:
    """Atoms other than hydrogen in each molecule, [n_mol] int64."""
    if len(data) == 0:
        return np.zeros(0, np.int64)
    return np.add.reduceat((data.numbers > 1).astype(np.int64), data.offsets[:-1])


def epoch_pool(train: np.ndarray, heavy: np.ndarray, size_floor: float) -> np.ndarray:
    """The molecule indices one epoch visits, in ``train``'s order, repeats beside their original.

    ``train``: the training split's indices; ``heavy``: heavy-atom counts of all molecules. With
    ``size_floor`` f > 0, each heavy-atom count with n < f * len(train) training molecules has all of
    them repeated ceil(f * len(train) / n) times (at least f * len(train) visits); 0: ``train`` itself.
    """
    if size_floor <= 0 or len(train) == 0:
        return train
    train_heavy = heavy[train]
    counts = np.bincount(train_heavy)  # [max heavy + 1] training molecules of each count
    wanted = size_floor * len(train)
    copies_of_size = np.ones(len(counts), np.int64)
    for size in np.flatnonzero((counts > 0) & (counts < wanted)):
        copies_of_size[size] = math.ceil(wanted / counts[size])
    return np.repeat(train, copies_of_size[train_heavy])
