"""Read molecules into :class:`Molecule` records and write predictions.

Readers (chosen by file suffix, case-insensitive):

- ``.sdf``, ``.sdf.gz``, ``.mol``: RDKit, streamed record by record. Records without explicit hydrogens get
  them added; 2D records (every z == 0, more than one atom, not tagged 3D in the header) or records without
  a conformer get an ETKDGv3 + MMFF94 conformer. Both are warnings, or errors with ``embed=False``.
- ``.xyz``, ``.extxyz``: ASE's extXYZ parser, frame by frame. A plain comment line is the molecule's name;
  a ``key=value`` comment line is extXYZ metadata and becomes the properties.
- ``.smi``, ``.smiles``, ``.txt``: one SMILES per line with an optional name after it; blank lines and
  ``#`` comments are skipped, and so is a header line whose first word is ``smiles`` or ``smi`` (any case).
  SMILES get hydrogens and an ETKDGv3 + MMFF94 conformer (UFF when MMFF94 has no parameters).

A record that cannot be used keeps its row with status ``error`` and a message naming the file and the
1-based record number; reading goes on with the next record. A file without any record yields one error
row ("no molecules found"). Only :class:`InputError` (missing file, unsupported suffix) is raised, and it
is raised by :func:`read_molecules` itself, before any record is produced.

:class:`PredictionWriter` writes CSV, JSON or SDF incrementally to a temporary file next to the target and
renames it into place on :meth:`PredictionWriter.close`, so an output file is complete or absent.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import ase.io
import numpy as np
from ase.data import chemical_symbols
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, rdDetermineBonds

from se3tcli.errors import STATUS_ERROR, STATUS_OK, STATUS_WARNING, InputError  # noqa: F401 - re-exported

SMILES_SOURCE = "<smiles>"  # Molecule.source of molecules given as SMILES strings rather than files

_FORMAT_BY_SUFFIX = {
    ".sdf": "sdf",
    ".sdf.gz": "sdf",
    ".mol": "sdf",
    ".xyz": "xyz",
    ".extxyz": "xyz",
    ".smi": "smiles",
    ".smiles": "smiles",
    ".txt": "smiles",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_FORMAT_BY_SUFFIX)

MIN_DISTANCE = 0.1  # Å; two atoms closer than this make a record invalid
_SMILES_HEADER_WORDS = {"smiles", "smi"}
_MAX_LINE_CHARS = 1 << 20  # longest text line the XYZ/SMILES readers accept (1 MiB)
_MAX_REASON_CHARS = 300
_MAX_ATOMS_BOND_PERCEPTION = 500  # larger atoms-only molecules are written to SDF without bonds
_MMFF_MAX_ITERS = 2000
_FRAGMENT_GAP = 3.0  # Å between the bounding spheres of disconnected fragments before optimisation

# RDKit >= 2026.03 can capture its error log; older versions only get it silenced (generic reasons then).
_CaptureErrorLog = getattr(rdBase, "CaptureErrorLog", None)
_RDKIT_LOG_LINE = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] (?:ERROR: )?(.+)$", re.MULTILINE)


def _symbol(number: int) -> str:
    """Element symbol of an atomic number (``X`` for 0, as in ASE)."""
    return chemical_symbols[number] if 0 <= number < len(chemical_symbols) else f"Z{number}"


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

    @property
    def formula(self) -> str:
        """Hill formula (C, then H, then alphabetical; alphabetical without carbon), "" without atoms."""
        counts = Counter(_symbol(int(z)) for z in self.numbers)
        if "C" in counts:
            order = ["C"] + (["H"] if "H" in counts else []) + sorted(set(counts) - {"C", "H"})
        else:
            order = sorted(counts)
        return "".join(s if counts[s] == 1 else f"{s}{counts[s]}" for s in order)

    @property
    def ok(self) -> bool:
        """Whether the molecule can be predicted (status ok or warning)."""
        return self.status != STATUS_ERROR


# ----------------------------------------------------------------------------------------------- reading


def _format_of(path: str | Path) -> str | None:
    name = Path(path).name.lower()
    return next((fmt for suffix, fmt in _FORMAT_BY_SUFFIX.items() if name.endswith(suffix)), None)


def check_inputs(paths: Iterable[str | Path]) -> None:
    """Raise :class:`InputError` for a missing or unreadable file, a directory or an unsupported suffix."""
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise InputError(f"input file not found: {path}")
        if p.is_dir():
            raise InputError(f"input is a directory, not a file: {path}")
        if _format_of(p) is None:
            raise InputError(f"unsupported input format: {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        if not os.access(p, os.R_OK):
            raise InputError(f"input file is not readable: {path}")


def read_molecules(
    paths: Iterable[str | Path] = (), smiles: Iterable[str] = (), embed: bool = True, seed: int = 42
) -> Iterator[Molecule]:
    """Read molecules lazily from files (in the order given), then from SMILES strings.

    Parameters
    ----------
    paths
        Input files; the suffix picks the reader (see :data:`SUPPORTED_SUFFIXES`).
    smiles
        SMILES strings, each optionally followed by whitespace and a name.
    embed
        Generate missing 3D conformers and hydrogens for SDF records (as warnings); with ``False`` such
        records are errors. SMILES are always embedded.
    seed
        Random seed of the ETKDGv3 conformer generator.

    Returns
    -------
    Iterator over :class:`Molecule` records, one per input record, error rows included.

    Raises
    ------
    InputError
        Immediately (before any record is produced) for missing files or unsupported suffixes.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    smiles = [smiles] if isinstance(smiles, str) else list(smiles)
    check_inputs(paths)
    return _iter_molecules(paths, smiles, embed, seed)


