"""The main job: every step of polymodal on the built-in shapes world, listed in one place.

Each step takes the demo's state (a dict of what earlier steps made) and returns what it made,
as ``{label: path or value}``; the summary at the end lists them all.

As a user meets it:

- every model trains for a number of optimizer **steps** (:data:`BUDGETS`), never for a time,
  so a busy machine gives the same models as a quiet one, only later;
- it says up front roughly how long it will take on this machine (a short matrix-multiply probe
  against the reference 2-core machine the budgets were measured on);
- a model trained by an earlier run into the same folder with the same recipe is reused (its
  interrupted training is resumed); ``retrain`` trains everything again;
- each model's metrics are written as ``metrics.json`` beside it, and checked against the floors
  it should clear (:data:`FLOORS`): a model far below them is reported plainly, and the demo
  ends with a failure, instead of a table that looks fine.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.markup import escape
from rich.table import Table

from polymodal.progress import console, progress_bar

# Optimizer steps of each model the demo trains, and the minutes each stage should take on the
# reference machine (2 quiet CPU cores), training and evaluation together: from the steps a minute
# each recipe made there. Measured in one busy run (BENCHMARKS.md, "The demo"): 430 CLIP steps
# reach test text->image R@5 0.929; 600 captioner steps left scene-graph 0.625 and VQA 0.750 and
# 503 drawing steps single objects 0.10 (shape 0.15), all below their floors, so those budgets
# were raised to what the recipes' own curves need (the captioner's scene-graph score passes 0.9
# at its 725th step on the recipe's world, 0.703 at 1,000 on the demo's; the latent UNet's
# single-object shape 0.77 at its 1,252nd). The recogniser's validation WER was 0.106 at step 350.
# The autoencoder's 578 steps reconstructed test images at PSNR 28.2 with the judge reading only 0.535 of
# the shapes right (0.621 of the large ones), so no drawing could get its shape right: at the recipe's
# 1,735 steps, 38.5 dB and 1.000; measured inside the demo (its world, quiet machine): 1.000 again, but the
# drawings' single objects only 0.35 (shape 0.40) with a text encoder trained alongside the denoiser, and
# 0.95 (shape 0.95) with the demo CLIP's text tower frozen in its place, same 1,250 steps.
BUDGETS = {"clip": 430, "captions": 1200, "listen": 600, "judge": 300, "autoencoder": 1735, "drawing": 1250,
           "omni": 600}
# The omni model (one Transformer that captions, answers and draws) is shown, not held to a floor: its
# recipe (width 128) wrote validation captions with every object right 0.28 of the time after 2,100
# steps (VQA 0.72) and drew single objects with the right shape at chance, far below the captioner and
# the drawing model, so the demo trains it 600 steps to show what it does and prints its scores
# (BENCHMARKS.md, "Drawing: adaLN, and how many drawing examples a denoiser needs here").
# Minutes of each stage in the quiet fresh-clone run of BENCHMARKS.md ("The demo on a quiet machine"):
# 2 threads, nothing else running; training and evaluation together.
REFERENCE_MINUTES = {"world": 1.0, "inspect": 0.3, "clip": 6.8, "eval": 0.1, "search": 0.1, "understand": 13.4,
                     "listen": 6.8, "judge": 1.8, "draw": 24.9,
                     "omni": 8.0}  # omni: not yet timed inside the demo; 600 steps at about 0.56 s (width 128,
# the trainer's own rate on a quiet machine) and its scoring
REFERENCE_GFLOPS = 160.0  # fp32 matrix-multiply speed of the reference machine when quiet

# (stage, metric on the test split, the bound it should clear, whether the bound is a ceiling): a
# model on the wrong side is reported as failed
FLOORS = [
    ("clip", "text->image R@5", 0.90, False),
    ("captions", "scene-graph objects right", 0.70, False),
    ("captions", "vqa accuracy", 0.80, False),
    ("listen", "word error rate", 0.10, True),
    ("autoencoder", "judge shape accuracy on reconstructions", 0.95, False),
    ("drawing", "single_object colour+shape+position", 0.60, False),
]


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[dict], dict]
    needs: tuple[str, ...] = ()  # earlier steps whose output (state[name]) it reads
    uses: tuple[str, ...] = ()  # earlier steps whose output it uses when there is one


# Where a step leaves what later steps read (state[step name]), inside the demo's folder
OUTPUTS = {"world": "shapes", "clip": "clip/model", "judge": "judge/model"}


# ---- shared by the steps ----


def budget(state: dict, model: str) -> int:
    """Steps for one of the demo's models: its budget times the demo's ``train_scale``."""
    return max(1, round(BUDGETS[model] * state["train_scale"]))


def train_split_size(state: dict) -> int:
    """Rows of the world's training split (counted once, from its metadata)."""
    if "train rows" not in state:
        from polymodal.data.describe import split_counts

        state["train rows"] = split_counts(state["world"]).get("train", 0)
    return state["train rows"]


