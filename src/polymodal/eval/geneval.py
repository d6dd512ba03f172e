"""GenEval-style scores of text-to-image generators on the shapes world.

GenEval (Ghosh et al., 2023) asks a generator for images from short prompts in six
categories, detects the objects in each image and checks the prompt against the detections.
Here the prompts are in the shapes world's own caption language (the canonical words of
:mod:`polymodal.data.scene`), the detector is a :class:`~polymodal.models.detector.GridDetector`
trained on real images (the *judge*), and the check is
:func:`polymodal.data.scene.check_caption`, the same reader that checks every caption of the
world. The categories, each built from the scenes of a split (test, test_novel...):

- ``single_object``: "a large red circle in the top left" (from one-object scenes); right
  when the image holds exactly one object and it is that one (size, colour, shape, cell).
- ``two_objects``: "a large red circle and a small blue star"; right when both are there.
- ``counting``: "two red circles", "three blue stars"; right when there are exactly that many.
- ``colours``: "a red circle"; right when there is one (shape and colour together).
- ``position``: "a small red circle to the left of a large blue star" (left of, right of,
  above, below); right when both are there and the relation holds.
- ``colour_attribution``: "a red circle and a blue star" (different colours and different
  shapes); right when each shape is there in its own colour (a swap is wrong).

``overall`` is the mean over the six categories, as GenEval reports. For ``single_object``
prompts the attributes are also scored one by one (GenEval's attribute breakdown): an image
is right on an attribute (colour, shape, size, position) when it holds exactly one detected
object and that object has the asked value; ``colour+shape+position`` needs all three at once.

On ``test_novel`` every prompt names a held-out shape-colour pair (as every scene of that
split holds one): a generator that never saw a red star in training is asked for one.

Counting: scenes of the world rarely repeat a shape-colour pair (1-3 objects of 30 pairs), so
counting prompts first take the split's scenes that do repeat one ("two red circles" with the
two objects of that scene), then, to reach ``per_category``, *constructed* scenes: a
shape-colour pair seen in the split (on test_novel, a held-out pair seen there), drawn three
and two times alternately (three first: real scenes almost never hold three of a pair) in
random distinct cells with random sizes, laid out as the world lays out objects. Their
``source`` is ``"constructed"``.

The judge's own accuracy on real images of the split is reported beside every score (a score
cannot be trusted further than its judge), with the Fréchet distance between the judge's
features of generated and real images, and a CLIP score when a contrastive model is given.
The prompts' scenes are not distributed as the split's scenes (one or two objects asked for,
constructed counting scenes), so even perfect renders of the prompts have a Fréchet distance
above zero: compare generators with each other and with :func:`scene_generator`'s renders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.data.scene import (
    NUMBERS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPE_PLURALS,
    SceneObject,
    check_caption,
    relation_holds,
)

CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
ATTRIBUTES = ("colour", "shape", "size", "position")
NOVEL_SPLIT = "test_novel"
WORLD_SIZE = 64  # side of the shapes world's images, in which objects' bboxes are given
BATCH = 500


# ---- the judge on real images ------------------------------------------------------------------


def judge_metrics(judge, images: torch.Tensor, rows: Sequence[dict]) -> dict[str, float]:
    """How well ``judge`` reads real images whose scene graphs (``rows[i]["objects"]``) are known.

    Over objects: ``<attr> accuracy`` is the share of true objects whose cell the judge finds
    occupied (position) and whose detection there has the right shape / colour / size (a
    missed object is wrong on every attribute); shape is also given per object size. Over
    images: ``count accuracy`` (as many detections as objects) and ``scene accuracy`` (the
    detections are exactly the scene: every object right on every attribute, nothing extra).
    """
    detected = judge.detect(images)
    right = {k: 0 for k in (*ATTRIBUTES, "shape small", "shape large")}
    objects_by_size = {"small": 0, "large": 0}
    n_objects = count_right = scene_right = 0
    for row, found in zip(rows, detected, strict=True):
        truth = [SceneObject.from_dict(d) for d in row["objects"]]
        at = {o.cell: o for o in found}
        for o in truth:
            n_objects += 1
            objects_by_size[o.size] += 1
            d = at.get(o.cell)
            if d is None:
                continue
            right["position"] += 1
            right["colour"] += d.colour == o.colour
            right["size"] += d.size == o.size
            right["shape"] += d.shape == o.shape
            right[f"shape {o.size}"] += d.shape == o.shape
        count_right += len(found) == len(truth)
        scene_right += _key(found) == _key(truth)
    n = max(len(rows), 1)
    metrics = {"samples": float(len(rows))}
    for k in ATTRIBUTES:
        metrics[f"{k} accuracy"] = right[k] / max(n_objects, 1)
    metrics["count accuracy"] = count_right / n
    metrics["scene accuracy"] = scene_right / n
    for size in ("small", "large"):
        metrics[f"shape accuracy ({size})"] = right[f"shape {size}"] / max(objects_by_size[size], 1)
    return metrics


def _key(objects: Sequence[SceneObject]) -> list[tuple]:
    return sorted((o.cell, o.shape, o.colour, o.size) for o in objects)


# ---- prompts -----------------------------------------------------------------------------------


def _phrase(o: SceneObject, size: bool = True) -> str:
    words = " ".join(([o.size] if size else []) + [o.colour, o.shape])
    return ("an " if words[0] in "aeiou" else "a ") + words


def _where(o: SceneObject) -> str:
    return POSITION_PHRASES[o.cell][0]


def _layout(rng: np.random.Generator, shape: str, colour: str, size: str, cell: int,
            world_size: int = WORLD_SIZE) -> SceneObject:
    """An object placed in ``cell`` as :func:`polymodal.data.shapes.sample_scene` places it."""
    row, col = divmod(cell, 3)
    cell_px = world_size / 3
    radius = cell_px * (0.42 if size == "large" else 0.25)
    jitter = cell_px / 2 - radius - 1
    cx = (col + 0.5) * cell_px + rng.uniform(-jitter, jitter) * 0.6
    cy = (row + 0.5) * cell_px + rng.uniform(-jitter, jitter) * 0.6
    return SceneObject(shape, colour, size, row, col, (cx - radius, cy - radius, cx + radius, cy + radius))


def _prompt(category: str, text: str, objects: Sequence[SceneObject], split: str, source: str) -> dict:
    return {"category": category, "prompt": text, "objects": [o.to_dict() for o in objects],
            "split": split, "source": source}


def geneval_prompts(rows: Sequence[dict], split_name: str, per_category: int = 50, seed: int = 0) -> list[dict]:
    """GenEval-style prompts built from the scenes of ``rows`` (one split of a shapes world).

    Each prompt is a dict: ``category``, ``prompt`` (the text), ``objects`` (the objects it
    asks for, as ``SceneObject.to_dict``: rendered together they satisfy the prompt),
    ``split`` and ``source`` (the row id it came from, or ``"constructed"``). At most
    ``per_category`` prompts per category (fewer when the split has too few fitting scenes;
    counting is filled with constructed scenes), in :data:`CATEGORIES` order; the same rows,
    split and seed give the same prompts. On ``test_novel`` every prompt names a held-out
    shape-colour pair.
    """
    from polymodal.data.shapes import HELD_OUT_PAIRS

    held = set(HELD_OUT_PAIRS)
    novel_only = split_name == NOVEL_SPLIT
    scenes: list[tuple[str, list[SceneObject]]] = []
    for i, row in enumerate(rows):
        if "objects" not in row:
            raise ValueError(f"row {row.get('id', i)!r} has no 'objects' scene graph: not a shapes world")
        scenes.append((str(row.get("id", i)), [SceneObject.from_dict(d) for d in row["objects"]]))

    def allowed(*objects: SceneObject) -> bool:  # on test_novel a prompt names a held-out pair
        return not novel_only or any((o.shape, o.colour) in held for o in objects)

    def pick(rng, options):
        return options[int(rng.integers(len(options)))] if options else None

    def pairs(objects, ok):
        return [(a, b) for a in objects for b in objects if a is not b and ok(a, b) and allowed(a, b)]

    def distinct(a, b):
        return (a.shape, a.colour) != (b.shape, b.colour)

    prompts: list[dict] = []
    for index, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, index])
        candidates: list[dict] = []
        for source, objects in scenes:
            if category == "single_object":
                if len(objects) == 1 and allowed(objects[0]):
                    o = objects[0]
                    candidates.append(_prompt(category, f"{_phrase(o)} {_where(o)}", [o], split_name, source))
            elif category == "two_objects":
                pair = pick(rng, pairs(objects, distinct))
                if pair:
                    a, b = pair
                    candidates.append(_prompt(category, f"{_phrase(a)} and {_phrase(b)}", [a, b], split_name, source))
            elif category == "counting":
                groups: dict[tuple[str, str], list[SceneObject]] = {}
                for o in objects:
                    groups.setdefault((o.shape, o.colour), []).append(o)
                for (shape, colour), group in groups.items():
                    if len(group) > 1 and allowed(group[0]):
                        text = f"{NUMBERS[len(group)]} {colour} {SHAPE_PLURALS[shape]}"
                        candidates.append(_prompt(category, text, group, split_name, source))
            elif category == "colours":
                o = pick(rng, [o for o in objects if allowed(o)])
                if o:
                    candidates.append(_prompt(category, _phrase(o, size=False), [o], split_name, source))
            elif category == "position":
                options = [(a, b, rel) for a, b in pairs(objects, lambda a, b: (a.size, a.colour, a.shape)
                                                             != (b.size, b.colour, b.shape))
                           for rel in RELATION_PHRASES if relation_holds(rel, a, b)]
                choice = pick(rng, options)
                if choice:
                    a, b, rel = choice
                    text = f"{_phrase(a)} {RELATION_PHRASES[rel][0]} {_phrase(b)}"
                    candidates.append(_prompt(category, text, [a, b], split_name, source))
            else:  # colour_attribution: different colours and different shapes, so a swap is wrong
                pair = pick(rng, pairs(objects, lambda a, b: a.colour != b.colour and a.shape != b.shape))
                if pair:
                    a, b = pair
                    text = f"{_phrase(a, size=False)} and {_phrase(b, size=False)}"
                    candidates.append(_prompt(category, text, [a, b], split_name, source))
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:per_category]]
        if category == "counting" and len(chosen) < per_category:
            chosen += _constructed_counting(rng, scenes, allowed, split_name, per_category - len(chosen))
        prompts += chosen
    return prompts


def _constructed_counting(rng, scenes, allowed, split_name: str, n: int) -> list[dict]:
    """``n`` counting prompts on scenes made from the split's shape-colour pairs (see module doc)."""
    available = sorted({(o.shape, o.colour) for _, objects in scenes for o in objects if allowed(o)})
    if not available:
        return []
    out = []
    for j in range(n):
        shape, colour = available[int(rng.integers(len(available)))]
        k = 3 if j % 2 == 0 else 2
        cells = sorted(int(c) for c in rng.choice(9, size=k, replace=False))
        objects = [_layout(rng, shape, colour, ("small", "large")[int(rng.integers(2))], c) for c in cells]
        out.append(_prompt("counting", f"{NUMBERS[k]} {colour} {SHAPE_PLURALS[shape]}", objects,
                           split_name, "constructed"))
    return out


