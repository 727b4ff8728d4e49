"""The QM9 data set: parse the CSVs shipped by the ``qm9pack`` wheel once, then load a compact ``.npz`` cache.

The cache needs only numpy, so training runs where ``qm9pack`` is not installed. Coordinates are in Å,
targets in the display units of :data:`se3tcli.targets.TARGETS` (energies in eV), in ``QM9_TARGETS`` order.
"""

from __future__ import annotations

import csv
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from se3tcli.files import atomic_write
from se3tcli.notices import NOTICES
from se3tcli.paths import CACHE_ENV as CACHE_ENV  # re-exported: se3tcli.data.qm9.CACHE_ENV
from se3tcli.paths import default_cache_dir
from se3tcli.targets import QM9_TARGETS, TARGETS

CACHE_FILE = "qm9_v1.npz"
CACHE_VERSION = 1  # bump when the cache layout or content changes; older caches are rebuilt

QM9_N_MOLECULES = 130_831
QM9_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
QM9_HINT = 'QM9 needs the qm9pack package: pip install "se3tcli[qm9]"'

# Raw CSV column of each target, in QM9_TARGETS order (raw units; TARGETS[name].factor converts).
_RAW_COLUMNS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "gap": "HOMO_LUMO_gap_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "Cv": "Heatcapacity_Cv_cal_mol_K",
}
_TARGET_COLUMNS = tuple(_RAW_COLUMNS[name] for name in QM9_TARGETS)
_FACTORS = np.array([TARGETS[name].factor for name in QM9_TARGETS], dtype=np.float64)

# Element symbol byte -> atomic number (QM9 holds only H, C, N, O, F; 0 marks anything else).
_SYMBOL_TO_Z = np.zeros(256, dtype=np.int8)
for _symbol, _z in (("H", 1), ("C", 6), ("N", 7), ("O", 8), ("F", 9)):
    _SYMBOL_TO_Z[ord(_symbol)] = _z

_DROP_BRACKETS = str.maketrans("", "", "[]")
_DROP_LIST_SYNTAX = str.maketrans("", "", "[]', ")
_PROGRESS_EVERY = 5_000  # molecules between progress callbacks while parsing


class QM9Unavailable(RuntimeError):
    """QM9 cannot be loaded: no usable cache and no ``qm9pack`` to build one."""


class _CacheError(Exception):
    """The cache file is unreadable, incomplete or from another format version."""


@dataclass(frozen=True, eq=False)
class QM9Data:
    """QM9 molecules (all or a subset) as flat arrays; molecule ``i`` is atoms ``offsets[i]:offsets[i+1]``."""

    numbers: np.ndarray  # [n_atoms_total] int8 atomic numbers, molecules concatenated
    positions: np.ndarray  # [n_atoms_total, 3] float32, Å
    offsets: np.ndarray  # [n_mol + 1] int64, offsets[0] == 0
    targets: np.ndarray  # [n_mol, n_targets] float64, display units
    index: np.ndarray  # [n_mol] int32 QM9 index (1-based gdb number)
    target_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n_mol = len(self.index)
        n_atoms_total = len(self.numbers)
        checks = (
            (self.numbers.dtype == np.int8 and self.numbers.ndim == 1, "numbers must be int8 [n_atoms]"),
            (self.positions.dtype == np.float32, "positions must be float32"),
            (self.positions.shape == (n_atoms_total, 3), "positions must be [n_atoms, 3]"),
            (self.offsets.dtype == np.int64 and self.offsets.shape == (n_mol + 1,), "offsets must be int64"),
            (self.offsets[0] == 0 and self.offsets[-1] == n_atoms_total, "offsets must span all atoms"),
            (self.targets.dtype == np.float64, "targets must be float64"),
            (self.targets.shape == (n_mol, len(self.target_names)), "targets must be [n_mol, n_targets]"),
            (self.index.dtype == np.int32 and self.index.ndim == 1, "index must be int32 [n_mol]"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"inconsistent QM9Data: {message}")

    def __len__(self) -> int:
        return len(self.index)

    def n_atoms(self) -> np.ndarray:
        """Atoms per molecule, [n_mol] int64."""
        return np.diff(self.offsets)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Atomic numbers (int64 [n]) and positions (float64 [n, 3], Å) of molecule ``i``."""
        n_mol = len(self)
        if not -n_mol <= i < n_mol:
            raise IndexError(f"molecule {i} out of range for {n_mol} molecules")
        i %= n_mol
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.numbers[start:stop].astype(np.int64), self.positions[start:stop].astype(np.float64)

    def subset(self, idx: np.ndarray) -> QM9Data:
        """A new QM9Data holding molecules ``idx`` (integer indices, negatives allowed) in that order."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise TypeError("subset needs a 1-D integer index array")
        n_mol = len(self)
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n_mol or idx.max() >= n_mol):
            raise IndexError(f"subset index out of range for {n_mol} molecules")
        idx %= max(n_mol, 1)
        counts = self.n_atoms()[idx]  # [n_sub]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # Source atom of every destination atom: molecule start + position within the molecule.
        atoms = np.repeat(self.offsets[idx] - offsets[:-1], counts) + np.arange(offsets[-1])
        return QM9Data(
            numbers=self.numbers[atoms],
            positions=self.positions[atoms],
            offsets=offsets,
            targets=self.targets[idx],
            index=self.index[idx],
            target_names=self.target_names,
        )


