"""``polymodal bench omni``: the native multimodal designs on one backbone, on one budget.

Trains the four arms {dense, MoT} x {Chameleon, Transfusion} of :mod:`polymodal.models.omni`
from one base recipe (``omni-transfusion-shapes``: the same sizes, optimiser, batch, data stream
and steps for every arm; only ``model.image``, ``model.layout`` and the autoencoder differ), each
with every seed asked for, saving a snapshot every so many steps. Then, for each run:

- the FLOPs of one training step, counted by :class:`torch.utils.flop_counter.FlopCounterMode` on
  a real batch (forward and backward; the frozen autoencoder's encoding is cached in training and
  not counted), active and total parameters (an MoT token passes through one modality's weights);
- the training curves per modality (text next-token loss; image-code loss or diffusion loss) from
  the run's CSV log, against steps and FLOPs;
- the final model's text validation loss, caption scene-graph accuracy, VQA accuracy and
  GenEval-style scores (overall, single objects, Fréchet distance) on ``test`` and ``test_novel``;
- each snapshot's caption and image scores on ``test`` (fewer prompts), for the parity fits.

And across runs, as the papers measure them:

- **MoT's step-matching slope** per modality (arXiv 2411.04996, Fig. 6): for each logged dense
  step ``s``, the first MoT step at which MoT's smoothed loss reaches the dense one's at ``s``;
  a line through the origin fitted to those pairs. Below 1: MoT gets there in fewer steps.
- **Transfusion's parity FLOP ratio** against Chameleon (arXiv 2408.11039, Table 3): fits of
  log(metric) against log(FLOPs) over the snapshots; the FLOPs Chameleon's fit needs to reach
  Transfusion's final metric, and Transfusion's own FLOPs over them (below 1: Transfusion
  needs fewer FLOPs for the same score). Flagged ``extrapolated`` when Chameleon never got there.
  On the bars' metrics (scene-graph accuracy, GenEval-style overall) and on the paper's (CIDEr for
  captions; the Frechet distance, lower better, for drawings).
- a guidance sweep of each dense arm's first seed (GenEval-style overall on ``test``).

Writes ``results.json``, ``losses.png`` (loss against FLOPs per modality) and ``guidance.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

BASE_RECIPE = "omni-transfusion-shapes"
ARMS = {"chameleon": ("vq", "dense"), "chameleon-mot": ("vq", "mot"),
        "transfusion": ("latent", "dense"), "transfusion-mot": ("latent", "mot")}
LOSSES = {"text": ("train/text_loss",), "image": ("train/image_loss", "train/diffusion_loss")}
CAPTION_METRIC, IMAGE_METRIC = "scene-graph objects right", "overall"
# each snapshot's scores kept for the parity fits: name -> (the eval's key, higher is better). The paper's
# Table 3 fits captioning by CIDEr and drawing by FID; the scene-graph and GenEval-style scores are this
# project's bars, but sit at 0 for the first few hundred steps, where CIDEr and the Frechet distance move.
PARITY_METRICS = {"caption": (CAPTION_METRIC, True), "cider": ("CIDEr", True),
                  "image": (IMAGE_METRIC, True), "frechet": ("frechet distance", False)}
EVERY_ARM_DRAWS = {"guidance_interval": "all", "best_of": 1}  # one drawing a prompt, guided at every step,
# whatever drawing settings an arm's recipe gives its model: the arms are compared as they draw alike
TRAIN_TIME = "train_time.json"  # in a run's folder: the seconds its training took


def arm_overrides(arm: str, autoencoders: dict[str, str], steps: int | None, seed: int, snapshot_every: int) -> list[str]:
    """The overrides that make the base recipe into ``arm`` (``autoencoders``: image kind -> model)."""
    image, layout = ARMS[arm]
    if image not in autoencoders:
        raise ValueError(f"arm {arm} needs a{' VQ' if image == 'vq' else 'n'} autoencoder "
                         f"({'--vq-autoencoder' if image == 'vq' else '--autoencoder'})")
    budget = [f"trainer.max_steps={steps}"] if steps else []
    return [*budget, f"model.image={image}", f"model.layout={layout}", f"model.autoencoder={autoencoders[image]}",
            f"trainer.seed={seed}", f"trainer.snapshot_every_steps={snapshot_every}",
            "trainer.snapshot_every_minutes=null"]


def same_recipe(run: Path, recipe) -> bool:
    """Whether ``run`` was (or is being) trained from exactly ``recipe``."""
    import yaml

    saved = run / "recipe.yaml"
    return saved.is_file() and yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(recipe.to_dict()))


def trained_before(run: Path, recipe) -> bool:
    """Whether ``run`` holds a model trained from exactly ``recipe`` (a finished earlier bench run)."""
    config = run / "model" / "config.json"
    return (same_recipe(run, recipe) and config.is_file()
            and config.stat().st_mtime >= (run / "recipe.yaml").stat().st_mtime)


def parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(active, total) trainable parameters: a token of an MoT block runs through one of its
    modality parameter sets, so all but one set of each block are inactive for it."""
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))
    inactive = 0
    for module in model.modules():
        for name in ("experts", "norms"):  # each block's parameter sets; the final norm of each modality
            sets = getattr(module, name, None)
            if isinstance(sets, torch.nn.ModuleList) and len(sets) > 1:
                inactive += sum(p.numel() for e in sets[1:] for p in e.parameters())
    return total - inactive, total