# ---- scoring generated images ------------------------------------------------------------------


def judge_prompts(judge, prompts: Sequence[dict], images: torch.Tensor) -> list[dict]:
    """Per prompt: ``ok`` (the image shows what the prompt asks), ``problems`` (the claims the
    detections contradict, in words) and ``detected`` (the judge's objects)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    detected = judge.detect(images)
    verdicts = []
    for p, found in zip(prompts, detected, strict=True):
        problems = check_caption(p["prompt"], found)
        if p["category"] == "single_object" and len(found) != 1:
            problems.append(f"asks for one object, image has {len(found)}")
        verdicts.append({"category": p["category"], "prompt": p["prompt"], "ok": not problems,
                         "problems": problems, "detected": [o.to_dict() for o in found]})
    return verdicts


def score_images(judge, prompts: Sequence[dict], images: torch.Tensor) -> dict[str, float]:
    """GenEval scores of ``images[i]`` generated for ``prompts[i]``: the share of right images
    per category, ``overall`` (mean over the categories present) and, for ``single_object``,
    each attribute (see the module doc)."""
    verdicts = judge_prompts(judge, prompts, images)
    scores: dict[str, float] = {}
    for category in CATEGORIES:
        oks = [v["ok"] for v in verdicts if v["category"] == category]
        if oks:
            scores[category] = float(np.mean(oks))
    if scores:
        scores["overall"] = float(np.mean([scores[c] for c in CATEGORIES if c in scores]))
    singles = [(p, v) for p, v in zip(prompts, verdicts, strict=True) if p["category"] == "single_object"]
    if singles:
        right = {k: 0 for k in (*ATTRIBUTES, "colour+shape+position")}
        for p, v in singles:
            if len(v["detected"]) != 1:
                continue
            asked, found = SceneObject.from_dict(p["objects"][0]), SceneObject.from_dict(v["detected"][0])
            hits = {"colour": asked.colour == found.colour, "shape": asked.shape == found.shape,
                    "size": asked.size == found.size, "position": asked.cell == found.cell}
            for k, hit in hits.items():
                right[k] += hit
            right["colour+shape+position"] += hits["colour"] and hits["shape"] and hits["position"]
        for k, n in right.items():
            scores[f"single_object {k}"] = n / len(singles)
    return scores


# ---- distribution and alignment scores ---------------------------------------------------------


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix (eigh; negative
    eigenvalues from rounding are set to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features (N, D) and (M, D):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, sample covariances.

    The cross term uses the symmetric form, whose trace equals that of ``(C_a C_b)^1/2``,
    so only symmetric square roots are needed (``eigh``; no scipy)."""
    a = np.asarray(features_a.detach().cpu() if torch.is_tensor(features_a) else features_a, dtype=np.float64)
    b = np.asarray(features_b.detach().cpu() if torch.is_tensor(features_b) else features_b, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples on each side; got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross
    return float(max(value, 0.0))


@torch.no_grad()
def clip_score(contrastive_model, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 250) -> float:
    """Mean of ``100 * max(cos, 0)`` between each image's embedding and its prompt's text
    embedding (CLIPScore without its rescaling weight), from a polymodal ContrastiveModel.
    Images (B, 3, H, W) in [-1, 1] are resized to the model's image size when they differ."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if len(images) == 0:
        raise ValueError("no images to score")
    size = contrastive_model.image_size
    was_training = contrastive_model.training
    contrastive_model.eval()
    scores = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
        transform = getattr(contrastive_model, "image_transform", None)
        if transform is not None:  # [-1, 1] -> the model's own normalisation (a Hugging Face CLIP's)
            x = transform.normalize((x + 1) / 2)
        image_emb = contrastive_model.embed_image(x)
        text_emb = contrastive_model.embed_text(list(prompts[start : start + batch_size]))
        cos = (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(-1)
        scores.append(100 * cos.clamp(min=0).cpu())
    contrastive_model.train(was_training)
    return float(torch.cat(scores).mean())


# ---- rendering scenes (real images, and an oracle generator) -----------------------------------


def render_scenes(scenes: Sequence[Sequence[SceneObject]], size: int = 32, seed: int = 0,
                  world_size: int = WORLD_SIZE) -> torch.Tensor:
    """Each scene drawn as the shapes world draws it (at ``world_size``, bboxes in its pixels),
    then resized to ``size`` as the data loader does: (B, 3, size, size) in [-1, 1]."""
    from polymodal.data.shapes import render
    from polymodal.modalities.image import ImageTransform

    transform = ImageTransform(size)
    images = [transform(render(list(objects), world_size, np.random.default_rng([seed, i])))
              for i, objects in enumerate(scenes)]
    return torch.stack(images) if images else torch.zeros(0, 3, size, size)


def scene_generator(prompts: Sequence[dict], size: int = 32) -> Callable[[list[str], int], torch.Tensor]:
    """An oracle ``generate(texts, seed)``: renders the scene each prompt was built from (its
    ``objects``). What a perfect generator would draw; its scores measure the judge."""
    scenes = {}
    for p in prompts:
        scenes.setdefault(p["prompt"], [SceneObject.from_dict(d) for d in p["objects"]])

    def generate(texts: list[str], seed: int) -> torch.Tensor:
        missing = [t for t in texts if t not in scenes]
        if missing:
            raise KeyError(f"no scene for prompt {missing[0]!r}")
        return render_scenes([scenes[t] for t in texts], size=size, seed=seed)

    return generate


# ---- the whole evaluation ----------------------------------------------------------------------


@torch.no_grad()
def generator_function(model, guidance: float, steps: int, batch: int = 100,
                       progress: Callable[[int], None] | None = None, compose: bool = False,
                       guidance_interval: tuple[int, int] | str | None = None, guidance_outside: float = 1.0,
                       best_of: int = 1):
    """``generate(prompts, seed)`` for :func:`evaluate_generator`, in chunks of ``batch``;
    ``compose``: "and"-joined prompts are drawn as conjunctions (``TextToImage.generate``);
    ``guidance_interval``: the timesteps guided at ``guidance`` (default: every step), the others
    at ``guidance_outside``; ``best_of`` N > 1: each image the model's own pick of N (a model
    that reads what it draws: the omni model's ``draw``)."""
    choose = {"best_of": best_of} if best_of != 1 else {}  # only models that read their drawings take it

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        out = []
        for k, start in enumerate(range(0, len(prompts), batch)):
            out.append(model.generate(prompts[start : start + batch], guidance=guidance, steps=steps, seed=seed * 1000 + k,
                                      compose=compose, guidance_interval=guidance_interval,
                                      guidance_outside=guidance_outside, **choose))
            if progress:
                progress(len(out[-1]))
        return torch.cat(out)
    return generate


def evaluate_generator(
    generate: Callable[[list[str], int], torch.Tensor], judge, rows_by_split: dict[str, Sequence[dict]], *,
    per_category: int = 50, seed: int = 0, clip=None,
    real_images_by_split: dict[str, torch.Tensor] | None = None, batch_size: int = 100,
) -> dict[str, dict[str, float]]:
    """GenEval scores of ``generate`` on each split, beside the judge's accuracy on real images.

    ``generate(prompts, seed)`` returns images (B, 3, H, W) in [-1, 1] for a list of prompt
    texts; it is called on chunks of ``batch_size`` prompts with seed ``seed + chunk index``.
    ``rows_by_split``: the metadata rows of each split (scene graphs in ``objects``): the
    prompts are built from them. ``real_images_by_split``: the real images of those rows
    (same order), for the judge's accuracy on real images and the Fréchet distance; without
    it the rows' scenes are rendered afresh as the world renders them.

    Per split: every :func:`score_images` score, ``judge <attribute> accuracy on real`` (see
    :func:`judge_metrics`), ``frechet distance`` (judge features, generated vs real) and,
    with ``clip`` (a ContrastiveModel), ``clip score``.
    """
    judge.eval()
    results: dict[str, dict[str, float]] = {}
    for split, rows in rows_by_split.items():
        rows = list(rows)
        prompts = geneval_prompts(rows, split, per_category=per_category, seed=seed)
        if not prompts:
            continue
        texts = [p["prompt"] for p in prompts]
        chunks = []
        for k, start in enumerate(range(0, len(texts), batch_size)):
            chunk = texts[start : start + batch_size]
            images = generate(chunk, seed + k)
            if images.ndim != 4 or images.shape[0] != len(chunk) or images.shape[1] != 3:
                raise ValueError(f"generate() returned shape {tuple(images.shape)} for {len(chunk)} prompts; "
                                 "expected (B, 3, H, W)")
            chunks.append(images.detach().float().cpu())
        generated = torch.cat(chunks)
        metrics = score_images(judge, prompts, generated)
        if real_images_by_split is not None and split in real_images_by_split:
            real = real_images_by_split[split]
            if len(real) != len(rows):
                raise ValueError(f"split {split!r}: {len(real)} real images for {len(rows)} rows")
        else:
            real = render_scenes([[SceneObject.from_dict(d) for d in r["objects"]] for r in rows],
                                 size=generated.shape[-1], seed=seed)
        for key, value in judge_metrics(judge, real, rows).items():
            if key != "samples":
                metrics[f"judge {key} on real"] = value
        features = lambda x: torch.cat([judge.features(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])  # noqa: E731
        metrics["frechet distance"] = frechet_distance(features(generated), features(real))
        if clip is not None:
            metrics["clip score"] = clip_score(clip, generated, texts)
        metrics["prompts"] = float(len(prompts))
        results[split] = metrics
    return results
