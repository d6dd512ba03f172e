"""Recipes: one YAML file says what to train (model), on what (data) and how (trainer).

``key=value`` overrides on the command line change any setting by its dotted path, e.g.
``trainer.max_minutes=5`` or ``model.towers.image.width=384``; values are read as YAML.
Unknown sections and settings are errors, not silently ignored, and suggest the setting that was
probably meant (``trainer.max_step`` -> ``trainer.max_steps``). The ``data`` and ``trainer``
settings are checked against the types their dataclasses declare when the recipe is loaded,
before anything is built or trained: ``trainer.max_minutes=one`` is a one-line error naming the
setting, the value and the type expected, not a traceback minutes into training. Numbers written
the way YAML 1.1 reads as text (``1e-4``) are taken as numbers where a number is expected.
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from polymodal.errors import InputError


@dataclass
class DataSettings:
    fields: list[str] | dict[str, str] = field(default_factory=lambda: ["image", "text"])  # inputs (see dataset.Field)
    train_split: str = "train"
    val_split: str | None = "val"
    in_memory: bool = True  # decode the split once into RAM (small data sets)
    memory_limit_gb: float | None = 4.0  # in memory only if the decoded split is estimated within this;
    # above it the split is streamed (and the log says so). null: no limit
    allow_outside_paths: bool = False  # read files that lead outside the data set folder (absolute
    # paths, '..', links elsewhere); off, such a sample is skipped with that reason
    max_file_mb: float = 512.0  # a larger file (or shard sample) is skipped before it is read
    batch_size: int = 256  # global batch, split over processes
    image_size: int = 64
    val_limit: int = 1000  # validation samples scored during training
    num_workers: int = 0
    bucket_by_length: bool = False  # batch audio of similar length together (one process, in memory)
    augment: str | None = None  # question_pairs: re-pair spoken questions and images of the training
    # split, labelled from the scene graph (shapes-world fusion task); fresh_captions: a new caption
    # of the scene graph each time a training image is served (text-to-image; polymodal.data.augment)


@dataclass
class TrainerSettings:
    max_steps: int | None = None  # the budget, in optimizer steps: the same model on any machine
    max_minutes: float | None = None  # an optional wall-clock cap: training also ends (cooled down, the
    # schedule follows whichever of the two budgets is further spent) after this many minutes
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: float = 0.05  # share of the budget over which the learning rate rises linearly to lr
    devices: int = 1  # processes (CPU: gloo DDP when > 1)
    accelerator: str = "auto"  # cpu | gpu | auto
    precision: str = "32-true"  # bf16-mixed on GPUs; never bf16 on CPU
    val_every_minutes: float = 4.0  # validation retrieval during training
    seed: int = 0
    vocab_size: int = 1024  # BPE vocabulary when a text tokenizer is trained
    threads: int | None = None  # torch threads per process (default: cores / devices, at most OMP_NUM_THREADS)
    log_every_steps: int = 10
    snapshot_every_minutes: float | None = None  # also save the model to snapshots/step-N this often
    # (to score it against training time afterwards)
    snapshot_every_steps: int | None = None  # also save the model to snapshots/step-N every this many
    # optimizer steps (to score it against steps or FLOPs afterwards: the same steps on any machine)
    gradient_clip: float | None = None  # clip the global gradient norm to this (null: no clipping)
    accumulate: int = 1  # batches a step: gradients of this many batches are summed before the optimizer
    # steps (steps, warm-up and the schedule count optimizer steps)
    ema_decay: float | None = None  # keep a moving average of the weights (e.g. 0.999), saved and
    # validated in place of the last weights (null: none; polymodal.train.ema)


@dataclass
class Recipe:
    model: dict  # the model family's config, with ``type`` (contrastive, ...)
    data: DataSettings = field(default_factory=DataSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    name: str = "run"

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "data": asdict(self.data), "trainer": asdict(self.trainer)}


def _parse_value(item: str, text: str):
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise InputError(item, f"the value is not valid YAML: {' '.join(str(e).split())}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(item, "an override is key=value, e.g. trainer.max_minutes=5")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(item, f"{part!r} is not a section")
        node[parts[-1]] = _parse_value(item, value)
    return raw


def _unknown(names, known, what: str, prefix: str = "") -> str:
    """``unknown whats: 'prefix.name'``, each unknown name with the known name it most likely
    meant (difflib), and the known names when one has nothing close."""
    parts, lost = [], False
    for name in sorted(map(str, names)):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        parts.append(repr(prefix + name) + (f" (did you mean {prefix + close[0]!r}?)" if close else ""))
        lost = lost or not close
    return f"unknown {what}s: " + ", ".join(parts) + (f"; known: {', '.join(sorted(known))}" if lost else "")


def _expected(annotation: str) -> str:
    """A dataclass field's annotation as a person reads it: ``float | None`` -> ``float or null``."""
    return " or ".join("null" if part == "None" else part for part in annotation.split(" | "))