def trained(state: dict, name: str, recipe_name: str, overrides: list[str], after: tuple[str, ...] = ()) -> Path:
    """The model of ``recipe_name`` with ``overrides``, trained into ``out/name``: reused when an
    earlier run trained it there with the same recipe (and none of the models named in ``after``,
    which it builds on, was trained anew); resumed from its last checkpoint when that run was cut off."""
    from polymodal.errors import InputError
    from polymodal.models import load_model
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import train

    recipe = load_recipe(recipe_name, overrides)
    train_rows = train_split_size(state)
    if 0 < train_rows < recipe.data.batch_size:  # a small world (--n): one batch is the whole split
        console.print(f"[yellow]{name}: the world has {train_rows} training rows, fewer than the recipe's batch of "
                      f"{recipe.data.batch_size}; training with batches of {train_rows}[/yellow]")
        recipe = load_recipe(recipe_name, [*overrides, f"data.batch_size={train_rows}"])
    run = state["out"] / name
    saved = run / "recipe.yaml"
    same = saved.is_file() and yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(recipe.to_dict()))
    fresh = state["retrain"] or not same or any(a in state["trained"] for a in after)
    model_config = run / "model" / "config.json"
    # the model must have been saved by a run of this recipe: after the recipe was written
    if not fresh and model_config.is_file() and model_config.stat().st_mtime >= saved.stat().st_mtime:
        try:
            load_model(run / "model")  # e.g. saved by an older polymodal whose weights no longer fit
        except (InputError, ValueError, RuntimeError) as e:
            console.print(f"[yellow]cannot reuse {run / 'model'}[/yellow] ({e}); training it again")
            fresh = True
        else:
            console.print(f"reusing {run / 'model'} (trained earlier with the same recipe; --retrain trains it again)")
            return run / "model"
    if fresh:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # nothing to resume from another recipe
    model_dir = train(recipe, state["world"], run, resume=not fresh)
    state["trained"].add(name)
    return model_dir


def demo_autoencoder(state: dict) -> Path:
    """The demo's KL autoencoder: trained by the first step that needs it (the drawing or the omni
    model, whose latent cells are its image tokens), reused by the other."""
    return trained(state, "autoencoder", "ae-shapes", [f"trainer.max_steps={budget(state, 'autoencoder')}"])


def scored(state: dict, name: str, results: dict) -> Path:
    """Write ``results`` as ``out/name/metrics.json`` and check the test metrics against the floors."""
    path = state["out"] / name / "metrics.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    test = results.get("test", {})
    for stage, metric, bound, ceiling in FLOORS:
        if stage == name:
            value = test.get(metric, float("nan"))
            ok = value <= bound if ceiling else value >= bound
            state["checks"].append((f"{name}: {metric} (test)", value, ("at most " if ceiling else "") + f"{bound:.2f}", ok))
    return path


