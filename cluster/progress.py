"""Progress bars for the generate stages on a terminal: one `rich` bar per model while its engines
run (rows done/total, rows/s, tokens/s, elapsed, ETA), removed when the model finishes, whose
closing line then stays on the console. Off a terminal (CI, `nohup`, a Ray job, a notebook) the
stages print one line per model every `generate.progress_interval_s` instead.

The stage code reports each row to `lossaverse.pipeline.generation.shards.PROGRESS`; `bars`
sets it for the duration of a command."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lossaverse.pipeline.generation.shards import PROGRESS, Tally


class Bars:
    """The PROGRESS hook: a bar per model, started with its engines and removed at its end."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("generate {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __call__(self, name: str, tally: Tally) -> None:
        if name not in self.tasks:
            if tally.end is not None:
                return
            if not self.tasks:
                self.progress.start()
            self.tasks[name] = self.progress.add_task("", total=tally.total, name=name, rate=tally.waiting())
        task = self.tasks[name]
        if tally.end is not None:
            self.progress.remove_task(task)
            del self.tasks[name]
            if not self.tasks:
                self.progress.stop()
            return
        rate = tally.waiting()
        if tally.first is not None and (running := time.perf_counter() - tally.first) > 0 and len(tally.batches) >= 2:
            rate = f"{tally.done / running:,.1f} rows/s, {tally.tokens / running:,.0f} tokens/s"
        elif tally.first is not None:
            rate = f"first answers after {tally.first - tally.start:.0f}s"
        self.progress.update(task, completed=tally.done, rate=rate)

    def close(self) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()
        self.progress.stop()


@contextmanager
def bars(console: Console, on: bool) -> Iterator[Bars | None]:
    """Progress bars on `console` for the duration, where `on` (a terminal, not --verbose)."""
    if not on:
        yield None
        return
    hook = Bars(console)
    token = PROGRESS.set(hook)
    try:
        yield hook
    finally:
        PROGRESS.reset(token)
        hook.close()
