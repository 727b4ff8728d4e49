"""Atomic file writes: the content goes to a temporary file in the target's folder, which is renamed onto
the target only once it is complete, so readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_FILE_MODE = 0o644  # of the finished file, less the process umask, like any newly created file
# The writer's host (a hash of its name), as a pid tells whether its process lives only on that host.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"

if os.name == "posix":
    import fcntl


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
    ``.NAME.<host>-<pid>-<random>.tmp`` (NAME cut to 100 bytes) in the target's folder, so that the
    rename stays on one file system. Creating it raises :class:`OSError` (missing or read-only folder, ...).

    On POSIX the writer holds a lock on its temporary file, which the system drops when the process ends,
    however it ends; temporary files of the same target left by a writer killed hard (``kill -9``) are
    removed (see :func:`remove_stale_temporaries`).
    """

    def __init__(self, path: str | Path, mode: str = "w", newline: str | None = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        remove_stale_temporaries(self.path)
        # at most 1 + 100 + 1 + 8 + 1 + 10 + 1 + 8 + 4 bytes: a name near the 255-byte limit still gets one
        unique = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.path.with_name(f"{_temporary_prefix(self.path)}{unique}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            if os.name == "posix":
                with contextlib.suppress(OSError):  # e.g. ENOLCK: a folder without locks (pids still tell)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new, so no one else holds it
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


def _temporary_prefix(path: Path) -> str:
    """``.NAME.``, NAME cut to 100 bytes."""
    return f".{os.fsencode(path.name)[:100].decode(errors='ignore')}."


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove the temporary files of ``path`` that no live writer owns (left by a process killed hard).

    Only on POSIX, and only a file named exactly as :class:`AtomicFile` names the temporaries of ``path``,
    by a process of this host that no longer exists, and whose lock no one holds; anything else (another
    host's writer on a shared folder, a pid in use, a file that cannot be opened) is left alone.
    """
    if os.name != "posix":
        return
    path = Path(path)
    pattern = re.compile(re.escape(_temporary_prefix(path) + _HOST) + r"-([0-9]+)-[0-9a-f]{8}\.tmp")
    stale = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        stale = [e.path for e in entries if (m := pattern.fullmatch(e.name)) and not _alive(int(m[1]))]
    for name in stale:
        _remove_unlocked(name)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        pass
    return True


def _remove_unlocked(name: str) -> None:
    """Delete the file ``name`` if no process holds its lock (one in another pid namespace may)."""
    with contextlib.suppress(OSError):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer lives
            os.unlink(name)
        finally:
            os.close(fd)


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
