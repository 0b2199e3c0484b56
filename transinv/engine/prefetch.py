"""Background prefetch: decode the next batches in a thread while the model runs on this one.

Pillow's decoding and torch's ops release the GIL, so with ``--workers 0`` a single thread
overlaps decoding with the forward pass at no extra process or copy. At most ``depth`` batches
wait decoded, so memory stays flat whatever the number of images.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    """An exception raised while producing, carried to the consumer to be raised there."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The items of ``items`` in order, produced ahead in a daemon thread (``depth`` waiting at most).

    An error in the producer is raised in the consumer at the item where it happened. When the
    consumer stops early (Ctrl-C, an error, ``close``) the producer stops after its current item.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand one item over unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # noqa: BLE001 (carried to the consumer and raised there)
            put(_Failed(error))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="transinv-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
