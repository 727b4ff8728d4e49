"""Molecules handed over in Python: RDKit molecules, ASE ``Atoms``, SMILES strings and file paths, in
one list, each becoming the same rows the command line reads from files."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import ase
from rdkit import Chem

from se3tcli.io.filereader import read_file
from se3tcli.io.molecule import Molecule, Record, guarded
from se3tcli.io.reading import reader_of
from se3tcli.io.sdf import molecule_from_rdkit
from se3tcli.io.smiles import molecule_from_smiles
from se3tcli.io.xyz import molecule_from_atoms

RDKIT_SOURCE = "<rdkit>"  # Molecule.source of RDKit molecules handed over in Python
ASE_SOURCE = "<ase>"  # ... and of ASE Atoms
PYTHON_SOURCE = "<python>"  # ... and of objects of any other type (error rows)


def molecules_from_objects(items: Iterable[object], embed: bool = True, seed: int = 42) -> Iterator[Molecule]:
    """Rows for each item in order: a file (a ``Path``, or a string naming an existing file with a
    supported suffix) gives one row per record, anything else one row; the record number of a row is the
    item's position in ``items`` (or, within a file, the record's)."""
    for index, item in enumerate(items):
        if isinstance(item, Path) or (isinstance(item, str) and _is_molecule_file(item)):
            reader = reader_of(item)
            if reader is None:
                yield Record(str(item), 0).error("unsupported file format")
            elif not Path(item).is_file():
                yield Record(str(item), 0).error("no such file")
            else:
                yield from read_file(item, reader, embed, seed)
        elif isinstance(item, str):
            yield molecule_from_smiles(item, index, seed)
        elif isinstance(item, Chem.Mol):
            yield guarded(molecule_from_rdkit, Record(RDKIT_SOURCE, index), Chem.Mol(item), embed, seed)
        elif isinstance(item, ase.Atoms):
            name = str(item.info.get("name", "")) or item.get_chemical_formula()
            yield guarded(molecule_from_atoms, Record(ASE_SOURCE, index), item, name)
        else:
            kind = type(item).__name__
            yield Record(PYTHON_SOURCE, index).error(
                f"cannot predict a {kind}: give an RDKit Mol, ASE Atoms, a SMILES string or a file path"
            )


def _is_molecule_file(text: str) -> bool:
    """A string that names a file se3t reads (a SMILES string may look like a path, not like an
    existing file with one of the supported suffixes)."""
    try:
        return reader_of(text) is not None and Path(text).is_file()
    except (OSError, ValueError):  # e.g. a NUL character, or a name too long for the file system
        return False
