"""Progress of long commands, drawn on a terminal only.

``sync-now --wait``, ``replay``, ``dlq replay``, ``bench`` and the demo's seeding show live
counts (and the time left where the total is known) while they work. It is drawn with
``rich`` only when the output is a terminal: piped or redirected output, ``--json`` and the
logs (on stderr) never carry it. It is transient: once the work is done it is erased, and the
command's own report follows as before.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, Self, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def on_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False


class Meter:
    """Named counters shown together; does nothing unless ``out`` is a terminal and
    ``enabled``. Use as a context manager around the work."""

    def __init__(self, *, out: TextIO | None = None, enabled: bool = True) -> None:
        stream = out if out is not None else sys.stdout
        self.shown = enabled and on_terminal(stream)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description:<12}"), BarColumn(bar_width=24),
            MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(),
            console=Console(file=stream), transient=True, disable=not self.shown)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.refresh()  # the last counts are drawn once, however quick the work
        self._progress.stop()

    def update(self, name: str, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, detail: str | None = None) -> None:
        """Set counter ``name`` (created on first use; ``total`` None: not known yet)."""
        if not self.shown:
            return
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total, detail="")
        fields: dict[str, Any] = {}
        if detail is not None:
            fields["detail"] = detail
        self._progress.update(self._tasks[name], completed=completed, total=total,
                              advance=advance, **fields)

    def say(self, text: str) -> None:
        """A line above the counters (on a terminal; nothing otherwise)."""
        if self.shown:
            self._progress.console.print(text, highlight=False, markup=False)
