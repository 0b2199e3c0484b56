"""Background prefetch: decode the next batches in a thread while the model runs on this one.

Pillow's decoding and torch's ops release the GIL, so with ``--workers 0`` a single thread
overlaps decoding with the forward pass at no extra process or copy. At most ``depth`` batches
wait decoded, so memory stays flat whatever the number of images. The thread runs its torch ops
(resizing, normalising) on one intra-op thread: left to itself it starts a second OpenMP team as
large as the model's, and on a machine without spare cores the two teams stall each other. Even on
one thread, where every core runs the model, the decoding thread takes a core from it (on 2 cores
mobilenet_v3_small measured no faster with it; see the README's Speed section), so by default it
runs only where a core is free for it (``core_to_spare``).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
_DONE = object()
# the thread count is per thread only under OpenMP (torch's native pool would be resized for all)
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


class _Failed:
    """An exception raised while producing, carried to the consumer to be raised there."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def core_to_spare(device: torch.device) -> bool:
    """Whether a decoding thread would have a CPU core to itself: on a GPU (the model runs there),
    or with more usable cores than torch's intra-op threads (the default ``--prefetch``)."""
    if device.type != "cpu":
        return True
    return usable_cores() > torch.get_num_threads()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The items of ``items`` in order, produced ahead in a daemon thread (``depth`` waiting at most)
    whose torch ops use one thread.

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
        if _OPENMP:  # per thread for OpenMP; torch also records it for threads started later: restored below
            torch.set_num_threads(1)
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # noqa: BLE001 (carried to the consumer and raised there)
            put(_Failed(error))
            return
        put(_DONE)

    threads = torch.get_num_threads()
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
        if _OPENMP:
            torch.set_num_threads(threads)
