"""The main job: every step of polymodal on the built-in shapes world, listed in one place.

Each step takes the demo's state (a dict of what earlier steps made) and returns what it made,
as ``{label: path or value}``; the summary at the end lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from polymodal.progress import console, progress_bar


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[dict], dict]


def make_world(state: dict) -> dict:
    from polymodal.data.shapes import WorldConfig, generate_world

    world = state["out"] / "shapes"
    with progress_bar("shapes world", state["n"]) as update:
        generate_world(world, WorldConfig(n=state["n"], seed=0), progress=update)
    state["world"] = world
    return {"data set": world}


def inspect_world(state: dict) -> dict:
    from polymodal.cli import print_inspection
    from polymodal.data.inspect import inspect_dataset

    with progress_bar("inspecting", state["n"]) as update:
        report = inspect_dataset(state["world"], sheet=state["out"] / "contact_sheet.png", progress=update)
    print_inspection(report)
    return {"contact sheet": report.sheet, "bad samples": len(report.bad)}


STEPS: list[Step] = [
    Step("world", "Generate the shapes world (images, captions, speech, QA, videos)", make_world),
    Step("inspect", "Inspect it and draw a contact sheet", inspect_world),
]


def run_demo(out: Path, n: int = 2000, steps: list[Step] = STEPS) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"out": out, "n": n}
    made: list[tuple[str, str, object]] = []
    start = time.perf_counter()
    for number, step in enumerate(steps, 1):
        console.rule(f"[bold]{number}/{len(steps)} {step.title}")
        t = time.perf_counter()
        for label, value in step.run(state).items():
            made.append((step.name, label, value))
        console.print(f"[green]done[/green] in {time.perf_counter() - t:.1f} s")
    table = Table(title=f"polymodal demo: finished in {time.perf_counter() - start:.0f} s")
    table.add_column("step")
    table.add_column("made")
    table.add_column("where / value")
    for name, label, value in made:
        table.add_row(name, label, str(value))
    console.print(table)
    return state
