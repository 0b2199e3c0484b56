"""Progress on stderr: a rich bar with images per second, started by the run when it knows the total;
for a sweep, a second bar counts models and estimates the time left."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console

Advance = Callable[[int], None]
ProgressStart = Callable[[int, int], Advance]


class ConsoleProgress:
    """``progress(total, done)`` -> per-batch callback; ``close()`` ends the bar (idempotent).

    The bar starts only when the run calls it, so nothing is drawn for runs that fail early.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )

    def __call__(self, total: int, done: int) -> Advance:
        self.bar.start()
        task = self.bar.add_task("measuring", total=total, completed=done, rate="- img/s")

        def advance(images: int) -> None:
            self.bar.advance(task, images)
            speed = self.task(task).speed
            self.bar.update(task, rate=f"{speed:.1f} img/s" if speed else "- img/s")

        return advance

    def task(self, task_id: int) -> Any:
        """A task by id (``bar.tasks`` is a list, whose positions shift once a task is removed)."""
        return next(task for task in self.bar.tasks if task.id == task_id)

    def close(self) -> None:
        self.bar.stop()

    def __enter__(self) -> "ConsoleProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SweepProgress(ConsoleProgress):
    """Two bars: the sweep's models, with the time left (mean time per finished model times the
    models left), and the current model's images (replaced when the next model starts)."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console)
        self.models: int | None = None
        self.images: int | None = None
        self.started = time.monotonic()

    def start(self, models: int) -> None:
        """The sweep knows how many models it will measure."""
        self.bar.start()
        self.started = time.monotonic()
        self.models = self.bar.add_task("models", total=models, rate="")

    def model(self, name: str) -> None:
        """A model starts: name it on the models bar."""
        if self.models is not None:
            self.bar.update(self.models, description=f"models: {name}")

    def model_done(self) -> None:
        """A model finished (measured or failed): advance, and show the estimate of the time left."""
        if self.models is None:
            return
        self.bar.advance(self.models)
        task = self.task(self.models)
        left = time_left(time.monotonic() - self.started, int(task.completed), int(task.total or 0))
        self.bar.update(self.models, rate=f"about {left} left" if left else "")

    def __call__(self, total: int, done: int) -> Advance:
        if self.images is not None:
            self.bar.remove_task(self.images)
        advance = super().__call__(total, done)
        self.images = self.bar.task_ids[-1]
        return advance


def time_left(elapsed: float, finished: int, total: int) -> str:
    """'3 min 20 s': the mean time per finished model times the models left ('' before the first
    model or under a second)."""
    seconds = round(elapsed / finished * max(total - finished, 0)) if finished > 0 else 0
    if seconds < 1:
        return ""
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
