"""SDF, MOL and gzipped SDF via RDKit, streamed record by record.

Records without explicit hydrogens get them added; 2D records (every z == 0, more than one atom, not
tagged 3D in the header) or records without a conformer get an ETKDGv3 + MMFF94 conformer. Both are
warnings, or errors with ``embed=False``.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rdkit import Chem

from se3tcli.io.conformers import generate_conformer
from se3tcli.io.filereader import FileReader
from se3tcli.io.molecule import Molecule, Record, element_problem, guarded, reason
from se3tcli.io.rdkit_tools import RDKitLog, atoms_of, positions_of


def _open(path: str | Path) -> IO[bytes]:
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - read_file closes it


def _rows(handle: IO[bytes], source: str, embed: bool, seed: int) -> Iterator[Molecule]:
    supplier = Chem.ForwardSDMolSupplier(handle, sanitize=False, removeHs=False)
    index = 0
    while (row := _next_row(supplier, Record(source, index), embed, seed)) is not None:
        yield row
        index += 1


SDF_READER = FileReader(open=_open, rows=_rows)


def _next_row(supplier: Chem.ForwardSDMolSupplier, record: Record, embed: bool, seed: int) -> Molecule | None:
    """The next record's row, or None at the end of the file; errors of the stream itself propagate."""
    with RDKitLog() as log:
        try:
            mol = next(supplier)
        except StopIteration:
            return None
        if mol is None:
            return record.error(f"cannot parse record: {log.reason('RDKit could not parse it')}")
        return guarded(molecule_from_rdkit, record, mol, embed, seed)


def _text_prop(mol: Chem.Mol, key: str) -> str | None:
    """A string property, or None if it is not valid UTF-8."""
    try:
        return mol.GetProp(key)
    except UnicodeDecodeError:
        return None


def molecule_from_rdkit(record: Record, mol: Chem.Mol, embed: bool, seed: int) -> Molecule:
    """The row of an RDKit molecule (as an SDF record gives it): hydrogens and a 3D conformer added where
    it lacks them (warnings, or errors without ``embed``); SD tags as properties."""
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

    problem = element_problem(numbers, symbols)
    if problem:
        return error(problem)
    try:
        Chem.SanitizeMol(mol)
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
        mol, embed_warnings, why = generate_conformer(mol, seed)
        if mol is None:
            return error(why)
        warnings.append("2D record: 3D conformer generated" + (" and hydrogens added" if needs_h else ""))
        warnings += embed_warnings
    else:
        Chem.AssignStereochemistryFrom3D(mol)
        if needs_h:
            if not embed:
                return error("no explicit hydrogens and embedding is off")
            mol = Chem.AddHs(mol, addCoords=True)
            warnings.append("hydrogens added")
    numbers, symbols = atoms_of(mol)
    return record.molecule(name, numbers, positions_of(mol), properties, symbols, warnings, mol)