def machine_speed(seconds: float = 0.5) -> float:
    """fp32 matrix-multiply GFLOP/s of this machine right now (a busy machine measures slower)."""
    import torch

    a = torch.randn(512, 512)
    a @ a
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    return count * 2 * 512**3 / (time.perf_counter() - start) / 1e9


# ---- the steps ----


def make_world(state: dict) -> dict:
    from polymodal.data.shapes import WorldConfig, generate_world, world_info

    world = state["out"] / "shapes"
    config = WorldConfig(n=state["n"], seed=0)
    info = world / "world.json"
    if info.is_file() and (world / "metadata.jsonl").is_file() and json.loads(info.read_text()) == json.loads(
            json.dumps(world_info(config))) and not state["retrain"]:
        console.print(f"reusing the world in {world}")
    else:
        with progress_bar("shapes world", state["n"]) as update:
            generate_world(world, config, progress=update)
    state["world"] = world
    return {"data set": world}


def inspect_world(state: dict) -> dict:
    from polymodal.data.inspect import inspect_dataset
    from polymodal.report import print_inspection

    with progress_bar("inspecting", state["n"]) as update:
        report = inspect_dataset(state["world"], sheet=state["out"] / "contact_sheet.png", progress=update)
    print_inspection(report)
    return {"contact sheet": report.sheet, "bad samples": len(report.bad)}


def train_clip(state: dict) -> dict:
    state["clip"] = trained(state, "clip", "clip-shapes", [f"trainer.max_steps={budget(state, 'clip')}",
                                                   ])
    return {"CLIP model": state["clip"], "training curves": state["out"] / "clip" / "curves.png"}


def evaluate_clip(state: dict) -> dict:
    from polymodal.models import evaluate
    from polymodal.report import format_table

    results = evaluate(state["clip"], state["world"], ["test", "test_novel"])
    console.print(format_table(results))
    path = scored(state, "clip", results)
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
    import torch

    from polymodal.data.dataset import Collator
    from polymodal.data.inspect import contact_sheet
    from polymodal.data.memory import MemoryDataset
    from polymodal.data.scene import SceneObject
    from polymodal.eval.captioning import judge_caption
    from polymodal.modalities.image import load_image
    from polymodal.models import evaluate, load_model
    from polymodal.report import format_table

    overrides = [f"trainer.max_steps={budget(state, 'captions')}", f"model.init_from={state.get('clip') or 'null'}"]
    model_dir = trained(state, "captions", "caption-shapes", overrides, after=("clip",))
    results = evaluate(model_dir, state["world"], ["test", "test_novel"])
    console.print(format_table(results))
    path = scored(state, "captions", results)

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


def listen(state: dict) -> dict:
    """Train the in-domain speech recogniser on the world's spoken captions (an encoder-decoder
    over log-mel); transcribe a few held-out recordings; score its word error rate."""
    import torch

    from polymodal.data.dataset import Collator
    from polymodal.data.memory import MemoryDataset
    from polymodal.models import evaluate, load_model
    from polymodal.report import format_table

    fields = {"speech": "audio:audio_file"}
    model_dir = trained(state, "listen", "asr-shapes", [f"trainer.max_steps={budget(state, 'listen')}"])
    results = evaluate(model_dir, state["world"], ["test", "test_novel"])
    console.print(format_table(results))
    path = scored(state, "listen", results)
    model = load_model(model_dir, task="caption")
    items = MemoryDataset(state["world"], fields, split="test", limit=4).items
    with torch.no_grad():
        heard = model.generate(Collator(fields)(items))
    for item, text in zip(items, heard, strict=True):
        console.print(f"[bold]{item['row']['id']}[/bold] said: {item['row']['text']}\n   heard: {text}")
    test = results.get("test", {})
    return {"recogniser": model_dir, "metrics": path,
            "word error rate (test)": f"{test.get('word error rate', float('nan')):.3f}"}


