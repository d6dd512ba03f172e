"""``polymodal bench fusion``: every fusion strategy trained on one task, side by side.

Trains image-only, audio-only, early, late and hybrid fusion models from the same recipe
(``recipes/fusion-shapes.yaml``), each on the same budget, and scores each on the test split:
accuracy, parameters and training time, plus, for the fused models, accuracy when one
modality is missing. Writes ``results.json`` and ``accuracy.png`` into the output folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from polymodal.data.dataset import DecodeOptions
from polymodal.eval.run import validation_function

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "fusion-shapes.yaml"
STRATEGIES = ("image-only", "audio-only", "early", "late", "hybrid")


def strategy_overrides(name: str, towers: dict[str, dict]) -> list[str]:
    if name == "image-only":
        return ["model.strategy=single", f"model.towers={json.dumps({'image': towers['image']})}",
                "data.fields={image: image}", "data.bucket_by_length=false"]
    if name == "audio-only":
        return ["model.strategy=single", f"model.towers={json.dumps({'question': towers['question']})}",
                'data.fields={question: "audio:fusion_audio_file"}']
    return [f"model.strategy={name}"]


def bench_fusion(data: str | os.PathLike, out: str | os.PathLike, *, minutes: float = 4.0,
                 init_from: str | None = None, strategies=STRATEGIES, recipe_path: Path = RECIPE,
                 extra: list[str] | None = None) -> dict:
    from polymodal.models.fusion import FusionClassifier
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_recipe(recipe_path)
    results = {}
    for name in strategies:
        overrides = [f"trainer.max_minutes={minutes}", f"model.init_from={init_from or 'null'}",
                     *strategy_overrides(name, base.model["towers"]), *(extra or [])]
        recipe = load_recipe(recipe_path, overrides)
        start = time.perf_counter()
        model_dir = train(recipe, data, out / name, progress=False)
        seconds = time.perf_counter() - start
        model = FusionClassifier.from_pretrained(model_dir)
        fields = recipe.data.fields
        options = DecodeOptions()
        with torch.no_grad():
            row = {"accuracy": validation_function(model, data, "test", fields, options, None)(model)["accuracy"],
                   "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": seconds}
            if len(fields) > 1:
                for missing in fields:
                    kept = {k: v for k, v in fields.items() if k != missing}
                    row[f"accuracy without {missing}"] = validation_function(
                        model, data, "test", kept, options, None)(model)["accuracy"]
        results[name] = row
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_accuracy(results, out / "accuracy.png")
    return results


def plot_accuracy(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, [results[n]["accuracy"] for n in names], color=["#999999"] * 2 + ["#3366cc"] * (len(names) - 2))
    ax.bar_label(bars, fmt="%.3f")
    ax.axhline(0.5, color="red", linestyle="--", linewidth=1, label="chance")
    ax.set(ylim=(0, 1), ylabel="test accuracy", title="fusion task: spoken question + image")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(results: dict):
    from rich.table import Table

    table = Table(title="fusion strategies (test split)")
    for column in ("model", "accuracy", "without image", "without question", "parameters", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.3f}", f"{r.get('accuracy without image', float('nan')):.3f}",
                      f"{r.get('accuracy without question', float('nan')):.3f}", f"{r['parameters']:,}",
                      f"{r['train_seconds']:.0f}")
    return table
