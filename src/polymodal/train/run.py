"""``polymodal train``: a recipe, a data set and an output folder in; a trained model out.

The output folder holds ``model/`` (``from_pretrained``-ready), ``checkpoints/`` (Lightning,
written atomically; ``--resume`` continues from ``last.ckpt``), ``logs/`` (TensorBoard and
CSV), ``curves.png`` and ``recipe.yaml`` (the settings actually used).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
import yaml

from polymodal.data.dataset import Collator, DecodeOptions, MultimodalDataset
from polymodal.data.memory import LengthBucketBatchSampler, MemoryDataset, item_length
from polymodal.data.source import SkipLog
from polymodal.modalities.image import ImageTransform
from polymodal.models import BuildContext, build_model
from polymodal.train.recipe import Recipe, TrainerSettings

log = logging.getLogger("polymodal.train")


def build_context(recipe: Recipe, data: Path) -> BuildContext:
    """What a model family may read from the recipe's data when it builds its model."""
    d = recipe.data
    return BuildContext(data=data, train_split=d.train_split, fields=d.fields, image_size=d.image_size,
                        vocab_size=recipe.trainer.vocab_size)


def augmented(train_set, recipe: Recipe, model):
    """The training set wrapped in the recipe's augmentation."""
    from polymodal.data.augment import FreshCaptions, QuestionPairs
    from polymodal.data.dataset import parse_fields

    if recipe.data.augment not in ("question_pairs", "fresh_captions"):
        raise ValueError(f"unknown augmentation {recipe.data.augment!r}; known: question_pairs, fresh_captions")
    if not recipe.data.in_memory:
        raise ValueError(f"augment: {recipe.data.augment} needs data.in_memory: true")
    if recipe.data.augment == "fresh_captions":
        return FreshCaptions(train_set.items, caption_column=getattr(model.config, "caption_column", "text"),
                             seed=recipe.trainer.seed)
    fields = {f.modality: f for f in parse_fields(recipe.data.fields)}
    if "audio" not in fields:
        raise ValueError("augment: question_pairs needs an audio (spoken question) field")
    return QuestionPairs(train_set.items, fields["audio"].name,
                         question_column=fields["audio"].column, label_column=model.config.label_column,
                         seed=recipe.trainer.seed)


def default_threads(devices: int) -> int:
    """Torch threads per process: the cores shared out over the processes, and no more than
    ``OMP_NUM_THREADS`` when the environment sets it (several busy threads on too few cores spin
    and wait on each other)."""
    threads = max(1, (os.cpu_count() or 1) // devices)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(env)) if env.isdigit() and int(env) > 0 else threads


def atomic_checkpoint_io():
    """Lightning checkpoint I/O that writes to a temporary file and renames it into place."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            os.close(fd)
            try:
                torch.save(checkpoint, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    return AtomicCheckpointIO()


def build_trainer(t: TrainerSettings, out: Path, *, progress: bool = True, use_distributed_sampler: bool = True):
    """The Lightning trainer of the settings ``t``, writing under ``out``: processes,
    precision, the step budget, gradient clipping and accumulation, and the callbacks that
    work on the model from outside (weight average, validation, snapshots, checkpoints)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from polymodal.train.ema import EMA
    from polymodal.train.module import PeriodicValidation, Snapshots

    if t.accumulate < 1:
        raise ValueError(f"trainer.accumulate must be at least 1, got {t.accumulate}")
    if t.gradient_clip is not None and t.gradient_clip <= 0:
        raise ValueError(f"trainer.gradient_clip must be positive (or null: off), got {t.gradient_clip}")
    callbacks = [EMA(t.ema_decay)] if t.ema_decay else []  # first: the others save and score the average
    callbacks += [PeriodicValidation(t.val_every_minutes), Snapshots(out / "snapshots", t.snapshot_every_minutes),
                  ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=200)]
    # batch-norm statistics over the global batch, as in one process (gloo on CPUs cannot)
    sync_batchnorm = t.devices > 1 and t.accelerator != "cpu" and torch.cuda.is_available()
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy="ddp" if t.devices > 1 else "auto",
        precision=t.precision, max_epochs=-1, max_steps=t.max_steps or -1,
        gradient_clip_val=t.gradient_clip, gradient_clip_algorithm="norm", accumulate_grad_batches=t.accumulate,
        sync_batchnorm=sync_batchnorm,
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        callbacks=callbacks, plugins=[atomic_checkpoint_io()],
        enable_progress_bar=progress, log_every_n_steps=t.log_every_steps, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=use_distributed_sampler,
    )


def train(recipe: Recipe, data: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
          progress: bool = True) -> Path | None:
    """Train ``recipe`` on ``data`` into ``out``; returns the model folder (None in every
    process but the first when several train together)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from polymodal.train.ema import averaged_weights
    from polymodal.train.module import TrainModule

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = recipe.trainer
    devices = t.devices
    torch.set_num_threads(t.threads or default_threads(devices))
    L.seed_everything(t.seed, workers=True, verbose=False)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model = build_model(recipe.model, build_context(recipe, data))
    options = DecodeOptions(image_transform=ImageTransform(recipe.data.image_size))
    skips = SkipLog()
    fields = recipe.data.fields
    if recipe.data.in_memory:
        train_set = MemoryDataset(data, fields, split=recipe.data.train_split, options=options, skips=skips)
    else:
        train_set = MultimodalDataset(data, fields, split=recipe.data.train_split, options=options, skips=skips)
    log.info("training data: %s; %s", len(train_set) if recipe.data.in_memory else "streamed", skips.summary())
    if recipe.data.augment:
        train_set = augmented(train_set, recipe, model)
    per_process = max(1, recipe.data.batch_size // devices)
    common = dict(num_workers=recipe.data.num_workers, collate_fn=Collator(fields),
                  persistent_workers=recipe.data.num_workers > 0)
    bucketed = recipe.data.in_memory and recipe.data.bucket_by_length and devices == 1
    if bucketed:  # variable-length audio: batches of similar length waste less on padding
        items = train_set.items  # an augmented set keeps the lengths of its items
        sampler = LengthBucketBatchSampler([item_length(x) for x in items], per_process, seed=t.seed)
        loader = DataLoader(train_set, batch_sampler=sampler, **common)
    else:
        loader = DataLoader(train_set, batch_size=per_process, shuffle=recipe.data.in_memory, drop_last=True, **common)
    validate = None
    if recipe.data.val_split:  # decoded once; the family says what to score on it
        items = MemoryDataset(data, fields, split=recipe.data.val_split, options=options, limit=recipe.data.val_limit).items
        validate = model.validator(items, fields)
    module = TrainModule(model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, warmup=t.warmup,
                         max_steps=t.max_steps, max_minutes=t.max_minutes, validate=validate)
    trainer = build_trainer(t, out, progress=progress, use_distributed_sampler=recipe.data.in_memory and not bucketed)
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    trainer.save_checkpoint(last)  # every process takes part; the first one writes
    if trainer.is_global_zero:
        with averaged_weights(trainer):  # the weights' moving average, when one is kept
            model.save_pretrained(out / "model")
        from polymodal.train.curves import plot_curves

        plot_curves(out / "logs" / "csv", out / "curves.png")
        return out / "model"
    return None
