"""Build, cache and load the fused CPU kernel (``se3tcli/model/fused_attention.c``).

The C source is compiled on first use with the system's C compiler into the ``kernels`` folder of the se3t
cache directory (a few seconds, announced in a notice of :mod:`se3tcli.notices`; keyed by the source, the
compiler, the flags, the C library and the CPU, since it is built for this CPU), kept private and checked
before every load (:mod:`.cache`), loaded with ctypes and bound (:mod:`.abi`). :func:`kernel_library` never
raises: every failure to build, verify, load or bind gives a :class:`KernelLibrary` without a library, the
reason, and a one-line warning (an info message where no compiler is found, or where a build failed before:
that is remembered in a ``.failed`` file beside the library, with the compiler's message, so that later runs
skip it quietly until the file is deleted).

Built with ``-fopenmp``, the library binds to the ``libgomp.so.1`` that PyTorch has loaded where PyTorch uses
GNU OpenMP under that name (the Linux CPU wheels), so the kernel and PyTorch's operations take turns on one
thread pool; with another OpenMP runtime the two pools are separate (correct, but they may spin against each
other).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from se3tcli.model.fused_cpu import abi
from se3tcli.model.fused_cpu.cache import (
    PRIVATE,
    UntrustedCache,
    UnverifiedFile,
    check_ancestors,
    check_folders,
    check_unchanged,
    make_private_folders,
    open_verified,
    record,
    sidecar,
    write_private,
)
from se3tcli.notices import NOTICES
from se3tcli.paths import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "fused_attention.c"  # absolute: it includes itself
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
FOLDER = "kernels"  # in the se3t cache directory
_FALLBACK = "the CPU attention layers use the PyTorch path"


class KernelUnavailable(Exception):
    """Why the kernel cannot be used, in one line; ``quiet``: an expected situation (logged as info)."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded kernel (``cdll``), or None and why."""

    cdll: ctypes.CDLL | None
    detail: str  # the library's file, or why there is none


@dataclass(frozen=True)
class CacheEntry:
    """The files of one build in the cache: the library, its SHA-256 record and the mark of a failed build."""

    folder: Path
    library: Path
    failed: Path

    @property
    def digest(self) -> Path:
        return sidecar(self.library)


