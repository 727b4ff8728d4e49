"""Tests of the QM9 loader, its cache, the splits and the atom references."""

from __future__ import annotations

import csv
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from se3tcli.data import qm9
from se3tcli.data.qm9 import CACHE_FILE, QM9Data, QM9Unavailable, default_cache_dir, load_qm9
from se3tcli.data.splits import (
    QM9_SPLIT_SIZES,
    element_counts,
    fit_atom_refs,
    load_split,
    random_split,
    save_split,
)
from se3tcli.targets import HARTREE_TO_EV, QM9_TARGETS

ELEMENTS = (1, 6, 7, 8, 9)
COL = {name: i for i, name in enumerate(QM9_TARGETS)}

_HAVE_QM9 = importlib.util.find_spec("qm9pack") is not None or (default_cache_dir() / CACHE_FILE).exists()
needs_qm9 = pytest.mark.skipif(not _HAVE_QM9, reason="needs qm9pack or an existing QM9 cache")


@pytest.fixture(scope="session")
def data() -> QM9Data:
    """All of QM9, from the cache in the default cache dir ($SE3T_CACHE_DIR respected), built once."""
    return load_qm9()


@pytest.fixture(scope="session")
def split(data: QM9Data) -> dict[str, np.ndarray]:
    return random_split(len(data), QM9_SPLIT_SIZES, seed=0)


def _toy(n_atoms: list[int]) -> QM9Data:
    """Synthetic molecules whose atom coordinates and targets encode their molecule number."""
    offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
    mol = np.repeat(np.arange(len(n_atoms)), n_atoms)
    return QM9Data(
        numbers=np.where(np.arange(offsets[-1]) == offsets[:-1].repeat(n_atoms), 6, 1).astype(np.int8),
        positions=np.stack([mol, np.arange(offsets[-1]), -mol], axis=1).astype(np.float32),
        offsets=offsets,
        targets=np.arange(len(n_atoms) * 12, dtype=np.float64).reshape(-1, 12),
        index=np.arange(1, len(n_atoms) + 1, dtype=np.int32),
        target_names=QM9_TARGETS,
    )


# --- the real data set -------------------------------------------------------------------------------


@pytest.mark.slow
@needs_qm9
def test_full_dataset(data: QM9Data) -> None:
    assert len(data) == 130_831
    assert data.targets.shape == (130_831, 12) and data.target_names == QM9_TARGETS
    assert set(np.unique(data.numbers).tolist()) == set(ELEMENTS)
    n_atoms = data.n_atoms()
    assert n_atoms.max() == 29 and n_atoms.min() >= 1
    heavy = np.bincount(np.repeat(np.arange(len(data)), n_atoms), weights=data.numbers > 1)
    assert heavy.max() == 9
    assert len(np.unique(data.index)) == len(data) and data.index.min() == 1 and data.index.max() == 133_885
    assert np.isfinite(data.positions).all() and np.isfinite(data.targets).all()


@pytest.mark.slow
@needs_qm9
def test_units_and_columns(data: QM9Data) -> None:
    """Methane (QM9 index 1) against the raw CSV values, and physical relations between columns."""
    assert data.index[0] == 1
    numbers, positions = data.molecule(0)
    assert numbers.tolist() == [6, 1, 1, 1, 1]
    assert positions.dtype == np.float64 and numbers.dtype == np.int64
    np.testing.assert_allclose(positions[0], [-0.0126981359, 1.0858041578, 0.0080009958], atol=1e-6)
    t = data.targets[0]
    assert t[COL["homo"]] == pytest.approx(-10.550, abs=1e-3)  # -0.3877 Ha
    assert t[COL["homo"]] == pytest.approx(-0.3877 * HARTREE_TO_EV, rel=1e-12)
    assert t[COL["U0"]] == pytest.approx(-40.47893 * HARTREE_TO_EV, rel=1e-12)
    assert t[COL["alpha"]] == 13.21 and t[COL["Cv"]] == 6.469 and t[COL["r2"]] == 35.3641
    assert t[COL["mu"]] == 0.0
    targets = data.targets
    # gap = LUMO - HOMO up to the 4-decimal rounding of the CSV (1.5e-4 Ha); H = U + kT (25.7 meV).
    assert np.abs(targets[:, COL["gap"]] - (targets[:, COL["lumo"]] - targets[:, COL["homo"]])).max() < 5e-3
    np.testing.assert_allclose(targets[:, COL["H"]] - targets[:, COL["U"]], 0.025693, atol=1e-4)
    assert (targets[:, COL["U"]] > targets[:, COL["U0"]]).all() and (
        targets[:, COL["G"]] < targets[:, COL["H"]]
    ).all()


