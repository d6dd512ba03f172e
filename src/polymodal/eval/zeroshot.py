"""Zero-shot classification with prompt templates, and the shapes world's attribute prompts."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from polymodal.data.scene import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES
from polymodal.errors import InputError

log = logging.getLogger("polymodal.eval")

DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "an image of a {}.", "a picture of a {}.")
# Files in a data set's folder that name its integer labels, one name a line (line 1 names label 0)
NAMES_FILES = ("classes.txt", "labels.txt")
MAX_NAMES_BYTES = 1 << 20  # a names file is read whole: a larger one is not a list of class names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names in a text file, one a line (blank lines ignored); line ``i`` names label ``i``."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_NAMES_BYTES:
            raise InputError(path, f"larger than {MAX_NAMES_BYTES} bytes: not a list of class names")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(path, "class names file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the class names: {e}") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(path, "no class names in it (one a line)")
    return names


def find_class_names(data: str | os.PathLike) -> tuple[list[str], Path] | None:
    """The names file a data set keeps beside its ``metadata.jsonl`` or shards
    (:data:`NAMES_FILES`), read, with its path; None when it has none."""
    folder = Path(data)
    folder = folder if folder.is_dir() else folder.parent
    for name in NAMES_FILES:
        if (folder / name).is_file():
            return read_class_names(folder / name), folder / name
    return None


def is_index_label(value: object, names: Sequence[str] = ()) -> bool:
    """Whether a ``label`` value is a class index (``3`` or ``"3"``) rather than a class name."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit() and value not in names


def label_classes(labels: Sequence[object], class_names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(each label as a class name, the classes to prompt with)`` for a ``label`` column.

    Integer labels are indexes into ``class_names``. Without names they can only be prompted as
    numbers ("a photo of a 3."), which a model trained on captions that say the class in words
    almost never matches: zero-shot then lands below chance (0.025 on ten handwritten digits whose
    model scored 0.989 once the labels were words). So that case is warned about, loudly.
    """
    names = list(class_names or [])
    if not any(is_index_label(v, names) for v in labels):
        out = [str(v) for v in labels]
        unknown = sorted(set(out) - set(names)) if names else []
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the {len(names)} class names given")
        return out, names or sorted(set(out))
    if not names:
        numbers = sorted({int(v) for v in labels if is_index_label(v)})
        log.warning("the label column holds integers (%s) and no class names were given: zero-shot prompts "
                    "are the bare numbers, which a model that learned the classes in words rarely matches. "
                    "Name them by index with --classes a,b,c or a %s in the data folder (one name a line)",
                    ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else ""), NAMES_FILES[0])
        out = [str(int(v)) if is_index_label(v) else str(v) for v in labels]
        return out, sorted(set(out), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    out = []
    for v in labels:
        if is_index_label(v, names):
            i = int(v)
            if i >= len(names):
                raise ValueError(f"label {i} has no name: {len(names)} class names were given (labels 0 to "
                                 f"{len(names) - 1})")
            out.append(names[i])
        elif str(v) in names:
            out.append(str(v))
        else:
            raise ValueError(f"label {v!r} is neither a class index nor one of the {len(names)} class names given")
    return out, names


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
