"""Read-ahead: iterate a slow producer (file parsing, batch collation) in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
JOIN_TIMEOUT_S = 10.0  # longest wait for the producer's current item when the consumer stops early


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead; exceptions re-raise here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Put ``entry`` once there is room; False when the consumer has stopped first."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer((done, exc))

    worker = threading.Thread(target=produce, name="se3t-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        # Wait for the producer to finish its item: a thread still inside torch when the interpreter
        # exits aborts the process ("terminate called without an active exception"). Bounded, so that a
        # slow item (a large conformer embedding) cannot hold up an interrupted run.
        stop.set()
        worker.join(timeout=JOIN_TIMEOUT_S)
