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

import dataclasses
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

from polymodal.data.dataset import Collator, DecodeOptions, MultimodalDataset
from polymodal.data.memory import MemoryDataset
from polymodal.errors import InputError
from polymodal.modalities.image import ImageTransform
from polymodal.modalities.text import TextTokenizer
from polymodal.models.folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_weights,
    one_line,
    read_json,
    read_model_config,
    read_weights,
)

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

    def sized(self, encoders: Mapping[str, dict], where: str) -> dict[str, dict]:
        """``encoders`` (a recipe's image, text, ... encoder specs) with each image encoder reading
        the recipe's ``data.image_size`` (the size its images are decoded at, so the two cannot
        disagree): filled in where the spec leaves it out, an error where it says otherwise."""
        from polymodal.nn.encoders import INPUT_KIND

        out = {}
        for name, spec in encoders.items():
            if isinstance(spec, Mapping) and INPUT_KIND.get(spec.get("type")) == "image":
                size = spec.get("image_size", self.image_size)
                if size != self.image_size:
                    raise ValueError(f"{where}.{name}.image_size is {size} but data.image_size is {self.image_size}: "
                                     f"the encoder would read images of another size than they are decoded at; "
                                     f"set both (or only data.image_size)")
                spec = {**spec, "image_size": size}
            out[name] = spec
        return out

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
    beams: int = 4  # beams a sample, for decoding: beam
    examples: int = 0  # generated examples kept in the results
    judge: str | os.PathLike | None = None  # a detector that judges generated or reconstructed images
    clip: str | os.PathLike | None = None  # a contrastive model for a CLIP score
    # drawing; None: the model's own (its config's drawing section), else DrawingSettings' default
    guidance: float | None = None  # classifier-free guidance scale
    guidance_interval: tuple[int, int] | str | None = None  # timesteps (low, high) guided; "all": every step
    guidance_outside: float | None = None  # the scale at the timesteps outside guidance_interval
    sample_steps: int | None = None  # denoising steps
    best_of: int | None = None  # draw this many images a prompt and keep the one the model reads as showing it
    # best (models that also read images: omni; OmniModel.choose)
    per_category: int = 50  # prompts per GenEval-style category and split
    seed: int = 0
    compose: bool = False  # draw 'and'-joined prompt parts as a conjunction
    progress: Callable[[int], None] | None = field(default=None, repr=False)


def split_items(data: str | os.PathLike, fields, split: str, image_size: int | ImageTransform, *,
                limit: int | None = None, progress=None) -> list[dict]:
    """The decoded items of one split (at most ``limit``), images at ``image_size`` (or through a
    model's own transform: a Hugging Face CLIP's mean and std)."""
    transform = image_size if isinstance(image_size, ImageTransform) else ImageTransform(image_size)
    options = DecodeOptions(image_transform=transform)
    return MemoryDataset(data, fields, split=split, options=options, limit=limit, progress=progress).items


