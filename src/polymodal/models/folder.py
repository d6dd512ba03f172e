"""A saved model is a folder: ``config.json``, ``model.safetensors`` and whatever else it needs
(a tokenizer). Folders are written beside the target and swapped in, so a crash never leaves
half a model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from polymodal.errors import InputError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def write_model_folder(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
                       extra: Callable[[Path], None] | None = None) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
    if extra is not None:
        extra(tmp)
    if directory.exists():  # swap in the new folder, then drop the old one
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a saved model folder, as a dict: the one reader of that file, so
    every caller gets the same clear error for a missing, unreadable or malformed config."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InputError(directory, f"no {CONFIG_FILE}: not a saved polymodal model")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise InputError(path, f"a model config is a JSON object, not {type(raw).__name__}")
    return raw


def read_model_folder(directory: str | os.PathLike, model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config (without ``model_type``) and weights of a saved model of ``model_type``."""
    directory = Path(directory)
    raw = read_config(directory)
    found = raw.pop("model_type", None)
    if found != model_type:
        raise InputError(directory / CONFIG_FILE, f"a {found!r} model, not a {model_type!r} model")
    if not (directory / WEIGHTS_FILE).is_file():
        raise InputError(directory, f"{WEIGHTS_FILE} is missing")
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise InputError(directory / WEIGHTS_FILE, f"unreadable weights: {e}") from e
    return raw, weights
