"""The shapes world's own metrics: what generic evaluation adds when the data set is a shapes
world (its ``world.json`` says ``"name": "shapes"``; see :mod:`polymodal.eval.datasets`).

Every row of the world carries its scene graph (``objects``), so more can be asked of a model
than of a plain folder:

- contrastive models: zero-shot classification of each attribute (colour, shape, size and
  position on single-object images, the number of objects on all) with prompts written from
  the world's vocabulary, and text->image retrieval with *paraphrased* queries (words and
  sentence shapes that training captions never use);
- captioners: the scene-graph judge of each caption (:func:`polymodal.eval.captioning.
  scene_graph_scores`), and more reference captions for BLEU and CIDEr drawn from the world's
  own caption generator for the same scene (COCO has five references per image; one makes
  CIDEr a lottery over synonyms); VQA question types reported in the world's order.

The metric names and values are those this evaluation has always reported for the world
(BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from polymodal.data.scene import QUESTION_TYPES, SceneObject
from polymodal.data.shapes import caption, paraphrase
from polymodal.eval.captioning import scene_graph_scores
from polymodal.eval.retrieval import recall_at_k
from polymodal.eval.zeroshot import (
    class_embeddings,
    shapes_attribute_prompts,
    shapes_count_prompts,
    zero_shot_accuracy,
)

ATTRIBUTES = ("colour", "shape", "size", "position")  # zero-shot on single-object images
QUERY_BATCH = 500  # paraphrased queries embedded at a time (as polymodal.eval.contrastive embeds items)
REFERENCE_SEED = 12345  # extra reference captions are drawn from [REFERENCE_SEED, the row's id]


def scene_of(row: Mapping) -> list[SceneObject]:
    """The objects of a row's scene graph; a row of the world without one is named."""
    if "objects" not in row:
        raise ValueError(f"row {row.get('id')!r} of a shapes world has no 'objects' scene graph")
    return [SceneObject.from_dict(o) for o in row["objects"]]


def paraphrased_queries(rows: Sequence[Mapping], seed: int = 0) -> list[str]:
    """A paraphrase of each row's scene, in words and sentence shapes no training caption uses."""
    rng = np.random.default_rng(seed)
    return [paraphrase(rng, scene_of(r)) for r in rows]


class ShapesWorldMetrics:
    """What a shapes world adds to the generic metrics of contrastive models and captioners."""

    # the world's own zero-shot tasks replace zero-shot over a ``label`` column
    label_zero_shot = False
    # the order VQA accuracies per question type are reported in
    question_types: tuple[str, ...] = QUESTION_TYPES

    def contrastive_metrics(self, embed_text: Callable[[list[str]], torch.Tensor], rows: Sequence[Mapping],
                            embeddings: Mapping[str, torch.Tensor], text: str) -> dict[str, float]:
        """Paraphrase retrieval (when the model has an image tower) and zero-shot attributes and
        counts for each tower but the text one (``text``). ``embed_text(texts)`` embeds texts
        with the text tower; ``embeddings[tower]`` holds row ``i``'s embedding at ``i``."""
        metrics: dict[str, float] = {}
        if "image" in embeddings:
            queries = paraphrased_queries(rows)
            paraphrased = torch.cat([embed_text(queries[i : i + QUERY_BATCH])
                                     for i in range(0, len(queries), QUERY_BATCH)])
            for key, value in recall_at_k(paraphrased, embeddings["image"], (1, 5, 10)).items():
                metrics[f"paraphrase text->image {key}"] = value
        scenes = [scene_of(r) for r in rows]
        single = [i for i, objects in enumerate(scenes) if len(objects) == 1]
        for query in (m for m in embeddings if m != text):
            prefix = "" if query == "image" else f"{query} "
            for attribute in ATTRIBUTES:
                names, classes = class_embeddings(embed_text, shapes_attribute_prompts(attribute))
                labels = [rows[i]["objects"][0][attribute] for i in single]
                if single:
                    metrics[f"{prefix}zero-shot {attribute}"] = zero_shot_accuracy(
                        embeddings[query][single], labels, names, classes)
            names, classes = class_embeddings(embed_text, shapes_count_prompts())
            metrics[f"{prefix}zero-shot count"] = zero_shot_accuracy(
                embeddings[query], [str(len(objects)) for objects in scenes], names, classes)
        return metrics

    def reference_captions(self, row: Mapping, n: int) -> list[str]:
        """``n`` more captions of the row's scene from the world's caption generator, drawn with
        a seed made from the row's id (the same in every run for the world's numeric ids)."""
        objects = scene_of(row)
        seed = int(row["id"]) if str(row.get("id", "")).isdigit() else zlib.crc32(str(row.get("id")).encode())
        rng = np.random.default_rng([REFERENCE_SEED, seed])
        return [caption(rng, objects) for _ in range(n)]

    def caption_metrics(self, rows: Sequence[Mapping], captions: Sequence[str]) -> dict[str, float]:
        """The scene-graph judge: captions that name every object right, and with no false claim."""
        return scene_graph_scores(captions, [scene_of(r) for r in rows])
