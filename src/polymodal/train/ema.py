"""An exponential moving average (EMA) of the weights, kept by the trainer rather than the model.

The model being trained never knows: the callback keeps a shadow copy of every trainable
parameter, moves it towards the trained weights after each optimizer step (not each
micro-batch when gradients are accumulated), and saves it in, and restores it from, the
Lightning checkpoint, so a resumed run averages on as if it had never stopped. Whatever is
saved as a model (the final ``model/`` folder, snapshots) or validated during training is the
average: :func:`averaged_weights` swaps it into the model and back out again afterwards.

Why an average: a diffusion denoiser sampled with averaged weights draws cleaner images than
the last noisy step's weights (the text-to-image recipes set ``trainer.ema_decay: 0.999``).

Buffers (batch-norm statistics) are not averaged: the averaged model uses the live ones.
Parameters that do not train (frozen towers) are not copied at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import lightning as L
import torch


class EMA(L.Callback):
    """``shadow = decay * shadow + (1 - decay) * weights`` after each optimizer step, with the
    decay warmed up as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n`` (an
    average of the first few steps would otherwise remember the random initialisation)."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None  # parameter name -> its average
        self.updates = 0  # optimizer steps averaged so far
        self._step_before = -1  # the trainer's step when the current batch began

    def trainable(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, module) -> None:
        live = self.trainable(module)
        if self.shadow is None:  # a fresh run (a resumed one has loaded its shadow already)
            self.shadow = {name: p.detach().clone() for name, p in live.items()}
        if set(self.shadow) != set(live):
            raise ValueError("the checkpoint's weight average does not fit the model: "
                             f"{sorted(set(self.shadow) ^ set(live))[:5]} differ")
        self.shadow = {name: s.to(live[name].device) for name, s in self.shadow.items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._step_before:  # the optimizer stepped on this batch
            self.update(module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.trainable(module).items():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """The averaged weights in ``module`` for the duration of the block; the trained ones
        after it (training goes on from them)."""
        live = self.trainable(module)
        with torch.no_grad():
            kept = {name: p.detach().clone() for name, p in live.items()}
            for name, p in live.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in live.items():
                    p.copy_(kept[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.shadow = int(state["updates"]), state["shadow"]


def averaged_weights(trainer: L.Trainer):
    """A context in which the trainer's module holds the averaged weights (a no-op without an
    :class:`EMA` callback): ``with averaged_weights(trainer): model.save_pretrained(...)``."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    if ema is None or ema.shadow is None:
        return nullcontext()
    return ema.swapped_in(trainer.lightning_module)
