"""What a training run tells the person running it: a bar of the budget spent, a summary at the
end, and nothing else that they cannot act on.

- :class:`BudgetProgress` shows ``step 120/1000`` (or minutes of a wall-clock cap) and the last
  loss. Lightning's own bar counts epochs, and a run whose budget is steps has no last epoch: it
  read ``Epoch 4/-2``.
- :func:`summary` is the end of a run in a few lines: steps of the budget, minutes, samples a
  second, the last training loss, the best and last validation scores, and the files written
  (only those that were).
- :func:`check_one_step` turns a run that could not take a single step (a split smaller than a
  batch, an empty or wholly skipped split) into an error naming the batch and the split sizes,
  before training starts.

What Lightning itself prints is kept down by :mod:`polymodal.train.quiet`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console

from polymodal.data.dataset import DecodeOptions
from polymodal.data.describe import split_counts, splits_text
from polymodal.data.source import SkipLog
from polymodal.errors import InputError
from polymodal.progress import budget_bar, budget_description
from polymodal.train.curves import read_metrics
from polymodal.train.recipe import Recipe

log = logging.getLogger("polymodal.train")


class BudgetProgress(ProgressBar):
    """A bar of the training budget spent: ``step 120/1000`` (with ``3.1/5 min`` under a
    wall-clock cap), the last loss, time spent and left. Shown by the first process only; redrawn
    at most every ``every_seconds`` (reading the loss waits for the device)."""

    def __init__(self, console: Console | None = None, every_seconds: float = 0.25):
        super().__init__()
        self.console = console
        self.every_seconds = every_seconds
        self.enabled = True
        self.bar = None
        self.task = None
        self.shown_at = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args, **kwargs) -> None:
        (self.bar.console.print if self.bar is not None else print)(*args, **kwargs)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self.bar = budget_bar(self.console)
        self.bar.start()
        self.task = self.bar.add_task(self.describe(trainer, module), total=1.0, loss="")
        self.show(trainer, module, force=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.show(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.show(trainer, module, force=True)
        self.stop()

    def on_exception(self, trainer, module, exception) -> None:
        self.stop()

    def teardown(self, trainer, module, stage) -> None:
        self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def show(self, trainer, module, force: bool = False) -> None:
        now = time.perf_counter()
        if self.bar is None or not (force or now - self.shown_at >= self.every_seconds):
            return
        self.shown_at = now
        loss = getattr(module, "last_loss", None)
        self.bar.update(self.task, description=self.describe(trainer, module), completed=self.spent(trainer, module),
                        loss=f"loss {float(loss):.4g}" if loss is not None else "")

    @staticmethod
    def describe(trainer, module) -> str:
        minutes = module.training_minutes() if hasattr(module, "training_minutes") else 0.0
        return budget_description(trainer.global_step, getattr(module, "max_steps", trainer.max_steps),
                                  minutes, getattr(module, "max_minutes", None))

    @staticmethod
    def spent(trainer, module) -> float:
        if hasattr(module, "budget_fraction"):
            return module.budget_fraction()
        return trainer.global_step / trainer.max_steps if trainer.max_steps > 0 else 0.0


# ---- the end of a run -------------------------------------------------------------------------

LOWER_IS_BETTER = ("loss", "mse", "error", "distance", "perplexity", "fid", "substitution", "deletion",
                   "insertion")  # in a metric's name (the last three: a recogniser's kinds of word error)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (losses and errors; scores are higher)."""
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


