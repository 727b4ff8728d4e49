"""A private folder for compiled code, checked the way ssh checks ``~/.ssh``, and files tied to a hash.

Loading a shared library runs its code as the user (its constructors run before any check of its symbols),
so se3t loads one only from a folder that no one else can write. The cache directory and its ``kernels``
folder (created here with mode 0700 where missing, whatever the umask) and every file read from there must
belong to the user and carry no group or other write bit. Each library is tied to the bytes that were
built: its SHA-256 is recorded beside it (``<name>.sha256``, written atomically in the same folder) right
after compiling, and a library is opened, hashed and checked against that record before loading, and
loaded only while its name still refers to the file that was hashed. (The loader is given the name, not
``/proc/self/fd/N``: glibc reuses an already loaded library whose name matches, and descriptor numbers
repeat.)
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE = 0o700  # folders and libraries: the user's alone


class UntrustedCache(Exception):
    """A folder or file that someone else could have written."""


class UnverifiedFile(UntrustedCache):
    """A file that does not hash to its record (cut short, corrupted or replaced)."""


def make_private_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode 0700 (``Path.mkdir`` applies the umask: under
    ``umask 000`` it makes folders that everyone can write)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE)
        except FileExistsError:  # made meanwhile by another process: checked like any other
            continue
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # this folder, not a link put there
        try:
            os.fchmod(fd, PRIVATE)  # whatever bits the umask removed
        finally:
            os.close(fd)


def check_private(path: Path, status: os.stat_result) -> None:
    """Raise :class:`UntrustedCache` unless ``path`` (``status``: its stat) belongs to this user and neither
    its group nor others may write it."""
    if status.st_uid != os.getuid():
        raise UntrustedCache(f"{path} belongs to another user (uid {status.st_uid})")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if status.st_mode & stat.S_IWOTH else "its group"
        raise UntrustedCache(f"{path} is writable by {who}")


def check_ancestors(root: Path) -> None:
    """Raise :class:`UntrustedCache` unless every folder above ``root`` (a real path, without links) belongs
    to this user or to root and is writable by no one else, or has the sticky bit (like ``/tmp``), which
    keeps others from renaming what they do not own. Otherwise someone could swap a folder on the way to
    the cache between its checks and the loader's open."""
    for folder in reversed(root.parents):
        status = os.lstat(folder)
        if status.st_uid not in (0, os.getuid()):
            raise UntrustedCache(f"{folder} belongs to another user (uid {status.st_uid})")
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not status.st_mode & stat.S_ISVTX:
            raise UntrustedCache(f"{folder} is writable by others (and has no sticky bit)")


def check_folders(root: Path, folder: Path) -> None:
    """Check ``root`` (a real path, see :func:`check_ancestors`) and every folder below it down to
    ``folder``, which must be real folders, not links."""
    status = os.lstat(root)
    if not stat.S_ISDIR(status.st_mode):
        raise UntrustedCache(f"{root} is not a folder")
    check_private(root, status)
    path = root
    for part in folder.relative_to(root).parts:
        path = path / part
        status = os.lstat(path)
        if not stat.S_ISDIR(status.st_mode):
            raise UntrustedCache(f"{path} is not a folder")
        check_private(path, status)


def sidecar(path: Path) -> Path:
    """Where the SHA-256 of ``path`` is recorded."""
    return path.with_name(path.name + ".sha256")


def _open_private(path: Path) -> int:
    """A read-only descriptor of the regular file ``path`` (not a link) after :func:`check_private`.
    Raises FileNotFoundError where there is none."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise UntrustedCache(f"{path} is not a regular file")
        check_private(path, status)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def record(path: Path) -> None:
    """Record the SHA-256 of ``path`` (which only this user can write) in its :func:`sidecar`, atomically."""
    fd = _open_private(path)
    try:
        text = _sha256(fd) + "\n"
    finally:
        os.close(fd)
    write_private(sidecar(path), text)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file (mode 0600) in the same folder and a rename."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def open_verified(path: Path) -> int:
    """An open descriptor of ``path``, checked with :func:`check_private`, whose bytes hash to the SHA-256
    recorded for it. Raises FileNotFoundError where the file or its record is missing (build it anew),
    :class:`UnverifiedFile` where the hash differs and :class:`UntrustedCache` where another user could have
    written either file."""
    fd = _open_private(sidecar(path))
    try:
        recorded = os.read(fd, 256).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    fd = _open_private(path)
    try:
        if _sha256(fd) != recorded:
            raise UnverifiedFile(f"{path} does not match the SHA-256 recorded when it was built")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_unchanged(fd: int, path: Path) -> None:
    """Raise :class:`UnverifiedFile` unless ``path`` (not a link) still names the file open as ``fd`` (the
    one :func:`open_verified` hashed); call it right before the loader opens ``path``."""
    opened, named = os.fstat(fd), os.lstat(path)
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise UnverifiedFile(f"{path} was replaced while it was checked")