def _iter_molecules(paths: list[str | Path], smiles: list[str], embed: bool, seed: int) -> Iterator[Molecule]:
    for path in paths:
        fmt = _format_of(path)
        if fmt == "sdf":
            yield from _read_sdf(path, embed, seed)
        elif fmt == "xyz":
            yield from _read_xyz(path)
        else:
            yield from _read_smiles_file(path, seed)
    for index, line in enumerate(smiles):
        text, name = _split_smiles_line(line)
        yield _guarded(_from_smiles, _Record(SMILES_SOURCE, index), text, name, seed)


@dataclass(frozen=True)
class _Record:
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
        return Molecule(
            name=name or self.default_name,
            source=self.source,
            index=self.index,
            numbers=numbers,
            positions=positions,
            properties=properties or {},
            status=STATUS_ERROR,
            message=self.message(name, [reason]),
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
        problem = _element_problem(numbers, symbols) or _geometry_problem(positions)
        if problem:
            return self.error(problem, name, numbers, positions, properties)
        return Molecule(
            name=name or self.default_name,
            source=self.source,
            index=self.index,
            numbers=numbers,
            positions=positions,
            properties=properties,
            status=STATUS_WARNING if warnings else STATUS_OK,
            message=self.message(name, warnings) if warnings else "",
            rdkit_mol=rdkit_mol,
        )


def _guarded(build: Callable[..., Molecule], record: _Record, *args: object) -> Molecule:
    """``build(record, *args)``; an unexpected exception becomes an error row, not the end of reading."""
    try:
        return build(record, *args)
    except Exception as exc:  # any failure of one record must not stop the others
        return record.error(f"cannot read record: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _element_problem(numbers: np.ndarray, symbols: Sequence[str]) -> str | None:
    if numbers.size == 0:
        return "empty molecule"
    bad = np.flatnonzero((numbers <= 0) | (numbers >= len(chemical_symbols)))
    if bad.size:
        return f"unsupported element {symbols[bad[0]]} (atom {bad[0] + 1})"
    return None


def _geometry_problem(positions: np.ndarray) -> str | None:
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        return f"non-finite coordinates (atom {bad[0] + 1})"
    pair = _close_pair(positions, MIN_DISTANCE)
    if pair is not None:
        i, j, d = pair
        return f"atoms {i + 1} and {j + 1} are {d:.3f} Å apart (< {MIN_DISTANCE} Å)"
    return None


def _close_pair(positions: np.ndarray, cutoff: float) -> tuple[int, int, float] | None:
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


class _RDKitLog:
    """Silence RDKit's logging to stderr and collect its error messages (where RDKit can capture them)."""

    def __enter__(self) -> _RDKitLog:
        self._stack = ExitStack()
        self._stack.enter_context(rdBase.BlockLogs())
        self._capture = self._stack.enter_context(_CaptureErrorLog()) if _CaptureErrorLog else None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def reason(self, default: str) -> str:
        """RDKit's error messages so far as one line, or ``default`` if there are none."""
        try:
            text = self._capture.messages if self._capture is not None else ""
        except UnicodeDecodeError as exc:  # RDKit quotes the bad input, which need not be UTF-8
            text = exc.object.decode("utf-8", errors="replace")
        lines = [line.strip() for line in _RDKIT_LOG_LINE.findall(text)]
        lines = [line for line in lines if not line.startswith("moving to the beginning of the next")]
        return _reason(ValueError("; ".join(dict.fromkeys(lines)))) if lines else default


def _atoms_of(mol: Chem.Mol) -> tuple[np.ndarray, list[str]]:
    atoms = list(mol.GetAtoms())
    return np.array([a.GetAtomicNum() for a in atoms], dtype=np.int64), [a.GetSymbol() for a in atoms]


def _positions_of(mol: Chem.Mol) -> np.ndarray:
    return np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)  # [n_atoms, 3] Å


def _embed(mol: Chem.Mol, seed: int) -> tuple[Chem.Mol | None, list[str], str]:
    """Add hydrogens and a 3D conformer (ETKDGv3, then MMFF94 or UFF).

    Returns (molecule or None, warnings, error reason).
    """
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            return None, [], "could not generate a 3D conformer (ETKDGv3)"
    warnings = _separate_fragments(mol)
    try:
        if AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=_MMFF_MAX_ITERS)
        elif AllChem.UFFHasAllMoleculeParams(mol):
            AllChem.UFFOptimizeMolecule(mol, maxIters=_MMFF_MAX_ITERS)
            warnings.append("no MMFF94 parameters: conformer optimised with UFF")
        else:
            warnings.append("no MMFF94/UFF parameters: conformer not optimised")
    except Exception as exc:  # a failed optimisation still leaves the ETKDG conformer
        warnings.append(f"force-field optimisation failed ({_reason(exc)}): conformer not optimised")
    return mol, warnings, ""


