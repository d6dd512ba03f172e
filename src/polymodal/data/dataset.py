"""Stream a data set (folder or shards) as decoded samples, and collate them into batches.

A *field* is one input the model wants: a name in the batch, a modality and the column it
comes from. ``["image", "text"]`` asks for the default columns; ``{"question":
"audio:fusion_audio_file"}`` names a column. A row that lacks a field's column is skipped and
counted ("missing"); a row whose file fails to decode is skipped, counted and logged ("bad").

A row without a ``split`` (and outside a ``train/``, ``val/``, ... folder, which names it) gets one
by a fixed rule, :func:`row_split`: a hash of its ``id`` (else of its first file path, else of the
row itself) puts 90% of such rows in ``train``, 5% in ``val`` and 5% in ``test``, the same on every
machine and in every run, and the same for a folder and the shards packed from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymodal.data.source import DEFAULT_MAX_FILE_BYTES, RawSample, SkipLog, iter_source
from polymodal.errors import InputError
from polymodal.modalities.audio import DEFAULT_MAX_SECONDS, load_audio, log_mel_spectrogram
from polymodal.modalities.image import DEFAULT_MAX_PIXELS, ImageTransform, load_image
from polymodal.modalities.text import TextTokenizer, pad_sequences, validate_text
from polymodal.modalities.video import DEFAULT_MAX_PIXELS as DEFAULT_MAX_VIDEO_PIXELS
from polymodal.modalities.video import load_video

MODALITIES = ("image", "text", "audio", "video")
DEFAULT_COLUMNS = {"image": "file_name", "text": "text", "audio": "audio_file", "video": "video_file"}
UNSPLIT_SHARES = (("train", 0.90), ("val", 0.05), ("test", 0.05))  # rows without a split (row_split)
UNSPLIT_RULE = ("rows without a 'split' get one from a hash of their id (or file): "
                "90% train, 5% val, 5% test")

log = logging.getLogger("polymodal.data")
_told_unsplit: set[str] = set()  # data sets whose unsplit rows were logged (once a process)


def row_split(row: Mapping) -> str:
    """The split of a metadata row: its ``split``, or for a row without one a split drawn by a
    hash of the row's ``id`` (else of its first file path, else of the row), in the shares of
    :data:`UNSPLIT_SHARES`. A hash, not a shuffle: a row keeps its split when rows are added,
    removed or reordered, and a folder and its shards agree."""
    split = row.get("split")
    if isinstance(split, str) and split:
        return split
    key = row.get("id")
    if key in (None, ""):
        key = next((row[c] for c in ("file_name", "audio_file", "video_file") if row.get(c) not in (None, "")), None)
    if key in (None, ""):
        key = json.dumps(row, sort_keys=True, default=str)
    draw = int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    for name, share in UNSPLIT_SHARES:
        if draw < share:
            return name
        draw -= share
    return UNSPLIT_SHARES[-1][0]


@dataclass(frozen=True)
class Field:
    name: str  # key in the batch
    modality: str  # image | text | audio | video
    column: str  # metadata column it is read from


def parse_fields(spec: Sequence[str] | Mapping[str, str]) -> list[Field]:
    """``["image", "text"]`` or ``{"name": "modality[:column]"}`` -> fields."""
    items = spec.items() if isinstance(spec, Mapping) else ((m, m) for m in spec)
    fields = []
    for name, value in items:
        modality, _, column = value.partition(":")
        if modality not in MODALITIES:
            raise ValueError(f"field {name!r}: unknown modality {modality!r}; choose from {MODALITIES}")
        fields.append(Field(name, modality, column or DEFAULT_COLUMNS[modality]))
    if not fields:
        raise ValueError("ask for at least one field")
    return fields


@dataclass(frozen=True)
class DecodeOptions:
    """How samples are read and decoded, and the limits that keep a stranger's file cheap."""

    image_transform: ImageTransform = ImageTransform(64)
    video_frames: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS  # an image of more pixels is skipped
    max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS  # a video whose frames have more pixels is skipped
    max_audio_seconds: float = DEFAULT_MAX_SECONDS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a larger file is skipped before it is read
    allow_outside_paths: bool = False  # read files that lead outside the data set folder

    @property
    def source_limits(self) -> dict:
        """The keyword arguments of :func:`iter_source` these options set."""
        return {"allow_outside_paths": self.allow_outside_paths, "max_file_bytes": self.max_file_bytes}


def decode_field(raw: RawSample, f: Field, options: DecodeOptions):
    """Decode one field of a sample; raises :class:`InputError` naming the file on bad input."""
    if f.modality == "text":
        return validate_text(raw.row.get(f.column), source=f"{raw.origin}: field {f.column!r}")
    data, name = raw.read(f.column), raw.file_name(f.column)
    if f.modality == "image":
        size = options.image_transform.size
        return options.image_transform(load_image(data, name=name, max_pixels=options.max_pixels, target_size=size))
    if f.modality == "audio":
        return log_mel_spectrogram(load_audio(data, name=name, max_seconds=options.max_audio_seconds))
    clip = load_video(data, name=name, num_frames=options.video_frames, max_pixels=options.max_video_pixels)
    frames = torch.stack([options.image_transform.normalize(x) for x in _resize_frames(clip.frames, options)])
    sound = log_mel_spectrogram(clip.audio) if clip.has_audio else torch.zeros(80, 0)
    return {"frames": frames, "audio": sound}