def train_judge(state: dict) -> dict:
    """Train the detector that reads generated images back into scenes (it scores the drawings)."""
    from polymodal.models import evaluate

    state["judge"] = trained(state, "judge", "judge-shapes", [f"trainer.max_steps={budget(state, 'judge')}",
                                                              "trainer.val_every_minutes=0"])
    results = evaluate(state["judge"], state["world"], ["test"])
    path = scored(state, "judge", results)
    return {"judge": state["judge"], "metrics": path,
            "scene accuracy on real test images": f"{results.get('test', {}).get('scene accuracy', float('nan')):.3f}"}


DEMO_PROMPTS = ("a large red circle in the top left", "a large blue square in the center",
                "a large yellow triangle at the bottom", "a large green star on the right")


def draw(state: dict) -> dict:
    """Train an autoencoder and a latent text-to-image diffusion model on the world's images and
    captions (prompts read by the CLIP's frozen text tower when the demo has one); draw a few
    prompts; score single-object prompts of held-out scenes with the judge."""
    import torch

    from polymodal.modalities.image import image_grid
    from polymodal.models import EvalOptions, evaluate, load_model
    from polymodal.report import format_table

    autoencoder = demo_autoencoder(state)
    made: dict = {}
    if state.get("judge"):  # what the drawings can be at best: the judge on the autoencoder's reconstructions
        reconstructed = evaluate(autoencoder, state["world"], ["test"], EvalOptions(judge=state["judge"]))
        made["autoencoder: shapes right after reconstruction (test)"] = \
            f"{reconstructed['test'].get('judge shape accuracy on reconstructions', float('nan')):.3f}"
        scored(state, "autoencoder", reconstructed)
    # the CLIP's text tower, frozen, reads the prompts when there is one: it already tells the
    # shapes apart, which a text encoder trained with the denoiser learns slowest
    text = [f"model.text={json.dumps({'type': 'clip', 'path': str(state['clip'])})}"] if state.get("clip") else []
    model_dir = trained(state, "drawing", "t2i-latent-shapes", [
        f"trainer.max_steps={budget(state, 'drawing')}", "trainer.snapshot_every_minutes=null",
        f"model.autoencoder={autoencoder}", *text], after=("autoencoder", "clip"))
    model = load_model(model_dir, task="generate image")
    rows = []
    with torch.no_grad(), progress_bar("drawing", len(DEMO_PROMPTS)) as update:
        for i, prompt in enumerate(DEMO_PROMPTS):
            rows.append(model.generate([prompt] * 4, guidance=3.0, steps=50, seed=i))
            update(i + 1)
    labels = [p for p in DEMO_PROMPTS for _ in range(4)]
    sheet = state["out"] / "generated.png"
    image_grid(torch.cat(rows), columns=4, scale=4, labels=labels,
               title=f"text-to-image after {budget(state, 'drawing')} training steps (guidance 3, 50 DDIM steps)"
               ).save(sheet)
    made = {"autoencoder": autoencoder, **made, "text-to-image model": model_dir, "generated images": sheet}
    if state.get("judge"):
        with progress_bar("judging drawings", None) as update:
            results = evaluate(model_dir, state["world"], ["test"],
                               EvalOptions(judge=state["judge"], per_category=state["judged_prompts"], progress=update))
        console.print(format_table(results))
        made["metrics"] = scored(state, "drawing", results)
        made["single objects right (test)"] = f"{results['test']['single_object colour+shape+position']:.3f}"
    return made