def _settings(cls, raw, section: str, source: str):
    """``cls`` (a settings dataclass) from the mapping ``raw``: unknown keys and values that are not
    of the declared type are :class:`InputError`, one line naming ``section.key``, the value and
    the type expected. The check is pydantic's (lax: ``1e-4`` is a float, ``[0.9, 0.99]`` a tuple;
    a bool is never taken as a number, nor a number as a bool)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(source, f"{section}: expected a mapping of settings, got {raw!r}")
    declared = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(raw) - set(declared)
    if unknown:
        raise InputError(source, _unknown(unknown, declared, "setting", f"{section}."))
    for key, value in raw.items():  # pydantic's lax mode would read true as 1, and 1 as true
        if (declared[key] == "bool") != isinstance(value, bool):
            raise InputError(f"{section}.{key}", f"expected {_expected(declared[key])}, got {value!r}")
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as e:
        key = str(e.errors()[0]["loc"][0])
        raise InputError(f"{section}.{key}", f"expected {_expected(declared[key])}, got {raw[key]!r}") from None


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def check_recipe(recipe: Recipe, source: str = "recipe") -> Recipe:
    """``recipe`` with its data and trainer settings checked against their declared types (and
    numbers given as text read as numbers): for recipes built in Python rather than loaded."""
    return Recipe(model=recipe.model, name=recipe.name,
                  data=_settings(DataSettings, asdict(recipe.data), "data", source),
                  trainer=_settings(TrainerSettings, asdict(recipe.trainer), "trainer", source))


def shipped_recipes() -> list[str]:
    """The names of the recipes that ship inside the package (``polymodal/recipes/*.yaml``)."""
    folder = resources.files("polymodal") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(name, YAML text)`` of a recipe: a file path, or the name of a recipe that ships with
    polymodal (``clip-shapes``, also ``recipes/clip-shapes.yaml`` as the checkout once held them;
    works from an installed wheel as from a checkout)."""
    path = Path(name_or_path)
    name = path.name.removesuffix(".yaml")
    if path.is_file():
        return name, path.read_text()
    shipped = resources.files("polymodal") / "recipes" / f"{name}.yaml"
    if str(name_or_path) in (name, f"{name}.yaml", f"recipes/{name}.yaml") and shipped.is_file():
        return name, shipped.read_text()
    raise InputError(name_or_path, f"no such recipe file, and no shipped recipe of that name; shipped: "
                                   f"{', '.join(shipped_recipes())}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """The recipe at ``path`` (a YAML file, or the name of a shipped recipe) with ``overrides``."""
    name, text = recipe_text(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(path, f"invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise InputError(path, "a recipe is a mapping with model, data, trainer and name")
    raw = apply_overrides(raw, overrides or [])
    unknown = set(raw) - {"model", "data", "trainer", "name"}
    if unknown:
        raise InputError(path, _unknown(unknown, {"model", "data", "trainer", "name"}, "section"))
    if not isinstance(raw.get("model"), dict) or "type" not in raw["model"]:
        raise InputError(path, "model: a mapping with a 'type' is required")
    from polymodal.models import check_recipe_model

    check_recipe_model(raw["model"], path)
    return Recipe(
        model=raw["model"], name=raw.get("name", name),
        data=_settings(DataSettings, raw.get("data"), "data", str(path)),
        trainer=_settings(TrainerSettings, raw.get("trainer"), "trainer", str(path)),
    )
