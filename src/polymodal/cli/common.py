"""What the ``polymodal`` commands share."""

from __future__ import annotations

import typer
from rich.markup import escape

from polymodal.progress import console


def fail(error: Exception) -> typer.Exit:
    """The exit of a command given bad input: the error printed in red, exit status 2."""
    console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
    return typer.Exit(2)


def check_drawing_options(best_of: int | None, interval: str | None, steps: int | None) -> None:
    """The drawing options a person gave, checked before a model loads (the rest are checked
    against the model's own settings: :func:`~polymodal.models.family.drawing_settings`); a
    ``ValueError`` names what is wrong."""
    from polymodal.models.family import check_best_of
    from polymodal.nn.diffusion import check_guidance_interval

    if best_of is not None:
        check_best_of(None, best_of)
    check_guidance_interval(interval)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")


def drawn_with(settings: dict) -> str:
    """Drawing settings (as :func:`~polymodal.models.family.drawing_settings` gives them) in a
    few words: ``cfg 4 at t 0-400, 1.5 elsewhere, best of 8, 50 steps``."""
    interval = settings["guidance_interval"]
    words = f"cfg {settings['guidance']:g}"
    if interval:
        words += f" at t {interval[0]}-{interval[1]}, {settings['guidance_outside']:g} elsewhere"
    if settings.get("best_of", 1) > 1:
        words += f", best of {settings['best_of']}"
    return words + f", {settings['steps']} steps"
