"""Ctrl-C and the conformer workers' forkserver (``conformer_pool._context`` preloads this module there).

A terminal's Ctrl-C reaches every process of the foreground group; a worker forked just then would die of
it inside multiprocessing's start-up code and print a traceback. Preloaded by the forkserver, this module
sets SIGINT to be ignored in the server, so that its children start with it ignored (they take the
handler the server had before it began to serve); as soon as a child knows which process it is, every
child but se3t's workers gets the server's earlier handler back. Imported anywhere else (se3t's own
process), it changes nothing.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import signal
import sys

WORKER_NAME = "se3t-conformers"  # the process name of se3t's conformer workers


def _in_forkserver_preload() -> bool:
    """Whether this import runs inside ``multiprocessing.forkserver.main`` (its preload)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


class _Handler:
    """The server's SIGINT handler from before this module; kept alive for the weakly held registry."""

    def __init__(self) -> None:
        self.earlier = signal.getsignal(signal.SIGINT)

    def restore_unless_worker(self) -> None:
        if multiprocessing.current_process().name != WORKER_NAME:
            signal.signal(signal.SIGINT, self.earlier)


if _in_forkserver_preload():
    _HANDLER = _Handler()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    multiprocessing.util.register_after_fork(_HANDLER, _Handler.restore_unless_worker)
