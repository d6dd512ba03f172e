"""A split decoded once into memory: for small data sets that are read for many epochs.

Decoding a 64x64 PNG or a spoken caption costs more than a small model's step on it; for data
that fits in memory (the shapes world: about 1 GB for 10,000 images with speech), decode once
and train from RAM.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from torch.utils.data import Dataset

from polymodal.data.dataset import DecodeOptions, MultimodalDataset
from polymodal.data.source import SkipLog


class MemoryDataset(Dataset):
    """Every decoded sample of a data set split, held in a list (map-style, shuffles freely)."""

    def __init__(
        self, location: str | os.PathLike, fields: Sequence[str] | Mapping[str, str], *,
        split: str | Iterable[str] | None = None, options: DecodeOptions = DecodeOptions(),
        skips: SkipLog | None = None, where=None, limit: int | None = None, progress=None,
    ):
        self.skips = skips if skips is not None else SkipLog()
        self.items: list[dict] = []
        for item in MultimodalDataset(location, fields, split=split, options=options, skips=self.skips, where=where):
            self.items.append(item)
            if progress:
                progress(len(self.items))
            if limit is not None and len(self.items) >= limit:
                break

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]
