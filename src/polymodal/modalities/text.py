"""Text: validation and a byte-level BPE tokenizer (HF ``tokenizers``) trained on captions.

The tokenizer is saved as ``tokenizer.json`` beside a model and restored with
:meth:`TextTokenizer.from_pretrained`. Special tokens:

``<pad>`` padding (id 0), ``<bos>`` / ``<eos>`` begin / end of text, ``<boi>`` / ``<eoi>``
begin / end of image (for sequences that interleave text and image tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from polymodal.errors import InputError

PAD, BOS, EOS, BOI, EOI = "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"
SPECIAL_TOKENS = (PAD, BOS, EOS, BOI, EOI)
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_CHARS = 10_000


def validate_text(text: object, *, source: str = "text", max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Return ``text`` stripped, or raise :class:`InputError` naming ``source``."""
    if not isinstance(text, str):
        raise InputError(source, f"expected a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise InputError(source, "empty text")
    if len(stripped) > max_chars:
        raise InputError(source, f"text of {len(stripped)} characters; the limit is {max_chars}")
    return stripped


class TextTokenizer:
    """A byte-level BPE tokenizer with polymodal's special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        for token in SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer lacks the special token {token}")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.boi_id = tokenizer.token_to_id(BOI)
        self.eoi_id = tokenizer.token_to_id(EOI)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2,
        lowercase: bool = True,
    ) -> TextTokenizer:
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` tokens from ``texts``."""
        tokenizer = Tokenizer(models.BPE())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens).strip()

    def batch(
        self, texts: Sequence[str], *, max_length: int | None = None, add_special_tokens: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, T)`` padded with ``<pad>`` and an attention mask ``(B, T)`` (True = token).

        With ``max_length``, longer sequences are cut (the last kept token stays ``<eos>``).
        """
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if max_length is not None:
            rows = [r if len(r) <= max_length else r[: max_length - 1] + r[-1:] for r in rows]
        return pad_sequences(rows, self.pad_id)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TextTokenizer:
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise InputError(path, "tokenizer file not found")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a plain Exception on a malformed file
            raise InputError(path, f"cannot read tokenizer: {e}") from e


def pad_sequences(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences: ids ``(B, T)`` and mask ``(B, T)``, True where a token is."""
    longest = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask
