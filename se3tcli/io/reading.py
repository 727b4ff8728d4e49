"""Reading molecules from files and SMILES strings: the registry of file readers by suffix."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from se3tcli.errors import InputError
from se3tcli.io.conformer_pool import Row, embed_pending
from se3tcli.io.conformers import DEFAULT_TIMEOUT_S
from se3tcli.io.filereader import FileReader, read_file, read_stream
from se3tcli.io.molecule import Molecule
from se3tcli.io.sdf import SDF_READER
from se3tcli.io.smiles import SMILES_READER, read_smiles_strings
from se3tcli.io.smiles_table import SMILES_TABLE_READER
from se3tcli.io.xyz import XYZ_READER

# Matched case-insensitively against the end of the file name, in this order.
_READER_BY_SUFFIX: dict[str, FileReader] = {
    ".sdf": SDF_READER,
    ".sdf.gz": SDF_READER,
    ".mol": SDF_READER,
    ".xyz": XYZ_READER,
    ".extxyz": XYZ_READER,
    ".smi": SMILES_READER,
    ".smiles": SMILES_READER,
    ".txt": SMILES_READER,
    ".csv": SMILES_TABLE_READER,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_READER_BY_SUFFIX)


def reader_of(path: str | Path) -> FileReader | None:
    name = Path(path).name.lower()
    return next((reader for suffix, reader in _READER_BY_SUFFIX.items() if name.endswith(suffix)), None)


STDIN = "-"  # the input name of standard input
STDIN_FORMATS = ("sdf", "xyz", "smi", "csv")  # what standard input may hold (--format)


def check_inputs(paths: Iterable[str | Path], stdin_format: str | None = None) -> None:
    """Raise :class:`InputError` for a missing or unreadable file, a directory or anything else that is not
    a regular file (a pipe or device could block or never end), an unsupported suffix, and for standard
    input (``-``) without a format or given twice."""
    paths = list(paths)
    if paths.count(STDIN) > 1:
        raise InputError("standard input (-) can be read only once")
    if STDIN in paths and stdin_format not in STDIN_FORMATS:
        raise InputError(f"reading standard input (-) needs --format, one of {', '.join(STDIN_FORMATS)}")
    for path in paths:
        if path == STDIN:
            continue
        p = Path(path)
        if not p.exists():
            raise InputError(f"input file not found: {path}")
        if p.is_dir():
            raise InputError(f"input is a directory, not a file: {path}")
        if not stat.S_ISREG(p.stat().st_mode):  # opening a FIFO blocks; /dev/zero never ends
            raise InputError(f"input is not a regular file (a pipe, device or socket): {path}")
        if reader_of(p) is None:
            raise InputError(f"unsupported input format: {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        if not os.access(p, os.R_OK):
            raise InputError(f"input file is not readable: {path}")


def read_molecules(
    paths: Iterable[str | Path] = (),
    smiles: Iterable[str] = (),
    embed: bool = True,
    seed: int = 42,
    stdin_format: str | None = None,
    workers: int = 1,
    conformer_timeout: float = DEFAULT_TIMEOUT_S,
    max_atoms: int | None = None,
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
    stdin_format
        ``sdf``, ``xyz``, ``smi`` or ``csv``: what the input ``-`` (standard input) holds.
    workers
        Processes that generate the conformers of SMILES (1: this process; see
        :func:`~se3tcli.io.conformer_pool.embed_pending`).
    conformer_timeout
        Seconds per SMILES conformer (0: no limit); a slower one becomes an error row.
    max_atoms
        A molecule that would have more atoms (hydrogens included) is an error row before any conformer
        is generated for it (None: no limit).

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
    check_inputs(paths, stdin_format)
    rows = _iter_rows(paths, smiles, embed, seed, stdin_format)
    return embed_pending(rows, workers, conformer_timeout, max_atoms)


def _iter_rows(
    paths: list[str | Path], smiles: list[str], embed: bool, seed: int, stdin_format: str | None
) -> Iterator[Row]:
    for path in paths:
        if path == STDIN:
            yield from read_stream(sys.stdin.buffer, reader_of(f"-.{stdin_format}"), embed, seed)
        else:
            yield from read_file(path, reader_of(path), embed, seed)
    yield from read_smiles_strings(smiles, seed)
