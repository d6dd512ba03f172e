"""A PNG of the loss and metric curves from the CSV log."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def read_metrics(csv_dir: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` from the newest ``metrics.csv`` under ``csv_dir``."""
    files = sorted(Path(csv_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    series: dict[str, list[tuple[float, float]]] = {}
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = float(row.get("step") or 0)
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_curves(csv_dir: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(csv_dir)
    losses = {k: v for k, v in series.items() if k.startswith("train/loss")}
    metrics = {k: v for k, v in series.items() if k.startswith("val/")}
    if not losses and not metrics:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in losses.items():
        steps, values = zip(*points, strict=True)
        axes[0].plot(steps, values, label=name.removeprefix("train/"), linewidth=1)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    for name, points in metrics.items():
        steps, values = zip(*points, strict=True)
        axes[1].plot(steps, values, marker="o", label=name.removeprefix("val/"))
    axes[1].set(title="validation", xlabel="step", ylim=(0, 1))
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