def omni(state: dict) -> dict:
    """Train one native multimodal model (Transfusion: caption tokens and the autoencoder's latent
    cells in one sequence, one decoder-only Transformer) that captions, answers and draws; caption
    and question a few test images, draw the demo's prompts; score it with the captioner's and the
    drawing model's judges, under their keys."""
    import torch

    from polymodal.data.inspect import contact_sheet
    from polymodal.modalities.image import to_pil
    from polymodal.models import EvalOptions, evaluate, load_model
    from polymodal.models.family import split_items
    from polymodal.report import format_table

    autoencoder = demo_autoencoder(state)
    model_dir = trained(state, "omni", "omni-transfusion-shapes", [
        f"trainer.max_steps={budget(state, 'omni')}", f"model.autoencoder={autoencoder}"], after=("autoencoder",))
    model = load_model(model_dir, task="caption")
    items = split_items(state["world"], ["image"], "test", model.input_size(), limit=4)
    batch = {"image": torch.stack([item["image"] for item in items])}
    questions = [item["row"]["qa"][0] for item in items]
    with torch.no_grad():
        captions = model.generate(batch, method="beam")  # 4 beams: scene-graph 0.66 -> 0.75 on test (BENCHMARKS.md)
        answers = model.generate(batch, [q["question"] for q in questions], max_new_tokens=8)
        drawn = model.generate(list(DEMO_PROMPTS), guidance=3.0, steps=50, seed=0)
    panels = []
    for item, caption, qa, answer in zip(items, captions, questions, answers, strict=True):
        console.print(f"[bold]{item['row']['id']}[/bold] caption: {caption}\n"
                      f"   Q: {qa['question']}  A: {answer} (truth: {qa['answer']})")
        panels.append((to_pil((item["image"] + 1) / 2), f"test image: its caption\n{caption}. Q: {qa['question']} "
                                                           f"A: {answer}"))
    for prompt, image in zip(DEMO_PROMPTS, drawn, strict=True):
        panels.append((to_pil((image + 1) / 2), f"drawn from its prompt\n{prompt}"))
    sheet = contact_sheet(panels, state["out"] / "omni.png", columns=4,
                          title=f"one model after {budget(state, 'omni')} steps: captions, answers and drawings")
    with progress_bar("scoring the omni model", None) as update:
        results = evaluate(model_dir, state["world"], ["test"],
                           EvalOptions(judge=state.get("judge"), per_category=state["judged_prompts"], progress=update))
    console.print(format_table(results))
    test = results.get("test", {})
    made = {"omni model": model_dir, "captions, answers and drawings": sheet, "metrics": scored(state, "omni", results),
            "scene-graph objects right (test)": f"{test.get('scene-graph objects right', float('nan')):.3f}",
            "VQA accuracy (test)": f"{test.get('vqa accuracy', float('nan')):.3f}"}
    if "single_object colour+shape+position" in test:
        made["single objects right (test)"] = f"{test['single_object colour+shape+position']:.3f}"
    return made


STEPS: list[Step] = [
    Step("world", "Generate the shapes world (images, captions, speech, QA, videos)", make_world),
    Step("inspect", "Inspect it and draw a contact sheet", inspect_world, needs=("world",)),
    Step("clip", "Train a CLIP (image and text in one embedding space)", train_clip, needs=("world",)),
    Step("eval", "Evaluate it: retrieval and zero-shot classification", evaluate_clip, needs=("world", "clip")),
    Step("search", "Index the test images and search them by text", search_world, needs=("world", "clip")),
    Step("understand", "Train a captioner that also answers questions; caption and ask", understand,
         needs=("world", "clip")),
    Step("listen", "Train a speech recogniser on the world's spoken captions; transcribe", listen,
         needs=("world",)),
    Step("judge", "Train the judge that reads generated images back into scenes", train_judge, needs=("world",)),
    Step("draw", "Train a text-to-image diffusion model, draw a few prompts and judge its drawings", draw,
         needs=("world",), uses=("judge", "clip")),
    Step("omni", "Train one native multimodal model that captions, answers and draws; caption, ask and draw", omni,
         needs=("world",), uses=("judge",)),
]


