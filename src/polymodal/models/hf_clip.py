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

import os
from pathlib import Path

import torch

from polymodal.errors import InputError


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


def read_hf_clip(directory: str | os.PathLike) -> tuple[dict, HFTokenizer, dict[str, torch.Tensor]]:
    """A ``CLIPModel`` folder's ``(ContrastiveConfig settings, tokenizer, polymodal state dict)``:
    what :meth:`ContrastiveModel.from_pretrained` builds the same model from."""
    from transformers import AutoTokenizer, CLIPModel

    directory = Path(directory)
    if not is_hf_clip(directory):
        raise InputError(directory, "not a Hugging Face CLIP folder (config.json with model_type 'clip')")
    hf_model = CLIPModel.from_pretrained(str(directory), local_files_only=True)
    cfg = hf_model.config
    towers = clip_towers(cfg.vision_config.to_dict(), cfg.text_config.to_dict())
    try:
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
    except (OSError, ValueError) as e:
        raise InputError(directory, f"cannot load the tokenizer: {e}") from e
    settings = {"towers": towers, "embed_dim": cfg.projection_dim, "max_logit_scale": 100.0}
    state = convert_state_dict(hf_model.state_dict(), cfg.vision_config.num_hidden_layers,
                               cfg.text_config.num_hidden_layers)
    return settings, tokenizer, state
