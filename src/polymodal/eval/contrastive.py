"""Metrics of contrastive models: retrieval Recall@K in both directions for every pair of towers
(also pairs never trained together, such as audio->image in a bound model) and zero-shot
classification: on the shapes world per attribute (colour, shape, size and position on
single-object images, count on all) and with paraphrased queries; on any other data set over
its ``label`` column. The model is duck-typed: ``embed``, ``embed_text``, ``tower_reading`` and
``config.towers`` / ``config.pairs``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from polymodal.data.dataset import Collator
from polymodal.eval.retrieval import recall_at_k, retrieval_metrics
from polymodal.eval.zeroshot import (
    class_embeddings,
    label_classes,
    shapes_attribute_prompts,
    shapes_count_prompts,
    template_prompts,
    zero_shot_accuracy,
)

EMBED_BATCH = 500


@torch.no_grad()
def embed_items(model, items: list[dict], fields, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    collate = Collator(fields)
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    for start in range(0, len(items), EMBED_BATCH):
        batch = collate(items[start : start + EMBED_BATCH])
        for m in modalities:
            out[m].append(model.embed(m, batch).cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def paraphrased_queries(rows: list[dict], seed: int = 0) -> list[str]:
    from polymodal.data.scene import SceneObject
    from polymodal.data.shapes import paraphrase

    rng = np.random.default_rng(seed)
    return [paraphrase(rng, [SceneObject.from_dict(o) for o in r["objects"]]) for r in rows]


def pair_retrieval(model, items: list[dict], fields) -> dict[str, float]:
    """Recall@1/5 of each trained pair (the quick score during training)."""
    if not items:
        return {}
    pairs = model.config.pairs
    emb = embed_items(model, items, fields, sorted({x for p in pairs for x in p}))
    metrics: dict[str, float] = {}
    for a, b in pairs:
        metrics.update(retrieval_metrics(emb[b], emb[a], b, a, ks=(1, 5)))
    return metrics


def contrastive_metrics(model, items: list[dict], fields, class_names: list[str] | None = None) -> dict[str, float]:
    """Every retrieval and zero-shot metric of ``model`` on decoded ``items``."""
    shapes_world = bool(items) and "objects" in items[0]["row"]
    modalities = list(model.config.towers)
    emb = embed_items(model, items, fields, modalities)
    metrics: dict[str, float] = {"samples": float(len(items))}
    for a, b in itertools.combinations(modalities, 2):
        metrics.update(retrieval_metrics(emb[a], emb[b], a, b))
    text = model.tower_reading("text")
    rows = [item["row"] for item in items]
    if text is None:
        return metrics
    if shapes_world and "image" in emb:
        # queries in words and sentence shapes that training captions never use
        queries = paraphrased_queries(rows)
        paraphrased = torch.cat([model.embed_text(queries[i : i + EMBED_BATCH], modality=text).cpu()
                                 for i in range(0, len(queries), EMBED_BATCH)])
        for key, value in recall_at_k(paraphrased, emb["image"], (1, 5, 10)).items():
            metrics[f"paraphrase text->image {key}"] = value
    embed_text = lambda texts: model.embed_text(texts, modality=text).cpu()  # noqa: E731
    # any other data set: zero-shot over its label column, integer labels named by index
    labelled = [] if shapes_world else [i for i, r in enumerate(rows) if r.get("label") is not None]
    if labelled:
        row_labels, label_names = label_classes([rows[i]["label"] for i in labelled], class_names)
        label_names, label_embeddings = class_embeddings(embed_text, template_prompts(label_names))
    for query in (m for m in modalities if m != text):
        prefix = "" if query == "image" else f"{query} "
        if shapes_world:
            single = [i for i, r in enumerate(rows) if len(r.get("objects", [])) == 1]
            for attribute in ("colour", "shape", "size", "position"):
                names, classes = class_embeddings(embed_text, shapes_attribute_prompts(attribute))
                labels = [rows[i]["objects"][0][attribute] for i in single]
                if single:
                    metrics[f"{prefix}zero-shot {attribute}"] = zero_shot_accuracy(emb[query][single], labels, names, classes)
            names, classes = class_embeddings(embed_text, shapes_count_prompts())
            metrics[f"{prefix}zero-shot count"] = zero_shot_accuracy(
                emb[query], [str(len(r["objects"])) for r in rows], names, classes)
        elif labelled:
            metrics[f"{prefix}zero-shot label"] = zero_shot_accuracy(emb[query][labelled], row_labels, label_names,
                                                                     label_embeddings)
    return metrics
