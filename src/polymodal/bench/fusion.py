"""``polymodal bench fusion``: every fusion strategy trained on one task, side by side.

Trains image-only, audio-only, early, late and hybrid fusion models from the same recipe, each
on the same budget, and scores each on the test split: accuracy, parameters and training
time, plus, for the fused models, accuracy with one modality only. Two tasks of the shapes
world: ``question`` (``recipes/fusion-shapes.yaml``: a spoken yes/no question and an image;
neither alone answers) and ``noisy`` (``recipes/fusion-noisy.yaml``: the colour of the object, from
a partly hidden image and a spoken caption under noise; each alone answers, unreliably). Writes
``results.json`` and ``accuracy.png`` into the output folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from polymodal.data.dataset import DecodeOptions, parse_fields
from polymodal.nn.encoders import INPUT_KIND

TASKS = {"question": "fusion-shapes", "noisy": "fusion-noisy"}  # shipped recipes
RECIPE = TASKS["question"]
STRATEGIES = ("image-only", "audio-only", "early", "late", "hybrid")


def strategy_overrides(name: str, towers: dict[str, dict], fields: dict[str, str]) -> list[str]:
    """Recipe overrides that turn the base fusion recipe into strategy ``name``."""
    if name in ("image-only", "audio-only"):
        kind = name.split("-")[0]
        tower = next((t for t, spec in towers.items() if INPUT_KIND.get(spec["type"]) == kind), None)
        if tower is None:
            raise ValueError(f"the recipe has no {kind} tower for {name!r}")
        return ["model.strategy=single", f"model.towers={json.dumps({tower: towers[tower]})}",
                f"data.fields={json.dumps({tower: fields[tower]})}", "model.fields={}",
                *(["data.augment=null"] if kind == "image" else [])]
    return [f"model.strategy={name}"]


def bench_fusion(data: str | os.PathLike, out: str | os.PathLike, *, steps: int | None = None,
                 init_from: str | None = None, strategies=STRATEGIES, recipe_path: str | os.PathLike = RECIPE,
                 extra: list[str] | None = None) -> dict:
    """Train each strategy on ``recipe_path``'s task for ``steps`` (the recipe's own budget by
    default); score each on the test split."""
    from polymodal.data.memory import MemoryDataset
    from polymodal.eval.understanding import fusion_metrics
    from polymodal.models import load_model
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_recipe(recipe_path, extra or [])
    base_fields = {f.name: f"{f.modality}:{f.column}" for f in parse_fields(base.data.fields)}
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    saved = out / "results.json"  # a rerun replaces the rows of the strategies it trains
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in strategies:
        budget = [f"trainer.max_steps={steps}"] if steps else []
        overrides = [*budget, f"model.init_from={init_from or 'null'}", *(extra or []),
                     *strategy_overrides(name, base.model["towers"], base_fields)]  # the strategy's own settings win
        recipe = load_recipe(recipe_path, overrides)
        start = time.perf_counter()
        model_dir = train(recipe, data, out / name, progress=False)
        seconds = time.perf_counter() - start
        model = load_model(model_dir, task="classify")
        with torch.no_grad():
            items = MemoryDataset(data, base_fields, split="test", options=DecodeOptions()).items
            metrics = fusion_metrics(model, items, base_fields)
        row = {"accuracy": metrics["accuracy"], "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": seconds}
        row.update({k: v for k, v in metrics.items() if k.endswith(" only")})
        results[name] = row
        results = {n: results[n] for n in STRATEGIES if n in results}
        saved.write_text(json.dumps(results, indent=2) + "\n")
    plot_accuracy(results, out / "accuracy.png", title=base.name)
    return results


def plot_accuracy(results: dict, path: Path, title: str = "fusion") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, [results[n]["accuracy"] for n in names], color=["#999999"] * 2 + ["#3366cc"] * (len(names) - 2))
    ax.bar_label(bars, fmt="%.3f")
    ax.set(ylim=(0, 1), ylabel="test accuracy", title=f"{title}: test accuracy per strategy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(results: dict):
    from rich.table import Table

    table = Table(title="fusion strategies (test split)")
    alone = list(dict.fromkeys(k for r in results.values() for k in r if k.endswith(" only")))
    for column in ("model", "accuracy", *alone, "parameters", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.3f}", *(f"{r[k]:.3f}" if k in r else "" for k in alone),
                      f"{r['parameters']:,}", f"{r['train_seconds']:.0f}")
    return table
