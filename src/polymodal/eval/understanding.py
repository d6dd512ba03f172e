"""Metrics of understanding models: captioners (captions, spoken-caption transcripts, VQA) and
fusion classifiers (accuracy with every modality and with each one missing).

A captioner that hears audio writes what was said, so beside the caption metrics it gets the
word error rate of its text against the caption it heard (:mod:`polymodal.eval.transcription`).

Captions are scored with BLEU-4 and CIDEr-D against reference captions: the stored caption,
plus ``references - 1`` more where the data set can write them. VQA is exact match of the
generated answer, overall and per question type. A data set may bring metrics of its own
(:mod:`polymodal.eval.datasets`): on the shapes world the scene-graph judge of each caption,
and more references from the world's caption generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from polymodal.data.dataset import Collator

if TYPE_CHECKING:
    from polymodal.eval.datasets import DatasetMetrics

BATCH = 250


def reference_captions(row: dict, references: int, dataset: DatasetMetrics | None = None) -> list[str]:
    """The stored caption of ``row``, and ``references - 1`` more when its data set (``dataset``)
    can write them."""
    refs = [row["text"]]
    if references > 1 and dataset is not None:
        refs += dataset.reference_captions(row, references - 1)
    return refs


@torch.no_grad()
def generate_all(model, items: list[dict], fields, prompts: Sequence[str | None] | None = None,
                 index: Sequence[int] | None = None, **decoding) -> list[str]:
    """Generated text for ``items[index[j]]`` with ``prompts[j]`` (default: every item, no prompt)."""
    collate = Collator(fields)
    index = list(range(len(items))) if index is None else list(index)
    prompts = list(prompts) if prompts is not None else [None] * len(index)
    out: list[str] = []
    for start in range(0, len(index), BATCH):
        chunk = index[start : start + BATCH]
        batch = collate([items[i] for i in chunk])
        out += model.generate(batch, prompts[start : start + BATCH], **decoding)
    return out


def hears_speech(model) -> bool:
    """Whether a captioner reads audio: its captions are then transcripts of what was said."""
    from polymodal.nn.encoders import INPUT_KIND

    return any(INPUT_KIND.get(spec.get("type")) == "audio" for spec in model.config.encoders.values())


def captioner_metrics(model, items: list[dict], fields, *, references: int = 5, decoding: str = "greedy",
                      examples: int = 0, dataset: DatasetMetrics | None = None, beams: int = 4) -> dict:
    """Caption metrics (when the model captions) and VQA accuracy (when it answers questions),
    with the metrics of its own that the items' data set brings (``dataset``, from
    :func:`polymodal.eval.datasets.dataset_metrics`; None: the generic ones only)."""
    from polymodal.eval.captioning import bleu_cider

    model.eval()
    metrics: dict = {"samples": float(len(items))}
    if not items:
        return metrics
    rows = [item["row"] for item in items]
    if "caption" in model.config.tasks:
        captions = generate_all(model, items, fields, method=decoding, beams=beams)
        metrics.update(bleu_cider([reference_captions(r, references, dataset) for r in rows], captions))
        if dataset is not None:
            metrics.update(dataset.caption_metrics(rows, captions))
        if hears_speech(model):  # what it writes is a transcript of the spoken caption: word error rate
            from polymodal.eval.transcription import word_error_rate

            metrics.update(word_error_rate([r[model.config.caption_column] for r in rows], captions))
        if examples:
            metrics["examples"] = [{"id": r.get("id"), "reference": r["text"], "generated": c}
                                   for r, c in zip(rows[:examples], captions, strict=False)]
    column = model.config.qa_column
    if "vqa" in model.config.tasks and column in rows[0]:
        index, prompts, answers, kinds = [], [], [], []
        for i, r in enumerate(rows):
            for qa in r[column]:
                index.append(i)
                prompts.append(qa["question"])
                answers.append(qa["answer"])
                kinds.append(qa.get("type", "all"))
        generated = generate_all(model, items, fields, prompts, index, method="greedy", max_new_tokens=8)
        right = [g.strip().lower() == a.strip().lower() for g, a in zip(generated, answers, strict=True)]
        metrics["vqa accuracy"] = sum(right) / max(len(right), 1)
        metrics["vqa questions"] = float(len(right))
        known = dataset.question_types if dataset is not None else ()
        for kind in [k for k in known if k in kinds] + sorted(set(kinds) - set(known)):
            picked = [ok for ok, k in zip(right, kinds, strict=True) if k == kind]
            metrics[f"vqa {kind}"] = sum(picked) / len(picked)
        if examples:
            metrics["vqa examples"] = [{"id": rows[i].get("id"), "question": q, "answer": a, "generated": g}
                                       for i, q, a, g in list(zip(index, prompts, answers, generated, strict=True))[:examples]]
    return metrics


@torch.no_grad()
def fusion_metrics(model, items: list[dict], fields) -> dict[str, float]:
    """Accuracy with every input, and with each subset of inputs missing (one modality only)."""
    model.eval()
    collate = Collator(fields)
    names = list(model.names)
    cases = {"accuracy": names}
    if len(names) > 1:
        for n in names:
            cases[f"accuracy {n} only"] = [n]
    correct = dict.fromkeys(cases, 0)
    for start in range(0, len(items), BATCH):
        batch = collate(items[start : start + BATCH])
        labels = model.labels(batch)
        for case, keep in cases.items():
            dropped = {k: v for k, v in batch.items()
                       if not any(k == n or k.startswith(f"{n}_") for n in names if n not in keep)}
            correct[case] += model.hits(model(dropped).cpu(), labels).sum().item()
    metrics = {"samples": float(len(items))}
    metrics.update({case: c / max(len(items), 1) for case, c in correct.items()})
    return metrics
