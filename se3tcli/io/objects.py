"""Molecules handed over in Python: RDKit molecules, ASE ``Atoms``, SMILES strings and file paths, in
one list, each becoming the same rows the command line reads from files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import ase
from rdkit import Chem

from se3tcli.io.conformer_pool import Row, embed_pending
from se3tcli.io.conformers import DEFAULT_TIMEOUT_S
from se3tcli.io.filereader import read_file
from se3tcli.io.molecule import Molecule, Record, guarded
from se3tcli.io.rdkit_tools import RDKitLog
from se3tcli.io.reading import reader_of
from se3tcli.io.sdf import molecule_from_rdkit
from se3tcli.io.smiles import row_of_smiles_string
from se3tcli.io.xyz import molecule_from_atoms

RDKIT_SOURCE = "<rdkit>"  # Molecule.source of RDKit molecules handed over in Python
ASE_SOURCE = "<ase>"  # ... and of ASE Atoms
PYTHON_SOURCE = "<python>"  # ... and of objects of any other type (error rows)


def molecules_from_objects(
    items: Iterable[object],
    embed: bool = True,
    seed: int = 42,
    workers: int = 1,
    conformer_timeout: float = DEFAULT_TIMEOUT_S,
    max_atoms: int | None = None,
) -> Iterator[Molecule]:
    """Rows for each item in order: a file (a ``Path``, or a string naming an existing file with a
    supported suffix) gives one row per record, an RDKit molecule with several conformers one row per
    conformer (named ``NAME#conf<id>``), anything else one row; the record number of a row is the item's
    position in ``items`` (or, within a file, the record's). SMILES conformers are generated in
    ``workers`` processes with ``conformer_timeout`` seconds each (see :func:`embed_pending`)."""
    return embed_pending(_rows(items, embed, seed), workers, conformer_timeout, max_atoms)


def _rows(items: Iterable[object], embed: bool, seed: int) -> Iterator[Row]:
    for index, item in enumerate(items):
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _names_a_file(item)):
            yield from _file_rows(Path(os.fspath(item)).expanduser(), embed, seed)
        elif isinstance(item, str):
            yield row_of_smiles_string(item, index, seed)
        elif isinstance(item, Chem.Mol):
            yield from _rdkit_rows(item, Record(RDKIT_SOURCE, index), embed, seed)
        elif isinstance(item, ase.Atoms):
            name = str(item.info.get("name", "")) or item.get_chemical_formula()
            yield guarded(molecule_from_atoms, Record(ASE_SOURCE, index), item, name)
        else:
            kind = type(item).__name__
            yield Record(PYTHON_SOURCE, index).error(
                f"cannot predict a {kind}: give an RDKit Mol, ASE Atoms, a SMILES string or a file path"
            )


def _rdkit_rows(mol: Chem.Mol, record: Record, embed: bool, seed: int) -> Iterator[Molecule]:
    """One row for a molecule with at most one conformer; else one per conformer, in the molecule's order,
    each named ``NAME#conf<id>`` (NAME: the molecule's ``_Name``, else the record's default name)."""
    if not mol.GetNumConformers() and any(atom.HasQuery() for atom in mol.GetAtoms()):
        yield record.error("a query molecule (a SMARTS pattern), not a structure")
        return
    if mol.GetNumConformers() <= 1:
        yield guarded(molecule_from_rdkit, record, Chem.Mol(mol), embed, seed)
        return
    name = (mol.GetProp("_Name").strip() if mol.HasProp("_Name") else "") or record.default_name
    for conformer in mol.GetConformers():
        one = Chem.Mol(mol, confId=conformer.GetId())  # a copy with only this conformer
        one.SetProp("_Name", f"{name}#conf{conformer.GetId()}")
        yield guarded(molecule_from_rdkit, record, one, embed, seed)


def _file_rows(path: Path, embed: bool, seed: int) -> Iterator[Row]:
    reader = reader_of(path)
    if path.is_dir():
        yield Record(str(path), 0).error("is a directory, not a file")
    elif reader is None:
        yield Record(str(path), 0).error("unsupported file format")
    elif path.exists() and not path.is_file():
        yield Record(str(path), 0).error("not a regular file (a pipe or a device?)")
    elif not path.is_file():
        yield Record(str(path), 0).error("no such file")
    else:
        yield from read_file(path, reader, embed, seed)


def _names_a_file(text: str) -> bool:
    """A string with a supported file suffix that names something on disk, or that cannot be a SMILES
    (a missing file is then reported as one, not as a SMILES parse error)."""
    try:
        if reader_of(text) is None:
            return False
        if Path(text).expanduser().exists():
            return True
    except (OSError, ValueError):  # e.g. a NUL character, or a name too long for the file system
        return False
    with RDKitLog():
        return Chem.MolFromSmiles(text.split()[0] if text.split() else text) is None
