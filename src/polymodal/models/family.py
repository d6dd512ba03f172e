"""What every model family provides, and the small helpers they share.

A family is a plain ``nn.Module`` class listed in :data:`polymodal.models.FAMILIES`. Beside
``forward``, ``loss(batch) -> dict`` and ``save_pretrained`` / ``from_pretrained`` it answers:

- ``from_recipe(spec, build) -> model`` (classmethod): a model from a recipe's ``model``
  section (without its ``type``). Whatever the family derives from data (a tokenizer trained
  on the training split, the latent scale of an autoencoder, the fields it reads, a start from
  a saved model with ``init_from``) is computed here, through :class:`BuildContext`, and passed
  to the constructor: a constructor never rewrites its config.
- ``validator(items) -> (model -> metrics)``: the quick metrics scored during training on
  decoded validation items (the trainer calls it and knows nothing else of the family).
- ``evaluate(data, splits, options) -> {split: {metric: value}}``: every metric of the family
  on the splits of a data set (``polymodal eval``).
- ``fields() -> {batch field: "modality[:column]"}`` and ``input_size() -> int``: what a data
  set must give the model, decoded at which image size.
- ``tasks``: what the model can be asked to do (``embed``, ``classify``, ``caption``,
  ``answer``, ``detect``, ``reconstruct``, ``generate image``): callers ask for a task
  (:func:`polymodal.models.load_model` with ``task=``), never for a family by name.
- ``default_splits``: the splits ``polymodal eval`` scores when none are named.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polymodal.data.dataset import Collator, DecodeOptions, MultimodalDataset
from polymodal.data.memory import MemoryDataset
from polymodal.modalities.image import ImageTransform
from polymodal.modalities.text import TextTokenizer

DEFAULT_SPLITS = ("val", "test", "test_novel")

Metrics = dict[str, float]
Validator = Callable[[torch.nn.Module], Metrics]


@dataclass
class BuildContext:
    """What a family may read from a recipe's data to build its model: the training split of
    ``data``, the recipe's ``fields``, decoding size and tokenizer vocabulary size."""

    data: Path
    train_split: str = "train"
    fields: Sequence[str] | Mapping[str, str] = ("image", "text")
    image_size: int = 64
    vocab_size: int = 1024

    def field_map(self) -> dict[str, str]:
        """The recipe's fields as ``{batch field: "modality[:column]"}`` (remembered by models
        that must read the same fields when they are evaluated)."""
        f = self.fields
        return dict(f) if isinstance(f, Mapping) else {name: name for name in f}

    def tokenizer(self, text_column: str = "text", questions: str | None = None) -> TextTokenizer:
        """A BPE vocabulary of ``vocab_size`` from the training split's texts (and, given their
        column, its questions and answers)."""
        def texts():
            for item in MultimodalDataset(self.data, {"text": f"text:{text_column}"}, split=self.train_split):
                yield item["text"]
                for qa in item["row"].get(questions, []) if questions else []:
                    yield qa["question"]
                    yield qa["answer"]

        return TextTokenizer.train(texts(), vocab_size=self.vocab_size)

    def images(self, limit: int) -> torch.Tensor:
        """Up to ``limit`` training images ``(N, 3, S, S)`` at the recipe's image size."""
        options = DecodeOptions(image_transform=ImageTransform(self.image_size))
        items = MemoryDataset(self.data, ["image"], split=self.train_split, options=options, limit=limit).items
        return Collator(["image"])(items)["image"]


@dataclass
class EvalOptions:
    """Settings of ``polymodal eval``; each family reads the ones that concern it."""

    limit: int | None = None  # at most this many samples per split (a family may set its own default)
    class_names: list[str] | None = None  # names of integer labels, by index
    image_size: int | None = None  # decode images at this size instead of the model's own
    decoding: str = "greedy"  # text generation: greedy | beam | nucleus
    examples: int = 0  # generated examples kept in the results
    judge: str | os.PathLike | None = None  # a detector that judges generated or reconstructed images
    clip: str | os.PathLike | None = None  # a contrastive model for a CLIP score
    guidance: float = 3.0  # classifier-free guidance scale
    sample_steps: int = 50  # denoising steps
    per_category: int = 50  # prompts per GenEval-style category and split
    seed: int = 0
    compose: bool = False  # draw 'and'-joined prompt parts as a conjunction
    progress: Callable[[int], None] | None = field(default=None, repr=False)


def split_items(data: str | os.PathLike, fields, split: str, image_size: int, *, limit: int | None = None,
                progress=None) -> list[dict]:
    """The decoded items of one split (at most ``limit``), images at ``image_size``."""
    options = DecodeOptions(image_transform=ImageTransform(image_size))
    return MemoryDataset(data, fields, split=split, options=options, limit=limit, progress=progress).items


def evaluate_splits(data, splits: Sequence[str], fields, image_size: int, score: Callable[[list[dict]], Metrics], *,
                    limit: int | None = None, progress=None) -> dict[str, Metrics]:
    """``score(items)`` for each split that has samples."""
    results: dict[str, Metrics] = {}
    for split in splits:
        items = split_items(data, fields, split, image_size, limit=limit, progress=progress)
        if items:
            results[split] = score(items)
    return results


def encoder_fields(encoders: Mapping[str, dict], fields: Mapping[str, str]) -> dict[str, str]:
    """The batch fields of a model whose inputs are ``encoders`` (field name -> encoder spec):
    ``fields`` as remembered from its recipe, or each encoder's name with its input kind."""
    from polymodal.nn.encoders import INPUT_KIND

    return dict(fields) or {name: INPUT_KIND[spec["type"]] for name, spec in encoders.items()}


def encoder_image_size(encoders: Mapping[str, dict], default: int = 64) -> int:
    """The image side the first image encoder of ``encoders`` reads."""
    from polymodal.nn.encoders import INPUT_KIND

    sizes = [spec.get("image_size", default) for spec in encoders.values() if INPUT_KIND[spec["type"]] == "image"]
    return sizes[0] if sizes else default
