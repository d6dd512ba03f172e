"""Hugging Face ``CLIPModel`` folders as polymodal contrastive models.

A ``transformers`` CLIP folder (``config.json`` with ``model_type: clip``, weights, tokenizer)
becomes (through ``ContrastiveModel.from_pretrained``) a
:class:`~polymodal.models.clip.ContrastiveModel` whose towers are polymodal's own
ViT and text Transformer configured as CLIP's (quick-GELU, pre-LayerNorm on the image tokens,
causal text attention, pooling at the class token and at the end-of-text token), with the
weights copied over tensor by tensor. The same ``embed_text`` / ``embed_image`` API then serves
it, and :func:`clip_towers` gives the identical architecture for benchmarks against
``transformers``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from polymodal.errors import InputError
from polymodal.modalities.image import ImageTransform, to_tensor

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# CLIPImageProcessor's defaults, for a folder whose preprocessor config leaves them out
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PREPROCESSOR_BYTES = 1 << 20  # a preprocessor config is a few hundred bytes


@dataclass(frozen=True)
class ClipImageTransform(ImageTransform):
    """CLIPImageProcessor's steps on one image: resize (the shorter side to ``resize``, the longer
    in proportion, rounded down as transformers does; or, with ``squash``, both sides to ``size``),
    centre-crop ``size`` x ``size``, rescale to [0, 1] and normalise by the folder's mean and std."""

    resize: int = 224
    squash: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        if self.squash:
            new_size = (self.size, self.size)
        elif width <= height:
            new_size = (self.resize, int(self.resize * height / width))
        else:
            new_size = (int(self.resize * width / height), self.resize)
        if new_size != (width, height):
            image = image.resize(new_size, self.resample)
        left, top = (image.size[0] - self.size) // 2, (image.size[1] - self.size) // 2
        if (left, top) != (0, 0) or image.size != (self.size, self.size):
            image = image.crop((left, top, left + self.size, top + self.size))
        return self.normalize(to_tensor(image))