def _resize_frames(frames: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
    size = options.image_transform.size
    if frames.shape[-2:] == (size, size):
        return frames
    return torch.nn.functional.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class MultimodalDataset(IterableDataset):
    """Decoded samples of one split of a data set folder or shard set, streamed.

    Each item is ``{field name: decoded value, ..., "row": the metadata row}``. With several
    DataLoader workers or processes, rows are dealt round-robin so each is read once.
    """

    def __init__(
        self, location: str | os.PathLike, fields: Sequence[str] | Mapping[str, str] = ("image", "text"),
        *, split: str | Iterable[str] | None = None, options: DecodeOptions = DecodeOptions(),
        skips: SkipLog | None = None, where=None,
    ):
        self.location = location
        self.fields = parse_fields(fields)
        self.splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        self.options = options
        self.skips = skips if skips is not None else SkipLog()
        self.where = where  # optional row filter: row -> bool

    def _shard_of_stream(self) -> tuple[int, int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        return rank, world

    def __iter__(self) -> Iterator[dict]:
        part, parts = self._shard_of_stream()
        kept = 0
        for raw in iter_source(self.location, self.skips, **self.options.source_limits):
            if self.splits is not None:
                if raw.row.get("split") in (None, "") and str(self.location) not in _told_unsplit:
                    _told_unsplit.add(str(self.location))
                    log.info("%s: %s", self.location, UNSPLIT_RULE)
                if row_split(raw.row) not in self.splits:
                    continue
            if self.where is not None and not self._where(raw):
                continue
            kept += 1
            if (kept - 1) % parts != part:
                continue
            missing = [f.column for f in self.fields if raw.row.get(f.column) is None or raw.row.get(f.column) == ""]
            if missing:
                self.skips.add(raw.origin, f"no {', '.join(missing)}", kind="missing")
                continue
            item = self._decode(raw)
            if item is not None:
                item["row"] = raw.row
                yield item

    def _where(self, raw: RawSample) -> bool:
        try:
            return bool(self.where(raw.row))
        except Exception as e:  # a row of unexpected types: its problem, not the run's
            self.skips.add(raw.origin, f"row not understood: {type(e).__name__}: {e}")
            return False

    def _decode(self, raw: RawSample) -> dict | None:
        """Every field of a sample, or None (the sample skipped, with the reason logged): a
        failure to read one sample never ends the run."""
        try:
            return {f.name: decode_field(raw, f, self.options) for f in self.fields}
        except InputError as e:
            self.skips.add(e.source, e.problem)
        except Exception as e:  # a decoder's own error on a file no check foresaw
            self.skips.add(raw.origin, f"cannot decode: {type(e).__name__}: {e}")
        return None


class Collator:
    """Batch samples: images stacked, text tokenised and padded, spectrograms padded, with masks.

    Batch keys, by field modality (``NAME`` is the field's name):
    image ``NAME`` (B, 3, H, W); text ``NAME`` list of str, and with a tokenizer ``NAME_ids`` /
    ``NAME_mask`` (B, T); audio ``NAME`` (B, 80, T) and ``NAME_mask`` (B, T) over frames; video
    ``NAME`` (B, N, 3, H, W), ``NAME_audio`` (B, 80, T) and ``NAME_audio_mask``; ``rows`` the
    metadata rows.
    """

    def __init__(self, fields: Sequence[str] | Mapping[str, str], tokenizer: TextTokenizer | None = None,
                 max_text_length: int | None = None):
        self.fields = parse_fields(fields)
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict = {"rows": [s["row"] for s in samples]}
        for f in self.fields:
            values = [s[f.name] for s in samples]
            if f.modality == "image":
                batch[f.name] = torch.stack(values)
            elif f.modality == "text":
                batch[f.name] = values
                if self.tokenizer is not None:
                    batch[f"{f.name}_ids"], batch[f"{f.name}_mask"] = self.tokenizer.batch(
                        values, max_length=self.max_text_length)
            elif f.modality == "audio":
                batch[f.name], batch[f"{f.name}_mask"] = pad_spectrograms(values)
            else:
                batch[f.name] = torch.stack([v["frames"] for v in values])
                batch[f"{f.name}_audio"], batch[f"{f.name}_audio_mask"] = pad_spectrograms([v["audio"] for v in values])
        return batch


def pad_spectrograms(specs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(80, T_i) each -> (B, 80, T_max) zero-padded, and a mask (B, T_max) True on real frames."""
    longest = max(s.shape[-1] for s in specs)
    out = torch.zeros(len(specs), specs[0].shape[0], longest)
    for i, s in enumerate(specs):
        out[i, :, : s.shape[-1]] = s
    _, mask = pad_sequences([[1] * s.shape[-1] for s in specs], 0)
    return out, mask.reshape(len(specs), longest)


def make_loader(
    location: str | os.PathLike, fields: Sequence[str] | Mapping[str, str] = ("image", "text"), *,
    split: str | Iterable[str] | None = None, batch_size: int = 32, tokenizer: TextTokenizer | None = None,
    options: DecodeOptions = DecodeOptions(), num_workers: int = 0, skips: SkipLog | None = None,
    max_text_length: int | None = None, where=None,
) -> DataLoader:
    """A DataLoader over a data set folder or shards, yielding collated batches."""
    if num_workers > 0 and skips is not None:
        skips.share()  # workers report their skips into the caller's log
    dataset = MultimodalDataset(location, fields, split=split, options=options, skips=skips, where=where)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      collate_fn=Collator(fields, tokenizer, max_text_length))
