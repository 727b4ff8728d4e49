"""What the file readers share: the :class:`FileReader` interface, :func:`read_file`, which opens a file
and ends it the same way for every format, and text lines of bounded length."""

from __future__ import annotations

import gzip
import io
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from se3tcli.io.molecule import Molecule, Record, reason

MAX_LINE_CHARS = 1 << 20  # longest line the readers accept (1 MiB; bytes for SDF)


STDIN_SOURCE = "<stdin>"  # Molecule.source of records read from standard input


@dataclass(frozen=True)
class FileReader:
    """One input format: ``open(path)`` gives the handle that ``rows(handle, source, embed, seed)`` reads.

    ``rows`` yields one row per record, with record indices 0, 1, 2, ...; it turns problems of a record
    into that record's error row and lets errors of the stream itself (I/O, decompression) propagate.
    ``binary``: whether ``rows`` reads bytes (else text).
    """

    open: Callable[[str | Path], IO]
    rows: Callable[[IO, str, bool, int], Iterator[Molecule]]
    binary: bool = False


def read_file(path: str | Path, reader: FileReader, embed: bool, seed: int) -> Iterator[Molecule]:
    """The rows of one file, plus an error row where the file cannot be opened, where reading it fails or
    the file is cut short while it is read (at the record where it happened; the rest of the file is lost),
    or when it has no records at all. Records appended while it is read are read."""
    source = str(path)
    try:
        # not even opened unless regular: opening a FIFO blocks, and a device like /dev/zero never ends
        handle = reader.open(path) if stat.S_ISREG(os.stat(path).st_mode) else None
    except OSError as exc:
        yield Record(source, 0).error(f"cannot open file: {reason(exc)}")
        return
    if handle is None:
        yield Record(source, 0).error("cannot open file: not a regular file (a pipe, device or socket)")
        return
    if not source.lower().endswith(".gz") and _starts_as_gzip(path):
        handle.close()
        yield Record(source, 0).error(
            "gzip-compressed, although its name does not end in .gz: decompress it (or name an SDF .sdf.gz)"
        )
        return
    with handle:
        yield from _rows_to_the_end(handle, source, reader, embed, seed, _shrink_check(handle))


def read_stream(stream: IO[bytes], reader: FileReader, embed: bool, seed: int) -> Iterator[Molecule]:
    """:func:`read_file` of a binary stream (standard input), whose rows have the source ``<stdin>``;
    gzip-compressed data (``curl .../x.sdf.gz | se3t predict -``) is decompressed."""
    peek = getattr(stream, "peek", None)
    if peek is not None and peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] == GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    handle = stream if reader.binary else io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace")
    yield from _rows_to_the_end(handle, STDIN_SOURCE, reader, embed, seed)


def _rows_to_the_end(
    handle: IO,
    source: str,
    reader: FileReader,
    embed: bool,
    seed: int,
    shrank: Callable[[], bool] = lambda: False,
) -> Iterator[Molecule]:
    """The rows of ``handle``; once ``shrank()`` says that the file was cut short, the row read then and
    the rest become one error row, as they may come from a part of the file that is gone or rewritten."""
    count = 0  # rows so far, which is the index of the next record
    try:
        for row in reader.rows(handle, source, embed, seed):
            if shrank():
                break
            yield row
            count += 1
        problem = _SHRANK if shrank() else ""
    except Exception as exc:  # I/O or decompression errors of the underlying stream
        problem = _SHRANK if shrank() else _stream_problem(exc, source.lower().endswith(".gz"))
    if problem:
        yield Record(source, count).error(f"cannot read the rest of the file: {problem}")
    elif count == 0:
        yield Record(source, 0).error("no molecules found")


_SHRANK = "it was cut short while it was read (truncated, or rewritten in place)"
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of gzip data


def _starts_as_gzip(path: str | Path) -> bool:
    """Whether the file begins with gzip's magic bytes (False where it cannot be read: its reader tells)."""
    try:
        with open(path, "rb") as raw:
            return raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    except OSError:
        return False


def _shrink_check(handle: IO) -> Callable[[], bool]:
    """Whether the open file is now shorter than it was at open or at an earlier call (it may grow: records
    appended while it is read are read)."""
    fd = handle.fileno()
    longest = os.fstat(fd).st_size

    def shrank() -> bool:
        nonlocal longest
        size = os.fstat(fd).st_size
        longest = max(longest, size)
        return size < longest

    return shrank


def _stream_problem(exc: Exception, gz_name: bool) -> str:
    """Why a stream (of a file named .gz if ``gz_name``) could not be read, in words (the gzip module's
    own messages say little)."""
    if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file"):  # the magic bytes
        if gz_name:
            return "not gzip-compressed, although its name ends in .gz"
        return "uncompressed data after the gzip-compressed data (files concatenated?)"
    if isinstance(exc, EOFError):
        return "the compressed data ends early (the file is cut short)"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):  # a CRC or length check failed, a bad block
        return f"the compressed data is corrupt ({reason(exc)})"
    return reason(exc)


def has_control_characters(text: str) -> bool:
    """Whether a line (without its line ending) holds control characters other than tabs: binary data."""
    return any(ord(c) < 32 and c != "\t" for c in text)


def open_text(path: str | Path) -> IO[str]:
    """A text input file; bytes that are not UTF-8 become U+FFFD, so decoding never fails, and a UTF-8 byte
    order mark at the start is dropped."""
    return open(path, encoding="utf-8-sig", errors="replace")


def text_lines(handle: IO[str] | IO[bytes]) -> Iterator[str | bytes | None]:
    """Lines of a text or binary file; None for a line longer than ``MAX_LINE_CHARS`` (the rest of it is
    skipped, so one endless line costs no memory)."""
    while line := handle.readline(MAX_LINE_CHARS):
        newline = "\n" if isinstance(line, str) else b"\n"
        if len(line) == MAX_LINE_CHARS and not line.endswith(newline):
            while (rest := handle.readline(MAX_LINE_CHARS)) and not rest.endswith(newline):
                pass
            yield None
        else:
            yield line
