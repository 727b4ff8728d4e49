"""Read-ahead in a background thread: order, errors, and a clean stop."""

from __future__ import annotations

import threading
import time

import pytest

from se3tcli.prefetch import prefetch


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "se3t-prefetch"]


def test_items_arrive_in_order_and_errors_reraise() -> None:
    assert list(prefetch(range(50), 3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("broken record")

    with pytest.raises(RuntimeError, match="broken record"):
        list(prefetch(failing(), 2))


def test_stopping_early_waits_for_the_producer() -> None:
    """A consumer that stops (as training does at its time limit) leaves no producer thread running:
    one still inside torch at interpreter exit aborts the process."""

    def slow():
        for i in range(1000):
            time.sleep(0.01)
            yield i

    items = prefetch(slow(), 4)
    assert next(items) == 0
    items.close()
    assert not _workers()
