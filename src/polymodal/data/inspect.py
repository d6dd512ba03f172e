"""Look at a data set: counts per split and modality, bad samples, and a contact sheet."""

from __future__ import annotations

import os
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.source import (
    DEFAULT_MAX_FILE_BYTES,
    BadSample,
    RawSample,
    SkipLog,
    is_file_column,
    iter_source,
)
from polymodal.errors import InputError
from polymodal.modalities.audio import load_audio
from polymodal.modalities.image import load_image, thumbnail
from polymodal.modalities.text import validate_text
from polymodal.modalities.video import load_video

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}


def modality_of(column: str, value: str) -> str:
    suffix = Path(value).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if column == "file_name" or "image" in column:
        return "image"
    if "video" in column:
        return "video"
    return "audio"


@dataclass
class Inspection:
    samples: int = 0
    per_split: Counter = field(default_factory=Counter)
    per_modality: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # split -> modality -> n
    bad: list[BadSample] = field(default_factory=list)
    skips: SkipLog = field(default_factory=SkipLog)
    sheet: Path | None = None
    sheet_items: list[tuple[object, str]] = field(default_factory=list)  # (PIL image, label)


THUMBNAIL = 128  # contact-sheet images are kept at most this size a side


def inspect_dataset(
    location: str | os.PathLike, *, decode: bool = True, sheet: str | os.PathLike | None = None,
    sheet_size: int = 24, progress: Callable[[int], None] | None = None, allow_outside_paths: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Inspection:
    """Read every sample (decoding every file when ``decode``), count it, and find the bad ones.

    With ``sheet``, writes a contact-sheet PNG of the first ``sheet_size`` good images with
    their captions (as thumbnails: a sheet holds small copies, not the decoded originals). Files
    are read under the same rules as training: inside the data set folder unless
    ``allow_outside_paths``, regular, at most ``max_file_bytes``.
    """
    result = Inspection()
    for raw in iter_source(location, result.skips, allow_outside_paths=allow_outside_paths,
                           max_file_bytes=max_file_bytes):
        split = str(raw.row.get("split", "(none)"))
        problems, found, image = _check_sample(raw, decode)
        for source, problem in problems:
            result.skips.add(source, problem)
        result.samples += 1
        result.per_split[split] += 1
        if not problems:
            for modality in set(found):
                result.per_modality[split][modality] += 1
            if image is not None and len(result.sheet_items) < sheet_size:
                caption = raw.row.get("text", "")
                caption = caption[:200] if isinstance(caption, str) else ""
                result.sheet_items.append((image, f"{split} · {raw.row.get('id', '')}\n{caption}"))
        if progress:
            progress(result.samples)
    result.bad = list(result.skips.bad)
    if sheet is not None and result.sheet_items:
        result.sheet = contact_sheet(result.sheet_items, sheet)
    return result


def _check_sample(raw: RawSample, decode: bool) -> tuple[list[tuple[str, str]], list[str], object]:
    """The problems of one sample (source, reason), the modalities it holds, and a thumbnail of
    its image; any failure to read or decode a file is one of its problems, never the end of the
    inspection."""
    problems: list[tuple[str, str]] = []
    found: list[str] = []
    image = None
    for column, value in raw.row.items():
        if not (is_file_column(column) and value):
            continue
        modality = modality_of(column, str(value))
        try:
            if decode:
                data, name = raw.read(column), raw.file_name(column)
                if modality == "image":
                    decoded = load_image(data, name=name, target_size=THUMBNAIL)
                    if column == "file_name":
                        image = thumbnail(decoded, THUMBNAIL)
                elif modality == "audio":
                    load_audio(data, name=name)
                else:
                    load_video(data, name=name, num_frames=1)
            else:
                raw.check(column)  # inside the folder, a regular file, not too large
            found.append(modality)
        except InputError as e:
            problems.append((e.source, e.problem))
        except Exception as e:  # a decoder's own error on a file no check foresaw
            problems.append((f"{raw.origin}: field {column!r}", f"cannot decode: {type(e).__name__}: {e}"))
    if "text" in raw.row:
        try:
            validate_text(raw.row["text"], source=f"{raw.origin}: field 'text'")
            found.append("text")
        except InputError as e:
            problems.append((e.source, e.problem))
    return problems, found, image


def contact_sheet(items: list[tuple[object, str]], out: str | os.PathLike, columns: int = 6,
                  title: str | None = None) -> Path:
    """A grid of images, each with its (wrapped) caption beneath, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(items) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 3.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, label) in zip(axes.flat, items, strict=False):
        ax.imshow(image, interpolation="nearest")
        head, _, text = label.partition("\n")
        ax.set_title(head, fontsize=7, color="#555555")
        ax.text(0.5, -0.04, textwrap.fill(text, 30), transform=ax.transAxes, ha="center", va="top", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
