"""The noisy-modalities task of the shapes world: what colour is the object?

Scenes of one object only. Each modality alone can answer, but each is damaged, independently:

- the image (``noisy_file``) has each of its nine grid cells hidden, with probability
  ``OCCLUDED_CELL``, under a grey noise patch; an object in a hidden cell is gone;
- the spoken caption (``noisy_audio_file``) has bursts of loud white noise at random places
  (``MASKED_SHARE`` of its length in all; they overlap, so about 40% of it) that drown
  stretches of it: a drowned colour word is gone.

Because the damage is independent, what one modality lost the other often kept: fusing them
beats the best single modality. The label (``noisy_label``) is the object's colour. (The
number of objects would be a poor label: a longer caption tells it, however noisy.) Scenes
with several objects get no noisy-task columns. The damage depends only on the world's seed
and the sample's index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

OCCLUDED_CELL = 0.4  # chance that a grid cell is hidden
MASKED_SHARE = 0.5  # loud-noise bursts, in lengths of the speech (they overlap: ~40% drowned)
SNR_DB = None  # signal-to-noise ratio of background noise over the whole utterance (None: none)
BURST_SECONDS = 0.3  # length of one loud-noise burst
STREAM = 101  # random stream of the noisy task, apart from the sample's other draws


def noisy_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, STREAM])


def occlude(image: Image.Image, rng: np.random.Generator, p: float = OCCLUDED_CELL) -> Image.Image:
    """Hide each of the 3x3 grid cells with probability ``p`` under grey noise."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    size = pixels.shape[0]
    edges = np.round(np.linspace(0, size, 4)).astype(int)
    for row in range(3):
        for col in range(3):
            if rng.random() < p:
                y0, y1, x0, x1 = edges[row], edges[row + 1], edges[col], edges[col + 1]
                grey = rng.uniform(90, 160)
                pixels[y0:y1, x0:x1] = grey + rng.normal(0, 30, size=(y1 - y0, x1 - x0, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def bury(speech: np.ndarray, rng: np.random.Generator, sample_rate: int = 16_000,
         masked: float = MASKED_SHARE, snr_db: float | None = SNR_DB) -> np.ndarray:
    """Speech with ``masked`` of its length in loud noise bursts, and (given ``snr_db``) under
    white noise at that signal-to-noise ratio."""
    speech = np.asarray(speech, dtype=np.float32)
    power = float(np.mean(speech**2)) + 1e-8
    out = speech.copy()
    if snr_db is not None:
        out = out + rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), size=speech.shape)
    burst = max(1, int(BURST_SECONDS * sample_rate))
    n_bursts = int(round(masked * len(speech) / burst))
    for _ in range(n_bursts):
        start = int(rng.integers(0, max(1, len(speech) - burst)))  # bursts may overlap
        out[start : start + burst] = rng.normal(0, 4 * np.sqrt(power), size=len(out[start : start + burst]))
    peak = np.abs(out).max()
    return (out / peak * 0.9 if peak > 0.9 else out).astype(np.float32)


def noisy_sample(row: dict, image: Image.Image, speech: np.ndarray | None, out: Path, seed: int,
                 index: int) -> dict:
    """Write the damaged image (and speech) of a one-object sample; return the row's new
    columns (none for a scene of several objects)."""
    if len(row["objects"]) != 1:
        return {}
    rng = noisy_rng(seed, index)
    sample_id = row["id"]
    columns = {"noisy_file": f"images/{sample_id}_noisy.png", "noisy_label": row["objects"][0]["colour"]}
    occlude(image, rng).save(out / columns["noisy_file"], optimize=False, compress_level=1)
    if speech is not None:
        from polymodal.modalities.audio import save_wav

        columns["noisy_audio_file"] = f"audio/{sample_id}_noisy.wav"
        save_wav(out / columns["noisy_audio_file"], bury(speech, rng))
    return columns


def add_noisy_task(world: str | os.PathLike, progress: Callable[[int], None] | None = None) -> int:
    """Add the noisy task to a shapes world made before it existed; returns the rows updated."""
    from polymodal.modalities.audio import load_audio

    world = Path(world)
    meta = world / "metadata.jsonl"
    info = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else {}
    seed = int(info.get("seed", 0))
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    for done, row in enumerate(rows, 1):
        if "objects" not in row:
            raise ValueError(f"{meta}: row {row.get('id')!r} has no scene graph: not a shapes world")
        image = Image.open(world / row["file_name"])
        speech = load_audio(world / row["audio_file"]).numpy() if row.get("audio_file") else None
        for column in ("noisy_file", "noisy_audio_file", "noisy_label"):  # made again from scratch
            row.pop(column, None)
        row.update(noisy_sample(row, image, speech, world, seed, int(row["id"])))
        if progress:
            progress(done)
    tmp = meta.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, meta)
    return len(rows)