def load_qm9(
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> QM9Data:
    """Load QM9 from the cache in ``cache_dir`` (default: :func:`default_cache_dir`), building it if needed.

    A missing, corrupt or outdated cache (or ``rebuild=True``) is rebuilt from the ``qm9pack`` CSVs;
    ``progress(done, total)`` is then called with the number of molecules parsed so far.
    """
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path /= CACHE_FILE
    if rebuild or not cache_path.exists():
        return build_cache(cache_path, progress)
    try:
        return _read_cache(cache_path)
    except _CacheError as err:
        try:
            return build_cache(cache_path, progress)
        except QM9Unavailable as missing:
            raise QM9Unavailable(f"the QM9 cache {cache_path} is unusable ({err}); {QM9_HINT}") from missing


def build_cache(cache_path: Path, progress: Callable[[int, int], None] | None = None) -> QM9Data:
    """Parse the ``qm9pack`` CSVs and write them to ``cache_path`` atomically (announced in a notice of
    :mod:`se3tcli.notices`); returns the parsed data."""
    data_dir = _qm9pack_data_dir()
    paths = [data_dir / name for name in QM9_CSV_FILES]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise QM9Unavailable(f"the qm9pack install lacks {', '.join(missing)}; {QM9_HINT}")
    NOTICES.info("building the QM9 cache %s (once, ~10 s)...", cache_path)
    data = _parse_csv_files(paths, QM9_N_MOLECULES, progress)
    write_npz_atomic(
        Path(cache_path),
        version=np.int64(CACHE_VERSION),
        numbers=data.numbers,
        positions=data.positions,
        offsets=data.offsets,
        targets=data.targets,
        index=data.index,
        target_names=np.array(data.target_names),
    )
    return data


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _qm9pack_data_dir() -> Path:
    """The ``data`` folder of the installed qm9pack wheel, found without importing it."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise QM9Unavailable(QM9_HINT)
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_cache(path: Path) -> QM9Data:
    """Read and validate a cache file written by :func:`build_cache`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as err:  # zipfile, zlib and numpy raise assorted errors on damaged files
        raise _CacheError(f"cannot read it: {err}") from err
    version = arrays.get("version")
    if version is None or version.shape != () or int(version) != CACHE_VERSION:
        raise _CacheError(f"format version {version} instead of {CACHE_VERSION}")
    target_names = tuple(str(name) for name in arrays.get("target_names", ()))
    if target_names != QM9_TARGETS:
        raise _CacheError(f"targets {target_names} instead of {QM9_TARGETS}")
    try:
        data = QM9Data(
            numbers=arrays["numbers"],
            positions=arrays["positions"],
            offsets=arrays["offsets"],
            targets=arrays["targets"],
            index=arrays["index"],
            target_names=target_names,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise _CacheError(f"incomplete or inconsistent: {err}") from err
    if len(data) != QM9_N_MOLECULES:
        raise _CacheError(f"{len(data)} molecules instead of {QM9_N_MOLECULES}")
    return data


def _malformed(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"malformed QM9 file {path.name}, line {line}: {message}")


def _parse_csv_files(
    paths: Sequence[Path],
    expected: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> QM9Data:
    """Parse qm9pack CSV files (in order) into a QM9Data; raises ValueError on any malformed row.

    ``expected`` is the required number of molecules (also the ``total`` passed to ``progress``).
    """
    n_atoms: list[int] = []
    index: list[int] = []
    symbols: list[str] = []  # per molecule, one character per atom ("CHHHH")
    coords: list[str] = []  # per molecule, "x,y,z,x,y,z,..." without brackets
    raw_targets: list[list[float]] = []  # [n_mol][12], raw units
    total = expected if expected is not None else 0
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise _malformed(path, 1, "empty file")
            try:
                i_n, i_index, i_elements, i_xyz = (
                    header.index(name) for name in ("N_atoms", "Index", "Elements", "XYZ_Ang")
                )
                i_targets = [header.index(name) for name in _TARGET_COLUMNS]
            except ValueError as err:
                raise _malformed(path, 1, f"missing column ({err})") from err
            n_cols = len(header)
            for row in reader:
                line = reader.line_num
                if len(row) != n_cols:
                    raise _malformed(path, line, f"{len(row)} fields instead of {n_cols}")
                try:
                    n = int(row[i_n])
                    index.append(int(row[i_index]))
                    raw_targets.append([float(row[i]) for i in i_targets])
                except ValueError as err:
                    raise _malformed(path, line, str(err)) from err
                elements, xyz = row[i_elements], row[i_xyz]
                # A list of n symbols has n - 1 commas; n triples have 3n - 1 commas and n + 1 '['.
                if n < 1 or elements.count(",") != n - 1:
                    raise _malformed(path, line, f"N_atoms={n} but Elements={elements}")
                if xyz.count(",") != 3 * n - 1 or xyz.count("[") != n + 1:
                    raise _malformed(path, line, f"N_atoms={n} but XYZ_Ang is not {n} triples")
                elements = elements.translate(_DROP_LIST_SYNTAX)
                if len(elements) != n:
                    raise _malformed(path, line, f"unexpected element symbols in {row[i_elements]}")
                n_atoms.append(n)
                symbols.append(elements)
                coords.append(xyz.translate(_DROP_BRACKETS))
                if progress is not None and len(n_atoms) % _PROGRESS_EVERY == 0:
                    progress(len(n_atoms), max(total, len(n_atoms)))
    n_mol = len(n_atoms)
    if expected is not None and n_mol != expected:
        raise ValueError(f"QM9 CSVs hold {n_mol} molecules instead of {expected}")

    offsets = np.zeros(n_mol + 1, dtype=np.int64)
    np.cumsum(np.array(n_atoms, dtype=np.int64), out=offsets[1:])
    symbol_bytes = np.frombuffer("".join(symbols).encode("ascii", "replace"), dtype=np.uint8)
    numbers = _SYMBOL_TO_Z[symbol_bytes]  # [n_atoms_total] int8
    if (numbers == 0).any():
        bad = sorted({chr(c) for c in np.unique(symbol_bytes[numbers == 0])})
        raise ValueError(f"QM9 CSVs contain unsupported element symbols {bad}")
    try:
        with warnings.catch_warnings():
            # Older numpy only warns (and stops) at a token it cannot parse; newer numpy raises ValueError.
            warnings.simplefilter("error", DeprecationWarning)
            flat = np.fromstring(",".join(coords), dtype=np.float64, sep=",")  # [3 * n_atoms_total], Å
    except (ValueError, DeprecationWarning) as err:
        raise ValueError(f"QM9 coordinates contain a token that is not a number ({err})") from err
    if flat.size != 3 * offsets[-1]:
        raise ValueError(f"QM9 coordinates: parsed {flat.size} numbers, expected {3 * offsets[-1]}")
    index_arr = np.array(index, dtype=np.int64)
    if len(np.unique(index_arr)) != n_mol:
        raise ValueError("QM9 CSVs contain duplicate molecule indices")
    if n_mol and index_arr.min() < 1:
        raise ValueError("QM9 molecule indices must be positive")
    targets = np.array(raw_targets, dtype=np.float64).reshape(n_mol, len(_TARGET_COLUMNS)) * _FACTORS
    if not (np.isfinite(flat).all() and np.isfinite(targets).all()):
        raise ValueError("QM9 CSVs contain non-finite coordinates or targets")
    if progress is not None:
        progress(n_mol, max(total, n_mol))
    return QM9Data(
        numbers=numbers,
        positions=flat.reshape(-1, 3).astype(np.float32),
        offsets=offsets,
        targets=targets,
        index=index_arr.astype(np.int32),
        target_names=QM9_TARGETS,
    )