def _separate_fragments(mol: Chem.Mol) -> list[str]:
    """Place disconnected fragments side by side along x (ETKDG may put them on top of each other).

    Returns a warning for molecules with several fragments (salts, solvates), none otherwise.
    """
    fragments = Chem.GetMolFrags(mol)  # tuples of atom indices
    if len(fragments) < 2:
        return []
    conformer = mol.GetConformer()
    positions = conformer.GetPositions()  # [n_atoms, 3] Å
    start = 0.0  # Å, x where the next fragment's bounding sphere begins
    for atoms in fragments:
        index = list(atoms)
        centred = positions[index] - positions[index].mean(axis=0)
        radius = float(np.linalg.norm(centred, axis=1).max())
        positions[index] = centred + np.array([start + radius, 0.0, 0.0])
        start += 2 * radius + _FRAGMENT_GAP
    for i, xyz in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, xyz)
    return [f"{len(fragments)} disconnected fragments placed side by side before optimisation"]


# ---- SDF / MOL


def _read_sdf(path: str | Path, embed: bool, seed: int) -> Iterator[Molecule]:
    source = str(path)
    opener = gzip.open if source.lower().endswith(".gz") else open
    index = 0
    try:
        handle = opener(path, "rb")
    except OSError as exc:
        yield _Record(source, 0).error(f"cannot open file: {_reason(exc)}")
        return
    with handle:
        supplier = Chem.ForwardSDMolSupplier(handle, sanitize=False, removeHs=False)
        more = True
        while more:
            row, more = _next_sdf_row(supplier, _Record(source, index), embed, seed)
            if row is not None:
                yield row
                index += 1
    if index == 0:
        yield _Record(source, 0).error("no molecules found")


