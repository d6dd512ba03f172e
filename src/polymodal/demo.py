"""The main job: every step of polymodal on the built-in shapes world, listed in one place.

Each step takes the demo's state (a dict of what earlier steps made) and returns what it made,
as ``{label: path or value}``; the summary at the end lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from polymodal.progress import console, progress_bar


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[dict], dict]


def make_world(state: dict) -> dict:
    from polymodal.data.shapes import WorldConfig, generate_world

    world = state["out"] / "shapes"
    with progress_bar("shapes world", state["n"]) as update:
        generate_world(world, WorldConfig(n=state["n"], seed=0), progress=update)
    state["world"] = world
    return {"data set": world}


def inspect_world(state: dict) -> dict:
    from polymodal.cli import print_inspection
    from polymodal.data.inspect import inspect_dataset

    with progress_bar("inspecting", state["n"]) as update:
        report = inspect_dataset(state["world"], sheet=state["out"] / "contact_sheet.png", progress=update)
    print_inspection(report)
    return {"contact sheet": report.sheet, "bad samples": len(report.bad)}


def train_clip(state: dict) -> dict:
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    recipe = load_recipe(RECIPES / "clip-shapes.yaml", [f"trainer.max_minutes={state['clip_minutes']}"])
    run = state["out"] / "clip"
    state["clip"] = train(recipe, state["world"], run)
    return {"CLIP model": state["clip"], "training curves": run / "curves.png"}


def evaluate_clip(state: dict) -> dict:
    import json

    from polymodal.cli import format_table
    from polymodal.models import evaluate

    results = evaluate(state["clip"], state["world"], ["test", "test_novel"])
    console.print(format_table(results))
    path = state["out"] / "clip_metrics.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    test = results.get("test", {})
    return {"metrics": path, "text->image R@5 (test)": f"{test.get('text->image R@5', float('nan')):.3f}",
            "zero-shot shape (test)": f"{test.get('zero-shot shape', float('nan')):.3f}"}


def search_world(state: dict) -> dict:
    from polymodal.index.build import build_index, draw_hits, embed_query
    from polymodal.models import load_model

    index_dir = state["out"] / "index"
    index = build_index(state["clip"], state["world"], index_dir, split="test")
    model = load_model(state["clip"], task="embed")
    # the query describes one held-out test image: where does that image rank?
    target = next(item for item in index.items if item["text"].startswith(("a ", "there are")))
    query = target["text"]
    scores, positions = index.search(embed_query(model, text=query), 8)
    hits = [index.items[p] for p in positions[0]]
    console.print(f"query: {query!r}")
    for score, hit in zip(scores[0], hits, strict=True):
        mark = "  <- the described image" if hit["id"] == target["id"] else ""
        console.print(f"  {score:.3f}  {hit['text']}{mark}")
    sheet = draw_hits(list(zip(scores[0], hits, strict=True)), state["out"] / "search.png",
                      title=f"query: {query}", columns=4)
    rank = next((i + 1 for i, h in enumerate(hits) if h["id"] == target["id"]), None)
    return {"index": index_dir, "search hits": sheet,
            "rank of the described image": rank if rank else "not in the top 8"}


def understand(state: dict) -> dict:
    """Train a captioner (captions and VQA) on the CLIP's image tower; caption test images and
    answer a question about each; judge both against the scene graph."""
    import json

    import torch

    from polymodal.cli import format_table
    from polymodal.data.dataset import Collator
    from polymodal.data.inspect import contact_sheet
    from polymodal.data.memory import MemoryDataset
    from polymodal.data.scene import SceneObject
    from polymodal.eval.captioning import judge_caption
    from polymodal.modalities.image import load_image
    from polymodal.models import evaluate, load_model
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    overrides = [f"trainer.max_minutes={state['caption_minutes']}"]
    if state.get("clip"):
        overrides.append(f"model.init_from={state['clip']}")
    else:
        overrides.append("model.init_from=null")
    recipe = load_recipe(RECIPES / "caption-shapes.yaml", overrides)
    run = state["out"] / "captioner"
    model_dir = train(recipe, state["world"], run)
    results = evaluate(model_dir, state["world"], ["test", "test_novel"])
    console.print(format_table(results))
    path = state["out"] / "captioner_metrics.json"
    path.write_text(json.dumps(results, indent=2) + "\n")

    model = load_model(model_dir, task="caption")
    items = MemoryDataset(state["world"], ["image"], split="test", limit=6).items
    batch = Collator(["image"])(items)
    questions = [item["row"]["qa"][0] for item in items]
    with torch.no_grad():
        captions = model.generate(batch)
        answers = model.generate(batch, [q["question"] for q in questions], max_new_tokens=8)
    panels = []
    for item, caption, qa, answer in zip(items, captions, questions, answers, strict=True):
        objects = [SceneObject.from_dict(o) for o in item["row"]["objects"]]
        verdict = "right" if judge_caption(caption, objects)["objects_right"] else "wrong"
        mark = "right" if answer == qa["answer"] else f"wrong, truth: {qa['answer']}"
        console.print(f"[bold]{item['row']['id']}[/bold] caption ({verdict}): {caption}\n"
                      f"   Q: {qa['question']}  A: {answer} ({mark})")
        panels.append((load_image(state["world"] / item["row"]["file_name"]),
                       f"caption {verdict}; answer {mark.split(',')[0]}\n{caption}. Q: {qa['question']} A: {answer}"))
    sheet = contact_sheet(panels, state["out"] / "captions.png", columns=3, title="captions and answers (test images)")
    test = results.get("test", {})
    return {"captioner": model_dir, "captions and answers": sheet, "metrics": path,
            "scene-graph objects right (test)": f"{test.get('scene-graph objects right', float('nan')):.3f}",
            "VQA accuracy (test)": f"{test.get('vqa accuracy', float('nan')):.3f}"}


DEMO_PROMPTS = ("a large red circle in the top left", "a large blue square in the center",
                "a large yellow triangle at the bottom", "a large green star on the right")


def draw(state: dict) -> dict:
    """Train an autoencoder and a latent text-to-image diffusion model on the world's images and
    captions (a third of the budget for the autoencoder); draw a few prompts."""
    import torch

    from polymodal.modalities.image import image_grid
    from polymodal.models import load_model
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    minutes = state["t2i_minutes"]
    recipe = load_recipe(RECIPES / "ae-shapes.yaml", [f"trainer.max_minutes={minutes / 3:g}"])
    autoencoder = train(recipe, state["world"], state["out"] / "autoencoder")
    recipe = load_recipe(RECIPES / "t2i-latent-shapes.yaml", [f"trainer.max_minutes={minutes * 2 / 3:g}",
                                                              "trainer.snapshot_every_minutes=null",
                                                              f"model.autoencoder={autoencoder}"])
    run = state["out"] / "text_to_image"
    model_dir = train(recipe, state["world"], run)
    model = load_model(model_dir, task="generate image")
    rows = []
    with torch.no_grad(), progress_bar("drawing", len(DEMO_PROMPTS)) as update:
        for i, prompt in enumerate(DEMO_PROMPTS):
            rows.append(model.generate([prompt] * 4, guidance=3.0, steps=50, seed=i))
            update(i + 1)
    labels = [p for p in DEMO_PROMPTS for _ in range(4)]
    sheet = state["out"] / "generated.png"
    image_grid(torch.cat(rows), columns=4, scale=4, labels=labels,
               title=f"text-to-image after {state['t2i_minutes']:g} training minutes (guidance 3, 50 DDIM steps)"
               ).save(sheet)
    return {"autoencoder": autoencoder, "text-to-image model": model_dir, "generated images": sheet}


RECIPES = Path(__file__).resolve().parents[2] / "recipes"

STEPS: list[Step] = [
    Step("world", "Generate the shapes world (images, captions, speech, QA, videos)", make_world),
    Step("inspect", "Inspect it and draw a contact sheet", inspect_world),
    Step("clip", "Train a CLIP (image and text in one embedding space)", train_clip),
    Step("eval", "Evaluate it: retrieval and zero-shot classification", evaluate_clip),
    Step("search", "Index the test images and search them by text", search_world),
    Step("understand", "Train a captioner that also answers questions; caption and ask", understand),
    Step("draw", "Train a text-to-image diffusion model and draw a few prompts", draw),
]


def run_demo(out: Path, n: int = 4000, clip_minutes: float = 8.0, caption_minutes: float = 5.0,
             t2i_minutes: float = 6.0, steps: list[Step] = STEPS) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"out": out, "n": n, "clip_minutes": clip_minutes, "caption_minutes": caption_minutes,
                   "t2i_minutes": t2i_minutes}
    made: list[tuple[str, str, object]] = []
    start = time.perf_counter()
    for number, step in enumerate(steps, 1):
        console.rule(f"[bold]{number}/{len(steps)} {step.title}")
        t = time.perf_counter()
        for label, value in step.run(state).items():
            made.append((step.name, label, value))
        console.print(f"[green]done[/green] in {time.perf_counter() - t:.1f} s")
    table = Table(title=f"polymodal demo: finished in {time.perf_counter() - start:.0f} s")
    table.add_column("step")
    table.add_column("made")
    table.add_column("where / value")
    for name, label, value in made:
        table.add_row(name, label, str(value))
    console.print(table)
    return state
