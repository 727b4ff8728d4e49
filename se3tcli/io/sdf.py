"""SDF, MOL and gzipped SDF via RDKit, streamed record by record.

Records without explicit hydrogens get them added; 2D records (every z == 0, more than one atom, not
tagged 3D in the header) or records without a conformer get an ETKDGv3 + MMFF94 conformer. Both are
warnings, or errors with ``embed=False``.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO

from rdkit import Chem

from se3tcli.io.conformers import PendingConformer, to_binary
from se3tcli.io.filereader import MAX_LINE_CHARS, FileReader, text_lines
from se3tcli.io.molecule import Molecule, Record, element_problem, guarded, reason
from se3tcli.io.rdkit_tools import RDKitLog, atoms_of, positions_of, sanitize


def _open(path: str | Path) -> IO[bytes]:
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - read_file closes it


def _rows(handle: IO[bytes], source: str, embed: bool, seed: int) -> Iterator[Molecule]:
    for index, (text, problem) in enumerate(_records(handle)):
        record = Record(source, index)
        yield record.error(problem) if problem else _row(text, record, embed, seed)


SDF_READER = FileReader(open=_open, rows=_rows, binary=True)

# The counts line of a molfile (V2000: atom and bond counts in 3-character fields; or V3000).
_COUNTS_LINE = re.compile(rb"^[ \d]{6}.*V2000\s*$|^.*V3000\s*$")
_HEADER_LINES = 3  # name, program and comment lines before the counts line
_BOM = b"\xef\xbb\xbf"


def _records(handle: IO[bytes]) -> Iterator[tuple[bytes, str]]:
    """The file's records as ``(text, problem)``, split at ``$$$$`` lines, and also where a record lacks
    its ``$$$$``: a molfile's counts line after the previous record's ``M  END`` starts a new record. A
    record with a line over 1 MiB is a problem (its text is dropped); so one broken record is one row.
    Such a line keeps its place (as None) while the record is split, so that it counts among the header
    lines of the record it belongs to, and makes that record, not the one before, the error."""
    lines: list[bytes | None] = []
    after_end = False
    for number, line in enumerate(text_lines(handle)):
        if number == 0 and line is not None and line.startswith(_BOM):  # a UTF-8 byte order mark
            line = line[len(_BOM) :]
        if line is not None and line.rstrip(b"\r\n") == b"$$$$":
            yield _record(lines)
            lines, after_end = [], False
            continue
        lines.append(line)
        if line is not None and line.startswith(b"M  END"):
            after_end = True
        elif after_end and _starts_a_record(lines):
            start = len(lines) - 1 - _HEADER_LINES  # this molecule's name line
            yield _record(lines[:start])
            lines, after_end = lines[start:], False
    if any(line is None or line.strip() for line in lines):
        yield _record(lines)  # the last record may lack its $$$$


def _record(lines: list[bytes | None]) -> tuple[bytes, str]:
    """A record's ``(text, problem)`` from its lines (None: a line over the limit)."""
    if None in lines:
        return b"", f"a line longer than {MAX_LINE_CHARS} bytes"
    return b"".join(lines), ""


def _starts_a_record(lines: list[bytes | None]) -> bool:
    """Whether the last line is a counts line whose header begins where a record may begin: right after
    ``M  END`` or after the blank line that ends a data item (never inside one: a data value may say
    "V3000"), with no data-item header among the three header lines (any of which may be over the limit)."""
    last = lines[-1]
    if len(lines) <= _HEADER_LINES + 1 or last is None or not _COUNTS_LINE.match(last.rstrip(b"\r\n")):
        return False
    before = lines[-2 - _HEADER_LINES]
    header = lines[-1 - _HEADER_LINES : -1]
    after_a_block = before is not None and (not before.strip() or before.startswith(b"M  END"))
    return after_a_block and not any(h is not None and h.startswith(b">") for h in header)


