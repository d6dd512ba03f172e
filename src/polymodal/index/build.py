"""Build an index of a data set's samples with a saved contrastive model, and search it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from polymodal.data.dataset import Collator, DecodeOptions, MultimodalDataset
from polymodal.data.source import SkipLog
from polymodal.errors import InputError
from polymodal.index.vectors import EXACT_LIMIT, VectorIndex, make_index
from polymodal.modalities.audio import load_audio, log_mel_spectrogram
from polymodal.modalities.image import load_image

BATCH = 256


@torch.no_grad()
def build_index(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                modality: str = "image", split: str | None = None, kind: str = "auto",
                exact_limit: int = EXACT_LIMIT, progress=None) -> VectorIndex:
    """Embed every sample's ``modality`` of ``data`` and write an index folder to ``out``."""
    from polymodal.models import load_model

    model = load_model(model_dir, task="embed")
    if modality not in model.config.towers:
        raise InputError(model_dir, f"model has no {modality!r} tower (has {sorted(model.config.towers)})")
    fields = {modality: model.input_kind(modality)}
    options = DecodeOptions(image_transform=model.image_transform)  # the model's own preprocessing
    skips = SkipLog()
    dataset = MultimodalDataset(data, fields, split=split, options=options, skips=skips)
    collate = Collator(fields)
    vectors, items, pending = [], [], []
    root = Path(data).resolve()

    def flush():
        batch = collate(pending)
        vectors.append(model.embed(modality, batch).numpy())
        for row in batch["rows"]:
            items.append({"id": row.get("id"), "text": row.get("text"), "split": row.get("split"),
                          "file": str(root / row["file_name"]) if row.get("file_name") else None})
        pending.clear()
        if progress:
            progress(len(items))

    for item in dataset:
        pending.append(item)
        if len(pending) == BATCH:
            flush()
    if pending:
        flush()
    if not items:
        raise InputError(data, f"no samples to index ({skips.summary()})")
    index = VectorIndex(make_index(np.concatenate(vectors), kind, exact_limit), items,
                        {"model": str(Path(model_dir).resolve()), "modality": modality, "data": str(root),
                         "split": split, "skipped": skips.total})
    index.save(out)
    return index


@torch.no_grad()
def embed_query(model, *, text: str | None = None, image: str | None = None, audio: str | None = None) -> np.ndarray:
    """The embedding of one query given as text, an image file or an audio file."""
    given = [x for x in (text, image, audio) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: text, --image or --audio")
    kind = "text" if text is not None else ("image" if image is not None else "audio")
    name = model.tower_reading(kind)
    if name is None:
        raise ValueError(f"this model has no {kind} tower")
    if text is not None:
        return model.embed_text([text], modality=name).numpy()
    if image is not None:
        transform = model.image_transform  # the model's own preprocessing (a Hugging Face CLIP's mean and std)
        pixels = transform(load_image(image, target_size=transform.size))
        return model.embed_image(pixels[None], modality=name).numpy()
    mel = log_mel_spectrogram(load_audio(audio))[None]
    return model.embed_audio(mel, modality=name).numpy()


def draw_hits(hits: list[tuple[float, dict]], out: str | os.PathLike, title: str, columns: int = 5) -> Path | None:
    """A contact sheet of search hits ``(score, item)`` whose files exist; None if none do."""
    from polymodal.data.inspect import contact_sheet

    drawable = [(s, it) for s, it in hits if it.get("file") and Path(it["file"]).is_file()]
    if not drawable:
        return None
    return contact_sheet([(load_image(it["file"]), f"#{i} · {s:.3f}\n{it.get('text') or ''}")
                          for i, (s, it) in enumerate(drawable, 1)], out, columns=min(columns, len(drawable)),
                         title=title)
