"""``polymodal eval``: every metric of a saved model on the splits of a data set.

The contract for every model family: metrics keyed by split, then by metric name, printed as
a table and written as JSON with ``--json``. For contrastive models: Recall@1/5/10 in both
directions for every pair of towers (also pairs never trained together, such as audio->image
in a bound model), and zero-shot classification: on the shapes world per attribute (colour,
shape, size and position on single-object images, count on all), on any other data set over
its ``label`` column. For detectors (the shapes-world judge of generated images): accuracy
of shape, colour, size and position over objects (shape also per object size), and of the
object count and the whole scene over images (see :func:`polymodal.eval.geneval.judge_metrics`).
For autoencoders: reconstruction error, and given a judge, its accuracy on the reconstructions.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import torch

from polymodal.data.dataset import Collator, DecodeOptions
from polymodal.data.memory import MemoryDataset
from polymodal.eval.retrieval import recall_at_k, retrieval_metrics
from polymodal.eval.zeroshot import (
    class_embeddings,
    shapes_attribute_prompts,
    shapes_count_prompts,
    template_prompts,
    zero_shot_accuracy,
)

DEFAULT_SPLITS = ("val", "test", "test_novel")
EMBED_BATCH = 500


def default_fields(model) -> dict[str, str]:
    """Batch fields for each tower: tower name -> the kind of input it reads (default column)."""
    return {tower: model.input_kind(tower) for tower in model.config.towers}


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


def validation_function(model, data, split: str, fields, options: DecodeOptions, limit: int):
    """A function ``model -> metrics`` over ``limit`` samples of ``split``, decoded once."""
    items = MemoryDataset(data, fields, split=split, options=options, limit=limit).items
    if hasattr(model, "detect"):  # a detector (the shapes-world judge): per-attribute accuracy
        from polymodal.eval.geneval import judge_metrics

        def judge_accuracy(m) -> dict[str, float]:
            if not items:
                return {}
            images = torch.stack([item["image"] for item in items])
            return judge_metrics(m, images, [item["row"] for item in items])

        return judge_accuracy
    if hasattr(model, "labels"):  # a classifier: accuracy
        def accuracy(m) -> dict[str, float]:
            correct = 0
            collate = Collator(fields)
            for start in range(0, len(items), EMBED_BATCH):
                batch = collate(items[start : start + EMBED_BATCH])
                correct += m.hits(m(batch).cpu(), m.labels(batch)).sum().item()
            return {"accuracy": correct / max(len(items), 1)}

        return accuracy
    if hasattr(model, "decode") and hasattr(model, "encode"):  # an autoencoder: reconstruction error
        def reconstruction(m) -> dict[str, float]:
            images = Collator(fields)(items)["image"]
            return {"reconstruction mse": float(torch.nn.functional.mse_loss(m.decode(m.encode(images)), images))}

        return reconstruction
    if hasattr(model, "diffusion"):  # a text-to-image model: the denoising loss at fixed noise
        def denoising_loss(m) -> dict[str, float]:
            generator = torch.Generator().manual_seed(0)
            collate, total, n = Collator(fields), 0.0, 0
            for start in range(0, len(items), 100):
                batch = collate(items[start : start + 100])
                total += m.loss(batch, generator=generator)["loss"].item() * len(batch["rows"])
                n += len(batch["rows"])
            return {"denoising loss": total / max(n, 1)}

        return denoising_loss
    if hasattr(model, "generate"):  # a captioner: decoded captions and answers, judged
        from polymodal.eval.understanding import captioner_metrics

        return lambda m: captioner_metrics(m, items[: min(len(items), 250)], fields, references=1)
    pairs = model.config.pairs

    def validate(m) -> dict[str, float]:
        if not items:
            return {}
        emb = embed_items(m, items, fields, sorted({x for p in pairs for x in p}))
        metrics: dict[str, float] = {}
        for a, b in pairs:
            metrics.update(retrieval_metrics(emb[b], emb[a], b, a, ks=(1, 5)))
        return metrics

    return validate


def contrastive_metrics(model, items: list[dict], fields, shapes_world: bool, class_names: list[str] | None = None) -> dict[str, float]:
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
        elif "label" in rows[0]:
            names = class_names or sorted({str(r["label"]) for r in rows})
            names_, classes = class_embeddings(embed_text, template_prompts(names))
            metrics[f"{prefix}zero-shot label"] = zero_shot_accuracy(emb[query], [str(r["label"]) for r in rows], names_, classes)
    return metrics


def model_type(model_dir: str | os.PathLike) -> str:
    """The ``model_type`` a saved model folder declares (a transformers CLIP folder: contrastive)."""
    import json
    from pathlib import Path

    from polymodal.errors import InputError

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(model_dir, "no config.json: not a saved model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    return raw.get("model_type", "contrastive") if raw.get("model_type") != "clip" else "contrastive"


@torch.no_grad()
def evaluate(model_dir: str | os.PathLike, data: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS, *,
             limit: int | None = None, class_names: list[str] | None = None, image_size: int | None = None,
             decoding: str = "greedy", examples: int = 0, progress=None, judge: str | os.PathLike | None = None,
             clip: str | os.PathLike | None = None, guidance: float = 3.0, sample_steps: int = 50,
             per_category: int = 50, seed: int = 0, compose: bool = False) -> dict[str, dict[str, float]]:
    """Metrics of the model saved in ``model_dir`` on each split of ``data``.

    Contrastive models are scored on at most ``limit`` samples per split (1,000 by default,
    the retrieval gallery); captioners, fusion classifiers and detectors on the whole split unless
    ``limit`` is given.
    """
    from polymodal.modalities.image import ImageTransform

    kind = model_type(model_dir)
    if kind == "text_to_image":
        return evaluate_text_to_image(model_dir, data, splits, judge=judge, clip=clip, guidance=guidance,
                                      steps=sample_steps, per_category=per_category, seed=seed, progress=progress,
                                      compose=compose)
    if kind == "contrastive":
        from polymodal.models.clip import ContrastiveModel

        model = ContrastiveModel.from_pretrained(model_dir)
        fields = default_fields(model)
        limit = 1000 if limit is None else limit
        size = image_size or model.image_size
    elif kind in ("captioner", "fusion"):
        from polymodal.nn.encoders import INPUT_KIND

        if kind == "captioner":
            from polymodal.models.captioner import Captioner

            model = Captioner.from_pretrained(model_dir)
            towers = model.config.encoders
        else:
            from polymodal.models.fusion import FusionClassifier

            model = FusionClassifier.from_pretrained(model_dir)
            towers = model.config.towers
        fields = model.config.fields or {n: INPUT_KIND[spec["type"]] for n, spec in towers.items()}
        sizes = [spec.get("image_size", 64) for spec in towers.values() if INPUT_KIND[spec["type"]] == "image"]
        size = image_size or (sizes[0] if sizes else 64)
    elif kind == "detector":
        from polymodal.models.detector import GridDetector

        model = GridDetector.from_pretrained(model_dir)
        fields = {"image": "image"}
        size = image_size or model.config.image_size
    elif kind == "autoencoder":
        from polymodal.models.autoencoder import Autoencoder

        model = Autoencoder.from_pretrained(model_dir).eval()
        detector = load_judge(judge) if judge is not None else None  # one load for every split
        fields = {"image": "image"}
        size = image_size or model.config.image_size
    else:
        raise ValueError(f"{model_dir}: cannot evaluate a {kind!r} model")
    options = DecodeOptions(image_transform=ImageTransform(size))
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        items = MemoryDataset(data, fields, split=split, options=options, limit=limit, progress=progress).items
        if not items:
            continue
        if kind == "captioner":
            from polymodal.eval.understanding import captioner_metrics

            results[split] = captioner_metrics(model, items, fields, decoding=decoding, examples=examples)
        elif kind == "detector":
            from polymodal.eval.geneval import judge_metrics

            if "objects" not in items[0]["row"]:
                raise ValueError(f"{data}: rows have no 'objects' scene graph; a detector is scored on a shapes world")
            images = torch.stack([item["image"] for item in items])
            results[split] = judge_metrics(model, images, [item["row"] for item in items])
        elif kind == "autoencoder":
            results[split] = autoencoder_metrics(model, torch.stack([item["image"] for item in items]),
                                                 [item["row"] for item in items], detector)
        elif kind == "fusion":
            from polymodal.eval.understanding import fusion_metrics

            results[split] = fusion_metrics(model, items, fields)
        else:
            shapes_world = "objects" in items[0]["row"]
            results[split] = contrastive_metrics(model, items, fields, shapes_world, class_names)
    return results


def load_judge(judge: str | os.PathLike):
    """The detector saved in ``judge``, ready to judge images; an error naming the folder when it
    holds another kind of model."""
    from polymodal.errors import InputError
    from polymodal.models.detector import GridDetector

    if model_type(judge) != "detector":
        raise InputError(judge, f"the judge must be a detector model, not a {model_type(judge)!r} model")
    return GridDetector.from_pretrained(judge).eval()


@torch.no_grad()
def autoencoder_metrics(model, images: torch.Tensor, rows: Sequence[dict], judge=None,
                        batch: int = 256) -> dict[str, float]:
    """Reconstruction error of an autoencoder (mean squared error and PSNR on [-1, 1] pixels);
    with a ``judge`` (a loaded detector) and a shapes world, the judge's accuracy on the reconstructions,
    beside its accuracy on the originals: what of the scene survives the latent grid."""
    recon = torch.cat([model.reconstruct(images[i: i + batch]) for i in range(0, len(images), batch)])
    mse = (recon - images).pow(2).mean().item()
    metrics = {"mse": mse, "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12)))}
    if judge is not None:
        from polymodal.eval.geneval import judge_metrics

        if "objects" not in rows[0]:
            raise ValueError("a judge reads a shapes world: the rows have no 'objects' scene graph")
        for name, value in judge_metrics(judge, recon, rows).items():
            if name != "samples":
                metrics[f"judge {name} on reconstructions"] = value
        metrics["judge scene accuracy on real"] = judge_metrics(judge, images, rows)["scene accuracy"]
    return metrics


@torch.no_grad()
def evaluate_text_to_image(model_dir, data, splits: Sequence[str], *, judge, clip=None, guidance: float = 3.0,
                           steps: int = 50, per_category: int = 50, seed: int = 0, progress=None,
                           compose: bool = False) -> dict[str, dict[str, float]]:
    """GenEval-style scores of a text-to-image model on prompts built from each split's scenes
    (see :mod:`polymodal.eval.geneval`), judged by a detector trained on real images, beside
    the judge's own accuracy on the split's real images; a CLIP score with ``clip``."""
    from polymodal.errors import InputError
    from polymodal.eval.generation_bench import generator_function
    from polymodal.eval.geneval import evaluate_generator
    from polymodal.modalities.image import ImageTransform
    from polymodal.models.text_to_image import TextToImage

    if judge is None:
        raise InputError(model_dir, "a text-to-image model is scored by a judge: pass --judge (a trained detector)")
    detector = load_judge(judge)
    model = TextToImage.from_pretrained(model_dir)
    contrastive = None
    if clip is not None:
        from polymodal.models.clip import ContrastiveModel

        contrastive = ContrastiveModel.from_pretrained(clip)
    options = DecodeOptions(image_transform=ImageTransform(model.config.image_size))
    rows, real = {}, {}
    for split in splits:
        items = MemoryDataset(data, {"image": "image"}, split=split, options=options).items
        if items:
            rows[split] = [item["row"] for item in items]
            real[split] = torch.stack([item["image"] for item in items])
    if not rows:
        raise InputError(data, f"no samples in the splits {list(splits)}")
    if "objects" not in next(iter(rows.values()))[0]:
        raise InputError(data, "rows have no 'objects' scene graph: GenEval-style prompts need a shapes world")
    return evaluate_generator(generator_function(model, guidance, steps, progress=progress, compose=compose), detector, rows,
                              per_category=per_category, seed=seed, clip=contrastive, real_images_by_split=real)


def format_table(results: dict[str, dict[str, float]]):
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("metric")
    splits = list(results)
    for s in splits:
        table.add_column(s, justify="right")
    names = list(dict.fromkeys(k for r in results.values() for k, v in r.items() if isinstance(v, (int, float))))
    for name in names:
        cells = []
        for s in splits:
            v = results[s].get(name)
            whole = name == "samples" or name.endswith("questions")
            cells.append("" if v is None else (f"{int(v)}" if whole else f"{v:.3f}"))
        table.add_row(name, *cells)
    return table