def _row(text: bytes, record: Record, embed: bool, seed: int) -> Molecule:
    with RDKitLog() as log:
        supplier = Chem.ForwardSDMolSupplier(io.BytesIO(text + b"$$$$\n"), sanitize=False, removeHs=False)
        mol = next(supplier, None)
        if mol is None:
            missing = "" if b"M  END" in text else " (it has no 'M  END' line)"
            why = f"cannot parse record{missing}: {log.reason('RDKit could not parse it')}"
            return record.error(why, _title_line(text))
        if mol.HasProp("_Name") and _text_prop(mol, "_Name") is None:  # as SMILES and XYZ names: U+FFFD
            mol.SetProp("_Name", _title_line(text))
        return guarded(molecule_from_rdkit, record, mol, embed, seed)


def _title_line(text: bytes) -> str:
    """A record's first line, its title, as text (invalid UTF-8 as U+FFFD, as SMILES and XYZ names)."""
    return text.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()


def _text_prop(mol: Chem.Mol, key: str) -> str | None:
    """A string property, or None if it is not valid UTF-8."""
    try:
        return mol.GetProp(key)
    except UnicodeDecodeError:
        return None


def _query_bond_problem(mol: Chem.Mol) -> str | None:
    """Why a molecule with a query bond (SD bond types 5-8: single or double, single or aromatic, double
    or aromatic, any) is no molecule to predict: such a bond leaves its order open. None without one."""
    for bond in mol.GetBonds():
        if bond.HasQuery() and bond.GetBondType() == Chem.BondType.UNSPECIFIED:  # not a ring/chain flag
            ends = f"atoms {bond.GetBeginAtomIdx() + 1} and {bond.GetEndAtomIdx() + 1}"
            return f"the bond between {ends} is a query bond (SD types 5-8 leave its order open): a pattern"
    return None


def molecule_from_rdkit(record: Record, mol: Chem.Mol, embed: bool, seed: int) -> Molecule | PendingConformer:
    """The row of an RDKit molecule (as an SDF record gives it): hydrogens and a 3D conformer added where
    it lacks them (warnings, or errors without ``embed``); SD tags as properties. A 2D record's row is
    pending: its conformer is generated like a SMILES string's, in the conformer pool with its time
    limit."""
    name = (_text_prop(mol, "_Name") or "").strip() if mol.HasProp("_Name") else ""
    properties: dict[str, str] = {}
    warnings: list[str] = []
    for key in mol.GetPropNames():
        value = _text_prop(mol, key)
        if value is None:
            warnings.append(f"SD tag {key!r} is not valid UTF-8 and was dropped")
        else:
            properties[key] = value
    numbers, symbols = atoms_of(mol)
    positions = positions_of(mol) if mol.GetNumConformers() else None  # [n_atoms, 3] Å

    def error(why: str) -> Molecule:
        return record.error(why, name, numbers, positions, properties)

    problem = element_problem(numbers, symbols) or _query_bond_problem(mol)
    if problem:
        return error(problem)
    try:
        sanitize(mol)
    except Exception as exc:  # RDKit raises several sanitization exception types
        return error(f"RDKit sanitization failed: {reason(exc)}")
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
        warnings.append("2D record: 3D conformer generated" + (" and hydrogens added" if needs_h else ""))
        finish = partial(_embedded_row, record, name, properties, warnings)
        return PendingConformer(record, name, numbers, to_binary(mol), seed, finish)  # see conformer_pool
    else:
        Chem.AssignStereochemistryFrom3D(mol)
        if needs_h:
            if not embed:
                return error("no explicit hydrogens and embedding is off")
            mol = Chem.AddHs(mol, addCoords=True)
            warnings.append("hydrogens added")
    numbers, symbols = atoms_of(mol)
    return record.molecule(name, numbers, positions_of(mol), properties, symbols, warnings, mol)


def _embedded_row(
    record: Record, name: str, properties: dict[str, str], warnings: list[str], mol: Chem.Mol,
    embed_warnings: list[str],
) -> Molecule:  # fmt: skip
    """The row of a 2D record once its conformer exists (``mol``, with the embedding's warnings)."""
    numbers, symbols = atoms_of(mol)
    positions = positions_of(mol)
    return record.molecule(name, numbers, positions, properties, symbols, [*warnings, *embed_warnings], mol)
