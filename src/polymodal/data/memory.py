"""A split decoded once into memory: for small data sets that are read for many epochs.

Decoding a 64x64 PNG or a spoken caption costs more than a small model's step on it; for data
that fits in memory (the shapes world: about 1 GB for 10,000 images with speech), decode once
and train from RAM. What does not fit is streamed instead: :func:`load_split` estimates the
decoded size before it holds the split (rows x the decoded bytes of the first samples) and
streams the split, saying so, when the estimate is over the limit (``data.memory_limit_gb``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from polymodal.data.dataset import DecodeOptions, MultimodalDataset, row_split
from polymodal.data.source import SkipLog, iter_source

log = logging.getLogger("polymodal.data")
DEFAULT_MEMORY_LIMIT_GB = 4.0
ESTIMATE_SAMPLES = 32  # decoded samples the size of a split is projected from


@dataclass
class MemoryEstimate:
    rows: int  # rows of the split (at most the limit asked for)
    bytes_per_row: float  # decoded bytes of a row, measured on the first samples

    @property
    def total_bytes(self) -> float:
        return self.rows * self.bytes_per_row

    def __str__(self) -> str:
        return (f"{self.rows:,} rows x {self.bytes_per_row / 2**20:.2f} MB decoded = "
                f"{self.total_bytes / 2**30:.2f} GB")


class SplitTooLarge(Exception):
    """A split whose decoded size is (or is estimated to be) over the memory limit."""

    def __init__(self, estimate: MemoryEstimate, limit_bytes: int):
        self.estimate, self.limit_bytes = estimate, limit_bytes
        super().__init__(f"{estimate}, over the limit of {limit_bytes / 2**30:g} GB")


def item_bytes(item: object) -> int:
    """Bytes a decoded item holds: its tensors, and a rough allowance for strings and the row."""
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, dict):
        return sum(3 * len(json.dumps(v, default=str)) if k == "row" else item_bytes(v) for k, v in item.items())
    if isinstance(item, str):
        return 50 + len(item)
    if isinstance(item, list | tuple):
        return sum(item_bytes(v) for v in item)
    return 16


def count_rows(location: str | os.PathLike, split: str | Iterable[str] | None = None, *,
               options: DecodeOptions = DecodeOptions(), where=None) -> int:
    """Rows of a split, read without decoding a file (bad lines are not counted, nor logged)."""
    splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    n = 0
    for raw in iter_source(location, SkipLog(quiet=True), **options.source_limits):
        if splits is not None and row_split(raw.row) not in splits:
            continue
        try:
            if where is not None and not where(raw.row):
                continue
        except Exception:  # the dataset skips (and names) such a row when it meets it
            continue
        n += 1
    return n


class MemoryDataset(Dataset):
    """Every decoded sample of a data set split, held in a list (map-style, shuffles freely).

    With ``memory_limit_bytes``, loading stops with :class:`SplitTooLarge` as soon as the split
    (``expected_rows`` of it, projected from the first :data:`ESTIMATE_SAMPLES` samples) or what
    is already held is over the limit.
    """

    def __init__(
        self, location: str | os.PathLike, fields: Sequence[str] | Mapping[str, str], *,
        split: str | Iterable[str] | None = None, options: DecodeOptions = DecodeOptions(),
        skips: SkipLog | None = None, where=None, limit: int | None = None, progress=None,
        memory_limit_bytes: int | None = None, expected_rows: int | None = None,
    ):
        self.skips = skips if skips is not None else SkipLog()
        self.items: list[dict] = []
        self.nbytes = 0
        for item in MultimodalDataset(location, fields, split=split, options=options, skips=self.skips, where=where):
            self.items.append(item)
            self.nbytes += item_bytes(item)
            if memory_limit_bytes is not None:
                self._check(memory_limit_bytes, expected_rows)
            if progress:
                progress(len(self.items))
            if limit is not None and len(self.items) >= limit:
                break

    def _check(self, limit_bytes: int, expected_rows: int | None) -> None:
        per_row = self.nbytes / len(self.items)
        if self.nbytes > limit_bytes:
            raise SplitTooLarge(MemoryEstimate(max(expected_rows or 0, len(self.items)), per_row), limit_bytes)
        if expected_rows and len(self.items) in (min(ESTIMATE_SAMPLES, expected_rows), expected_rows // 4):
            estimate = MemoryEstimate(expected_rows, per_row)
            if estimate.total_bytes > limit_bytes:
                raise SplitTooLarge(estimate, limit_bytes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def load_split(
    location: str | os.PathLike, fields: Sequence[str] | Mapping[str, str], *,
    split: str | Iterable[str] | None = None, options: DecodeOptions = DecodeOptions(),
    skips: SkipLog | None = None, where=None, memory_limit_gb: float | None = DEFAULT_MEMORY_LIMIT_GB,
    progress=None,
) -> MemoryDataset | MultimodalDataset:
    """A split decoded into memory when its estimated decoded size is within ``memory_limit_gb``
    (None: no limit), else the same split streamed, with a log line that says so and why.

    The estimate is the split's rows times the decoded bytes of its first samples; loading also
    stops if what it holds passes the limit. Samples skipped on the way are counted into
    ``skips`` once, whichever way the split is read.
    """
    skips = skips if skips is not None else SkipLog()
    if memory_limit_gb is not None and memory_limit_gb <= 0:
        raise ValueError(f"data.memory_limit_gb must be positive (or null: no limit), got {memory_limit_gb}")
    limit = None if memory_limit_gb is None else int(memory_limit_gb * 2**30)
    rows = count_rows(location, split, options=options, where=where) if limit is not None else None
    trial = SkipLog(keep=skips.keep, quiet=True)  # a split that goes back to streaming logs its skips there
    try:
        dataset = MemoryDataset(location, fields, split=split, options=options, skips=trial, where=where,
                                progress=progress, memory_limit_bytes=limit, expected_rows=rows)
    except SplitTooLarge as e:
        log.warning("data split %s: %s, over data.memory_limit_gb (%g): streamed from disk instead of held "
                    "in memory", split, e.estimate, memory_limit_gb)
        return MultimodalDataset(location, fields, split=split, options=options, skips=skips, where=where)
    trial.replay(skips)
    dataset.skips = skips
    log.info("data split %s held in memory: %s", split,
             MemoryEstimate(len(dataset), dataset.nbytes / max(1, len(dataset))))
    return dataset


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
