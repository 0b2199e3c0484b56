"""Progress on stderr: a rich bar with images per second, started by the run when it knows the total."""

from __future__ import annotations

from typing import Callable

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
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )

    def __call__(self, total: int, done: int) -> Advance:
        self.bar.start()
        task = self.bar.add_task("measuring", total=total, completed=done, rate="-")

        def advance(images: int) -> None:
            self.bar.advance(task, images)
            speed = self.bar.tasks[task].speed
            self.bar.update(task, rate=f"{speed:.1f}" if speed else "-")

        return advance

    def close(self) -> None:
        self.bar.stop()

    def __enter__(self) -> "ConsoleProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
