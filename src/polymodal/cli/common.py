"""What the ``polymodal`` commands share."""

from __future__ import annotations

import typer
from rich.markup import escape

from polymodal.progress import console


def fail(error: Exception) -> typer.Exit:
    """The exit of a command given bad input: the error printed in red, exit status 2."""
    console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
    return typer.Exit(2)


def guidance_options(cfg: float, interval: str | None, outside: float) -> dict:
    """``--cfg-interval`` and ``--cfg-outside`` as keyword arguments of a drawing model's
    ``generate``, checked: a ``ValueError`` names what is wrong."""
    from polymodal.nn.diffusion import Guidance

    schedule = Guidance.of(cfg, interval, outside)
    return {"guidance_interval": schedule.interval, "guidance_outside": schedule.outside}
