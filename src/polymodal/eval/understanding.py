"""Metrics of understanding models: captioners (captions, spoken-caption transcripts, VQA) and
fusion classifiers (accuracy with every modality and with each one missing).

A captioner that hears audio writes what was said, so beside the caption metrics it gets the
word error rate of its text against the caption it heard (:mod:`polymodal.eval.transcription`).

Captions are scored with BLEU-4 and CIDEr-D against reference captions and, on the shapes
world, by the scene-graph judge. On the shapes world the references are the stored caption
plus ``references - 1`` more drawn from the world's own caption generator for the same scene
(COCO has five references per image; one reference makes CIDEr a lottery over synonyms).
VQA is exact match of the generated answer, overall and per question type.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from polymodal.data.dataset import Collator

BATCH = 250


def reference_captions(row: dict, references: int) -> list[str]:
    refs = [row["text"]]
    if references > 1 and "objects" in row:
        from polymodal.data.scene import SceneObject
        from polymodal.data.shapes import caption

        objects = [SceneObject.from_dict(o) for o in row["objects"]]
        seed = int(row["id"]) if str(row.get("id", "")).isdigit() else abs(hash(row.get("id"))) % 2**31
        rng = np.random.default_rng([12345, seed])
        refs += [caption(rng, objects) for _ in range(references - 1)]
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
                      examples: int = 0) -> dict:
    """Caption metrics (when the model captions) and VQA accuracy (when it answers questions)."""
    from polymodal.data.scene import QUESTION_TYPES, SceneObject
    from polymodal.eval.captioning import bleu_cider, scene_graph_scores

    model.eval()
    metrics: dict = {"samples": float(len(items))}
    if not items:
        return metrics
    rows = [item["row"] for item in items]
    if "caption" in model.config.tasks:
        captions = generate_all(model, items, fields, method=decoding)
        metrics.update(bleu_cider([reference_captions(r, references) for r in rows], captions))
        if "objects" in rows[0]:
            metrics.update(scene_graph_scores(captions, [[SceneObject.from_dict(o) for o in r["objects"]] for r in rows]))
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
        for kind in [k for k in QUESTION_TYPES if k in kinds] + sorted(set(kinds) - set(QUESTION_TYPES)):
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