def _next_sdf_row(
    supplier: Chem.ForwardSDMolSupplier, record: _Record, embed: bool, seed: int
) -> tuple[Molecule | None, bool]:
    """The next record's row (None at the end of the file) and whether reading can go on."""
    with _RDKitLog() as log:
        try:
            mol = next(supplier)
        except StopIteration:
            return None, False
        except Exception as exc:  # I/O or decompression errors of the underlying stream
            return record.error(f"cannot read the rest of the file: {_reason(exc)}"), False
        if mol is None:
            return record.error(f"cannot parse record: {log.reason('RDKit could not parse it')}"), True
        return _guarded(_from_sdf_mol, record, mol, embed, seed), True


def _text_prop(mol: Chem.Mol, key: str) -> str | None:
    """A string property, or None if it is not valid UTF-8."""
    try:
        return mol.GetProp(key)
    except UnicodeDecodeError:
        return None


def _from_sdf_mol(record: _Record, mol: Chem.Mol, embed: bool, seed: int) -> Molecule:
    name = (_text_prop(mol, "_Name") or "").strip() if mol.HasProp("_Name") else ""
    properties: dict[str, str] = {}
    warnings: list[str] = []
    for key in mol.GetPropNames():
        value = _text_prop(mol, key)
        if value is None:
            warnings.append(f"SD tag {key!r} is not valid UTF-8 and was dropped")
        else:
            properties[key] = value
    numbers, symbols = _atoms_of(mol)
    positions = _positions_of(mol) if mol.GetNumConformers() else None  # [n_atoms, 3] Å

    def error(reason: str) -> Molecule:
        return record.error(reason, name, numbers, positions, properties)

    problem = _element_problem(numbers, symbols)
    if problem:
        return error(problem)
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several sanitization exception types
        return error(f"RDKit sanitization failed: {_reason(exc)}")
    # 2D: no conformer, or more than one atom, all z == 0 and the header does not declare 3D coordinates
    flat = positions is None or (
        len(numbers) > 1 and not positions[:, 2].any() and not mol.GetConformer().Is3D()
    )
    needs_h = any(atom.GetTotalNumHs() > 0 for atom in mol.GetAtoms())
    if flat:
        if not embed:
            return error("no 3D coordinates (2D record) and embedding is off")
        Chem.AssignChiralTypesFromBondDirs(mol)
        Chem.DetectBondStereochemistry(mol)
        Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
        mol, embed_warnings, reason = _embed(mol, seed)
        if mol is None:
            return error(reason)
        warnings.append("2D record: 3D conformer generated" + (" and hydrogens added" if needs_h else ""))
        warnings += embed_warnings
    else:
        Chem.AssignStereochemistryFrom3D(mol)
        if needs_h:
            if not embed:
                return error("no explicit hydrogens and embedding is off")
            mol = Chem.AddHs(mol, addCoords=True)
            warnings.append("hydrogens added")
    numbers, symbols = _atoms_of(mol)
    return record.molecule(name, numbers, _positions_of(mol), properties, symbols, warnings, mol)


# ---- SMILES


def _split_smiles_line(line: str) -> tuple[str, str]:
    """(SMILES, name) from "SMILES [name ...]"; the name is "" when absent."""
    parts = line.strip().split(None, 1)
    return (parts[0], parts[1].strip()) if len(parts) == 2 else ("".join(parts), "")