def earlier_output(state: dict, name: str) -> bool:
    """Put what step ``name`` made in an earlier run into the same folder into ``state[name]``:
    its data set, or its model if that still loads. False when there is none to reuse."""
    from polymodal.errors import InputError
    from polymodal.models import load_model

    path = state["out"] / OUTPUTS.get(name, name)
    if not (path / "metadata.jsonl").is_file():  # not a data set: a model folder, if it loads
        try:
            load_model(path)
        except (InputError, ValueError, RuntimeError, OSError):
            return False
    state[name] = path
    console.print(f"step {name!r} is not run: reusing {path} from an earlier run into this folder")
    return True


def gather_needs(state: dict, steps: list[Step]) -> None:
    """Before anything runs: what the chosen ``steps`` need from steps that are not chosen is taken
    from an earlier run into the same folder, or the error says which steps to add."""
    chosen = {s.name for s in steps}
    by_name = {s.name: s for s in STEPS}
    missing: list[str] = []
    pending = list(steps)
    while pending:
        step = pending.pop(0)
        for need in (*step.needs, *step.uses):
            if need in chosen or need in missing or need in state or need not in by_name:
                continue
            if not earlier_output(state, need) and need in step.needs:
                missing.append(need)
                pending.append(by_name[need])  # which may need more in turn
    if missing:
        add = [s.name for s in STEPS if s.name in chosen or s.name in missing]
        raise ValueError(f"the steps chosen need what step(s) {', '.join(missing)} make, and {state['out']} "
                         f"holds none from an earlier run: add them, e.g. --steps {','.join(add)}")


def run_demo(out: Path, n: int = 4000, *, train_scale: float = 1.0, retrain: bool = False,
             steps: list[Step] = STEPS, judged_prompts: int = 20) -> dict:
    """Run ``steps`` into ``out``; returns the state, whose ``checks`` list each floor and
    whether the model cleared it (``failed`` names those that did not)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"out": out, "n": n, "train_scale": train_scale, "retrain": retrain, "trained": set(),
                   "checks": [], "judged_prompts": judged_prompts}
    gather_needs(state, steps)
    speed = machine_speed()
    minutes = sum(REFERENCE_MINUTES.get(s.name, 0.0) for s in steps) * max(1.0, REFERENCE_GFLOPS / speed)
    console.print(f"this machine multiplies matrices at {speed:.0f} GFLOP/s now (the reference 2-core machine: "
                  f"{REFERENCE_GFLOPS:.0f}); the demo should take about {minutes:.0f} minutes"
                  + (f" at {train_scale:g} times the training steps" if train_scale != 1.0 else "")
                  + ", less where it reuses models trained earlier in the same folder.")
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
    state["failed"] = [c for c in state["checks"] if not c[3]]
    if state["checks"]:
        checks = Table(title="are the models as good as they should be? (test split)")
        for column in ("model and metric", "got", "floor", "verdict"):
            checks.add_column(column)
        for what, value, floor, ok in state["checks"]:
            checks.add_row(what, f"{value:.3f}", floor, "[green]ok[/green]" if ok else "[red]FAILED[/red]")
        console.print(checks)
    if state["failed"]:
        console.print(f"[red bold]{len(state['failed'])} result(s) came out worse than these models reach with "
                      "these budgets[/red bold]: the budgets are steps, so a busy machine is not the cause; "
                      "see the metrics.json beside each model and the training curves.")
    console.print(serve_hint(out), soft_wrap=True)  # the command stays one line to copy
    return state


def serve_hint(out: Path, port: int = 8000) -> str:
    """How to serve the demo's models (OpenAI's API and the web page): the demo's last words,
    so that what it trained is one command away from being used."""
    return (f"\n[bold]Try the models:[/bold] start the server on them with\n\n"
            f"    polymodal serve --models {escape(shlex.quote(str(out)))}\n\n"
            f"then open http://127.0.0.1:{port}/ in a browser (chat, image upload, microphone), or point any "
            f"OpenAI client at http://127.0.0.1:{port}/v1")
