"""Look at a data set: counts per split and modality, bad samples, and a contact sheet."""

from __future__ import annotations

import os
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.data.source import BadSample, SkipLog, is_file_column, iter_source
from polymodal.errors import InputError
from polymodal.modalities.audio import load_audio
from polymodal.modalities.image import load_image
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


def inspect_dataset(
    location: str | os.PathLike, *, decode: bool = True, sheet: str | os.PathLike | None = None,
    sheet_size: int = 24, progress: Callable[[int], None] | None = None,
) -> Inspection:
    """Read every sample (decoding every file when ``decode``), count it, and find the bad ones.

    With ``sheet``, writes a contact-sheet PNG of the first ``sheet_size`` good images with
    their captions.
    """
    result = Inspection()
    for raw in iter_source(location, result.skips):
        split = str(raw.row.get("split", "(none)"))
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
                        decoded = load_image(data, name=name)
                        if column == "file_name":
                            image = decoded
                    elif modality == "audio":
                        load_audio(data, name=name)
                    else:
                        load_video(data, name=name, num_frames=1)
                found.append(modality)
            except InputError as e:
                problems.append((e.source, e.problem))
        if "text" in raw.row:
            try:
                validate_text(raw.row["text"], source=f"{raw.origin}: field 'text'")
                found.append("text")
            except InputError as e:
                problems.append((e.source, e.problem))
        for source, problem in problems:
            result.skips.add(source, problem)
        result.samples += 1
        result.per_split[split] += 1
        if not problems:
            for modality in set(found):
                result.per_modality[split][modality] += 1
            if image is not None and len(result.sheet_items) < sheet_size:
                result.sheet_items.append((image, f"{split} · {raw.row.get('id', '')}\n{raw.row.get('text', '')}"))
        if progress:
            progress(result.samples)
    result.bad = list(result.skips.bad)
    if sheet is not None and result.sheet_items:
        result.sheet = contact_sheet(result.sheet_items, sheet)
    return result


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
