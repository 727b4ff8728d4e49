"""The :class:`Molecule` record of one input record, and the checks that decide whether it is usable."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from rdkit import Chem

from se3tcli.elements import symbol
from se3tcli.errors import STATUS_ERROR, STATUS_OK, STATUS_WARNING

SMILES_SOURCE = "<smiles>"  # Molecule.source of molecules given as SMILES strings rather than files
MIN_DISTANCE = 0.1  # Å; two atoms closer than this make a record invalid
_MAX_REASON_CHARS = 300


@dataclass(eq=False)
class Molecule:
    """One input record: atoms and coordinates, plus a status telling whether it can be predicted."""

    name: str
    source: str  # file path as given, or "<smiles>" for molecules given as SMILES strings
    index: int  # 0-based record index within its source
    numbers: np.ndarray  # [n_atoms] int64 atomic numbers (empty for error rows without atoms)
    positions: np.ndarray  # [n_atoms, 3] float64, Å
    properties: dict[str, str]  # SD tags / extXYZ info entries, values as strings
    status: str  # STATUS_OK | STATUS_WARNING | STATUS_ERROR
    message: str = ""  # reason for a warning/error, naming the file and the record
    rdkit_mol: Chem.Mol | None = None  # the RDKit molecule with its 3D conformer, when there is one
    smiles: str = ""  # the SMILES string as given, for molecules read from SMILES
    net_charge: int | None = None  # stated outside the properties: ASE per-atom charges summed

    @property
    def record(self) -> int:
        """The 1-based record number that messages and output files name."""
        return self.index + 1

    @property
    def formula(self) -> str:
        """Hill formula (C, then H, then alphabetical; alphabetical without carbon), "" without atoms."""
        counts = Counter(symbol(int(z)) for z in self.numbers)
        if "C" in counts:
            order = ["C"] + (["H"] if "H" in counts else []) + sorted(set(counts) - {"C", "H"})
        else:
            order = sorted(counts)
        return "".join(s if counts[s] == 1 else f"{s}{counts[s]}" for s in order)

    @property
    def ok(self) -> bool:
        """Whether the molecule can be predicted (status ok or warning)."""
        return self.status != STATUS_ERROR


@dataclass(frozen=True)
class Record:
    """Where a record comes from; builds its fallback name, its messages and its Molecule rows."""

    source: str
    index: int

    @property
    def label(self) -> str:
        return self.source if self.source == SMILES_SOURCE else Path(self.source).name

    @property
    def default_name(self) -> str:
        return f"{self.label}#{self.index + 1}"

    def message(self, name: str, reasons: Sequence[str]) -> str:
        who = f" ({name})" if name and name != self.default_name else ""
        return f"{self.label} record {self.index + 1}{who}: {'; '.join(reasons)}"

    def error(
        self,
        reason: str,
        name: str = "",
        numbers: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        properties: dict[str, str] | None = None,
    ) -> Molecule:
        """An error row; keeps the atoms read so far (NaN positions where coordinates are unknown)."""
        if numbers is None:
            numbers = np.zeros(0, dtype=np.int64)
        if positions is None:
            positions = np.full((len(numbers), 3), np.nan)
        return self._row(
            name, numbers, positions, properties or {}, STATUS_ERROR, self.message(name, [reason])
        )

    def molecule(
        self,
        name: str,
        numbers: np.ndarray,
        positions: np.ndarray,
        properties: dict[str, str],
        symbols: Sequence[str],
        warnings: Sequence[str] = (),
        rdkit_mol: Chem.Mol | None = None,
    ) -> Molecule:
        """A validated row: ok, warning (with ``warnings``), or error if the atoms fail validation."""
        problem = element_problem(numbers, symbols) or geometry_problem(positions)
        if problem:
            return self.error(problem, name, numbers, positions, properties)
        status, message = (STATUS_WARNING, self.message(name, warnings)) if warnings else (STATUS_OK, "")
        return self._row(name, numbers, positions, properties, status, message, rdkit_mol)

    def _row(
        self,
        name: str,
        numbers: np.ndarray,
        positions: np.ndarray,
        properties: dict[str, str],
        status: str,
        message: str,
        rdkit_mol: Chem.Mol | None = None,
    ) -> Molecule:
        return Molecule(
            name or self.default_name, self.source, self.index, numbers, positions, properties, status,
            message, rdkit_mol,
        )  # fmt: skip


def guarded(build: Callable[..., Molecule], record: Record, *args: object) -> Molecule:
    """``build(record, *args)``; an unexpected exception becomes an error row, not the end of reading."""
    try:
        return build(record, *args)
    except Exception as exc:  # any failure of one record must not stop the others
        return record.error(f"cannot read record: {reason(exc)}")


def size_limit_reason(n_atoms: int, max_atoms: int) -> str:
    """The error of a molecule of more atoms than ``--max-atoms-per-molecule`` allows."""
    return f"{n_atoms} atoms, more than the limit of {max_atoms} (--max-atoms-per-molecule)"


def isotope_warning(labels: Sequence[str]) -> str:
    """The warning of atoms given as isotopes (``labels`` such as ``2H``, one per such atom)."""
    counts = ", ".join(f"{label} x{n}" for label, n in Counter(labels).items())
    return (
        f"isotopes ignored ({counts}): predicted for the common isotopes, while ZPVE, Cv, U, H and G "
        "depend on the masses"
    )


def reason(exc: BaseException) -> str:
    """An exception as a one-line reason of at most ``_MAX_REASON_CHARS`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def element_problem(numbers: np.ndarray, symbols: Sequence[str]) -> str | None:
    """Why atoms with these atomic numbers ([n_atoms]) and symbols cannot be used, or None."""
    if numbers.size == 0:
        return "empty molecule"
    bad = np.flatnonzero((numbers <= 0) | (numbers >= len(chemical_symbols)))
    if bad.size:
        return f"unsupported element {symbols[bad[0]]} (atom {bad[0] + 1})"
    return None


def geometry_problem(positions: np.ndarray) -> str | None:
    """Why coordinates ([n_atoms, 3] Å) cannot be used (non-finite, atoms too close), or None."""
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        return f"non-finite coordinates (atom {bad[0] + 1})"
    pair = close_pair(positions, MIN_DISTANCE)
    if pair is not None:
        i, j, d = pair
        return f"atoms {i + 1} and {j + 1} are {d:.3f} Å apart (< {MIN_DISTANCE} Å)"
    return None


def close_pair(positions: np.ndarray, cutoff: float) -> tuple[int, int, float] | None:
    """First pair of atoms closer than ``cutoff`` (Å), or None; O(n) memory.

    Atoms are sorted along the axis of largest extent; the k-th sorted neighbours are compared for
    k = 1, 2, ... until no pair is closer than ``cutoff`` along that axis (then no later k can be).
    """
    n = len(positions)
    if n < 2:
        return None
    axis = int(np.argmax(np.ptp(positions, axis=0)))
    order = np.argsort(positions[:, axis], kind="stable")
    pos = positions[order]  # [n, 3] Å, sorted along `axis`
    for shift in range(1, n):
        near = np.flatnonzero(pos[shift:, axis] - pos[:-shift, axis] < cutoff)
        if near.size == 0:
            return None
        dist = np.linalg.norm(pos[near + shift] - pos[near], axis=1)  # [n_near] Å
        hit = np.flatnonzero(dist < cutoff)
        if hit.size:
            k = near[hit[0]]
            i, j = sorted((int(order[k]), int(order[k + shift])))
            return i, j, float(dist[hit[0]])
    return None