def evaluate_splits(data, splits: Sequence[str], fields, image_size: int | ImageTransform, score: Callable[[list[dict]], Metrics], *,
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


# ---- a saved model's config: checked before anything is built ----------------------------------
#
# A config.json may come from a stranger. Before a family builds anything from it, every setting
# is checked against the annotation of its config dataclass (nested encoder, denoiser and
# diffusion specs against theirs), unknown keys are refused, numbers must lie in a range (by the
# setting's name, the same in every config: a ``depth`` is a depth wherever it is), and the model
# is built on the meta device (shapes, no memory) to count its parameters against a limit. The
# ranges are far beyond any model polymodal trains; their job is to keep a meta build itself
# cheap (a depth of a million is a million Python objects even without storage) and arithmetic
# finite, while the parameter limit bounds memory.

MAX_PARAMS_ENV = "POLYMODAL_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 1_000_000_000  # 4 GB of float32 weights (8 GB at the peak of a load, the
# model and its weights file read): 40x the largest shipped recipe (lit-shapes, 24M with MiniLM)
MAX_ITEMS = 10_000  # entries of one list or dict setting
MAX_CHARS = 4096  # characters of one string setting
MAX_ENCODERS = 16  # towers (or encoders) of one model

# (lowest, highest) of each numeric setting by name; other integers: INT_RANGE, other floats: FLOAT_RANGE
RANGES: dict[str, tuple[float, float]] = {
    # widths and channels
    **dict.fromkeys(("width", "embed_dim", "head_width", "colour_width", "context_dim", "flatten_channels",
                     "latent_channels", "in_channels", "channels", "widths", "groups"), (1, 65_536)),
    "n_mels": (1, 4096),
    "heads": (1, 1024),
    # how many of a thing: each one is a module built in Python, even on the meta device
    "depth": (1, 256),
    "blocks": (1, 64),
    # sizes of inputs and tables
    # (an image side also sizes every decoded input and generated image: 4096 px is 200 MB a float image)
    "image_size": (1, 4096), "max_side": (1, 4096), "patch_size": (1, 4096), "patch": (1, 1024),
    "stem_stride": (1, 1024),
    "context_length": (1, 1 << 20), "max_length": (1, 1 << 20), "max_memory_tokens": (0, 1 << 20),
    "vocab_size": (1, 1 << 24), "codebook_size": (1, 1 << 24), "questions_per_sample": (1, 1 << 20),
    "train_steps": (1, 100_000),  # the diffusion schedule's tables are allocated outside the model
    # floats
    "mlp_ratio": (1e-3, 64.0), "eps": (1e-12, 1.0), "init_temperature": (1e-4, 100.0),
    "max_logit_scale": (1e-3, 1e4), "latent_scale": (1e-6, 1e6), "mel_std": (1e-6, 1e6),
    "min_snr_gamma": (1e-6, 1e6), "clip_sample_range": (1e-6, 1e6), "tasks": (0.0, 1e6),
    **dict.fromkeys(("condition_dropout", "modality_dropout", "recolour_fraction", "occupied_threshold",
                     "codebook_decay"), (0.0, 1.0)),
    **dict.fromkeys(("commitment", "kl_weight", "noise_std", "blur_sigma", "brightness", "ctc", "dead_code_threshold"),
                    (0.0, 1e6)),
}
INT_RANGE = (0, 65_536)
FLOAT_RANGE = (-1e6, 1e6)
# most items of a list setting, by name, where each item is a level of modules; others: MAX_ITEMS
LENGTHS = dict.fromkeys(("channels", "widths", "blocks", "attention"), 16)


class _Bad(Exception):
    """A setting that fails its check: where it is (``towers.image.depth``) and what is wrong."""

    def __init__(self, where: str, problem: str):
        super().__init__(where, problem)
        self.where, self.problem = where, problem


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _number(value: object, integer: bool, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        shown = "" if value is None or isinstance(value, dict | list) else f" {value!r:.40}"
        raise _Bad(where, f"expected {'an integer' if integer else 'a number'}, got {_kind(value)}{shown}")
    if not math.isfinite(value):
        raise _Bad(where, f"{value} is not a finite number")
    low, high = RANGES.get(name, INT_RANGE if integer else FLOAT_RANGE)
    if not low <= value <= high:
        raise _Bad(where, f"{_shown(value)} is out of range (from {_shown(low)} to {_shown(high)})")


def _shown(number: float) -> str:
    return f"{number:,}" if isinstance(number, int) else f"{number:g}"


def check_number(value: object, kind: type, name: str, where: str, source: str | os.PathLike) -> None:
    """``value`` is an ``int`` (or, ``kind`` float, any number) in the range of the setting
    ``name``; otherwise an InputError naming ``source`` and ``where`` (for files in other
    libraries' formats, whose keys are not polymodal's)."""
    try:
        _number(value, kind is int, name, where)
    except _Bad as e:
        raise InputError(source, f"{e.where}: {e.problem}") from None


def _check_value(value: object, hint: object, name: str, where: str) -> None:
    """``value`` (read from JSON) against the type ``hint``; ``name`` picks the numeric range."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        problems = []
        for option in options:
            try:
                return _check_value(value, option, name, where)
            except _Bad as e:
                problems.append(e)
        if len(problems) == 1:
            raise problems[0]
        raise _Bad(where, f"expected {' or '.join(getattr(o, '__name__', str(o)) for o in options)}, "
                          f"got {_kind(value)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise _Bad(where, f"expected true or false, got {_kind(value)}")
    elif hint is int or hint is float:
        _number(value, hint is int, name, where)
    elif hint is str:
        if not isinstance(value, str):
            raise _Bad(where, f"expected a string, got {_kind(value)}")
        if len(value) > MAX_CHARS:
            raise _Bad(where, f"a string of {len(value):,} characters; the limit is {MAX_CHARS:,}")
    elif hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Bad(where, f"expected a list, got {_kind(value)}")
        most = LENGTHS.get(name, MAX_ITEMS)
        if len(value) > most:
            raise _Bad(where, f"a list of {len(value):,} items; the limit is {most:,}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise _Bad(where, f"expected a list of {len(args)} items, got {len(value)}")
        for i, item in enumerate(value):
            item_hint = (args[0] if origin is list or args[-1] is Ellipsis else args[i]) if args else object
            _check_value(item, item_hint, name, f"{where}[{i}]")
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Bad(where, f"expected an object, got {_kind(value)}")
        if len(value) > MAX_ITEMS:
            raise _Bad(where, f"an object of {len(value):,} entries; the limit is {MAX_ITEMS:,}")
        for key, item in value.items():
            _check_value(key, str, name, where)
            if args:
                _check_value(item, args[1], name, _join(where, key))
            else:
                _check_json(item, _join(where, key))
    elif hint is object or hint is Any:
        _check_json(value, where)
    else:  # an annotation this checker does not know: a programming error, not a bad file
        raise TypeError(f"{where}: cannot check values of type {hint!r}")


def _check_json(value: object, where: str, depth: int = 0) -> None:
    """Any JSON value with no more than ``MAX_ITEMS`` entries a container, finite numbers and
    bounded strings (a free-form setting, such as a plain ``dict``)."""
    if depth > 32:
        raise _Bad(where, "nested too deep")
    if isinstance(value, dict | list):
        if len(value) > MAX_ITEMS:
            raise _Bad(where, f"{len(value):,} entries; the limit is {MAX_ITEMS:,}")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_json(item, _join(where, key) if isinstance(value, dict) else f"{where}[{key}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Bad(where, f"{value} is not a finite number")
    elif isinstance(value, str) and len(value) > MAX_CHARS:
        raise _Bad(where, f"a string of {len(value):,} characters; the limit is {MAX_CHARS:,}")


def _join(where: str, name: str) -> str:
    """The path of the setting ``name`` inside ``where``; a key that is not a plain name (it may
    hold anything, line breaks included) is shown quoted and cut short."""
    if not re.fullmatch(r"[\w\-]{1,64}", name):
        return f"{where}[{name!r:.40}]"
    return f"{where}.{name}" if where else name


def check_settings(settings: object, cls: type, where: str = "") -> None:
    """``settings`` (a dict read from JSON) fit the config dataclass ``cls``: no unknown keys,
    each value of its field's type and range, nested specs checked by the checker a field names
    in its metadata (``field(metadata={"check": ...})``). A ``preset`` is allowed where ``cls``
    has ``PRESETS``. Raises :class:`_Bad` naming the setting."""
    if not isinstance(settings, dict):
        raise _Bad(where or "config", f"expected an object, got {_kind(settings)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    presets = getattr(cls, "PRESETS", None)
    unknown = [k for k in settings if k not in known and not (k == "preset" and presets)]
    if unknown:
        raise _Bad(_join(where, unknown[0]), f"unknown setting; known: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    for key, value in settings.items():
        path = _join(where, key)
        if key == "preset":
            if not isinstance(value, str) or value not in presets:
                raise _Bad(path, f"unknown preset {value!r:.40}; choose from {sorted(presets)}")
        elif "check" in known[key].metadata:
            known[key].metadata["check"](value, path)
        else:
            _check_value(value, hints[key], key, path)
    effective = {**{k: getattr(cls, k) for k in ("width", "heads") if hasattr(cls, k)},
                 **(presets or {}).get(settings.get("preset"), {}), **settings}
    width, heads = effective.get("width"), effective.get("heads")
    divides = "heads" in known and getattr(cls, "HEADS_DIVIDE_WIDTH", True)
    if divides and isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise _Bad(_join(where, "heads"), f"{heads} heads do not divide the width {width}")


def check_encoder_spec(spec: object, where: str) -> None:
    """An encoder spec (``{"type": "vit", "preset": "small", "depth": 6}``) against the config
    of its type; a video encoder's frame and sound encoders too."""
    from polymodal.nn.encoders import ENCODERS

    if not isinstance(spec, dict):
        raise _Bad(where, f"an encoder spec is an object with a type, not {_kind(spec)}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in ENCODERS:
        raise _Bad(_join(where, "type"), f"unknown encoder type {kind!r:.40}; choose from {sorted(ENCODERS)}")
    check_settings(spec, ENCODERS[kind][0], where)
    if kind == "video":  # its frames are read by an image encoder, its sound by an audio encoder
        for part, kinds in (("frames", ("cnn", "vit")), ("audio", ("audio",))):
            if part in spec:
                sub = spec[part]
                if isinstance(sub, dict) and sub.get("type") not in kinds:
                    raise _Bad(_join(_join(where, part), "type"), f"expected {' or '.join(kinds)}, "
                                                             f"got {sub.get('type')!r:.40}")
                check_encoder_spec(sub, _join(where, part))
    if kind == "minilm" and spec.get("path") is not None:
        folder = Path(spec["path"])
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            raise _Bad(_join(where, "path"), "not a folder with config.json and model.safetensors "
                                             "(pretrained weights load from safetensors only)")


def check_encoder_specs(specs: object, where: str) -> None:
    """A model's towers or encoders: field name -> encoder spec."""
    if not isinstance(specs, dict):
        raise _Bad(where, f"expected an object of encoder specs, got {_kind(specs)}")
    if len(specs) > MAX_ENCODERS:
        raise _Bad(where, f"{len(specs)} encoders; the limit is {MAX_ENCODERS}")
    for name, spec in specs.items():
        check_encoder_spec(spec, _join(where, name))


def check_denoiser_spec(spec: object, where: str) -> None:
    """A text-to-image denoiser: a UNet or DiT spec."""
    from polymodal.nn.dit import DiTConfig
    from polymodal.nn.unet import UNetConfig

    kinds = {"unet": UNetConfig, "dit": DiTConfig}
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in kinds:
        raise _Bad(_join(where, "type"), f"unknown denoiser type {kind!r:.40}; choose from {sorted(kinds)}")
    check_settings(spec, kinds[kind], where)


def check_best_of(model, best_of: int) -> None:
    """``best_of`` (drawings to choose each image from) checked for ``model``: a ``ValueError``
    unless it is a whole number of at least 1, and 1 for a model that draws but cannot read
    what it drew (it has no ``caption_log_likelihood`` to choose with). ``model`` None: the
    number alone."""
    if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
        raise ValueError(f"best-of is the number of drawings to choose each image from, at least 1; got {best_of!r}")
    if best_of > 1 and model is not None and not callable(getattr(model, "caption_log_likelihood", None)):
        raise ValueError(f"best-of {best_of}: a {type(model).__name__} draws but does not read images, so it cannot "
                         "choose among its drawings (an omni model can)")


@dataclass
class DrawingSettings:
    """How a model draws when its caller does not say: a config's ``drawing`` section (a recipe's
    ``model.drawing``, kept in the saved model's ``config.json``), each setting as the option of
    ``polymodal generate image`` and ``polymodal eval`` of that name (``--cfg``, ``--cfg-interval``,
    ``--cfg-outside``, ``--steps``, ``--best-of``). An option given on the command line or in a
    request wins; a setting the section leaves out is the default here."""

    guidance: float = 3.0  # classifier-free guidance scale (1: none)
    guidance_interval: list[int] | None = None  # [low, high]: the timesteps guided at guidance; None: every step
    guidance_outside: float = 1.0  # the scale at the timesteps outside guidance_interval
    steps: int = 50  # denoising steps
    best_of: int = 1  # drawings to choose each image from (models that read what they draw)

    def schedule(self):
        """The guidance schedule (:class:`~polymodal.nn.diffusion.Guidance`) these settings draw
        with, after checking them: a ``(setting, problem)`` ``ValueError`` for an interval out of
        order, an outside scale with no interval, or fewer than one step or drawing. The one check
        of a config's ``drawing`` section and of the settings a call resolves to."""
        from polymodal.nn.diffusion import Guidance

        for name in ("steps", "best_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(name, f"at least 1; got {value!r}")
        try:
            return Guidance.of(self.guidance, self.guidance_interval, self.guidance_outside)
        except ValueError as e:
            raise ValueError("guidance", str(e)) from None


def check_drawing_settings(settings: object, where: str) -> None:
    """A config's ``drawing`` section: :class:`DrawingSettings`' keys and types, an interval of
    two timesteps in order, a scale outside it only with one, at least one step and one drawing."""
    check_settings(settings, DrawingSettings, where)
    try:
        DrawingSettings(**settings).schedule()
    except ValueError as e:
        name, problem = e.args
        raise _Bad(where if name == "guidance" else _join(where, name), problem) from None


def drawing_settings(model, **given) -> dict:
    """The settings ``model`` draws with, as its ``generate`` takes them (``guidance``,
    ``guidance_interval``, ``guidance_outside``, ``steps``, and ``best_of`` when above 1, so
    ``model.generate(prompts, **drawing_settings(model))`` draws as the model would): each one
    ``given`` (not None), else the model's own (its config's ``drawing`` section,
    :class:`DrawingSettings`), else the default. An interval the caller gives (``"all"``: every
    step) replaces the model's with its outside scale too; an outside scale given alone applies
    to the model's interval. Checked (a ValueError names the problem); ``best_of`` above 1 only
    for a model that reads its drawings."""
    unknown = [k for k in given if k not in {f.name for f in dataclasses.fields(DrawingSettings)}]
    if unknown:
        raise TypeError(f"unknown drawing settings: {', '.join(unknown)}")
    own = getattr(getattr(model, "config", None), "drawing", None) or {}
    given = {k: v for k, v in given.items() if v is not None}
    if "guidance_interval" in given:  # the caller's schedule, whole
        own = {k: v for k, v in own.items() if k not in ("guidance_interval", "guidance_outside")}
    settings = DrawingSettings(**{**own, **given})
    try:
        schedule = settings.schedule()
    except ValueError as e:
        name, problem = e.args
        raise ValueError(problem if name == "guidance" else f"{name.replace('_', '-')}: {problem}") from None
    check_best_of(model, settings.best_of)
    chosen = {"best_of": settings.best_of} if settings.best_of > 1 else {}  # only models that read drawings
    return {"guidance": schedule.scale, "guidance_interval": schedule.interval, "guidance_outside": schedule.outside,
            "steps": settings.steps, **chosen}


def check_diffusion_settings(settings: object, where: str) -> None:
    from polymodal.nn.diffusion import DiffusionConfig

    check_settings(settings, DiffusionConfig, where)


def check_text_encoder_spec(spec: object, where: str) -> None:
    """A text-to-image text encoder: a trained ``text`` encoder, ``minilm``, or ``clip`` (the
    text tower of a contrastive model, saved in the model's own ``text_encoder/`` folder; its
    ``path`` only records where it came from)."""
    if isinstance(spec, dict) and spec.get("type") == "clip":
        unknown = [k for k in spec if k not in ("type", "path")]
        if unknown:
            raise _Bad(_join(where, unknown[0]), "unknown setting; known: path, type")
        _check_value(spec.get("path"), str | None, "path", _join(where, "path"))
    else:
        check_encoder_spec(spec, where)


def saved_config(directory: str | os.PathLike, model_type: str, cls: type):
    """The config dataclass ``cls`` of the model of ``model_type`` saved in ``directory``, every
    setting checked first (see :func:`check_settings`); one InputError naming ``config.json``
    and the setting otherwise."""
    directory = Path(directory)
    raw = read_model_config(directory, model_type)
    source = directory / CONFIG_FILE
    try:
        check_settings(raw, cls)
    except _Bad as e:
        raise InputError(source, f"{e.where}: {e.problem}") from None
    try:
        return cls(**raw)
    except (ValueError, TypeError, KeyError) as e:  # the dataclass's own checks across settings
        raise InputError(source, one_line(e)) from None


def saved_encoder_spec(directory: str | os.PathLike, model_type: str) -> dict:
    """The encoder spec saved as the config of a model part (a text tower's folder), checked."""
    directory = Path(directory)
    raw = read_model_config(directory, model_type)
    try:
        check_encoder_spec(raw, "")
    except _Bad as e:
        raise InputError(directory / CONFIG_FILE, f"{e.where}: {e.problem}") from None
    return raw


# ---- the parameter limit, and building a saved model within it ---------------------------------

_max_params: ContextVar[int | None] = ContextVar("max_params", default=None)


def max_params() -> int:
    """The most parameters (and buffer elements) a loaded model may have: the value given to
    :func:`limit_params` (``load_model(max_params=...)``), else the environment variable
    ``POLYMODAL_MAX_PARAMS``, else :data:`DEFAULT_MAX_PARAMS`."""
    given = _max_params.get()
    if given is not None:
        return given
    text = os.environ.get(MAX_PARAMS_ENV)
    if not text:
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise InputError(MAX_PARAMS_ENV, f"expected a number of parameters, got {text!r:.40}") from None
    if value < 1:
        raise InputError(MAX_PARAMS_ENV, f"must be at least 1, got {text!r:.40}")
    return value


@contextmanager
def limit_params(limit: float | None):
    """Within this block, models load with at most ``limit`` parameters (None: the default;
    ``2e9`` reads as 2,000,000,000)."""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 1 <= limit < float("inf"):
            raise ValueError(f"max_params must be a positive number of parameters, got {limit!r}")
        limit = int(limit)
    token = _max_params.set(limit)
    try:
        yield
    finally:
        _max_params.reset(token)


def parameter_count(model: torch.nn.Module) -> int:
    """Elements of ``model``'s parameters and buffers (shared ones once)."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def within_limit(source: str | os.PathLike, build: Callable[[], torch.nn.Module], *,
                 extra_params: int = 0) -> torch.nn.Module:
    """``build()`` run on the meta device, where tensors have shapes and no storage: the model a
    config describes, its parameters counted (plus ``extra_params`` of parts counted apart)
    against :func:`max_params`, with nothing allocated. Any failure to build is the config's:
    an InputError naming ``source``."""
    try:
        with torch.device("meta"):
            model = build()
    except InputError:
        raise
    except Exception as e:  # the constructors of checked settings: any failure is the config's
        raise InputError(source, f"the configuration does not build: {one_line(e)}") from None
    count, limit = parameter_count(model) + extra_params, max_params()
    if count > limit:
        raise InputError(source, f"the model would have {count:,} parameters, more than the limit of {limit:,} "
                                 f"(allow more with {MAX_PARAMS_ENV} or load_model(max_params=...))")
    return model


def pretrained_standin(spec: dict) -> tuple[dict, int]:
    """For counting on the meta device: a spec that stands in for a pretrained encoder spec
    (``minilm``: built by loading its weights from disk, which cannot happen on the meta device),
    and that encoder's parameters. The stand-in has the encoder's width and almost no
    parameters; the encoder's own are counted from its folder's ``config.json`` (a BERT).
    Other specs come back as they are, with 0."""
    from polymodal.nn.pretrained import minilm_path

    if spec.get("type") != "minilm":
        return spec, 0
    folder = Path(spec["path"]) if spec.get("path") else minilm_path()
    bert = read_json(folder / "config.json", 1 << 20, "a config")
    if not isinstance(bert, dict):
        raise InputError(folder / "config.json", f"a model config is a JSON object, not {_kind(bert)}")
    sizes = {}
    for key, name in (("hidden_size", "width"), ("num_hidden_layers", "depth"), ("intermediate_size", "width"),
                      ("vocab_size", "vocab_size"), ("max_position_embeddings", "context_length"),
                      ("type_vocab_size", "vocab_size")):
        sizes[key] = bert.get(key, 2 if key == "type_vocab_size" else None)
        check_number(sizes[key], int, name, key, folder / "config.json")
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    embeddings = (sizes["vocab_size"] + sizes["max_position_embeddings"] + sizes["type_vocab_size"] + 2) * h
    layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # attention, MLP, two LayerNorms
    params = embeddings + sizes["num_hidden_layers"] * layer + h * h + h  # + the pooler
    return {"type": "vit", "image_size": 1, "patch_size": 1, "width": h, "depth": 0, "heads": 1}, params


def load_saved(directory: str | os.PathLike, build: Callable[[], torch.nn.Module], *,
               saved: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]] | None = None,
               parts: Mapping[str, Callable[[torch.nn.Module], torch.nn.Module]] | None = None,
               estimate: Callable[[], torch.nn.Module] | None = None, extra_params: int = 0) -> torch.nn.Module:
    """The model ``build()`` makes, holding the weights saved in ``directory``; nothing is
    allocated before every check has passed.

    First the model is built on the meta device (by ``estimate`` where ``build`` would load a
    pretrained encoder from disk; see :func:`pretrained_standin`) and sized against the limit;
    then the weight files' headers are compared with the tensors it needs: ``saved(model)`` (its
    whole state dict by default) in ``model.safetensors``, and each part ``parts[folder](model)``
    (a separately trained module) in ``folder/model.safetensors``. Only then is it built for
    real and only those tensors are read."""
    directory = Path(directory)
    saved = saved or (lambda m: m.state_dict())
    parts = parts or {}
    meta = within_limit(directory / CONFIG_FILE, estimate or build, extra_params=extra_params)
    check_weights(directory / WEIGHTS_FILE, saved(meta))
    for folder, part in parts.items():
        check_weights(directory / folder / WEIGHTS_FILE, part(meta).state_dict())
    names = list(saved(meta))
    del meta
    try:
        model = build()
    except InputError:
        raise
    except Exception as e:  # it built on the meta device: what differs is the config's too
        raise InputError(directory / CONFIG_FILE, f"the configuration does not build: {one_line(e)}") from None
    model.load_state_dict(read_weights(directory / WEIGHTS_FILE, names), strict=False)
    for folder, part in parts.items():
        part(model).load_state_dict(read_weights(directory / folder / WEIGHTS_FILE))
    return model.eval()
