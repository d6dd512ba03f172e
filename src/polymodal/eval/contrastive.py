"""Metrics of contrastive models: retrieval Recall@K in both directions for every pair of towers
(also pairs never trained together, such as audio->image in a bound model) and zero-shot
classification over the data set's ``label`` column, plus whatever metrics the data set brings
of its own (:mod:`polymodal.eval.datasets`: on the shapes world, zero-shot per attribute and
retrieval with paraphrased queries instead of the label column). The model is duck-typed:
``embed``, ``embed_text``, ``tower_reading`` and ``config.towers`` / ``config.pairs``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from polymodal.data.dataset import Collator
from polymodal.eval.retrieval import retrieval_metrics
from polymodal.eval.zeroshot import (
    class_embeddings,
    label_classes,
    template_prompts,
    zero_shot_accuracy,
)

if TYPE_CHECKING:
    from polymodal.eval.datasets import DatasetMetrics

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


def contrastive_metrics(model, items: list[dict], fields, class_names: list[str] | None = None, *,
                        dataset: DatasetMetrics | None = None) -> dict[str, float]:
    """Every retrieval and zero-shot metric of ``model`` on decoded ``items``, with the metrics
    of its own that the items' data set brings (``dataset``, from
    :func:`polymodal.eval.datasets.dataset_metrics`; None: the generic ones only)."""
    modalities = list(model.config.towers)
    emb = embed_items(model, items, fields, modalities)
    metrics: dict[str, float] = {"samples": float(len(items))}
    for a, b in itertools.combinations(modalities, 2):
        metrics.update(retrieval_metrics(emb[a], emb[b], a, b))
    text = model.tower_reading("text")
    rows = [item["row"] for item in items]
    if text is None:
        return metrics
    embed_text = lambda texts: model.embed_text(texts, modality=text).cpu()  # noqa: E731
    if dataset is not None and items:
        metrics.update(dataset.contrastive_metrics(embed_text, rows, emb, text))
    # zero-shot over the label column, integer labels named by index
    label_zero_shot = dataset is None or dataset.label_zero_shot
    labelled = [i for i, r in enumerate(rows) if r.get("label") is not None] if label_zero_shot else []
    if labelled:
        row_labels, label_names = label_classes([rows[i]["label"] for i in labelled], class_names)
        label_names, label_embeddings = class_embeddings(embed_text, template_prompts(label_names))
        for query in (m for m in modalities if m != text):
            prefix = "" if query == "image" else f"{query} "
            metrics[f"{prefix}zero-shot label"] = zero_shot_accuracy(emb[query][labelled], row_labels, label_names,
                                                                     label_embeddings)
    return metrics
