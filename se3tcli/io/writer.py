"""Writing predictions: :class:`PredictionWriter`, incremental and atomic, as CSV, JSON or SDF."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from se3tcli.errors import InputError
from se3tcli.files import AtomicFile, with_filename
from se3tcli.io.molecule import Molecule
from se3tcli.io.outputs import FORMAT_BY_SUFFIX, file_value


def writer_formats() -> tuple[str, ...]:
    """Output suffixes :class:`PredictionWriter` supports."""
    return tuple(FORMAT_BY_SUFFIX)


STDOUT = "-"  # the output name of standard output


class _StandardOutput:
    """Standard output in place of an :class:`~se3tcli.files.AtomicFile`: rows go out as they come, so an
    interrupted run leaves the rows so far (the reader of a pipe sees the end of the stream)."""

    def __init__(self):
        self.handle = sys.stdout

    def commit(self) -> None:
        self.handle.flush()

    def abort(self) -> None:
        self.handle.flush()


def check_output(path: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse an output that is one of the inputs (also through links), and an existing file unless
    ``overwrite``: predictions written over a molecule file would lose its records."""
    target = Path(path)
    if str(path) == STDOUT or not target.exists():
        return
    if target.is_dir():
        raise InputError(f"output path is a directory: {path}")
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(source, target):
                raise InputError(f"{path} is also an input: refusing to write predictions over it")
    if not overwrite:
        raise InputError(f"{path} exists: give --overwrite to replace it, or another --output")


class PredictionWriter:
    """Incremental, atomic writer of predictions as CSV, JSON or SDF (chosen by the output suffix).

    Rows go to a temporary file in the target's directory, which :meth:`close` renames into place and
    :meth:`abort` deletes. As a context manager it closes on success and aborts on an exception.

    Parameters
    ----------
    path
        Output file; its suffix must be one of :func:`writer_formats`. ``-``: standard output, written as
        the rows come (no temporary file), in ``output_format``.
    targets
        Predicted quantities, in column order: the targets, then any dipole components.
    units
        Unit of each quantity (a missing unit leaves the column name bare).
    output_format
        ``csv`` (the default), ``json`` or ``sdf``, for standard output.

    Raises
    ------
    InputError
        For an unsupported suffix, or when the temporary file cannot be created.
    """

    def __init__(
        self,
        path: str | Path,
        targets: Sequence[str],
        units: Mapping[str, str],
        output_format: str | None = None,
    ):
        to_stdout = str(path) == STDOUT
        # Through a link to its target: the link stays, the file it names gets the predictions.
        self.path = Path(path) if to_stdout else Path(os.path.realpath(path))
        suffix = f".{output_format or 'csv'}" if to_stdout else self.path.suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise InputError(f"unsupported output format: {path} (supported: {', '.join(writer_formats())})")
        if self.path.is_dir() and not to_stdout:
            raise InputError(f"output path is a directory: {path}")
        self.targets = tuple(targets)
        self.units = {t: units.get(t, "") for t in self.targets}
        try:
            # untranslated newlines, as csv needs
            self._file = _StandardOutput() if to_stdout else AtomicFile(self.path, "w", newline="")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        self._closed = False
        try:
            self._format = FORMAT_BY_SUFFIX[suffix](self._file.handle, self.targets, self.units)
        except BaseException:
            self.abort()
            raise

    def write(self, molecule: Molecule, predictions: Mapping[str, float] | None) -> None:
        """Append one row; predictions of error rows, missing quantities and NaN values are left empty."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        values = {}
        if molecule.ok and predictions is not None:
            values = {t: file_value(predictions[t]) for t in self.targets if t in predictions}
        try:
            self._format.write(molecule, values)
        except OSError as exc:  # e.g. a full disk
            raise with_filename(exc, self.path) from exc

    @property
    def skipped(self) -> int:
        """Rows the format could not hold (SD records need atoms with coordinates; CSV and JSON keep all)."""
        return getattr(self._format, "skipped", 0)

    def close(self) -> None:
        """Finish the file and move it into place (atomically replacing an existing one)."""
        if self._closed:
            return
        try:
            self._format.finish()
            self._file.commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written; the target file is left as it was."""
        if self._closed:
            return
        self._closed = True
        self._file.abort()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