@dataclass
class RunSummary:
    steps: int  # optimizer steps done, in all (a resumed run counts its earlier steps)
    max_steps: int | None
    minutes: float  # of training, in all
    max_minutes: float | None
    run_steps: int  # steps of this run (since a resume)
    run_seconds: float
    samples: int  # samples trained on in this run, all processes together
    last_loss: float | None
    validation: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # metric: (best, last, step)
    model: Path | None = None
    curves: Path | None = None

    def lines(self) -> list[str]:
        rate = f", {self.samples / self.run_seconds:,.0f} samples/s" if self.run_seconds > 0 and self.samples else ""
        budget = budget_description(self.steps, self.max_steps, self.minutes, self.max_minutes)
        resumed = f" ({self.run_steps} in this run)" if self.run_steps != self.steps else ""
        spent = f"{self.minutes:.1f} min" if self.minutes >= 1 else f"{self.minutes * 60:.0f} s"
        lines = [f"training done: {budget}{resumed}, {spent} of training{rate}"]
        if self.last_loss is not None:
            lines.append(f"final training loss {self.last_loss:.4g}")
        if self.validation:
            scores = "; ".join(f"{name} {best:.3f} / {last:.3f}" for name, (best, last, _) in self.validation.items())
            lines.append(f"validation (best / last at step {max(s for _, _, s in self.validation.values()):.0f}): "
                         f"{scores}")
        lines.append(f"model: {self.model}" if self.model else "model: not saved")
        lines.append(f"curves: {self.curves}" if self.curves else "curves: none (nothing was logged to draw)")
        return lines


def validation_scores(csv_dir: Path) -> dict[str, tuple[float, float, float]]:
    """``{metric: (best, last, step of last)}`` of the validation metrics in the CSV log."""
    scores = {}
    for name, points in read_metrics(csv_dir).items():
        if not name.startswith("val/") or not points:
            continue
        values = [v for _, v in points]
        best = min(values) if lower_is_better(name) else max(values)
        scores[name.removeprefix("val/")] = (best, points[-1][1], points[-1][0])
    return scores


def summary(trainer: L.Trainer, module, out: Path, model: Path | None, curves: Path | None) -> RunSummary:
    """The run just ended, from its trainer and module and the logs in ``out``."""
    run_seconds = max(0.0, module.training_minutes() * 60 - module.elapsed_before)
    loss = module.last_loss
    first_step = int(round(module.step_at_start)) if hasattr(module, "step_at_start") else 0
    return RunSummary(
        steps=trainer.global_step, max_steps=module.max_steps, minutes=module.training_minutes(),
        max_minutes=module.max_minutes, run_steps=trainer.global_step - first_step, run_seconds=run_seconds,
        samples=module.samples_seen * trainer.world_size, last_loss=float(loss) if loss is not None else None,
        validation=validation_scores(out / "logs" / "csv"), model=model, curves=curves,
    )


# ---- a run that cannot take one step ----------------------------------------------------------


def check_one_step(location: str | os.PathLike, recipe: Recipe, samples: int | None, skips: SkipLog,
                   options: DecodeOptions | None = None) -> None:
    """Raise :class:`InputError` when the training split of ``samples`` usable samples (None:
    streamed, and known to have given no batch) cannot fill one batch of each process: a run
    that cannot take a step is an error naming the batch and the split sizes, not a saved
    untrained model. In memory, the last incomplete batch of an epoch is dropped, so each
    process needs ``data.batch_size / devices`` samples of its share of the split."""
    d, devices = recipe.data, recipe.trainer.devices
    per_process = max(1, d.batch_size // devices)
    if samples is not None and samples > 0 and math.ceil(samples / devices) >= per_process:
        return
    counts = split_counts(location, options)
    present = f"splits present: {splits_text(counts)}"
    rows = counts.get(d.train_split, 0)
    if not rows:
        raise InputError(location, f"the training split {d.train_split!r} is empty; {present} "
                                   f"(data.train_split names the one to train on)")
    if not samples:
        raise InputError(location, f"no training step can be taken: all {rows:,} rows of the training split "
                                   f"{d.train_split!r} were skipped ({skips.summary()}); {present}")
    shared = (f", {math.ceil(samples / devices):,} for each of {devices} processes (batches of {per_process})"
              if devices > 1 else "")
    raise InputError(location, f"no training step can be taken: the training split {d.train_split!r} has "
                               f"{samples:,} usable samples{shared}, fewer than one batch of {d.batch_size:,} "
                               f"(data.batch_size); set data.batch_size={samples} or lower, or add data; {present}")
