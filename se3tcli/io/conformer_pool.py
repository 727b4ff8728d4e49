"""Conformer generation over several cores: rows in input order, with a wall-clock limit per molecule.

:func:`embed_pending` turns the :class:`PendingConformer` rows of a stream into finished rows and passes
every other row through, in input order. With one worker it embeds in this process (RDKit's own ETKDG
timeout is then the only limit). With more it starts up to that many worker processes on the first pending
row, never for a stream without one; each embeds one molecule at a time, and one that runs past the limit
is killed and replaced, its record becoming an error row. Workers are forks of a ``forkserver`` that has
imported RDKit (quick to start or replace, and never a fork of this process, whose torch threads a fork
would break), or ``spawn``-ed where there is no forkserver. At most ``workers * AHEAD_PER_WORKER`` rows
wait for the oldest one to be done, so memory stays flat on any input length. Workers ignore Ctrl-C and
are killed when the stream ends, fails or is closed (and, as daemon processes, when this process exits).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from se3tcli.io.conformers import DEFAULT_TIMEOUT_S, PendingConformer, embed_binary, time_limit_reason
from se3tcli.io.molecule import Molecule, size_limit_reason
from se3tcli.io.worker_signals import WORKER_NAME

AHEAD_PER_WORKER = 8  # rows read ahead of the oldest unfinished one, per worker
MAX_DEFAULT_WORKERS = 4
_READY = "ready"  # a worker's first message, once its imports are done

Row = Molecule | PendingConformer


def default_workers() -> int:
    """One worker per core available to this process, 2 to 4 (2 on one core, so the time limit holds)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(max(cores, 2), MAX_DEFAULT_WORKERS)


def embed_pending(
    rows: Iterable[Row], workers: int = 1, timeout: float = DEFAULT_TIMEOUT_S, max_atoms: int | None = None
) -> Iterator[Molecule]:
    """The rows with every pending conformer generated, in input order (``timeout`` in s; 0: no limit).
    A pending molecule of more than ``max_atoms`` atoms with its hydrogens is an error row at once,
    never embedded (None: no limit)."""
    if max_atoms is not None:
        rows = (_within(row, max_atoms) for row in rows)
    if workers <= 1:
        for row in rows:
            yield row if isinstance(row, Molecule) else row.row(embed_binary(row.mol, row.seed, timeout))
    else:
        yield from _in_workers(iter(rows), workers, timeout)


def _within(row: Row, max_atoms: int) -> Row:
    if isinstance(row, Molecule) or (n_atoms := row.n_atoms) <= max_atoms:
        return row
    return row.error(size_limit_reason(n_atoms, max_atoms))


@dataclass(eq=False)
class _Slot:
    """One row of the stream: done (``row``) or waiting for its conformer (``pending``)."""

    pending: PendingConformer | None
    row: Molecule | None = None


class _Worker:
    """A worker process and the pipe to it; ``slot`` is the row it embeds, sent at ``since``."""

    def __init__(self, context: multiprocessing.context.BaseContext):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name=WORKER_NAME, daemon=True)
        self.process.start()
        child.close()  # so that the worker's death reads as end of file here
        self.ready = False
        self.slot: _Slot | None = None
        self.since = 0.0

    @property
    def idle(self) -> bool:
        return self.ready and self.slot is None

    def send(self, slot: _Slot, timeout: float) -> None:
        self.conn.send((slot.pending.mol, slot.pending.seed, timeout))
        self.slot, self.since = slot, time.monotonic()

    def stop(self) -> int | None:
        """Kill the process and reap it (no zombie); its exit code."""
        self.process.kill()
        self.process.join()
        code = self.process.exitcode
        self.process.close()
        self.conn.close()
        return code


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # (No effect once the server runs.) worker_signals: the workers start with Ctrl-C ignored.
    context.set_forkserver_preload(["__main__", __name__, "se3tcli.io.worker_signals"])
    return context


def _in_workers(rows: Iterator[Row], n_workers: int, timeout: float) -> Iterator[Molecule]:
    context = _context()
    window: deque[_Slot] = deque()  # the rows read and not yet yielded, in input order
    queued: deque[_Slot] = deque()  # pending rows not yet sent to a worker
    workers: list[_Worker] = []
    more = True
    try:
        while True:
            while more and len(window) < n_workers * AHEAD_PER_WORKER:
                row = next(rows, None)
                more = row is not None
                if more:
                    slot = _Slot(None, row) if isinstance(row, Molecule) else _Slot(row)
                    window.append(slot)
                    if slot.pending is not None:
                        queued.append(slot)
            while window and window[0].row is not None:
                yield window.popleft().row
            if not window and not more:
                return
            free = sum(1 for w in workers if w.slot is None)  # idle or still starting
            for _ in range(min(len(queued) - free, n_workers - len(workers))):
                workers.append(_Worker(context))
            _dispatch(workers, queued, timeout)
            if window and window[0].row is None:
                _collect(workers, timeout)
    finally:
        for worker in workers:
            worker.stop()


def _dispatch(workers: list[_Worker], queued: deque[_Slot], timeout: float) -> None:
    """Send queued rows to the idle workers; one that has died meanwhile is dropped, its row kept queued."""
    for worker in [w for w in workers if w.idle]:
        if not queued:
            return
        try:
            worker.send(queued[0], timeout)
        except OSError:
            _drop(workers, worker, _died(worker.stop()))
        else:
            queued.popleft()


def _collect(workers: list[_Worker], timeout: float) -> None:
    """Wait for a worker's message or the earliest deadline; finish the rows that are done or out of time,
    replacing workers that were killed or died (removed from ``workers``; the caller starts new ones)."""
    busy = [w for w in workers if w.slot is not None]
    deadlines = [w.since + timeout for w in busy] if timeout > 0 else []
    wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
    for conn in wait([w.conn for w in workers], wait_s):
        worker = next(w for w in workers if w.conn is conn)
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the worker died (crash, out of memory)
            _drop(workers, worker, _died(worker.stop()))
            continue
        if worker.ready:
            worker.slot.row = worker.slot.pending.row(message)
            worker.slot = None
        else:
            worker.ready = message == _READY
    now = time.monotonic()
    for worker in busy:
        if worker.slot is not None and timeout > 0 and now >= worker.since + timeout:
            worker.stop()
            _drop(workers, worker, time_limit_reason(timeout))


def _drop(workers: list[_Worker], worker: _Worker, why: str) -> None:
    """Remove a stopped worker; its row becomes an error row with ``why``. A worker that died before it was
    ready means that none can start: an error of the whole stream."""
    workers.remove(worker)
    if not worker.ready:
        raise RuntimeError(f"cannot start a conformer worker process: {why}")
    if worker.slot is not None:
        worker.slot.row = worker.slot.pending.error(why)
        worker.slot = None


def _died(exit_code: int | None) -> str:
    return f"the conformer worker process died (exit code {exit_code})"


def _serve(conn: Connection) -> None:
    """A worker process: embed the molecules the parent sends, one at a time, until it closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the workers
    try:
        conn.send(_READY)
        while True:
            conn.send(embed_binary(*conn.recv()))
    except (EOFError, OSError):  # the parent has gone
        return
