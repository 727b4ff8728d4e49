"""Read molecules into :class:`Molecule` records and write predictions.

Readers, chosen by file suffix (case-insensitive, see :data:`SUPPORTED_SUFFIXES`):

- ``.sdf``, ``.sdf.gz``, ``.mol``: RDKit (:mod:`se3tcli.io.sdf`), with generated conformers for 2D records.
- ``.xyz``, ``.extxyz``: ASE's extXYZ parser (:mod:`se3tcli.io.xyz`).
- ``.smi``, ``.smiles``, ``.txt``: one SMILES per line (:mod:`se3tcli.io.smiles`), embedded in 3D.
- ``.csv``: a table with a SMILES column (:mod:`se3tcli.io.smiles_table`); other columns are properties.

A record that cannot be used keeps its row with status ``error`` and a message naming the file and the
1-based record number; reading goes on with the next record. A file without any record yields one error
row ("no molecules found"). Only :class:`InputError` (missing file, unsupported suffix) is raised, and it
is raised by :func:`read_molecules` itself, before any record is produced.

:class:`PredictionWriter` writes CSV, JSON or SDF incrementally to a temporary file next to the target and
renames it into place on :meth:`PredictionWriter.close`, so an output file is complete or absent.
"""

from se3tcli.errors import STATUS_ERROR, STATUS_OK, STATUS_WARNING, InputError
from se3tcli.io.molecule import MIN_DISTANCE, SMILES_SOURCE, Molecule
from se3tcli.io.reading import STDIN, STDIN_FORMATS, SUPPORTED_SUFFIXES, check_inputs, read_molecules
from se3tcli.io.writer import STDOUT, PredictionWriter, check_output, writer_formats

__all__ = [
    "MIN_DISTANCE",
    "SMILES_SOURCE",
    "STDIN",
    "STDIN_FORMATS",
    "STDOUT",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_WARNING",
    "SUPPORTED_SUFFIXES",
    "InputError",
    "Molecule",
    "PredictionWriter",
    "check_inputs",
    "check_output",
    "read_molecules",
    "writer_formats",
]
