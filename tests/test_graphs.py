"""CUDA-graph bookkeeping (``PassGraphs``), checked on the CPU.

A captured graph is stood in for by one whose replay runs the pass again and writes its tensors
into the captured result, as a real replay overwrites them in place; what is checked is
everything around it: which pass is run eager, captured or replayed, the staged canvases, the
values written after a replay, the reference maps later passes read, and the eager fallback.
The real capture is checked on a GPU by ``benchmarks/cuda_check.py``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable

import torch

from transinv.api import prepare_jobs
from transinv.engine.distributed import Context
from transinv.engine.graphs import PassGraphs, PassResult
from transinv.engine.runner import RunState, make_loader, run_batches
from transinv.examples import strided_circular
from transinv.options import MeasureOptions
from transinv.plan import make_plan


class _ReplayedGraph:
    """A captured pass on the CPU: ``replay`` runs it again into the captured result's tensors."""

    def __init__(self, run: Callable[[], PassResult], result: PassResult) -> None:
        self.run, self.result, self.replays = run, result, 0

    def replay(self) -> None:
        self.replays += 1
        fresh = self.run()
        self.result.output.copy_(fresh.output)
        if self.result.values is not None:
            self.result.values.copy_(fresh.values)
        for name, kept in self.result.references.items():
            for field in fields(kept):
                tensor = getattr(kept, field.name)
                if isinstance(tensor, torch.Tensor):
                    tensor.copy_(getattr(fresh.references[name], field.name))


class _CPUGraphs(PassGraphs):
    """``PassGraphs`` with the stand-in capture (``refuse``: every capture fails, as a model that
    reads a value back to the host makes it fail)."""

    def __init__(self, warn: Callable[[str], None], refuse: bool = False) -> None:
        super().__init__(warn)
        self.refuse, self.captured = refuse, []

    def capture(self, run: Callable[[], PassResult]) -> tuple[_ReplayedGraph, PassResult]:
        if self.refuse:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        graph = _ReplayedGraph(run, run())
        self.captured.append(graph)
        return graph, graph.result


def _rows(graphs: Callable[[], PassGraphs] | None) -> list[dict]:
    """A run on 9 of the built-in images: 4 full batches of 2 (eager, captured, replayed twice) and
    a last one of 1."""
    options = MeasureOptions(weights="none", num_images=9, batch_size=2, size=32, resize=48, shift="0..3",
                             layers="all").validate()
    torch.manual_seed(3)
    plan = make_plan([strided_circular()], options, Context())
    measured = prepare_jobs(plan, options, torch.device("cpu"), lambda _: None)[0][0]
    if graphs is not None:
        measured.measurement.graphs = graphs()
    group = plan.groups[0]
    loader = make_loader(plan.items, group.shifts.decoding(group.preprocess), group.shifts.canvas, 2, 0, plan.ids)
    run_batches([measured.measurement], [measured.state], iter(loader), RunState())
    return measured.state.rows()


def test_replayed_passes_give_the_eager_numbers() -> None:
    """Full batches replay their passes (the reference, then one shift a pass; whole and fractional
    feature shifts), the last batch of one image runs eager with two shifts a pass: every row equals
    the eager run's, bit for bit."""
    made: list[_CPUGraphs] = []

    def graphs() -> _CPUGraphs:
        made.append(_CPUGraphs(lambda _: None))
        return made[-1]

    eager = _rows(None)
    replayed = _rows(graphs)
    assert replayed == eager
    (used,) = made
    assert len(used.captured) == 4  # the reference pass and the passes of shifts 1, 2, 3, captured once each
    assert [graph.replays for graph in used.captured] == [3] * 4  # at capture, then in batches 3 and 4


def test_a_refused_capture_falls_back_to_eager_passes_with_one_note() -> None:
    notes: list[str] = []
    assert _rows(lambda: _CPUGraphs(notes.append, refuse=True)) == _rows(None)
    assert notes == ["CUDA graphs off for this model (operation not permitted when stream is capturing); measuring "
                     "with eager passes (--no-cuda-graphs skips the attempt)"]
