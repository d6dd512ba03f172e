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
from polymodal.modalities.text import TextTokenizer
from polymodal.train.recipe import Recipe

log = logging.getLogger("polymodal.train")


def build_model(recipe: Recipe, data: Path):
    """The model a recipe names; a text tokenizer is trained on the training split when needed."""
    spec = dict(recipe.model)
    kind = spec.pop("type")
    init_from = spec.pop("init_from", None)  # a saved model whose matching towers start this one
    if kind in ("fusion", "captioner", "text_to_image") and not spec.get("fields"):  # remembered for evaluation
        fields = recipe.data.fields
        spec["fields"] = dict(fields) if isinstance(fields, dict) else {f: f for f in fields}
    if kind == "contrastive":
        from polymodal.models.clip import ContrastiveConfig, ContrastiveModel

        config = ContrastiveConfig(**spec)
        base = ContrastiveModel.from_pretrained(init_from) if init_from else None
        tokenizer = base.tokenizer if base is not None else None
        if tokenizer is None and any(t.get("type") == "text" for t in config.towers.values()):
            tokenizer = train_tokenizer(data, recipe.data.train_split, recipe.trainer.vocab_size)
        model = ContrastiveModel(config, tokenizer)
        if base is not None:
            copied = model.init_towers_from(base)
            log.info("towers %s start from %s", copied, init_from)
        return model
    if kind == "fusion":
        from polymodal.models.clip import ContrastiveModel
        from polymodal.models.fusion import FusionClassifier, FusionConfig

        model = FusionClassifier(FusionConfig(**spec))
        if init_from:
            copied = model.init_encoders_from(ContrastiveModel.from_pretrained(init_from))
            log.info("encoders %s start from %s", copied, init_from)
        return model
    if kind == "captioner":
        from polymodal.models.captioner import Captioner, CaptionerConfig
        from polymodal.models.clip import ContrastiveModel

        config = CaptionerConfig(**spec)
        tokenizer = train_tokenizer(data, recipe.data.train_split, recipe.trainer.vocab_size,
                                    questions=config.qa_column if "vqa" in config.tasks else None)
        model = Captioner(config, tokenizer)
        if init_from:
            copied = model.init_encoders_from(ContrastiveModel.from_pretrained(init_from))
            log.info("encoders %s start from %s", copied, init_from)
        return model
    if kind == "detector":
        from polymodal.models.detector import DetectorConfig, GridDetector

        if init_from:
            raise ValueError("model.init_from: a detector starts from scratch")
        config = DetectorConfig(**spec)
        if recipe.data.image_size != config.image_size:
            log.info("detector reads %dx%d images; data are decoded at %d and resized", config.image_size,
                     config.image_size, recipe.data.image_size)
        return GridDetector(config)
    if kind == "text_to_image":
        from polymodal.models.text_to_image import TextToImage, TextToImageConfig

        config = TextToImageConfig(**spec)
        tokenizer = None
        if config.text["type"] == "text":
            tokenizer = train_tokenizer(data, recipe.data.train_split, recipe.trainer.vocab_size)
        model = TextToImage(config, tokenizer)
        if model.autoencoder is not None and "latent_scale" not in spec:  # unit-variance latents
            model.config.latent_scale = latent_scale(model.autoencoder, data, recipe)
            log.info("latent scale %.4f", model.config.latent_scale)
        return model
    if kind == "autoencoder":
        from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig

        return Autoencoder(AutoencoderConfig(**spec))
    raise ValueError(f"unknown model type {kind!r} in recipe "
                     "(known: contrastive, fusion, captioner, detector, text_to_image, autoencoder)")


@torch.no_grad()
def latent_scale(autoencoder, data: Path, recipe: Recipe, samples: int = 512) -> float:
    """1 / the standard deviation of the autoencoder's latents over training images."""
    options = DecodeOptions(image_transform=ImageTransform(recipe.data.image_size))
    items = MemoryDataset(data, ["image"], split=recipe.data.train_split, options=options, limit=samples).items
    latents = autoencoder.encode(Collator(["image"])(items)["image"])
    return float(1.0 / latents.std().clamp(min=1e-6))


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


def train_tokenizer(data: Path, split: str, vocab_size: int, questions: str | None = None) -> TextTokenizer:
    """A BPE vocabulary from the training split's captions (and, given their column, its
    questions and answers)."""
    def texts():
        for item in MultimodalDataset(data, {"text": "text"}, split=split):
            yield item["text"]
            for qa in item["row"].get(questions, []) if questions else []:
                yield qa["question"]
                yield qa["answer"]

    return TextTokenizer.train(texts(), vocab_size=vocab_size)


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


def train(recipe: Recipe, data: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
          progress: bool = True) -> Path | None:
    """Train ``recipe`` on ``data`` into ``out``; returns the model folder (None in every
    process but the first when several train together)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.data import DataLoader

    from polymodal.train.module import PeriodicValidation, Snapshots, TrainModule

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = recipe.trainer
    devices = t.devices
    torch.set_num_threads(t.threads or default_threads(devices))
    L.seed_everything(t.seed, workers=True, verbose=False)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model = build_model(recipe, data)
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
    if recipe.data.val_split:
        from polymodal.eval.run import validation_function

        validate = validation_function(model, data, recipe.data.val_split, fields, options, recipe.data.val_limit)
    module = TrainModule(model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, warmup_steps=t.warmup_steps,
                         max_steps=t.max_steps, max_minutes=t.max_minutes, validate=validate)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=200)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision=t.precision, max_epochs=-1, max_steps=t.max_steps or -1,
        logger=[TensorBoardLogger(out / "logs", name="tensorboard"), CSVLogger(out / "logs", name="csv")],
        callbacks=[checkpoints, PeriodicValidation(t.val_every_minutes),
                   Snapshots(out / "snapshots", t.snapshot_every_minutes)], plugins=[atomic_checkpoint_io()],
        enable_progress_bar=progress, log_every_n_steps=t.log_every_steps, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=recipe.data.in_memory and not bucketed,
    )
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    trainer.save_checkpoint(last)  # every process takes part; the first one writes
    if trainer.is_global_zero:
        model.save_pretrained(out / "model")
        from polymodal.train.curves import plot_curves

        plot_curves(out / "logs" / "csv", out / "curves.png")
        return out / "model"
    return None
