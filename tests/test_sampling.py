"""The rare-size floor: which training molecules an epoch repeats (se3tcli/train/sampling.py)."""

from __future__ import annotations

import numpy as np

from se3tcli.data.qm9 import QM9Data
from se3tcli.train.sampling import epoch_pool, heavy_atom_counts


def test_heavy_atom_counts_leave_out_hydrogen() -> None:
    numbers = np.array([6, 1, 1, 1, 1, 8, 1, 1, 1], np.int8)  # CH4, H2O, a lone H
    data = QM9Data(
        numbers=numbers,
        positions=np.zeros((9, 3), np.float32),
        offsets=np.array([0, 5, 8, 9]),
        targets=np.zeros((3, 1)),
        index=np.arange(3, dtype=np.int32),
        target_names=("homo",),
    )
    assert heavy_atom_counts(data).tolist() == [1, 1, 0]


def test_each_rare_size_reaches_the_floor_and_common_sizes_stay_once() -> None:
    heavy = np.array([9] * 90 + [8] * 7 + [1] * 2 + [2] + [5] * 3)  # molecule i has heavy[i] heavy atoms
    train = np.arange(100)  # the 3 five-atom molecules are not training ones
    pool = epoch_pool(train, heavy, 0.05)  # each size at least 5 of the epoch's molecules
    counts = np.bincount(pool, minlength=len(heavy))
    assert counts[:90].tolist() == [1] * 90  # 90 >= 5: once each
    assert counts[90:97].tolist() == [1] * 7  # 7 >= 5
    assert counts[97:99].tolist() == [3, 3]  # 2 < 5: ceil(5 / 2) = 3 times each
    assert counts[99] == 5 and counts[100:].sum() == 0  # only the training split
    for size in (9, 8, 1, 2):
        assert (heavy[pool] == size).sum() >= 5


def test_no_floor_is_the_training_split_itself() -> None:
    train = np.array([4, 0, 2])
    heavy = np.array([1, 9, 9, 9, 3])
    assert epoch_pool(train, heavy, 0.0) is train
    assert epoch_pool(train[:0], heavy, 0.5).size == 0
