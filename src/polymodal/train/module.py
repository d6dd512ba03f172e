"""The one Lightning module: it trains any model that has ``loss(batch) -> dict``.

It knows nothing about model families. The optimiser is AdamW with weight decay on matrices
only; the learning rate warms up linearly to its peak, then follows a cosine to zero over the rest
of the budget, which is a step count (``max_steps``: the same model on a quiet or a busy machine, only the time
varies), with an optional wall-clock cap (``max_minutes``: the schedule then follows whichever
budget is further spent, so a capped run still ends with a cooled-down model). The warm-up is a
share of the budget, so it scales with it: a 10-step run of a recipe written for 1,000 steps still
reaches the peak learning rate, at its first or second step.
Steps are optimizer steps: with ``trainer.accumulate`` batches a step, the micro-batches of one
step share its learning rate.

What else shapes training is applied from outside the model, by Lightning and its callbacks:
gradient clipping and accumulation (``trainer.gradient_clip``, ``trainer.accumulate``), the
weights' moving average (:mod:`polymodal.train.ema`), validation and snapshots (below). They
work the same in one process and in several (DDP): every decision that must be taken in step
by all processes is taken on a clock that all of them share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from polymodal.train.ema import averaged_weights


class TrainModule(L.LightningModule):
    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.98),
                 warmup: float = 0.05, max_steps: int | None = None, max_minutes: float | None = None,
                 validate: Callable[[nn.Module], dict[str, float]] | None = None):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        if not max_steps and not max_minutes:
            raise ValueError("a training budget is needed: trainer.max_steps (or a max_minutes cap)")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"trainer.warmup is a share of the budget in [0, 1), got {warmup}")
        self.warmup, self.max_steps, self.max_minutes = warmup, max_steps, max_minutes
        self.validate_fn = validate
        self.started: float | None = None
        self.elapsed_before = 0.0  # training seconds spent before a resume
        self.fraction = 0.0  # of the budget spent, as of the current batch (same in every process)
        self.minutes = 0.0  # of training, as of the current batch (same in every process)
        self.step_before = 0  # the optimizer step count when the current batch began
        self.last_loss: torch.Tensor | None = None  # of the last batch trained (for the run's summary)
        self.samples_seen = 0  # samples this process trained on in this run (resumes start again at 0)
        self.step_at_start = 0  # the optimizer step this run started from (not 0 after a resume)
        self.epoch_batches = 0  # batches of the current pass over the data

    def budget_fraction(self) -> float:
        """How much of the budget is spent: of the steps, or of the minutes when a clock cap is
        set and further spent (so a capped run still ends cooled down)."""
        fraction = self.global_step / self.max_steps if self.max_steps else 0.0
        if self.max_minutes:
            spent = self.elapsed_before + (time.perf_counter() - self.started if self.started else 0.0)
            fraction = max(fraction, spent / (self.max_minutes * 60))
        return min(1.0, fraction)

    def learning_rate(self) -> float:
        """Linear warm-up over the first ``warmup`` share of the budget, then a cosine from the
        peak to zero over the rest. With a step budget the warm-up counts steps: step ``g`` gets
        ``(g + 1) / (warmup * max_steps)`` of the peak, so a short budget warms up as fast as it
        must; the cosine starts where the warm-up ends, so the peak itself is always reached (a
        cosine over the whole budget would already have fallen to 91% of it by the end of a 19%
        warm-up)."""
        progress = (self.global_step + 1) / self.max_steps if self.max_steps else self.fraction
        warm = min(1.0, max(progress, self.fraction) / self.warmup) if self.warmup > 0 else 1.0
        decay = min(1.0, max(0.0, (self.fraction - self.warmup) / (1.0 - self.warmup)))
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * decay))

    def on_train_start(self) -> None:
        self.started = time.perf_counter()
        self.step_at_start = self.global_step

    def synced_clock(self) -> tuple[float, float]:
        """The budget fraction and the training minutes, the same in every process (the
        largest), so that all replicas use one learning rate, stop at the same step and
        validate at the same step."""
        clock = torch.tensor([self.budget_fraction(), self.training_minutes()], dtype=torch.float64,
                             device=self.device)
        if self.trainer.world_size > 1:
            clock = self.trainer.strategy.reduce(clock, reduce_op="max")
        return float(clock[0]), float(clock[1])

    def on_train_epoch_start(self) -> None:
        self.epoch_batches = 0

    def on_train_epoch_end(self) -> None:
        # a pass over the data that gave no batch (an empty stream) gives none the next time either:
        # stop instead of starting pass after empty pass until the budget's minutes run out (never,
        # for a step budget); ``polymodal.train.run`` then says why no step was taken
        if self.epoch_batches == 0:
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch, batch_idx):
        self.epoch_batches += 1
        self.fraction, self.minutes = self.synced_clock()
        self.step_before = self.global_step
        if self.fraction >= 1.0:
            self.trainer.should_stop = True
            return -1  # skips the rest of the epoch; should_stop ends the run
        for group in self.optimizers().param_groups:
            group["lr"] = self.learning_rate()

    def training_step(self, batch, batch_idx):
        out = self.model.loss(batch)
        size = len(batch["rows"]) if "rows" in batch else None
        self.last_loss = out["loss"].detach()
        self.samples_seen += size if size is not None else batch_size_of(batch)
        self.log_dict({f"train/{k}": v.float() for k, v in out.items()}, prog_bar=False, batch_size=size)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=size)
        self.log("train/lr", self.learning_rate(), batch_size=size)
        self.log("train/minutes", self.training_minutes(), batch_size=size)
        return out["loss"]

    def stepped(self) -> bool:
        """Whether the optimizer stepped on the batch just trained (not so on the first
        micro-batches of an accumulated step)."""
        return self.global_step > self.step_before

    def training_minutes(self) -> float:
        return (self.elapsed_before + (time.perf_counter() - self.started if self.started else 0.0)) / 60

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
        # the fused kernel: the same update in one pass over all parameters (on 2 CPU cores 3.1 ms a step
        # against 15.7 ms for the loop over tensors, 3.7M parameters in 200 tensors)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas, fused=fused or None)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """The batch on ``device``. On the CPU it is there already: Lightning's walk over every
        value of every row (the scene graphs and texts of ``rows``) cost about 30 ms a step."""
        if torch.device(device).type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["training_seconds"] = self.training_minutes() * 60

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.elapsed_before = float(checkpoint.get("training_seconds", 0.0))


def batch_size_of(batch) -> int:
    """The number of samples in a batch without ``rows``: the first dimension of its first tensor."""
    tensors = [v for v in (batch.values() if isinstance(batch, dict) else batch) if isinstance(v, torch.Tensor)]
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else 0


class PeriodicValidation(L.Callback):
    """Runs the module's validation every ``val_every_minutes`` of training and at the end.

    The time is the module's shared clock and the check comes only after an optimizer step, so
    with several processes all of them validate at the same step (see :func:`run_validation`)."""

    def __init__(self, val_every_minutes: float | None):
        self.val_every = val_every_minutes
        self.next_val = val_every_minutes

    def on_train_batch_end(self, trainer, module: TrainModule, outputs, batch, batch_idx):
        if self.val_every and module.validate_fn and module.stepped() and module.minutes >= self.next_val:
            self.next_val = module.minutes + self.val_every
            run_validation(trainer, module)

    def on_train_end(self, trainer, module: TrainModule):
        if module.validate_fn:
            run_validation(trainer, module)


def run_validation(trainer, module: TrainModule) -> None:
    """Scores the model (its averaged weights when an EMA is kept) and logs the metrics.

    Every process calls this; the first one computes (a validation metric such as retrieval
    recall is over the whole validation set, not a sum of shards) and the others wait for it at
    a barrier, so no process runs ahead into the next step's gradient exchange. A validation
    function therefore must not talk to the other processes (no gathered loss: score with
    ``embed``/``forward``, not with a contrastive ``loss``)."""
    if module.validate_fn is None:
        return
    if trainer.is_global_zero:
        was_training = module.model.training
        module.model.eval()
        with torch.no_grad(), averaged_weights(trainer):
            metrics = module.validate_fn(module.model)
        module.model.train(was_training)
        metrics = {f"val/{k}": float(v) for k, v in metrics.items()}
        metrics["train/minutes"] = module.training_minutes()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
    trainer.strategy.barrier("validation")


class Snapshots(L.Callback):
    """Saves the model (``save_pretrained``; its averaged weights when an EMA is kept) to
    ``folder/step-NNNNNN`` every ``every_minutes`` of training and/or every ``every_steps``
    optimizer steps, and at the end, so quality can be measured against training time, steps
    or FLOPs afterwards."""

    def __init__(self, folder, every_minutes: float | None, every_steps: int | None = None):
        self.folder, self.every, self.every_steps = folder, every_minutes, every_steps
        self.next = every_minutes
        self.saved_at = -1  # the step of the last snapshot (the end does not save it twice)

    def on_train_batch_end(self, trainer, module: TrainModule, outputs, batch, batch_idx):
        if not module.stepped():
            return
        due = bool(self.every) and module.minutes >= self.next
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            due = True
        if due:
            if self.every:
                self.next = module.minutes + self.every
            self.save(trainer, module)

    def on_train_end(self, trainer, module: TrainModule):
        if (self.every or self.every_steps) and self.saved_at != trainer.global_step:
            self.save(trainer, module)

    def save(self, trainer, module: TrainModule) -> None:
        self.saved_at = trainer.global_step
        if trainer.is_global_zero:
            with averaged_weights(trainer):
                module.model.save_pretrained(self.folder / f"step-{trainer.global_step:06d}")