@pytest.mark.slow
@needs_qm9
def test_qm9_split(data: QM9Data, split: dict[str, np.ndarray]) -> None:
    assert [len(split[k]) for k in ("train", "val", "test")] == [100_000, 17_748, 13_083]
    everything = np.concatenate(list(split.values()))
    assert everything.dtype == np.int64
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(data)))  # disjoint and covering
    again = random_split(len(data), QM9_SPLIT_SIZES, seed=0)
    other = random_split(len(data), QM9_SPLIT_SIZES, seed=1)
    for name in split:
        np.testing.assert_array_equal(split[name], again[name])
        assert not np.array_equal(split[name], other[name])
    test = data.subset(split["test"])
    for j in (0, 1234, len(test) - 1):
        for got, want in zip(test.molecule(j), data.molecule(int(split["test"][j])), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@needs_qm9
def test_cache_round_trip(data: QM9Data, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second load reads the written npz without consulting qm9pack."""

    def no_qm9pack() -> Path:
        raise QM9Unavailable("qm9pack must not be consulted when the cache is valid")

    monkeypatch.setattr(qm9, "_qm9pack_data_dir", no_qm9pack)
    again = load_qm9(default_cache_dir())
    for name in ("numbers", "positions", "offsets", "targets", "index"):
        got, want = getattr(again, name), getattr(data, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert again.target_names == data.target_names


@pytest.mark.slow
@needs_qm9
def test_atom_refs_remove_size_dependence(data: QM9Data, split: dict[str, np.ndarray]) -> None:
    # Measured (seed 0): std of U0 1085.87 eV on train -> 1.096 eV after atom refs (ratio 1.0e-3);
    # on test 1094.89 eV -> 1.096 eV. Refs (eV): H -16.43, C -1036.05, N -1489.80, O -2046.98, F -2717.50.
    train, test = data.subset(split["train"]), data.subset(split["test"])
    u0 = train.targets[:, COL["U0"]]
    refs = fit_atom_refs(train.numbers, train.offsets, u0, ELEMENTS)
    assert refs.shape == (5,) and refs.dtype == np.float64
    for part in (train, test):
        y = part.targets[:, COL["U0"]]
        residual = y - element_counts(part.numbers, part.offsets, ELEMENTS) @ refs
        assert residual.std() < 0.01 * y.std()
        assert residual.std() < 2.0  # eV
    # The H reference is close to the energy of an H atom (-0.5 Ha) minus a share of the bond energy.
    assert -0.7 * HARTREE_TO_EV < refs[0] < -0.5 * HARTREE_TO_EV


# --- synthetic data ----------------------------------------------------------------------------------


def test_fit_atom_refs_recovers_synthetic_refs() -> None:
    rng = np.random.default_rng(7)
    n_atoms = rng.integers(1, 20, size=500)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    numbers = rng.choice(ELEMENTS, size=offsets[-1]).astype(np.int8)
    true_refs = np.array([-13.6, -1029.8, -1485.3, -2042.6, -2713.5])
    counts = element_counts(numbers, offsets, ELEMENTS)
    assert counts.shape == (500, 5) and counts.dtype == np.float64
    np.testing.assert_array_equal(counts.sum(axis=1), n_atoms)
    y = counts @ true_refs
    np.testing.assert_allclose(fit_atom_refs(numbers, offsets, y, ELEMENTS), true_refs, rtol=1e-10)
    two = fit_atom_refs(numbers, offsets, np.stack([y, 2 * y], axis=1), ELEMENTS)
    np.testing.assert_allclose(two, np.stack([true_refs, 2 * true_refs], axis=1), rtol=1e-10)


def test_element_counts_small() -> None:
    numbers = np.array([6, 1, 1, 1, 1, 8, 1, 1], dtype=np.int8)  # CH4, H2O
    offsets = np.array([0, 5, 8])
    np.testing.assert_array_equal(element_counts(numbers, offsets, (1, 6, 8)), [[4, 1, 0], [2, 0, 1]])
    with pytest.raises(ValueError, match="not in"):
        element_counts(numbers, offsets, (1, 6))
    with pytest.raises(ValueError):
        fit_atom_refs(numbers, offsets, np.zeros(3), (1, 6, 8))


def test_random_split_sizes() -> None:
    default = random_split(10, None, seed=3)
    assert [len(default[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    tiny = random_split(3, None, seed=3)
    assert [len(tiny[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    limited = random_split(1000, QM9_SPLIT_SIZES, seed=3)  # e.g. --limit 1000
    assert [len(limited[k]) for k in ("train", "val", "test")] == [766, 135, 99]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(limited.values()))), np.arange(1000))
    larger = random_split(50, (10, 5, 5), seed=3)  # surplus molecules are left out
    assert [len(larger[k]) for k in ("train", "val", "test")] == [10, 5, 5]
    assert len(np.unique(np.concatenate(list(larger.values())))) == 20
    with pytest.raises(ValueError):
        random_split(2, QM9_SPLIT_SIZES, seed=3)
    with pytest.raises(ValueError):
        random_split(10, (5, -1, 1), seed=3)


def test_save_load_split(tmp_path: Path) -> None:
    split = random_split(200, None, seed=11)
    path = tmp_path / "run" / "splits.npz"
    save_split(path, split, seed=11)
    assert sorted(p.name for p in path.parent.iterdir()) == ["splits.npz"]  # no temp file left behind
    loaded = load_split(path)
    assert set(loaded) == {"train", "val", "test"}
    for name in split:
        assert loaded[name].dtype == np.int64
        np.testing.assert_array_equal(loaded[name], split[name])
    with np.load(path) as npz:
        assert int(npz["seed"]) == 11


def test_subset_and_molecule() -> None:
    data = _toy([3, 1, 4, 2])
    sub = data.subset(np.array([2, 0, -1]))
    assert len(sub) == 3 and sub.n_atoms().tolist() == [4, 3, 2]
    assert sub.offsets.tolist() == [0, 4, 7, 9]
    np.testing.assert_array_equal(sub.index, [3, 1, 4])
    np.testing.assert_array_equal(sub.targets, data.targets[[2, 0, 3]])
    for j, i in enumerate([2, 0, 3]):
        for got, want in zip(sub.molecule(j), data.molecule(i), strict=True):
            np.testing.assert_array_equal(got, want)
    assert data.molecule(-1)[1][:, 0].tolist() == [3.0, 3.0]
    assert len(data.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        data.subset(np.array([4]))
    with pytest.raises(IndexError):
        data.molecule(4)


# --- parsing and the cache -----------------------------------------------------------------------------

HEADER = [
    "XYZ_file",
    "Index",
    "SMILES",
    "InChi",
    "N_atoms",
    "Stoichiometry",
    "Elements",
    "XYZ_Ang",
    "Mulliken_pop",
    "Harmonic_Freq_cmi",
    "RotA_GHz",
    "RotB_GHz",
    "RotC_GHz",
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "HOMO_LUMO_gap_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
]
# The target values, in CSV column order, of QM9 molecule 4 (acetylene).
ACETYLENE_TARGETS = [
    "0.",
    "16.28",
    "-0.2845",
    "0.0506",
    "0.3351",
    "59.5248",
    "0.026841",
    "-77.308427",
    "-77.305527",
    "-77.304583",
    "-77.327429",
    "8.574",
]


def _acetylene_row(**changes: str) -> list[str]:
    row = dict.fromkeys(HEADER, "")
    row.update(
        Index="4",
        N_atoms="4",
        Elements="['C','C','H','H']",
        XYZ_Ang="[[0.5995394918,0.,1.],[-0.5995394918,0.,1.],[-1.6616385861,0.,1.],[1.6616385861,0.,1e-3]]",
    )
    row.update(zip(HEADER[13:], ACETYLENE_TARGETS, strict=True))
    row.update(changes)
    return [row[name] for name in HEADER]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def test_parse_csv(tmp_path: Path) -> None:
    first = _write_csv(tmp_path / "a.csv", [_acetylene_row()])
    second = _write_csv(tmp_path / "b.csv", [_acetylene_row(Index="5")])
    seen: list[tuple[int, int]] = []
    data = qm9._parse_csv_files(
        [first, second], expected=2, progress=lambda done, total: seen.append((done, total))
    )
    assert len(data) == 2 and data.index.tolist() == [4, 5] and seen[-1] == (2, 2)
    numbers, positions = data.molecule(1)
    assert numbers.tolist() == [6, 6, 1, 1]
    np.testing.assert_allclose(positions[:, 1:], [[0, 1], [0, 1], [0, 1], [0, 1e-3]], atol=1e-7)
    assert data.targets[0, COL["gap"]] == pytest.approx(0.3351 * HARTREE_TO_EV)
    assert data.targets[0, COL["G"]] == pytest.approx(-77.327429 * HARTREE_TO_EV)
    with pytest.raises(ValueError, match="instead of 3"):
        qm9._parse_csv_files([first, second], expected=3)


@pytest.mark.parametrize(
    "changes",
    [
        {"N_atoms": "5"},
        {"Elements": "['C','Cl','H','H']"},
        {"XYZ_Ang": "[[0.5,0.,1.],[-0.5,0.,1.],[-1.6,0.,1.],[1.6,0.]]"},
        {"XYZ_Ang": "[[0.5,0.,1.],[-0.5,0.,1.],[-1.6,0.,1.],[1.6,x,1.]]"},
        {"HOMO_au": ""},
    ],
    ids=["n_atoms", "element", "xyz_count", "xyz_number", "target"],
)
def test_parse_csv_rejects_malformed_rows(tmp_path: Path, changes: dict[str, str]) -> None:
    path = _write_csv(tmp_path / "bad.csv", [_acetylene_row(), _acetylene_row(Index="5", **changes)])
    with pytest.raises(ValueError, match="QM9"):
        qm9._parse_csv_files([path])


def _no_qm9pack() -> Path:
    raise QM9Unavailable(qm9.QM9_HINT)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(qm9.CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(qm9.CACHE_ENV)
    assert default_cache_dir() == tmp_path / "xdg" / "se3t"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "se3t"


def test_missing_qm9pack_gives_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qm9, "_qm9pack_data_dir", _no_qm9pack)
    with pytest.raises(QM9Unavailable) as err:
        load_qm9(tmp_path)
    assert str(err.value) == 'QM9 needs the qm9pack package: pip install "se3tcli[qm9]"'
    (tmp_path / CACHE_FILE).write_bytes(b"not a zip file")
    with pytest.raises(QM9Unavailable, match="unusable"):
        load_qm9(tmp_path)


@pytest.mark.parametrize("kind", ["corrupt", "old_version", "truncated"])
def test_unusable_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str) -> None:
    cache = tmp_path / CACHE_FILE
    if kind == "corrupt":
        cache.write_bytes(b"PK\x03\x04 garbage")
    else:
        toy = _toy([2, 3])
        arrays = {"version": np.int64(0 if kind == "old_version" else qm9.CACHE_VERSION)}
        arrays.update(numbers=toy.numbers, offsets=toy.offsets, target_names=np.array(QM9_TARGETS))
        qm9.write_npz_atomic(cache, **arrays)
    rebuilt = _toy([1])
    calls: list[Path] = []
    monkeypatch.setattr(qm9, "build_cache", lambda path, progress=None: calls.append(path) or rebuilt)
    assert load_qm9(tmp_path) is rebuilt and calls == [cache]
    assert load_qm9(tmp_path, rebuild=True) is rebuilt


def test_building_the_cache_is_announced_only_when_it_happens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog
) -> None:
    """One notice per parse of the CSVs (toy ones), none where qm9pack is missing or the cache is read."""
    monkeypatch.setattr(qm9, "_qm9pack_data_dir", _no_qm9pack)
    with caplog.at_level(logging.INFO, logger="se3tcli.notices"), pytest.raises(QM9Unavailable):
        load_qm9(tmp_path)
    assert not caplog.records
    for name in qm9.QM9_CSV_FILES:
        (tmp_path / name).touch()
    toy = _toy([2, 3])
    monkeypatch.setattr(qm9, "_qm9pack_data_dir", lambda: tmp_path)
    monkeypatch.setattr(qm9, "_parse_csv_files", lambda paths, expected, progress: toy)
    with caplog.at_level(logging.INFO, logger="se3tcli.notices"):
        assert load_qm9(tmp_path) is toy
    (notice,) = caplog.records
    assert notice.getMessage().startswith(f"building the QM9 cache {tmp_path / CACHE_FILE} (once")
    caplog.clear()
    monkeypatch.setattr(qm9, "_read_cache", lambda path: toy)  # the toy cache holds too few molecules
    with caplog.at_level(logging.INFO, logger="se3tcli.notices"):
        assert load_qm9(tmp_path) is toy
    assert not caplog.records