def training_batch(model, data, batch_size: int, split: str = "val") -> dict:
    from polymodal.data.dataset import Collator
    from polymodal.models.family import split_items

    fields = model.fields()
    items = split_items(data, fields, split, model.input_size(), limit=batch_size)
    if not items:
        raise ValueError(f"{data}: no {split!r} samples to count a training step's FLOPs on")
    return Collator(fields)(items)


def cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU kernel of scaled dot-product attention, which the counter has
    none for (it would count attention as free on CPU): the same count as its GPU kernels'."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def step_flops(model, batch: dict) -> float:
    """FLOPs of one training step (loss, forward and backward) of ``model`` on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    model.training_tokens(batch[model.config.image_field], batch["rows"])  # the cache, as in training
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
    with counter:
        model.loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return float(counter.get_total_flops())


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Per modality, the (step, training loss) points the run logged."""
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in LOSSES}
    for path in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                for name, columns in LOSSES.items():
                    value = next((row[c] for c in columns if row.get(c) not in (None, "")), None)
                    if value is not None and math.isfinite(float(value)):
                        curves[name].append((int(row["step"]), float(value)))
    return {name: sorted(dict(points).items()) for name, points in curves.items() if points}


def smooth(points: Sequence[tuple[int, float]], window: int = 5) -> list[tuple[int, float]]:
    """A centred moving average of the loss (logged losses are single noisy batches)."""
    out = []
    for i, (step, _) in enumerate(points):
        near = points[max(0, i - window // 2) : i + window // 2 + 1]
        out.append((step, sum(v for _, v in near) / len(near)))
    return out


def step_matching_slope(dense: Sequence[tuple[int, float]], mot: Sequence[tuple[int, float]],
                        skip: float = 0.1) -> dict:
    """For each dense step (after the first ``skip`` share of training), the first MoT step whose
    smoothed loss is at or below the dense smoothed loss there; the slope of a line through the
    origin fitted to the pairs (least squares), and how many dense steps MoT matched."""
    dense, mot = smooth(dense), smooth(mot)
    if not dense or not mot:
        return {"slope": None, "matched": 0, "points": 0}
    start = skip * dense[-1][0]
    pairs = []
    considered = [(s, v) for s, v in dense if s >= start]
    for step, loss in considered:
        reached = next((m for m, v in mot if v <= loss), None)
        if reached is not None:
            pairs.append((step, reached))
    if not pairs:
        return {"slope": None, "matched": 0, "points": len(considered)}
    slope = sum(s * m for s, m in pairs) / sum(s * s for s, _ in pairs)
    return {"slope": slope, "matched": len(pairs), "points": len(considered)}


def log_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of log(metric) = a + b log(FLOPs) by least squares over the points with metric > 0."""
    xy = [(math.log(f), math.log(m)) for f, m in points if f > 0 and m > 0]
    if len(xy) < 2 or len({x for x, _ in xy}) < 2:
        return None
    mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
    b = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
    return my - b * mx, b


def parity_ratio(transfusion: Sequence[tuple[float, float]], chameleon: Sequence[tuple[float, float]],
                 higher_is_better: bool = True) -> dict:
    """Transfusion's FLOPs at its last point over the FLOPs Chameleon's log-log fit needs to reach
    Transfusion's metric there. ``points``: (FLOPs, metric), in training order. A metric where lower
    is better (a Frechet distance) needs a fit that falls with FLOPs."""
    fit = log_fit(chameleon)
    if not transfusion or transfusion[-1][1] <= 0:
        return {"ratio": None, "why": "Transfusion's final metric is 0"}
    if fit is None:
        return {"ratio": None, "why": "Chameleon's metric was 0 at all but one checkpoint: no fit"}
    a, b = fit
    if (b <= 0) if higher_is_better else (b >= 0):
        way = "grow" if higher_is_better else "fall"
        return {"ratio": None, "why": f"Chameleon's metric does not {way} with FLOPs (slope {b:.3f})"}
    flops_t, metric_t = transfusion[-1]
    needed = math.exp((math.log(metric_t) - a) / b)
    values = [m for _, m in chameleon if m > 0]  # the points the fit used (a missing score is 0)
    best = max(values) if higher_is_better else min(values)
    return {"ratio": flops_t / needed, "chameleon_flops": needed, "transfusion_flops": flops_t,
            "metric": metric_t, "fit_slope": b,
            "extrapolated": best < metric_t if higher_is_better else best > metric_t}


def run_scores(model, data, judge, *, splits, per_category: int, limit: int | None,
               sample_steps: int, guidance: float) -> dict:
    """Every metric of the loaded omni ``model`` on ``splits`` (captions, answers, drawings)."""
    from polymodal.models import EvalOptions

    options = EvalOptions(judge=judge, per_category=per_category, limit=limit, sample_steps=sample_steps,
                          guidance=guidance, **EVERY_ARM_DRAWS)
    return model.evaluate(data, list(splits), options)


def validation_losses(model, data, limit: int) -> dict[str, float]:
    from polymodal.models.family import split_items

    items = split_items(data, model.fields(), "val", model.input_size(), limit=limit)
    if not items:
        return {}
    with torch.no_grad():
        metrics = model.validator(items, model.fields())(model)
    return {k: v for k, v in metrics.items() if k.endswith("loss")}


def bench_omni(data: str | os.PathLike, out: str | os.PathLike, *, judge: str | os.PathLike,
               autoencoder: str | os.PathLike | None = None, vq_autoencoder: str | os.PathLike | None = None,
               steps: int | None = None, seeds: Sequence[int] = (0, 1), arms: Sequence[str] = tuple(ARMS),
               snapshots: int = 4, per_category: int = 10, limit: int | None = 200, sample_steps: int = 25,
               guidance: float = 3.0, scales: Sequence[float] = (1.0, 2.0, 3.0, 5.0), extra: list[str] | None = None,
               recipe: str = BASE_RECIPE, progress: bool = False, train_only: bool = False) -> dict:
    """Train every arm and seed (a run already in ``out`` with its model is scored, not retrained;
    one already scored with the same settings keeps its scores), score them and compare them;
    returns what ``results.json`` holds (processes scoring different arms into one ``out`` each
    add their rows to it). ``train_only``: train the runs and stop, so several processes can
    train different arms into one ``out`` side by side and a last call without it scores them
    all; returns ``{"trained": [run names]}``."""
    from polymodal.models import EvalOptions, load_model
    from polymodal.models.text_to_image import TextToImage
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    if snapshots < 1:
        raise ValueError(f"snapshots must be at least 1, got {snapshots}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    autoencoders = {k: str(v) for k, v in (("latent", autoencoder), ("vq", vq_autoencoder)) if v is not None}
    saved = out / "results.json"

    def read_results() -> dict:
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        results.setdefault("runs", {})
        return results

    results = read_results()
    runs = results["runs"]
    scoring = {"per_category": per_category, "limit": limit, "sample_steps": sample_steps, "guidance": guidance,
               "scales": [float(v) for v in scales]}
    base = load_recipe(recipe, [*(extra or []), *([f"trainer.max_steps={steps}"] if steps else [])])
    budget = base.trainer.max_steps
    if not budget:
        raise ValueError("the bench needs a step budget: --steps, or a recipe with trainer.max_steps")
    for arm in arms:
        for seed in seeds:
            overrides = [*(extra or []), *arm_overrides(arm, autoencoders, budget, seed, max(1, budget // snapshots))]
            name, run = f"{arm}-seed{seed}", out / f"{arm}-seed{seed}"
            arm_recipe = load_recipe(recipe, overrides)
            row = runs.get(name, {})
            if not trained_before(run, arm_recipe):  # an interrupted run resumes from its last checkpoint
                started = time.perf_counter()
                train(arm_recipe, data, run, resume=same_recipe(run, arm_recipe), progress=progress)
                row = {"train_seconds": time.perf_counter() - started}
                (run / TRAIN_TIME).write_text(json.dumps(row) + "\n")
            elif "train_seconds" not in row and (run / TRAIN_TIME).is_file():  # trained by a train_only call
                row = {**row, **json.loads((run / TRAIN_TIME).read_text())}
            if train_only:
                continue
            if row.get("scored_with") == scoring and row.get("steps") == budget and "final" in row:
                continue  # scored before with these settings, and not trained again since
            row.update({"arm": arm, "seed": seed, "steps": budget})
            model = load_model(run / "model")
            row["active_parameters"], row["total_parameters"] = parameters(model)
            row["flops_per_step"] = step_flops(model, training_batch(model, data, base.data.batch_size))
            row["flops"] = row["flops_per_step"] * budget
            row["curves"] = read_curves(run)
            row["validation"] = validation_losses(model, data, base.data.val_limit)
            row["final"] = run_scores(model, data, judge, splits=("test", "test_novel"),
                                      per_category=per_category, limit=limit, sample_steps=sample_steps,
                                      guidance=guidance)
            row["snapshots"] = []
            for snap in sorted((run / "snapshots").glob("step-*")):
                step = int(snap.name.split("-")[1])
                scores = run_scores(load_model(snap), data, judge, splits=("test",), per_category=per_category, limit=limit,
                                    sample_steps=sample_steps, guidance=guidance).get("test", {})
                row["snapshots"].append({"step": step, "flops": step * row["flops_per_step"],
                                         "vqa": scores.get("vqa accuracy"),
                                         **{name: scores.get(key) for name, (key, _) in PARITY_METRICS.items()}})
            if ARMS[arm][1] == "dense" and seed == seeds[0]:
                row["guidance"] = {}
                for scale in scales:
                    drawn = TextToImage.evaluate(model, data, ["test"], EvalOptions(
                        judge=judge, per_category=per_category, sample_steps=sample_steps, guidance=scale,
                        **EVERY_ARM_DRAWS))
                    row["guidance"][f"{scale:g}"] = drawn["test"][IMAGE_METRIC]
            row["scored_with"] = scoring
            results = read_results()  # another process scoring other arms into this folder may have written
            runs = results["runs"]
            runs[name] = row
            saved.write_text(json.dumps(results, indent=2) + "\n")
    if train_only:
        return {"trained": [f"{arm}-seed{seed}" for arm in arms for seed in seeds]}
    results = read_results()  # every process's rows
    runs = results["runs"]
    results["comparisons"] = compare(runs)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(runs, out / "losses.png")
    plot_guidance(runs, out / "guidance.png")
    return results


def compare(runs: dict) -> dict:
    """MoT's step-matching slope per modality and image kind, and Transfusion's parity ratio
    against Chameleon per metric, per seed and their mean."""
    seeds = sorted({r["seed"] for r in runs.values()})
    slopes: dict = {}
    for kind in ("chameleon", "transfusion"):
        for modality in LOSSES:
            per_seed = {}
            for seed in seeds:
                dense, mot = runs.get(f"{kind}-seed{seed}"), runs.get(f"{kind}-mot-seed{seed}")
                if dense and mot and modality in dense["curves"] and modality in mot["curves"]:
                    per_seed[str(seed)] = step_matching_slope(dense["curves"][modality], mot["curves"][modality])
            values = [s["slope"] for s in per_seed.values() if s["slope"] is not None]
            slopes[f"{kind} {modality}"] = {"per_seed": per_seed,
                                            "mean": sum(values) / len(values) if values else None}
    parity: dict = {}
    for metric, (_, higher_is_better) in PARITY_METRICS.items():
        per_seed = {}
        for seed in seeds:
            t, c = runs.get(f"transfusion-seed{seed}"), runs.get(f"chameleon-seed{seed}")
            if t and c and all(metric in s for r in (t, c) for s in r["snapshots"]):  # older results lack some
                points = [[(s["flops"], s[metric] or 0.0) for s in r["snapshots"]] for r in (t, c)]
                per_seed[str(seed)] = parity_ratio(*points, higher_is_better=higher_is_better)
        values = [p["ratio"] for p in per_seed.values() if p["ratio"] is not None]
        parity[metric] = {"per_seed": per_seed, "mean": sum(values) / len(values) if values else None}
    return {"mot_step_matching_slope": slopes, "transfusion_parity_flop_ratio": parity}


def plot_losses(runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"chameleon": "#cc3333", "chameleon-mot": "#ff9966", "transfusion": "#3366cc", "transfusion-mot": "#66ccff"}
    for name, r in runs.items():
        for ax, modality in zip(axes, LOSSES, strict=True):
            points = smooth(r["curves"].get(modality, []))
            if points:
                ax.plot([s * r["flops_per_step"] for s, _ in points], [v for _, v in points],
                        color=colours.get(r["arm"]), alpha=0.9 if r["seed"] == 0 else 0.5,
                        label=name)
    for ax, modality in zip(axes, LOSSES, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs",
               ylabel=f"{modality} training loss" + (" (codes: cross-entropy; latents: diffusion)" if modality == "image" else ""),
               title=f"{modality} loss against FLOPs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_guidance(runs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        if r.get("guidance"):
            scales = sorted(r["guidance"], key=float)
            ax.plot([float(s) for s in scales], [r["guidance"][s] for s in scales], marker="o", label=name)
    ax.set(xlabel="guidance scale", ylabel="GenEval-style overall (test)", ylim=(0, 1), title="guidance sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(results: dict):
    from rich.table import Table

    table = Table(title="native multimodal designs on one budget (final models)")
    columns = ("run", "text val loss", "scene-graph", "VQA", "GenEval test", "GenEval novel", "Fréchet",
               "GFLOPs", "train s", "active / total params")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")

    def number(value, fmt=".3f"):
        return "" if value is None else format(value, fmt)

    for name, r in results["runs"].items():
        test, novel = r["final"].get("test", {}), r["final"].get("test_novel", {})
        table.add_row(name, number(r["validation"].get("text loss")), number(test.get(CAPTION_METRIC)),
                      number(test.get("vqa accuracy")), number(test.get(IMAGE_METRIC)), number(novel.get(IMAGE_METRIC)),
                      number(test.get("frechet distance"), ".1f"), number(r["flops"] / 1e9, ",.0f"),
                      number(r.get("train_seconds"), ".0f"),
                      f"{r['active_parameters']:,} / {r['total_parameters']:,}")
    return table