def _machine_signature() -> str:
    """What a ``-march=native`` build depends on: the CPU (every /proc/cpuinfo line but clock readings, which
    covers x86's flags and ARM's features alike) and the C library."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = [platform.processor(), platform.machine()]
    cpu = sorted({line for line in lines if "mhz" not in line.lower() and "bogomips" not in line.lower()})
    return "\n".join([*cpu, platform.machine(), *platform.libc_ver()])


def find_compiler() -> list[str] | None:
    """``$CC`` (may carry arguments: ``ccache gcc``), else ``cc``, else ``gcc``; None if none is found.
    Raises :class:`KernelUnavailable` where ``$CC`` cannot be split into words (an unclosed quote)."""
    try:
        command = shlex.split(os.environ.get("CC", "")) or ["cc"]
    except ValueError as error:
        raise KernelUnavailable(f"$CC={os.environ['CC']!r} cannot be parsed ({error})") from None
    found = shutil.which(command[0])
    if found is None and "CC" not in os.environ:
        found = shutil.which("gcc")
    return None if found is None else [found, *command[1:]]


def cache_entry(compiler: list[str], root: Path | None = None) -> CacheEntry:
    """Where the build of the source with ``compiler`` on this machine lives in the cache (``root``, by
    default the se3t cache directory)."""
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *compiler, *FLAGS, _machine_signature()]).encode()
    ).hexdigest()[:16]
    folder = (root or default_cache_dir()) / FOLDER
    return CacheEntry(folder, folder / f"fused_attention-{key}.so", folder / f"fused_attention-{key}.failed")


def _compile(compiler: list[str], entry: CacheEntry) -> None:
    """Build the library into a private temporary folder, record its hash, then rename it into place."""
    with tempfile.TemporaryDirectory(dir=entry.folder) as scratch:  # mode 0700
        built = Path(scratch) / entry.library.name
        subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.chmod(built, PRIVATE)  # the linker applied the umask: world-writable under umask 000
        record(built)
        os.replace(sidecar(built), entry.digest)
        os.replace(built, entry.library)


def _first_line(error: BaseException) -> str:
    """The compiler's first error line (or the exception's message), for a one-line warning."""
    if isinstance(error, subprocess.CalledProcessError) and not (error.stderr or "").strip():
        return f"the compiler exited with status {error.returncode}"
    detail = str(getattr(error, "stderr", "") or error).strip()
    lines = [line for line in detail.splitlines() if "error" in line.lower()] or detail.splitlines() or [""]
    return lines[0][:300]


def _build(compiler: list[str], entry: CacheEntry) -> None:
    try:
        _compile(compiler, entry)
    except (OSError, subprocess.SubprocessError) as error:
        command = shlex.join([*compiler, *FLAGS, str(SOURCE)])
        write_private(entry.failed, f"{command}\n{getattr(error, 'stderr', None) or error}")
        raise KernelUnavailable(
            f"could not build the fused CPU kernel ({_first_line(error)}; details in {entry.failed}, "
            "delete it to retry)"
        ) from error


def _open(compiler: list[str], entry: CacheEntry) -> int:
    """A descriptor of the verified library, built first where it or its record is missing."""
    try:
        return open_verified(entry.library)
    except FileNotFoundError:
        pass
    except UntrustedCache as error:  # inside a private folder: safe to delete, and rebuilt next time
        for path in (entry.library, entry.digest):
            path.unlink(missing_ok=True)
        what = "the cached kernel" if isinstance(error, UnverifiedFile) else "the cached kernel's files"
        raise KernelUnavailable(f"{error}: deleted {what}, which the next run rebuilds") from None
    NOTICES.info("compiling se3t's CPU attention kernel (once, ~10 s)...")
    _build(compiler, entry)
    return open_verified(entry.library)


def _load() -> KernelLibrary:
    compiler = find_compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler found", quiet=True)
    make_private_folders(default_cache_dir() / FOLDER)
    # From here on, the real path: a link on the way (the user's choice, or someone else's) is resolved
    # once, and what is checked is what the loader opens.
    root = Path(os.path.realpath(default_cache_dir()))
    entry = cache_entry(compiler, root)
    try:
        check_ancestors(root)
        check_folders(root, entry.folder)
    except UntrustedCache as error:
        raise KernelUnavailable(f"refusing to load compiled code from the se3t cache: {error}") from None
    if entry.failed.exists():  # a build that failed before: do not retry (and warn) in every run
        raise KernelUnavailable(f"the fused CPU kernel did not build before (see {entry.failed})", quiet=True)
    fd = _open(compiler, entry)
    try:
        check_unchanged(fd, entry.library)
        library = ctypes.CDLL(str(entry.library))
    finally:
        os.close(fd)
    try:
        abi.bind(library)
    except (AttributeError, abi.LayoutMismatch) as error:
        raise KernelUnavailable(f"could not bind the fused CPU kernel ({error})") from None
    return KernelLibrary(library, str(entry.library))


@cache
def kernel_library() -> KernelLibrary:
    """The compiled kernel (built on first use), or the reason there is none; never raises."""
    try:
        return _load()
    except KernelUnavailable as error:
        reason = str(error)
        (log.info if error.quiet else log.warning)("%s: %s", reason, _FALLBACK)
    except Exception as error:  # an optional accelerator must never stop a command: no cache folder, ...
        reason = f"could not load the fused CPU kernel ({_first_line(error)})"
        log.warning("%s: %s", reason, _FALLBACK)
    return KernelLibrary(None, reason)