def _side(value, path: Path, key: str) -> tuple[int | None, int | None, int | None]:
    """``(shortest_edge, height, width)`` of a ``size`` / ``crop_size`` entry (an int or a dict)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    if not isinstance(value, dict):
        raise InputError(path, f"{key}: expected a number or an object, got {type(value).__name__}")
    out = []
    for part in ("shortest_edge", "height", "width"):
        v = value.get(part)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8192):
            raise InputError(path, f"{key}.{part}: expected a whole number of pixels from 1 to 8192, got {v!r}")
        out.append(v)
    return out[0], out[1], out[2]


def _triple(raw: dict, key: str, default: tuple[float, ...], path: Path, positive: bool) -> tuple[float, ...]:
    value = raw.get(key, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * 3
    if (not isinstance(value, list | tuple) or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or (positive and min(value) <= 0)):
        raise InputError(path, f"{key}: expected 3 finite numbers{' above 0' if positive else ''}, got {value!r}")
    return tuple(float(v) for v in value)


def hf_image_transform(directory: str | os.PathLike, image_size: int) -> ClipImageTransform:
    """How a Hugging Face CLIP folder turns an image into its input, from its
    ``preprocessor_config.json`` (CLIPImageProcessor's defaults where the file or a key is
    absent): the mean and std it was trained with (not polymodal's 0.5), its resize, crop and
    resampling. ``image_size`` is what the vision tower reads: the crop must give it."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    raw: dict = {}
    if path.is_file():
        if path.stat().st_size > MAX_PREPROCESSOR_BYTES:
            raise InputError(path, f"larger than {MAX_PREPROCESSOR_BYTES} bytes: not a preprocessor config")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(path, f"not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise InputError(path, f"expected a JSON object, got {type(raw).__name__}")
    mean, std = _triple(raw, "image_mean", CLIP_MEAN, path, False), _triple(raw, "image_std", CLIP_STD, path, True)
    if raw.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # transformers rescales 0..255 pixels by rescale_factor (1/255) before normalising; ours are
    # already in [0, 1], so a folder that rescales otherwise (or not at all) scales mean and std
    factor = raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) is not False else 1.0
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
        raise InputError(path, f"rescale_factor: expected a positive number, got {factor!r}")
    unit = 255 * factor  # pixel value in the processor's scale = unit * our [0, 1] value
    mean, std = tuple(m / unit for m in mean), tuple(s / unit for s in std)
    resample = raw.get("resample", int(Image.Resampling.BICUBIC))
    if resample not in [int(r) for r in Image.Resampling]:
        raise InputError(path, f"resample: expected one of PIL's resampling filters 0 to 5, got {resample!r}")
    shortest, height, width = _side(raw.get("size", {"shortest_edge": image_size}), path, "size")
    if raw.get("do_center_crop", True) is not False:
        _, crop_h, crop_w = _side(raw.get("crop_size", image_size), path, "crop_size")
    else:
        crop_h, crop_w = height, width
    if crop_h != image_size or crop_w != image_size:
        raise InputError(path, f"images become {crop_h}x{crop_w} pixels, but the vision model reads "
                               f"{image_size}x{image_size}")
    if raw.get("do_resize", True) is False:
        raise InputError(path, "do_resize false: images of any size would reach a model that reads one size")
    if shortest is None and (height, width) != (image_size, image_size):
        raise InputError(path, f"size {height}x{width} before a {image_size}-pixel crop is not supported; "
                               "use shortest_edge")
    return ClipImageTransform(size=image_size, mean=mean, std=std, resample=Image.Resampling(resample),
                              resize=shortest or image_size, squash=shortest is None)


class HFTokenizer:
    """A ``transformers`` tokenizer behind polymodal's ``batch`` / ``vocab_size`` interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id or 0

    def batch(self, texts, *, max_length=None, add_special_tokens=True):
        enc = self.tokenizer(list(texts), padding=True, truncation=max_length is not None,
                             max_length=max_length, return_tensors="pt", add_special_tokens=add_special_tokens)
        return enc["input_ids"], enc["attention_mask"].bool()

    def save_pretrained(self, directory):
        self.tokenizer.save_pretrained(str(directory))


def clip_towers(vision: dict, text: dict) -> dict[str, dict]:
    """polymodal tower specs equal to a CLIP's vision and text configs (as dicts)."""
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu"}[vision.get("hidden_act", "quick_gelu")]
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    return {
        "image": {"type": "vit", "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                  "width": width, "depth": vision["num_hidden_layers"], "heads": heads,
                  "mlp_ratio": vision["intermediate_size"] / width, "activation": act, "pool": "cls",
                  "pre_norm": True, "eps": vision.get("layer_norm_eps", 1e-5)},
        "text": {"type": "text", "vocab_size": text["vocab_size"], "context_length": text["max_position_embeddings"],
                 "width": text["hidden_size"], "depth": text["num_hidden_layers"],
                 "heads": text["num_attention_heads"], "mlp_ratio": text["intermediate_size"] / text["hidden_size"],
                 "activation": act, "causal": True, "pool": "eos", "eps": text.get("layer_norm_eps", 1e-5)},
    }


def _blocks(prefix_hf: str, prefix_pm: str, depth: int, hf: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        a, b = f"{prefix_hf}.encoder.layers.{i}", f"{prefix_pm}.transformer.blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{b}.attn.q.{part}"] = hf[f"{a}.self_attn.q_proj.{part}"]
            out[f"{b}.attn.kv.{part}"] = torch.cat([hf[f"{a}.self_attn.k_proj.{part}"], hf[f"{a}.self_attn.v_proj.{part}"]])
            out[f"{b}.attn.out.{part}"] = hf[f"{a}.self_attn.out_proj.{part}"]
            out[f"{b}.norm1.{part}"] = hf[f"{a}.layer_norm1.{part}"]
            out[f"{b}.norm2.{part}"] = hf[f"{a}.layer_norm2.{part}"]
            out[f"{b}.mlp.fc1.{part}"] = hf[f"{a}.mlp.fc1.{part}"]
            out[f"{b}.mlp.fc2.{part}"] = hf[f"{a}.mlp.fc2.{part}"]
    return out


def convert_state_dict(hf: dict[str, torch.Tensor], vision_depth: int, text_depth: int) -> dict[str, torch.Tensor]:
    """Map a ``CLIPModel`` state dict onto a polymodal contrastive model's names."""
    v, t = "vision_model", "text_model"
    out = {
        "towers.image.encoder.patch_embed.weight": hf[f"{v}.embeddings.patch_embedding.weight"],
        "towers.image.encoder.class_embedding": hf[f"{v}.embeddings.class_embedding"],
        "towers.image.encoder.position_embedding": hf[f"{v}.embeddings.position_embedding.weight"],
        "towers.image.encoder.pre_norm.weight": hf[f"{v}.pre_layrnorm.weight"],
        "towers.image.encoder.pre_norm.bias": hf[f"{v}.pre_layrnorm.bias"],
        "towers.image.encoder.norm.weight": hf[f"{v}.post_layernorm.weight"],
        "towers.image.encoder.norm.bias": hf[f"{v}.post_layernorm.bias"],
        "towers.text.encoder.token_embedding.weight": hf[f"{t}.embeddings.token_embedding.weight"],
        "towers.text.encoder.position_embedding": hf[f"{t}.embeddings.position_embedding.weight"],
        "towers.text.encoder.norm.weight": hf[f"{t}.final_layer_norm.weight"],
        "towers.text.encoder.norm.bias": hf[f"{t}.final_layer_norm.bias"],
        "towers.image.projection.weight": hf["visual_projection.weight"],
        "towers.text.projection.weight": hf["text_projection.weight"],
        "logit_scale": hf["logit_scale"],
    }
    out.update(_blocks(v, "towers.image.encoder", vision_depth, hf))
    out.update(_blocks(t, "towers.text.encoder", text_depth, hf))
    return out


def is_hf_clip(directory: str | os.PathLike) -> bool:
    from polymodal.models.folder import read_config

    try:
        return read_config(directory).get("model_type") == "clip"
    except InputError:
        return False


# CLIP config keys -> the polymodal setting whose range they take (see polymodal.models.family.RANGES)
HF_SIZES = {"hidden_size": "width", "intermediate_size": "width", "num_hidden_layers": "depth",
            "num_attention_heads": "heads", "image_size": "image_size", "patch_size": "patch_size",
            "vocab_size": "vocab_size", "max_position_embeddings": "context_length"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _check_hf_config(cfg, source: Path) -> None:
    """The sizes of a CLIP config's towers: whole numbers in polymodal's ranges, an activation
    polymodal has, finite epsilons; one InputError naming ``source`` and the key otherwise."""
    from polymodal.models.family import check_number

    for part, sub in (("vision_config", cfg.vision_config.to_dict()), ("text_config", cfg.text_config.to_dict())):
        for key, name in HF_SIZES.items():
            if key in sub or part == "text_config" and key in ("vocab_size", "max_position_embeddings"):
                check_number(sub.get(key), int, name, f"{part}.{key}", source)
        if sub.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise InputError(source, f"{part}.hidden_act: {sub.get('hidden_act')!r:.40} is not quick_gelu or gelu")
        check_number(sub.get("layer_norm_eps", 1e-5), float, "eps", f"{part}.layer_norm_eps", source)
    check_number(cfg.projection_dim, int, "embed_dim", "projection_dim", source)


def read_hf_clip(directory: str | os.PathLike) -> tuple[dict, HFTokenizer, dict[str, torch.Tensor]]:
    """A ``CLIPModel`` folder's ``(ContrastiveConfig settings, tokenizer, polymodal state dict)``:
    what :meth:`ContrastiveModel.from_pretrained` builds the same model from.

    The folder is read as a polymodal one is, nothing allocated before it is checked: the config's
    sizes, the tokenizer files' sizes, a ``CLIPModel`` of that config built on the meta device and
    counted against the parameter limit, ``model.safetensors``'s header against the tensors it
    holds; only those are read (no transformers model is built for real). Weights saved as a pickle
    (``pytorch_model.bin``) are not loaded."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from polymodal.models.family import within_limit
    from polymodal.models.folder import (
        CONFIG_FILE,
        MAX_TOKENIZER_BYTES,
        WEIGHTS_FILE,
        check_weights,
        one_line,
        read_weights,
    )

    directory = Path(directory)
    if not is_hf_clip(directory):
        raise InputError(directory, "not a Hugging Face CLIP folder (config.json with model_type 'clip')")
    source = directory / CONFIG_FILE
    try:
        cfg = CLIPConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers' own checks of the file, in its own error types
        raise InputError(source, f"not a CLIP config: {one_line(e)}") from None
    _check_hf_config(cfg, source)
    if not (directory / WEIGHTS_FILE).is_file():
        raise InputError(directory, f"{WEIGHTS_FILE} is missing (weights saved as a pickle, pytorch_model.bin, "
                                    "are not loaded)")
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file() and path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise InputError(path, f"{path.stat().st_size:,} bytes; the limit for a tokenizer file is "
                                   f"{MAX_TOKENIZER_BYTES:,}")
    try:
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    except Exception as e:  # the tokenizer libraries raise many kinds of error on a bad file
        raise InputError(directory, f"cannot load the tokenizer: {one_line(e)}") from None
    if tokenizer.vocab_size != cfg.text_config.vocab_size:
        raise InputError(directory, f"the tokenizer has {tokenizer.vocab_size} tokens; text_config.vocab_size "
                                    f"says {cfg.text_config.vocab_size}")
    towers = clip_towers(cfg.vision_config.to_dict(), cfg.text_config.to_dict())
    settings = {"towers": towers, "embed_dim": cfg.projection_dim, "max_logit_scale": 100.0}
    # the polymodal model holds the same tensors (k and v joined): the transformers model, built on
    # the meta device, is counted against the limit and tells which tensors the file must hold
    expected = within_limit(source, lambda: CLIPModel(cfg)).state_dict()
    check_weights(directory / WEIGHTS_FILE, expected, extra_allowed=True)
    hf = read_weights(directory / WEIGHTS_FILE, list(expected))
    state = convert_state_dict(hf, cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers)
    return settings, tokenizer, state
