"""The shapes world: a deterministic synthetic multimodal data set, and the ruler of polymodal.

Each sample is a 3x3-grid scene of 1-3 non-overlapping objects (shape, colour, size, cell)
drawn on a lightly noisy background, with:

- a caption in varied English (templates, synonyms, counts, spatial relations), spoken by
  eSpeak NG in one of a few voices and speeds (``audio_file``);
- question/answer pairs about colour, shape, count, existence and position (``qa``);
- a fusion task: a spoken yes/no question about a colour-shape pair (``fusion_audio_file``,
  ``fusion_label``), balanced, with near-miss negatives, so neither the image nor the
  question alone tells the answer;
- a noisy-modalities task (one-object scenes): the object's colour, from an image with hidden
  cells and a spoken caption under noise (``noisy_file``, ``noisy_audio_file``, ``noisy_label``; see
  :mod:`polymodal.data.noisy`): each alone is informative but unreliable;
- for a fraction of samples, a short video of one object moving across the frame with its
  spoken description as the sound track (``video_file``, ``video_text``);
- the scene graph itself (``objects``), so any judge can check any claim.

Splits: ``train`` / ``val`` / ``test`` never contain the shape-colour pairs in
:data:`HELD_OUT_PAIRS`; every ``test_novel`` scene contains at least one of them.
Every sample depends only on ``(seed, index)``, so a world's metadata and images are
byte-identical on every run and any number of worker processes (its speech says the same words
in the same voice, but eSpeak NG can shift an utterance by a few samples from run to run).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from polymodal.data.noisy import noisy_sample
from polymodal.data.scene import (
    COLOUR_WORDS,
    COLOURS,
    NUMBERS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    SHAPE_PLURALS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    SceneObject,
    relation_holds,
)
from polymodal.modalities.audio import save_wav
from polymodal.modalities.speech import ENGLISH_VOICES, synthesize
from polymodal.modalities.video import write_video

RGB = {
    "red": (220, 38, 38), "green": (34, 160, 60), "blue": (37, 84, 220),
    "yellow": (235, 200, 20), "purple": (140, 55, 185), "orange": (245, 128, 25),
}
# Shape-colour pairs that never appear in train / val / test; every test_novel scene has one.
HELD_OUT_PAIRS = (
    ("star", "red"), ("triangle", "green"), ("cross", "blue"),
    ("circle", "yellow"), ("square", "purple"), ("star", "orange"),
)
SPLIT_FRACTIONS = (("train", 0.80), ("val", 0.05), ("test", 0.10), ("test_novel", 0.05))
OBJECT_COUNT_WEIGHTS = (0.4, 0.3, 0.3)  # P(1 object), P(2), P(3)
SPEECH_RATES = (140, 160, 180)  # words per minute
VIDEO_FPS = 8
SUPERSAMPLE = 4  # draw at 4x and downsample, so small shapes keep clean edges


@dataclass(frozen=True)
class WorldConfig:
    n: int = 1000
    seed: int = 0
    size: int = 64  # image side in pixels
    speech: bool = True
    video_fraction: float = 0.05  # share of samples that also get a video clip

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.size < 24:
            raise ValueError(f"size must be at least 24 pixels, got {self.size}")
        if not 0.0 <= self.video_fraction <= 1.0:
            raise ValueError(f"video_fraction must be in [0, 1], got {self.video_fraction}")


# ---- scenes ------------------------------------------------------------------------------------


def _choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _split_of(rng: np.random.Generator) -> str:
    u, acc = rng.random(), 0.0
    for name, fraction in SPLIT_FRACTIONS:
        acc += fraction
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def sample_scene(rng: np.random.Generator, split: str, size: int) -> list[SceneObject]:
    n = int(rng.choice(3, p=OBJECT_COUNT_WEIGHTS)) + 1
    cells = rng.choice(9, size=n, replace=False)
    held = set(HELD_OUT_PAIRS)
    objects = []
    for k, cell in enumerate(cells):
        if split == "test_novel" and k == 0:
            shape, colour = _choose(rng, HELD_OUT_PAIRS)
        else:
            while True:
                shape, colour = _choose(rng, SHAPES), _choose(rng, COLOURS)
                if split == "test_novel" or (shape, colour) not in held:
                    break
        obj_size = _choose(rng, SIZES)
        row, col = divmod(int(cell), 3)
        cell_px = size / 3
        radius = cell_px * (0.42 if obj_size == "large" else 0.25)
        jitter = cell_px / 2 - radius - 1
        cx = (col + 0.5) * cell_px + rng.uniform(-jitter, jitter) * 0.6
        cy = (row + 0.5) * cell_px + rng.uniform(-jitter, jitter) * 0.6
        bbox = (cx - radius, cy - radius, cx + radius, cy + radius)
        objects.append(SceneObject(shape, colour, obj_size, row, col, bbox))
    return objects


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) inside a circle of radius ``r``."""
    def polar(radius, angle):
        return (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        return [polar(r if k % 2 == 0 else r * 0.42, -math.pi / 2 + math.pi * k / 5) for k in range(10)]
    if shape == "cross":
        a = r * 0.34
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_objects(draw: ImageDraw.ImageDraw, objects: list[SceneObject], scale: float) -> None:
    for o in objects:
        x0, y0, x1, y1 = (v * scale for v in o.bbox)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=RGB[o.colour])
        else:
            draw.polygon(shape_polygon(o.shape, cx, cy, r), fill=RGB[o.colour])


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light grey background with mild Gaussian pixel noise, (size, size, 3) float."""
    level = rng.uniform(205, 240)
    return level + rng.normal(0.0, 5.0, size=(size, size, 3))


def render(objects: list[SceneObject], size: int, rng: np.random.Generator) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw_objects(ImageDraw.Draw(canvas), objects, SUPERSAMPLE)
    layer = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    alpha = layer[:, :, 3:4] / 255.0
    noise = rng.normal(0.0, 4.0, size=(size, size, 3))
    pixels = background(rng, size) * (1 - alpha) + (layer[:, :, :3] + noise) * alpha
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# ---- language ----------------------------------------------------------------------------------


def _word(rng, table: dict, canon: str) -> str:
    words = table[canon]
    return words[0] if rng.random() < 0.7 else _choose(rng, words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(rng, o: SceneObject, with_size: bool = True) -> str:
    words = ([_word(rng, SIZE_WORDS, o.size)] if with_size else []) + [
        _word(rng, COLOUR_WORDS, o.colour), _word(rng, SHAPE_WORDS, o.shape)]
    return _article(" ".join(words))


def position_phrase(rng, o: SceneObject) -> str:
    return _word(rng, POSITION_PHRASES, o.cell)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(rng: np.random.Generator, objects: list[SceneObject], sizes: bool = True, places: bool = True) -> str:
    """One English description of the scene; every claim in it is true of ``objects``. It names
    every object; without ``sizes`` it leaves out their sizes, without ``places`` their cells
    (relations between two objects are kept: they are not places). With both (the world's
    captions) the same ``rng`` gives the same caption as it always has."""
    def phrase(o: SceneObject) -> str:
        return object_phrase(rng, o, with_size=sizes)

    full = [f"{phrase(o)} {position_phrase(rng, o)}" if places else phrase(o) for o in objects]
    n = len(objects)
    if n == 1:
        o = objects[0]

        def counted_one() -> str:
            words = ([_word(rng, SIZE_WORDS, o.size)] if sizes else []) + [
                _word(rng, COLOUR_WORDS, o.colour), _word(rng, SHAPE_WORDS, o.shape)]
            return " ".join(["one", *words] + ([position_phrase(rng, o)] if places else []))

        templates = [
            lambda: full[0],
            lambda: f"there is {full[0]}",
            *([lambda: f"{position_phrase(rng, o)} there is {phrase(o)}"] if places else []),
            lambda: f"a picture of {full[0]}",
            counted_one,
        ]
        return _choose(rng, templates)()
    relation_pairs = [(a, b, rel) for a in objects for b in objects if a is not b
                      for rel in RELATION_PHRASES if relation_holds(rel, a, b)]
    templates = [
        lambda: _join(full),
        lambda: f"there are {NUMBERS[n]} {_choose(rng, ('objects', 'shapes'))}: {_join(full)}",
        lambda: f"an image with {_join(full)}",
    ]
    if n == 2:
        def relation():
            a, b, rel = relation_pairs[int(rng.integers(len(relation_pairs)))]
            return f"{phrase(a)} {_word(rng, RELATION_PHRASES, rel)} {phrase(b)}"
        templates += [relation, relation]
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    if any(k > 1 for k in groups.values()):
        def counted():
            parts = []
            for (colour, shape), k in groups.items():
                word = _word(rng, SHAPE_WORDS, shape)
                noun = SHAPE_PLURALS[word] if k > 1 else word
                parts.append(f"{NUMBERS[k] if k > 1 else 'a'} {_word(rng, COLOUR_WORDS, colour)} {noun}"
                             .replace("a o", "an o"))
            return _join(parts)
        templates += [counted, counted]
    return _choose(rng, templates)()


# Words and sentence shapes that training captions never use, for paraphrased queries.
PARAPHRASE_COLOURS = {"red": ("scarlet", "crimson"), "green": ("emerald", "lime"), "blue": ("azure", "cobalt"),
                      "yellow": ("golden", "lemon"), "purple": ("lilac", "plum"), "orange": ("tangerine", "amber")}
PARAPHRASE_SHAPES = {"circle": ("ring", "round dot"), "square": ("tile", "block"), "triangle": ("pyramid", "wedge"),
                     "star": ("five-pointed star", "starburst"), "cross": ("plus symbol", "cross mark")}
PARAPHRASE_SIZES = {"small": ("minuscule", "compact"), "large": ("huge", "giant")}
PARAPHRASE_PLACES = ("upper-left corner", "top edge", "upper-right corner", "left edge", "dead center",
                     "right edge", "lower-left corner", "bottom edge", "lower-right corner")


def paraphrase(rng: np.random.Generator, objects: list[SceneObject]) -> str:
    """A description in words and sentence shapes the training captions never use."""
    parts = []
    for o in objects:
        size = _choose(rng, PARAPHRASE_SIZES[o.size])
        colour = _choose(rng, PARAPHRASE_COLOURS[o.colour])
        shape = _choose(rng, PARAPHRASE_SHAPES[o.shape])
        place = PARAPHRASE_PLACES[o.cell]
        parts.append(_choose(rng, (f"{size} {colour} {shape} near the {place}",
                                   f"{colour} {shape}, {size}, by the {place}")))
    lead = _choose(rng, ("this scene shows ", "we see ", "the picture holds ", "look: "))
    return lead + "; ".join(parts)


def questions(rng: np.random.Generator, objects: list[SceneObject], split: str) -> list[dict]:
    """One question per answerable type: colour, shape, count, exist, position."""
    qa = []
    by_shape: dict[str, list[SceneObject]] = {}
    by_colour: dict[str, list[SceneObject]] = {}
    for o in objects:
        by_shape.setdefault(o.shape, []).append(o)
        by_colour.setdefault(o.colour, []).append(o)
    colour_word = _choose(rng, ("colour", "color"))
    unique_shapes = [s for s, os_ in by_shape.items() if len(os_) == 1]
    if unique_shapes:
        s = _choose(rng, unique_shapes)
        qa.append({"type": "colour", "question": f"what {colour_word} is the {_word(rng, SHAPE_WORDS, s)}?",
                   "answer": by_shape[s][0].colour})
    unique_colours = [c for c, os_ in by_colour.items() if len(os_) == 1]
    if unique_colours:
        c = _choose(rng, unique_colours)
        noun = _choose(rng, ("object", "shape", "thing"))
        qa.append({"type": "shape", "question": f"what shape is the {_word(rng, COLOUR_WORDS, c)} {noun}?",
                   "answer": by_colour[c][0].shape})
    if rng.random() < 0.5:
        qa.append({"type": "count", "question": f"how many {_choose(rng, ('objects', 'shapes'))} are there?",
                   "answer": NUMBERS[len(objects)]})
    else:
        s = _choose(rng, SHAPES)
        qa.append({"type": "count", "question": f"how many {SHAPE_PLURALS[s]} are there?",
                   "answer": NUMBERS[len(by_shape.get(s, []))]})
    colour, shape, label = yes_no_pair(rng, objects, split)
    qa.append({"type": "exist", "question": f"is there {_article(f'{colour} {shape}')}?", "answer": label})
    o = _choose(rng, objects)
    if sum(p.colour == o.colour and p.shape == o.shape for p in objects) == 1:
        qa.append({"type": "position", "question": f"where is the {o.colour} {o.shape}?", "answer": o.position})
    return qa


def yes_no_pair(rng: np.random.Generator, objects: list[SceneObject], split: str) -> tuple[str, str, str]:
    """A (colour, shape) to ask about and the answer, "yes" or "no" with equal chance.

    A "no" is a near miss: its colour or its shape is in the scene, just not together, so the
    question cannot be answered from the image's colours or shapes alone. Outside
    ``test_novel`` the held-out pairs are never asked about.
    """
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = _choose(rng, sorted(present))
        return colour, shape, "yes"
    held = {(c, s) for s, c in HELD_OUT_PAIRS}
    candidates = sorted(
        (c, s) for c in COLOURS for s in SHAPES
        if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)
        and (split == "test_novel" or (c, s) not in held)
    )
    colour, shape = _choose(rng, candidates)
    return colour, shape, "no"


# ---- one sample --------------------------------------------------------------------------------


def _video(rng: np.random.Generator):
    """A single object crossing the frame along a row or column, and its description."""
    shape, colour = _choose(rng, SHAPES), _choose(rng, COLOURS)
    direction = _choose(rng, ("left", "right", "up", "down"))
    text = {
        "left": f"a {colour} {shape} moves from the right to the left",
        "right": f"a {colour} {shape} moves from the left to the right",
        "up": f"a {colour} {shape} moves from the bottom to the top",
        "down": f"a {colour} {shape} moves from the top to the bottom",
    }[direction]
    return shape, colour, direction, text


def _render_video(rng, shape, colour, direction, size, n_frames) -> np.ndarray:
    r = size / 3 * 0.4
    lane = (int(rng.integers(3)) + 0.5) * size / 3
    start, end = r + 1, size - r - 1
    if direction in ("left", "up"):
        start, end = end, start
    frames = []
    for t in range(n_frames):
        along = start + (end - start) * t / max(n_frames - 1, 1)
        cx, cy = (along, lane) if direction in ("left", "right") else (lane, along)
        obj = SceneObject(shape, colour, "large", 0, 0, (cx - r, cy - r, cx + r, cy + r))
        frames.append(np.asarray(render([obj], size, rng)))
    return np.stack(frames)


def make_sample(config: WorldConfig, index: int, out: Path) -> dict:
    """Generate sample ``index`` of the world, write its files under ``out``, return its row."""
    rng = np.random.default_rng([config.seed, index])
    split = _split_of(rng)
    objects = sample_scene(rng, split, config.size)
    sample_id = f"{index:06d}"
    row: dict = {"id": sample_id, "split": split, "file_name": f"images/{sample_id}.png"}
    image = render(objects, config.size, rng)
    image.save(out / row["file_name"], optimize=False, compress_level=1)
    row["text"] = caption(rng, objects)
    row["objects"] = [o.to_dict() for o in objects]
    row["count"] = len(objects)
    row["qa"] = questions(rng, objects, split)
    colour, shape, label = yes_no_pair(rng, objects, split)
    row["fusion_question"] = f"is there {_article(f'{colour} {shape}')}?"
    row["fusion_label"] = label
    voice, rate = _choose(rng, ENGLISH_VOICES), int(_choose(rng, SPEECH_RATES))
    row["voice"], row["speech_rate"] = voice, rate
    wants_video = rng.random() < config.video_fraction
    speech = None
    if config.speech:
        row["audio_file"] = f"audio/{sample_id}.wav"
        speech = synthesize(row["text"], voice, rate)
        save_wav(out / row["audio_file"], speech)
        row["fusion_audio_file"] = f"audio/{sample_id}_question.wav"
        save_wav(out / row["fusion_audio_file"], synthesize(row["fusion_question"], voice, rate))
    if wants_video:
        shape, colour, direction, text = _video(rng)
        speech = synthesize(text, voice, rate)
        n_frames = max(12, math.ceil(len(speech) / 16_000 * VIDEO_FPS))
        frames = _render_video(rng, shape, colour, direction, config.size, n_frames)
        row["video_file"] = f"video/{sample_id}.mp4"
        write_video(str(out / row["video_file"]), frames, VIDEO_FPS, speech)
        row["video_text"] = text
        row["video_motion"] = {"shape": shape, "colour": colour, "direction": direction}
    row.update(noisy_sample(row, image, speech, out, config.seed, index))  # its own random stream
    return row


# ---- the whole world ---------------------------------------------------------------------------

_worker_config: tuple[WorldConfig, Path] | None = None


def _init_worker(config: WorldConfig, out: Path) -> None:
    global _worker_config
    _worker_config = (config, out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _work(index: int) -> str:
    config, out = _worker_config
    return json.dumps(make_sample(config, index, out), sort_keys=True)


def world_info(config: WorldConfig) -> dict:
    return {
        "name": "shapes", "n": config.n, "seed": config.seed, "image_size": config.size,
        "speech": config.speech, "video_fraction": config.video_fraction,
        "shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "splits": {name: fraction for name, fraction in SPLIT_FRACTIONS},
    }


def generate_world(
    out: str | os.PathLike, config: WorldConfig, *, workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the world to ``out`` (``metadata.jsonl``, ``world.json``, images/, audio/, video/).

    ``progress`` is called with the number of samples finished after each one.
    """
    out = Path(out)
    for sub in ("images", "audio", "video"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    tmp = out / "metadata.jsonl.tmp"
    chunk = max(1, min(64, config.n // (workers * 8) or 1))
    with open(tmp, "w") as f:
        if workers == 1:
            _init_worker(config, out)
            rows = map(_work, range(config.n))
            for done, line in enumerate(rows, 1):
                f.write(line + "\n")
                if progress:
                    progress(done)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(config, out)) as pool:
                for done, line in enumerate(pool.imap(_work, range(config.n), chunksize=chunk), 1):
                    f.write(line + "\n")
                    if progress:
                        progress(done)
    os.replace(tmp, out / "metadata.jsonl")
    (out / "world.json").write_text(json.dumps(world_info(config), indent=2) + "\n")
    return out
