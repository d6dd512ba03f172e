"""Greedy caption decoding with the KV cache against full recompute, in one process.

The captioner has the shape of the shipped recipe (``caption-shapes``: its image encoder, decoder
width, depth and heads) with random weights; speed does not depend on what the weights say.
Both paths decode exactly ``--tokens`` new tokens for every sample (``eos`` is ignored, so
neither stops earlier than the other) after left-padded prompts, half captions (no prompt) and
half questions, as the recipe's evaluation decodes them. The image memory is computed once
and not timed: only decoding is.

- ``cache``: each step runs the decoder on the one new position, reading the keys and values of
  the earlier ones from the KV cache (what ``Captioner.generate`` does).
- ``recompute``: each step runs the decoder over the whole sequence so far (``cache=None``; what
  ``generate`` did before the cache), the peer.

Runs are interleaved (cache, recompute, cache, ...) after a warm-up of each; medians and their
ratio are reported, and the two paths' tokens must be identical.

    OMP_NUM_THREADS=2 python benchmarks/caption_decode.py [--batch 32] [--tokens 40] [--repeats 7]

On a machine whose cores are busy with other jobs, use ``OMP_NUM_THREADS=1``: more threads than
free cores make every small operation of a cached step wait for a descheduled thread, and the
run measures that contention instead of the decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

QUESTIONS = ["what colour is the circle?", "how many stars are there?", "is there a red square?",
             "where is the blue triangle?", "what shape is in the top left?"]


def captions() -> list[str]:
    """Sentences of the shapes world's kind, to train a tokenizer of a realistic vocabulary."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "grey"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "cross"]
    places = ["in the top left", "in the top right", "in the center", "at the bottom", "on the left", "on the right"]
    out = [f"a {c} {s} {p}" for c in colours for s in shapes for p in places]
    out += [f"a {c} {s} {p} and a {c2} {s2}" for c, c2 in zip(colours, colours[1:], strict=False) for s, s2 in zip(shapes, shapes[1:], strict=False)
            for p in places]
    return out + QUESTIONS * 4 + ["yes", "no", "one", "two", "three"] * 4


def build(recipe: str):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig
    from polymodal.train.recipe import recipe_text

    spec = yaml.safe_load(recipe_text(recipe)[1])["model"]  # the model section only
    known = {f.name for f in dataclasses.fields(CaptionerConfig)}
    settings = {k: v for k, v in spec.items() if k in known}
    tokenizer = TextTokenizer.train(captions(), vocab_size=1024)
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(**{**settings, "vocab_size": tokenizer.vocab_size}), tokenizer)
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="caption-shapes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per sample (eos ignored)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from polymodal.nn import decoding

    model = build(args.recipe)
    c, tok = model.config, model.tokenizer
    image_size = c.encoders["image"].get("image_size", 64)
    images = torch.randn(args.batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    prompts = [QUESTIONS[i % len(QUESTIONS)] if i % 2 else None for i in range(args.batch)]
    with torch.no_grad():
        memory, memory_mask = model.memory({"image": images})
    ids = model.prompt_ids(prompts)
    if ids.shape[1] + args.tokens > c.context_length:
        raise SystemExit(f"{ids.shape[1]} prompt + {args.tokens} new tokens exceed context_length {c.context_length}")

    def step(new_ids, cache):
        return model.decode(new_ids, new_ids != tok.pad_id, memory, memory_mask, cache)[:, -1]

    def run(use_cache: bool) -> tuple[float, list[list[int]]]:
        cache = model.decoder.new_cache() if use_cache else None
        start = time.perf_counter()
        out = decoding.greedy(step, ids, max_new=args.tokens, eos=None, pad=tok.pad_id, cache=cache)
        return time.perf_counter() - start, out

    paths = {"cache": True, "recompute": False}
    tokens = {name: run(flag)[1] for name, flag in paths.items()}  # warm-up, and the tokens to compare
    times = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, flag in paths.items():
            seconds, out = run(flag)
            times[name].append(seconds)
            if out != tokens[name]:
                raise SystemExit(f"{name}: decoding is not deterministic")
    identical = tokens["cache"] == tokens["recompute"]
    same_rows = sum(a == b for a, b in zip(tokens["cache"], tokens["recompute"], strict=True))
    results = {
        "machine": platform.machine(), "threads": torch.get_num_threads(), "recipe": args.recipe,
        "model": {"width": c.width, "depth": c.depth, "heads": c.heads, "vocab": tok.vocab_size,
                  "memory_tokens": memory.shape[1], "parameters": sum(p.numel() for p in model.parameters())},
        "batch": args.batch, "prompt_length": ids.shape[1], "new_tokens": args.tokens, "repeats": args.repeats,
        "tokens_identical": identical, "rows_identical": f"{same_rows}/{args.batch}",
    }
    for name in paths:
        median = statistics.median(times[name])
        results[name] = {"median_s": round(median, 4), "tokens_per_s": round(args.batch * args.tokens / median, 1),
                         "runs_s": [round(t, 4) for t in times[name]]}
    results["speedup_cache_over_recompute"] = round(results["recompute"]["median_s"] / results["cache"]["median_s"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not identical:
        raise SystemExit("the cached and recomputed paths decoded different tokens")


if __name__ == "__main__":
    main()
