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


class LengthBucketBatchSampler:
    """Batches of similar length, in random order: less padding for variable-length inputs.

    Indices are shuffled, cut into pools of ``pool_batches`` batches, each pool sorted by
    length and cut into batches; then the batches are shuffled. Every index appears once an
    epoch; the last incomplete batch is dropped.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, pool_batches: int = 50, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.pool = batch_size * pool_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool) - self.batch_size + 1, self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]


def item_length(item: dict) -> int:
    """The longest time axis among an item's spectrograms (0 if it has none)."""
    longest = 0
    for value in item.values():
        if hasattr(value, "shape") and getattr(value, "ndim", 0) == 2:
            longest = max(longest, value.shape[-1])
        elif isinstance(value, dict) and "audio" in value:
            longest = max(longest, value["audio"].shape[-1])
    return longest
