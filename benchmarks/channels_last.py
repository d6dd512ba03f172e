"""Training steps of the convolutional models with channels-last memory order against the
default (contiguous, channels-first) order, in one process.

polymodal's CNN encoder, grid detector and autoencoder keep their convolution weights and
inputs in channels-last order (``polymodal.nn.layers.channels_last``): oneDNN's convolutions,
above all their backward pass, run faster on CPU that way. The peer is the same model, same
batch and same optimizer with that order switched off (weights made contiguous and the input
conversion replaced by the identity), as every model was before.

Each recipe's model is built as ``polymodal train`` builds it (random weights: speed does not
depend on what they say), one training batch of the data set is decoded once, and full steps
(forward, backward, AdamW) are timed, interleaved (channels-last, default, ...) after a warm-up
of each; medians and their ratio are reported.

    OMP_NUM_THREADS=2 python benchmarks/channels_last.py --data DIR [--repeats 7]
        [--recipe clip-shapes --recipe caption-shapes ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RECIPES = ["clip-shapes", "caption-shapes", "judge-shapes", "ae-shapes"]
MODULES = ["polymodal.nn.encoders", "polymodal.models.detector", "polymodal.models.autoencoder"]


@contextlib.contextmanager
def default_order(model: torch.nn.Module):
    """The model as it ran before: contiguous weights, inputs left as they come."""
    import importlib

    patched = [(importlib.import_module(m), importlib.import_module(m).channels_last) for m in MODULES]
    for module, _ in patched:
        module.channels_last = lambda x: x
    model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        for module, original in patched:
            module.channels_last = original
        model.to(memory_format=torch.channels_last)


def setup(recipe_name: str, data: Path):
    from polymodal.data.dataset import Collator
    from polymodal.models import build_model
    from polymodal.train.recipe import load_recipe
    from polymodal.train.run import build_context, decode_options, load_split

    overrides = ["model.init_from=null"] if recipe_name == "caption-shapes" else []
    recipe = load_recipe(recipe_name, overrides)
    torch.manual_seed(0)
    model = build_model(recipe.model, build_context(recipe, data)).train()
    items = load_split(data, recipe.data.fields, split="train", options=decode_options(recipe))
    batch = Collator(recipe.data.fields)([items[i] for i in range(recipe.data.batch_size)])
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> float:
        start = time.perf_counter()
        out = model.loss(batch)
        loss = out["loss"] if isinstance(out, dict) else out
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return model, step, recipe.data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a shapes world (e.g. outputs/demo/shapes)")
    parser.add_argument("--recipe", action="append", help=f"recipes to time (default: {', '.join(RECIPES)})")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/channels_last.json"))
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "recipes": {}}
    for name in args.recipe or RECIPES:
        model, step, batch = setup(name, args.data)
        times: dict[str, list[float]] = {"channels_last": [], "default": []}
        step()
        with default_order(model):
            step()
        for _ in range(args.repeats):
            times["channels_last"].append(step())
            with default_order(model):
                times["default"].append(step())
        last, default = statistics.median(times["channels_last"]), statistics.median(times["default"])
        results["recipes"][name] = {"batch": batch, "channels_last_s": last, "default_s": default,
                                    "speed_up": default / last}
        print(f"{name:16s} batch {batch:4d}  channels-last {last:.3f} s  default {default:.3f} s  "
              f"{default / last:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
