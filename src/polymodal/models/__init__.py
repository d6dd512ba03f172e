"""Model families, one file each, readable top to bottom, and the ONE table of them.

:data:`FAMILIES` maps the ``type`` a recipe names and the ``model_type`` a saved folder's
``config.json`` declares to the family's class. It is a plain dict, filled here and nowhere
else: adding a family is one line (a test adds a toy family to it and trains, evaluates, saves
and loads it through the same code as the real ones). What a family must answer is listed in
:mod:`polymodal.models.family`. The trainer, the evaluator, the command line and the demo go
through :func:`build_model`, :func:`load_model`, :func:`model_type` and :func:`evaluate`; none of
them names a family.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from polymodal.errors import InputError
from polymodal.models.autoencoder import Autoencoder
from polymodal.models.captioner import Captioner
from polymodal.models.clip import ContrastiveModel
from polymodal.models.detector import GridDetector
from polymodal.models.family import (
    BuildContext,
    EvalOptions,
    Metrics,
    _Bad,
    check_settings,
    limit_params,
)
from polymodal.models.folder import read_config
from polymodal.models.fusion import FusionClassifier
from polymodal.models.omni import OmniModel
from polymodal.models.text_to_image import TextToImage

FAMILIES: dict[str, type[nn.Module]] = {
    "contrastive": ContrastiveModel,  # CLIP, CLAP, bound models: one embedding space
    "fusion": FusionClassifier,  # early / late / hybrid fusion classifiers
    "captioner": Captioner,  # captions, audio captions, VQA
    "detector": GridDetector,  # the shapes world's judge of generated images
    "autoencoder": Autoencoder,  # KL / VQ image autoencoders (latent spaces)
    "text_to_image": TextToImage,  # text-guided diffusion
    "omni": OmniModel,  # native multimodal decoder (Chameleon / Transfusion / MoT): captions, answers, draws
}

# ``model_type`` values written by other libraries, read as one of ours
FOREIGN_TYPES = {"clip": "contrastive"}  # a transformers CLIPModel folder


def family(name: str) -> type[nn.Module]:
    """The class of the family called ``name``; an error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model type {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def model_type(path: str | os.PathLike) -> str:
    """The family of the model saved in the folder ``path``."""
    declared = read_config(path).get("model_type")
    kind = FOREIGN_TYPES.get(declared, declared) if isinstance(declared, str) else None
    if kind not in FAMILIES:
        raise InputError(Path(path) / "config.json",
                         f"model_type {declared!r} is not a polymodal model; known: {', '.join(sorted(FAMILIES))}")
    return kind


def load_model(path: str | os.PathLike, task: str | None = None, *, max_params: float | None = None) -> nn.Module:
    """The model saved in the folder ``path`` (in eval mode). With ``task`` (``embed``,
    ``caption``, ``generate image``, ...), an error names the folder when its family cannot do it.

    A model folder may come from anyone: its config is checked (types, ranges, unknown keys) and
    the model it describes is counted on the meta device before anything is allocated, with at
    most ``max_params`` parameters (default: ``POLYMODAL_MAX_PARAMS`` or 10^9); its weight
    files must fit it exactly. Every failure is one :class:`InputError` naming the file."""
    cls = FAMILIES[model_type(path)]
    if task is not None and task not in cls.tasks:
        raise InputError(path, f"a {model_type(path)!r} model cannot {task}; it can: {', '.join(cls.tasks)}")
    with limit_params(max_params):
        return cls.from_pretrained(path).eval()


# keys of a recipe's model section that say how to build, not what is built (not in the config)
RECIPE_KEYS = ("type", "init_from")


def check_recipe_model(spec: object, source: str | os.PathLike) -> None:
    """A recipe's ``model`` section (after overrides) fits its family's config: known keys,
    types and ranges, before any data is read or anything is built. One InputError naming
    ``source`` and the setting otherwise. A family without a ``config_class`` checks itself."""
    if not isinstance(spec, dict):
        raise InputError(source, "model: expected a mapping")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise InputError(source, f"model.type: {kind!r} is not a model family; known: {', '.join(sorted(FAMILIES))}")
    config_class = getattr(FAMILIES[kind], "config_class", None)
    if config_class is None:
        return
    try:
        check_settings({k: v for k, v in spec.items() if k not in RECIPE_KEYS}, config_class, "model")
    except _Bad as e:
        raise InputError(source, f"{e.where}: {e.problem}") from None


def build_model(spec: dict, build: BuildContext) -> nn.Module:
    """A new model from a recipe's ``model`` section (``type`` names the family)."""
    spec = dict(spec)
    return family(spec.pop("type")).from_recipe(spec, build)


def evaluate(path: str | os.PathLike, data: str | os.PathLike, splits: Sequence[str] | None = None,
             options: EvalOptions | None = None) -> dict[str, Metrics]:
    """Every metric of the model saved in ``path`` on each split of ``data`` (the family's
    default splits when none are named)."""
    model = load_model(path)
    return model.evaluate(data, list(splits or model.default_splits), options or EvalOptions())


def default_splits(path: str | os.PathLike) -> tuple[str, ...]:
    return FAMILIES[model_type(path)].default_splits


__all__ = ["FAMILIES", "BuildContext", "EvalOptions", "build_model", "check_recipe_model", "default_splits", "evaluate", "family",
           "load_model", "model_type"]
