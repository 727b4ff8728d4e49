"""Atomic file writes: the content goes to a temporary file in the target's folder, which is renamed onto
the target only once it is complete, so readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_FILE_MODE = 0o644  # of the finished file, less the process umask, like any newly created file


def with_filename(exc: OSError, path: str | Path) -> OSError:
    """``exc`` naming ``path`` where it names no file (a full disk's ENOSPC comes from a write, which
    knows no name), so that its message says which file could not be written."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


class AtomicFile:
    """An open temporary file beside ``path``: :meth:`commit` renames it onto ``path``, :meth:`abort`
    deletes it. For content written bit by bit; :func:`atomic_write` is the one-block form.

    ``mode`` is ``"w"`` (UTF-8 text; ``newline`` as for :func:`open`) or ``"wb"``. The temporary file is
    ``.NAME.<random>.tmp`` (NAME cut to 100 bytes) in the target's folder, so that the rename stays
    on one file system. Creating it raises :class:`OSError` (missing or read-only folder, ...).
    """

    def __init__(self, path: str | Path, mode: str = "w", newline: str | None = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        # at most 1 + 100 + 1 + 12 + 4 bytes: a target name near the 255-byte limit still gets one
        short = os.fsencode(self.path.name)[:100].decode(errors="ignore")  # at most 100 bytes
        self.tmp = self.path.with_name(f".{short}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            text = mode == "w"
            self.handle: IO = os.fdopen(
                fd, mode, encoding="utf-8" if text else None, newline=newline if text else None
            )
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        """Flush the content to disk and rename the file onto the target, replacing an existing one (whose
        permissions the new file takes)."""
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its permissions
                os.chmod(self.tmp, stat.S_IMODE(os.stat(self.path).st_mode))
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise with_filename(exc, self.path) from exc
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Delete the temporary file; the target is left as it was."""
        with contextlib.suppress(OSError):  # e.g. flushing the discarded content onto a full disk
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open a file for writing in place of ``path`` (see :class:`AtomicFile`): it replaces ``path`` when
    the block ends, and is deleted if the block raises."""
    file = AtomicFile(path, mode, newline)
    try:
        yield file.handle
    except OSError as exc:
        file.abort()
        raise with_filename(exc, path) from exc
    except BaseException:
        file.abort()
        raise
    file.commit()
