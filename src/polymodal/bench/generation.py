"""``polymodal bench generation``: what a text-to-image model draws, as pictures and curves.

- ``samples_<category>.png``: a grid per GenEval category of test prompts, each image marked
  right or wrong by the judge;
- ``guidance.png`` and ``results.json["guidance"]``: the GenEval scores against the guidance
  scale (1.0 is no guidance);
- ``training.png`` and ``results.json["training"]``: the scores of every snapshot a run saved
  (``trainer.snapshot_every_minutes``) against its training step, on the first split's prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from polymodal.eval.geneval import (
    CATEGORIES,
    evaluate_generator,
    generator_function,
    geneval_prompts,
    judge_prompts,
)

CURVE_METRICS = ("overall", "single_object colour", "single_object shape", "single_object position",
                 "single_object colour+shape+position")


def sample_sheets(model, judge, rows: Sequence[dict], split: str, out: Path, *, guidance: float, steps: int,
                  per_category: int = 8, seed: int = 0, compose: bool = False) -> dict[str, Path]:
    """One PNG per category: ``per_category`` prompts of ``split`` and what the model drew."""
    from polymodal.modalities.image import image_grid

    prompts = geneval_prompts(rows, split, per_category=per_category, seed=seed)
    sheets = {}
    for category in CATEGORIES:
        chosen = [p for p in prompts if p["category"] == category]
        if not chosen:
            continue
        images = model.generate([p["prompt"] for p in chosen], guidance=guidance, steps=steps, seed=seed,
                                compose=compose)
        verdicts = judge_prompts(judge, chosen, images)
        labels = [("ok: " if v["ok"] else "no: ") + p["prompt"] for p, v in zip(chosen, verdicts, strict=True)]
        path = out / f"samples_{category}.png"
        image_grid(images, columns=4, scale=4, labels=labels,
                   title=f"{category} ({split}, guidance {guidance:g}, {steps} steps); ok = the judge agrees").save(path)
        sheets[category] = path
    return sheets


def guidance_sweep(model, judge, rows_by_split: dict[str, Sequence[dict]], scales: Sequence[float], *,
                   steps: int, per_category: int, seed: int = 0, compose: bool = False) -> list[dict]:
    """GenEval scores at each guidance scale: ``[{"guidance": g, split: metrics}, ...]``."""
    results = []
    for g in scales:
        scores = evaluate_generator(generator_function(model, g, steps, compose=compose), judge, rows_by_split,
                                    per_category=per_category, seed=seed)
        results.append({"guidance": g, **scores})
    return results


def snapshot_curve(run: Path, judge, rows_by_split: dict[str, Sequence[dict]], *, guidance: float, steps: int,
                   per_category: int, seed: int = 0, compose: bool = False) -> list[dict]:
    """GenEval scores of every snapshot of a training run: ``[{"step": n, split: metrics}, ...]``."""
    from polymodal.models import load_model

    results = []
    for folder in sorted((run / "snapshots").glob("step-*")):
        model = load_model(folder, task="generate image")
        scores = evaluate_generator(generator_function(model, guidance, steps, compose=compose), judge, rows_by_split,
                                    per_category=per_category, seed=seed)
        results.append({"step": int(folder.name.split("-")[1]), **scores})
    return results


def plot_curves(points: list[dict], x_key: str, out: Path, title: str, xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [k for k in points[0] if k != x_key] if points else []
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(5.5 * max(len(splits), 1), 4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=False):
        xs = [p[x_key] for p in points]
        for metric in CURVE_METRICS:
            ys = [p[split].get(metric, float("nan")) for p in points]
            ax.plot(xs, ys, marker="o", label=metric)
        ax.set_title(split)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GenEval-style score")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def bench_generation(model_dir: str | os.PathLike, data: str | os.PathLike, judge_dir: str | os.PathLike,
                     out: str | os.PathLike, *, scales: Sequence[float] = (1.0, 2.0, 3.0, 5.0, 8.0),
                     guidance: float = 3.0, steps: int = 50, per_category: int = 30, seed: int = 0,
                     splits: Sequence[str] = ("test", "test_novel"), compose: bool = False) -> dict:
    """Sample sheets, the guidance sweep and (for a run folder with snapshots) the training curve."""
    from polymodal.data.source import SkipLog, iter_folder
    from polymodal.models import load_model

    model_dir, out = Path(model_dir), Path(out)
    run = model_dir if (model_dir / "snapshots").is_dir() else None
    if run is not None:
        model_dir = run / "model"
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, task="generate image")
    judge = load_model(judge_dir, task="detect")
    rows = [sample.row for sample in iter_folder(data, SkipLog())]
    rows_by_split = {s: [r for r in rows if r.get("split") == s] for s in splits}
    results: dict = {"model": str(model_dir), "steps": steps, "per_category": per_category, "compose": compose}
    results["sheets"] = {k: str(v) for k, v in sample_sheets(model, judge, rows_by_split[splits[0]], splits[0], out,
                                                               guidance=guidance, steps=steps,
                                                               compose=compose).items()}
    results["guidance"] = guidance_sweep(model, judge, rows_by_split, scales, steps=steps, per_category=per_category,
                                         seed=seed, compose=compose)
    plot_curves(results["guidance"], "guidance", out / "guidance.png", "GenEval-style score against guidance scale",
                "guidance scale (1 = none)")
    if run is not None:
        first = {splits[0]: rows_by_split[splits[0]]}
        results["training"] = snapshot_curve(run, judge, first, guidance=guidance, steps=steps,
                                             per_category=per_category, seed=seed, compose=compose)
        if results["training"]:
            plot_curves(results["training"], "step", out / "training.png", "GenEval-style score during training",
                        "training step")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
