"""The background prefetch hands over every item in order, at most ``depth`` ahead, and stops with its consumer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from transinv.engine.prefetch import core_to_spare, prefetched, usable_cores


def test_items_arrive_in_order_and_complete() -> None:
    assert list(prefetched(range(50), depth=2)) == list(range(50))


def test_producer_runs_at_most_depth_ahead() -> None:
    made: list[int] = []

    def produce():
        for i in range(20):
            made.append(i)
            yield i

    items = prefetched(produce(), depth=2)
    assert next(items) == 0
    time.sleep(0.3)  # ample time for the producer to run ahead if it could
    # one handed over, two waiting in the queue, one blocked in put: never more
    assert len(made) <= 4
    items.close()


def test_producer_error_is_raised_in_consumer_at_its_place() -> None:
    def produce():
        yield 1
        raise OSError("bad file")

    items = prefetched(produce())
    assert next(items) == 1
    with pytest.raises(OSError, match="bad file"):
        next(items)


def test_closing_early_stops_the_thread() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    items = prefetched(endless())
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    time.sleep(0.3)
    assert not any(t.name == "transinv-prefetch" for t in threading.enumerate())


def test_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        list(prefetched([1], depth=0))


def test_producer_uses_one_torch_thread_and_the_consumer_keeps_its_own() -> None:
    """The producer's ops get one intra-op thread (no second OpenMP team beside the model's); the
    consuming thread keeps its count during the run, and the process's setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def produce():
            for i in range(3):
                seen.append(torch.get_num_threads())
                yield i

        during = [torch.get_num_threads() for _ in prefetched(produce())]
        assert seen == [1, 1, 1]
        assert during == [2, 2, 2]
        assert torch.get_num_threads() == 2
        # a thread started after the run gets the process's count again, not the producer's
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(before)


def test_prefetch_by_default_only_where_a_core_is_free() -> None:
    """The default ``--prefetch``: on a GPU always; on the CPU only with more usable cores than
    torch's threads (a decoding thread on a busy core slows the model's threads more than it saves)."""
    before = torch.get_num_threads()
    cores = usable_cores()
    try:
        torch.set_num_threads(cores)
        assert not core_to_spare(torch.device("cpu"))
        assert core_to_spare(torch.device("cuda"))
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert core_to_spare(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
