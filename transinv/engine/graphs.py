"""Forward passes replayed as CUDA graphs: a pass of a full image batch (the model, the hooks'
comparisons of every measured layer, their values gathered into one tensor) is captured once and
then launched as one graph, so a GPU run is not bound by the hundreds of small kernel launches that
Python makes per pass.

A pass is captured the second time it is met (the first, eager, run makes what a capture cannot:
the comparison geometry copied to the device, lazy initialisation, cuDNN's choices) and replayed
from the third on. Replays run the same kernels on the same shapes, so the numbers are those of
the eager passes. A capture that fails (a model that reads a value back to the host, say) turns
graphs off for the rest of the run, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from . import metrics as M


@dataclass(frozen=True)
class PassResult:
    """What one forward pass leaves: the model's outputs, the measured layers' values (one row per
    key, None when no layer was compared) and the reference maps the comparisons read."""

    output: torch.Tensor
    keys: tuple[M.Key, ...]
    values: torch.Tensor | None
    references: dict[str, M.Reference]


class PassGraphs:
    """The captured passes of one measurement, by key (the canvases' shape and the pass's shifts),
    sharing one memory pool; ``stage`` keeps the canvases every graph reads at a fixed address."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.enabled = True
        self.pool: tuple[int, int] | None = None  # made at the first capture
        self.seen: set[Hashable] = set()
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, PassResult]] = {}
        self.inputs: dict[tuple[int, ...], torch.Tensor] = {}

    def stage(self, canvases: torch.Tensor) -> torch.Tensor:
        """The batch's canvases where the graphs read them: the first batch of a shape is kept as
        that place, later ones are copied into it."""
        if not self.enabled:
            return canvases
        place = self.inputs.setdefault(tuple(canvases.shape), canvases)
        if place is not canvases:
            place.copy_(canvases)
        return place

    def run(self, key: Hashable, run: Callable[[], PassResult]) -> PassResult:
        """``run()``'s result: eager the first time ``key`` is met, captured and replayed the
        second, replayed after (the result's tensors are then overwritten in place)."""
        if not self.enabled:
            return run()
        captured = self.graphs.get(key)
        if captured is not None:
            graph, result = captured
            graph.replay()
            return result
        if key not in self.seen:
            self.seen.add(key)
            return run()
        try:
            graph, result = self.capture(run)
        except Exception as error:  # noqa: BLE001 - any refusal of the capture falls back to eager passes
            self.enabled = False
            self.graphs.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.warn(f"CUDA graphs off for this model ({first_line[:160]}); measuring with eager passes "
                      "(--no-cuda-graphs skips the attempt)")
            return run()
        self.graphs[key] = (graph, result)
        graph.replay()
        return result

    def capture(self, run: Callable[[], PassResult]) -> tuple[torch.cuda.CUDAGraph, PassResult]:
        """``run()`` captured (not run): the graph, and the result its replays write into."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            result = run()
        return graph, result
