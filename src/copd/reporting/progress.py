"""Progress display for long work: a rich bar with cycle, phase, branch, reward, overlap, ETA."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """What the driver tells the user; the quiet reporter (tests, --quiet) says nothing."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, description: str, info: str = "") -> None: ...

    def stop(self) -> None: ...

    def print(self, message: str) -> None: ...


class QuietReporter(Reporter):
    pass


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.stop()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def advance(self, description: str, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description, info=info)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)


def default_reporter(quiet: bool = False) -> Reporter:
    return QuietReporter() if quiet or "pytest" in sys.modules else RichReporter()
