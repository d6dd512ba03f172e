"""Progress bars for long jobs (rich), shared by the CLI, the demo and training.

Training shows how much of its *budget* is spent — ``step 120/1000``, or minutes of a wall-clock
cap — never epochs: a run's budget is steps (the data is repeated as often as the steps need), so
an epoch count has no end to show.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """Yields ``update(done)``: call it with the number of items finished so far."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def budget_description(step: int, max_steps: int | None, minutes: float = 0.0,
                       max_minutes: float | None = None) -> str:
    """Where a run stands against its budget: ``step 120/1000``, with ``3.1/5.0 min`` when a
    wall-clock cap is set (``step 120 · 3.1/5.0 min`` when the cap is the only budget)."""
    text = f"step {step}/{max_steps}" if max_steps else f"step {step}"
    if max_minutes:
        text += f" · {minutes:.1f}/{max_minutes:g} min"
    return text


def budget_bar(target: Console | None = None) -> Progress:
    """A (not yet started) bar for a training budget: its task's ``total`` is 1.0 and
    ``completed`` the share of the budget spent; the description says it in steps or minutes
    (:func:`budget_description`) and the field ``loss`` holds the last training loss."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=target or console, transient=False,
    )