def _from_smiles(record: _Record, smiles: str, name: str, seed: int) -> Molecule:
    name = name.strip() or smiles
    with _RDKitLog() as log:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return record.error(f"cannot parse SMILES {smiles!r}: {log.reason('invalid SMILES')}", name)
        numbers, symbols = _atoms_of(mol)
        problem = _element_problem(numbers, symbols)
        if problem:
            return record.error(problem, name, numbers)
        mol, warnings, reason = _embed(mol, seed)
    if mol is None:
        return record.error(reason, name, numbers)
    mol.SetProp("_Name", name)
    properties = {"smiles": smiles}
    numbers, symbols = _atoms_of(mol)
    return record.molecule(name, numbers, _positions_of(mol), properties, symbols, warnings, mol)


def _text_lines(handle: IO[str]) -> Iterator[str | None]:
    """Lines of a text file; None for a line longer than ``_MAX_LINE_CHARS`` (the rest of it is skipped)."""
    while line := handle.readline(_MAX_LINE_CHARS):
        if len(line) == _MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := handle.readline(_MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            yield None
        else:
            yield line


def _read_smiles_file(path: str | Path, seed: int) -> Iterator[Molecule]:
    source = str(path)
    index = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in _text_lines(handle):
                record = _Record(source, index)
                if line is None:
                    yield record.error(f"line longer than {_MAX_LINE_CHARS} characters")
                    index += 1
                    continue
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                smiles, name = _split_smiles_line(text)
                if index == 0 and smiles.lower() in _SMILES_HEADER_WORDS:
                    continue
                yield _guarded(_from_smiles, record, smiles, name, seed)
                index += 1
    except OSError as exc:
        yield _Record(source, index).error(f"cannot read the rest of the file: {_reason(exc)}")
        return
    if index == 0:
        yield _Record(source, 0).error("no molecules found")


# ---- XYZ / extXYZ

_EOF = object()  # end-of-file marker for next(lines, _EOF)
_COUNT_LINE = re.compile(r"[0-9]+")


def _read_xyz(path: str | Path) -> Iterator[Molecule]:
    source = str(path)
    index = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for comment, atom_lines, problem in _xyz_frames(handle):
                record = _Record(source, index)
                if problem:
                    yield record.error(problem)
                else:
                    yield _guarded(_from_xyz_frame, record, comment, atom_lines)
                index += 1
    except OSError as exc:
        yield _Record(source, index).error(f"cannot read the rest of the file: {_reason(exc)}")
        return
    if index == 0:
        yield _Record(source, 0).error("no molecules found")


def _xyz_frames(handle: IO[str]) -> Iterator[tuple[str, list[str], str]]:
    """Split an XYZ file into frames: (comment line, atom lines, problem); problem is "" for a sound frame.

    Blank lines between frames are skipped. When a frame ends early (a line that cannot be an atom line),
    that frame is a problem and the line is tried as the next frame's atom count. When no atom count can be
    found, one last problem frame covers the rest of the file.
    """
    lines = _text_lines(handle)
    line = next(lines, _EOF)
    while True:
        while isinstance(line, str) and not line.strip():
            line = next(lines, _EOF)
        if line is _EOF:
            return
        words = line.split() if isinstance(line, str) else []
        if not words or not _COUNT_LINE.fullmatch(words[0]):
            found = _shorten(line) if isinstance(line, str) else "an overlong line"
            yield "", [], f"expected an atom count line, found {found!r}; rest of the file skipped"
            return
        n_atoms = int(words[0])
        comment = next(lines, _EOF)
        if not isinstance(comment, str):
            yield "", [], "file ends (or has an overlong line) where the comment line should be"
            return
        atom_lines: list[str] = []
        while len(atom_lines) < n_atoms:
            line = next(lines, _EOF)
            if line is _EOF:
                yield "", [], f"file ends after {len(atom_lines)} of {n_atoms} atom lines"
                return
            if not isinstance(line, str) or len(line.split()) < 4:
                break
            atom_lines.append(line if line.endswith("\n") else line + "\n")
        else:
            yield comment, atom_lines, ""
            line = next(lines, _EOF)
            continue
        yield "", [], f"frame declares {n_atoms} atoms but has {len(atom_lines)} atom lines"


def _shorten(text: str, limit: int = 40) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_xyz_frame(record: _Record, comment: str, atom_lines: list[str]) -> Molecule:
    comment = comment.strip()
    metadata = "=" in comment  # extXYZ key=value pairs, not a plain title
    name = "" if metadata else comment
    text = f"{len(atom_lines)}\n{comment if metadata else ''}\n{''.join(atom_lines)}"
    try:
        atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
    except KeyError as exc:
        return record.error(f"unknown element symbol {exc.args[0]!r}", name)
    except Exception as exc:  # ASE raises many exception types for malformed frames
        return record.error(f"ASE cannot parse the frame: {_reason(exc)}", name)
    properties: dict[str, str] = {}
    if metadata:
        entries = dict(atoms.info)
        if atoms.calc is not None:  # ASE moves energy-like keys (energy, free_energy, ...) to a calculator
            entries.update((k, v) for k, v in atoms.calc.results.items() if np.ndim(v) == 0)
        properties = {str(k): _info_text(v) for k, v in entries.items()}
        name = properties.get("name", "").strip()
    numbers = np.asarray(atoms.numbers, dtype=np.int64)  # [n_atoms]
    positions = np.asarray(atoms.positions, dtype=np.float64)  # [n_atoms, 3] Å
    return record.molecule(name, numbers, positions, properties, atoms.get_chemical_symbols())


def _info_text(value: object) -> str:
    """An extXYZ info value as text (arrays as space-separated numbers)."""
    if isinstance(value, np.ndarray):
        return " ".join(str(x) for x in value.ravel().tolist())
    return str(value.item() if isinstance(value, np.generic) else value)


# ----------------------------------------------------------------------------------------------- writing


def writer_formats() -> tuple[str, ...]:
    """Output suffixes :class:`PredictionWriter` supports."""
    return (".csv", ".json", ".sdf")


def _finite(value: object) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


_BASE_COLUMNS = ("name", "source", "index", "formula", "status", "message")


def _column(target: str, unit: str) -> str:
    return f"{target} [{unit}]" if unit else target


class PredictionWriter:
    """Incremental, atomic writer of predictions as CSV, JSON or SDF (chosen by the output suffix).

    Rows go to a temporary file in the target's directory, which :meth:`close` renames into place and
    :meth:`abort` deletes. As a context manager it closes on success and aborts on an exception.

    Parameters
    ----------
    path
        Output file; its suffix must be one of :func:`writer_formats`.
    targets
        Predicted properties, in column order.
    units
        Unit of each target (a missing unit leaves the column name bare).

    Raises
    ------
    InputError
        For an unsupported suffix, or when the temporary file cannot be created.
    """

    def __init__(self, path: str | Path, targets: Sequence[str], units: Mapping[str, str]):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in writer_formats():
            raise InputError(f"unsupported output format: {path} (supported: {', '.join(writer_formats())})")
        if self.path.is_dir():
            raise InputError(f"output path is a directory: {path}")
        self.targets = tuple(targets)
        self.units = {t: units.get(t, "") for t in self.targets}
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            self._handle = open(self._tmp, "x", encoding="utf-8", newline="")  # noqa: SIM115 - closed by close()/abort()
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        self._closed = False
        format_class = {".csv": _CsvFormat, ".json": _JsonFormat, ".sdf": _SdfFormat}[suffix]
        try:
            self._format = format_class(self._handle, self.targets, self.units)
        except BaseException:
            self.abort()
            raise

    def write(self, molecule: Molecule, predictions: Mapping[str, float] | None) -> None:
        """Append one row; predictions of error rows, missing targets and NaN values are left empty."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        values = {}
        if molecule.ok and predictions is not None:
            values = {t: _finite(predictions[t]) for t in self.targets if t in predictions}
        self._format.write(molecule, values)

    def close(self) -> None:
        """Finish the file and move it into place (atomically replacing an existing one)."""
        if self._closed:
            return
        try:
            self._format.finish()
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written; the target file is left as it was."""
        if self._closed:
            return
        self._closed = True
        self._handle.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _CsvFormat:
    """Columns name, source, index, formula, status, message, then ``<target> [<unit>]`` per target."""

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._targets = targets
        self._csv = csv.writer(handle, lineterminator="\n")
        self._csv.writerow([*_BASE_COLUMNS, *(_column(t, units[t]) for t in targets)])

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        cells = [repr(v) if (v := values.get(t)) is not None else "" for t in self._targets]
        m = molecule
        self._csv.writerow([m.name, m.source, m.index, m.formula, m.status, m.message, *cells])

    def finish(self) -> None:
        """Nothing to add after the last row."""


class _JsonFormat:
    """A JSON list of records, written one record at a time; non-finite values become null."""

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._units = units
        self._count = 0
        handle.write("[")

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        m = molecule
        record = {
            "name": m.name,
            "source": m.source,
            "index": m.index,
            "formula": m.formula,
            "status": m.status,
            "message": m.message,
            "predictions": {t: {"value": v, "unit": self._units[t]} for t, v in values.items()},
        }
        text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
        self._handle.write(("\n" if self._count == 0 else ",\n") + textwrap.indent(text, "  "))
        self._count += 1

    def finish(self) -> None:
        self._handle.write("\n]\n" if self._count else "]\n")


class _SdfFormat:
    """SD records with 3D coordinates, the original tags, ``<target> [<unit>]`` tags and se3t_status/message.

    Rows without atoms or without finite coordinates cannot be written as SD records and are skipped.
    """

    def __init__(self, handle: IO[str], targets: tuple[str, ...], units: dict[str, str]):
        self._handle = handle
        self._tags = {t: _column(t, units[t]) for t in targets}

    def write(self, molecule: Molecule, values: dict[str, float | None]) -> None:
        if molecule.numbers.size == 0 or not np.isfinite(molecule.positions).all():
            return
        if molecule.rdkit_mol is not None:
            mol = Chem.Mol(molecule.rdkit_mol)
        else:
            mol = _mol_from_atoms(molecule.numbers, molecule.positions, perceive_bonds=molecule.ok)
        mol.SetProp("_Name", " ".join(molecule.name.split()))  # the title line of an SD record
        for key, value in molecule.properties.items():
            mol.SetProp(key, value)
        for target, tag in self._tags.items():
            value = values.get(target)
            if value is not None:
                mol.SetProp(tag, repr(value))
            elif mol.HasProp(tag):  # a stale value from an earlier run in the input
                mol.ClearProp(tag)
        mol.SetProp("se3t_status", molecule.status)
        mol.SetProp("se3t_message", " ".join(molecule.message.split()))
        with _RDKitLog():
            try:
                text = Chem.SDWriter.GetText(mol)
            except Exception:  # e.g. an aromatic system RDKit cannot kekulize
                text = Chem.SDWriter.GetText(mol, kekulize=False)
        self._handle.write(text)

    def finish(self) -> None:
        """Nothing to add after the last record."""


def _mol_from_atoms(numbers: np.ndarray, positions: np.ndarray, perceive_bonds: bool) -> Chem.Mol:
    """An RDKit molecule from atoms and coordinates, with bonds from rdDetermineBonds when it succeeds."""
    rw = Chem.RWMol()
    for z in numbers:
        atom = Chem.Atom(int(z))
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conformer = Chem.Conformer(len(numbers))
    for i, xyz in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, xyz)
    conformer.Set3D(True)
    rw.AddConformer(conformer, assignId=True)
    mol = rw.GetMol()
    if perceive_bonds and len(numbers) <= _MAX_ATOMS_BOND_PERCEPTION:
        bonded = Chem.Mol(mol)
        with _RDKitLog():
            try:
                rdDetermineBonds.DetermineBonds(bonded, charge=0)
                return bonded
            except Exception:  # no consistent bond orders: atoms only
                pass
    mol.UpdatePropertyCache(strict=False)
    return mol
