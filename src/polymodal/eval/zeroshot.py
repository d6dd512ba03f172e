"""Zero-shot classification with prompt templates, and the shapes world's attribute prompts."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from polymodal.data.scene import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES

DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "an image of a {}.", "a picture of a {}.")


def class_embeddings(
    embed_text: Callable[[list[str]], torch.Tensor], prompts: dict[str, Sequence[str]], batch: int = 512,
) -> tuple[list[str], torch.Tensor]:
    """Each class's embedding: the normalised mean of its prompts' embeddings (prompt ensembling)."""
    names = list(prompts)
    flat = [p for n in names for p in prompts[n]]
    embedded = torch.cat([embed_text(flat[i : i + batch]) for i in range(0, len(flat), batch)])
    out, start = [], 0
    for n in names:
        k = len(prompts[n])
        out.append(F.normalize(embedded[start : start + k].mean(0), dim=-1))
        start += k
    return names, torch.stack(out)


def template_prompts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, list[str]]:
    return {c: [t.format(c) for t in templates] for c in class_names}


def shapes_attribute_prompts(attribute: str) -> dict[str, list[str]]:
    """Prompts for one attribute of a single-object shapes-world image.

    Each class's prompts are every description of one object that has that attribute value
    ("a small red circle in the top left", ...), so the class embedding averages over the
    other attributes instead of guessing one wording.
    """
    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attribute]
    prompts: dict[str, list[str]] = {v: [] for v in values}
    for size, colour, shape, cell in itertools.product(SIZES, COLOURS, SHAPES, range(9)):
        obj = {"colour": colour, "shape": shape, "size": size, "position": POSITIONS[cell]}
        prompts[obj[attribute]].append(f"a {size} {colour} {shape} {POSITION_PHRASES[cell][0]}")
    return prompts


def zero_shot_accuracy(image_embeddings: torch.Tensor, labels: Sequence[str], names: list[str],
                       classes: torch.Tensor) -> float:
    predicted = (image_embeddings @ classes.T).argmax(1)
    truth = torch.tensor([names.index(label) for label in labels])
    return (predicted == truth).float().mean().item()


def shapes_count_prompts(per_count: int = 60, seed: int = 0) -> dict[str, list[str]]:
    """Prompts for the number of objects: captions of random scenes with 1, 2 and 3 objects."""
    import numpy as np

    from polymodal.data.shapes import caption, sample_scene

    rng = np.random.default_rng(seed)
    prompts: dict[str, list[str]] = {"1": [], "2": [], "3": []}
    while min(len(v) for v in prompts.values()) < per_count:
        objects = sample_scene(rng, "test_novel", 64)
        bucket = prompts[str(len(objects))]
        if len(bucket) < per_count:
            bucket.append(caption(rng, objects))
    return prompts
