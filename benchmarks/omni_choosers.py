"""How well an omni model picks its own drawings. For each GenEval-style prompt of ``--split``
the model draws ``--candidates`` images (as ``draw`` does, in one batch a chunk of prompts), the
judge scores every candidate, and the model reads every candidate back. Each way of choosing
then keeps one candidate of the first k (k = 1, 2, 4, ... up to ``--candidates``), and the
judge's verdict on it is what that way scores, per category and overall:

- ``first``: the first candidate (one drawing, no choice);
- ``closed``: the likeliest caption, its closing ``<eos>`` included;
- ``open``: the likeliest caption's first words, no ``<eos>``;
- ``open, floor F``: the same, each token's probability raised by F (``log(p + F)``);
- ``caption shows, then open, floor 0.05``: the model captions each candidate (greedy); candidates whose
  caption shows the prompt (``shows_prompts``) first, then those whose caption cannot tell,
  then the rest, each group by ``open, floor`` ``CHOICE_FLOOR``;
- ``pixels: ...``: the same two readings of each candidate's pixels encoded again by the autoencoder (as
  the model reads any image), not of the latents it drew; ``draw(best_of=k)`` chooses as
  ``pixels: caption shows, then open, floor 0.05`` (``choose``);
- ``oracle``: a right candidate whenever one of the k is right (what no chooser can beat).

Prints and writes (``--json``) every score.

    OMP_NUM_THREADS=2 python benchmarks/omni_choosers.py MODEL --data WORLD --judge JUDGE \\
        [--split val] [--per-category 50] [--candidates 8] [--cfg 4 --cfg-interval 0,400 --cfg-outside 1.5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transfusion_peer import report

FLOORS = (0.02, 0.05, 0.1)


def main() -> None:
    from polymodal.eval.geneval import CATEGORIES, geneval_prompts, judge_prompts
    from polymodal.models import load_model
    from polymodal.models.detector import GridDetector
    from polymodal.models.family import split_items
    from polymodal.models.omni.generation import CHOICE_FLOOR, summed_log_probs
    from polymodal.nn.diffusion import Guidance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--judge", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--per-category", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--cfg-interval", default="0,400")
    parser.add_argument("--cfg-outside", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=50, help="prompts drawn in one batch (their candidates together)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model).eval()
    if not callable(getattr(model, "caption_token_log_probs", None)):
        raise SystemExit(f"{args.model}: not a model that reads its drawings (an omni model)")
    judge = GridDetector.load_judge(args.judge).eval()
    rows = [item["row"] for item in split_items(args.data, {"image": "image"}, args.split, model.input_size())]
    prompts = geneval_prompts(rows, args.split, per_category=args.per_category)
    if not prompts:
        raise SystemExit(f"{args.data}: no GenEval-style prompts in split {args.split!r}")
    schedule = Guidance.of(args.cfg, args.cfg_interval, args.cfg_outside)
    k_all, tok = args.candidates, model.tokenizer
    right, closed, opened, floored = [], [], [], {f: [] for f in FLOORS}
    shown, pixels, shown_pixels = [], [], []
    start_time = time.perf_counter()
    with torch.no_grad():
        for n, start in enumerate(range(0, len(prompts), args.chunk)):
            chunk = prompts[start : start + args.chunk]
            asked = [p for p in chunk for _ in range(k_all)]  # each prompt's candidates side by side, as draw's
            prefixes = [[[tok.bos_id, *model._caption_ids(p["prompt"])]] for p in asked]
            tokens = model.generate_image(prefixes, guidance=schedule.scale, steps=args.steps, seed=1000 + n,
                                          guidance_interval=schedule.interval, guidance_outside=schedule.outside)
            images = model.decode_images(tokens)
            verdicts = judge_prompts(judge, asked, images)
            right.append(torch.tensor([v["ok"] for v in verdicts]).view(len(chunk), k_all))
            texts = [p["prompt"] for p in asked]
            logp, real = model.caption_token_log_probs(tokens, texts, closed=True)
            closed.append(summed_log_probs(logp, real).view(len(chunk), k_all))
            words = real.scatter(1, real.sum(1, keepdim=True) - 1, False)  # the same tokens less the closing <eos>
            opened.append(summed_log_probs(logp, words).view(len(chunk), k_all))
            for f in FLOORS:
                floored[f].append(summed_log_probs(logp, words, f).view(len(chunk), k_all))
            read = model.image_tokens(images)  # the pixels, encoded again
            pixels.append(model.caption_log_likelihood(read, texts, closed=False, floor=CHOICE_FLOOR).view(len(chunk), k_all))
            shown.append(model.shows_prompts(tokens, texts).float().view(len(chunk), k_all))
            shown_pixels.append(model.shows_prompts(read, texts).float().view(len(chunk), k_all))
    right = torch.cat(right).float()
    choosers = {"first": -torch.arange(k_all).float().expand_as(right), "closed": torch.cat(closed),
                "open": torch.cat(opened), **{f"open, floor {f}": torch.cat(v) for f, v in floored.items()}}
    # caption shows: ranked first by (2, 1, 0) for shown, cannot tell, contradicted; then by the reading
    choosers[f"caption shows, then open, floor {CHOICE_FLOOR}"] = (torch.cat(shown) * 1e6
                                                                  + choosers[f"open, floor {CHOICE_FLOOR}"])
    choosers[f"pixels: open, floor {CHOICE_FLOOR}"] = torch.cat(pixels)
    choosers[f"pixels: caption shows, then open, floor {CHOICE_FLOOR}"] = torch.cat(shown_pixels) * 1e6 + torch.cat(pixels)
    categories = [c for c in CATEGORIES if any(p["category"] == c for p in prompts)]
    members = {c: [i for i, p in enumerate(prompts) if p["category"] == c] for c in categories}

    def scores(hits: torch.Tensor) -> dict[str, float]:
        per = {c: round(hits[members[c]].mean().item(), 3) for c in categories}
        return {"overall": round(sum(per.values()) / len(per), 3), **per}

    results = {"model": str(args.model), "split": args.split, "prompts": len(prompts), "candidates": k_all,
               "guidance": {"scale": schedule.scale, "interval": schedule.interval, "outside": schedule.outside},
               "minutes": round((time.perf_counter() - start_time) / 60, 2), "best of": {}}
    rows_index = torch.arange(len(prompts))
    for k in sorted({*(2**i for i in range(k_all.bit_length()) if 2**i < k_all), k_all}):
        table = {name: scores(right[rows_index, score[:, :k].argmax(1)]) for name, score in choosers.items()}
        table["oracle"] = scores(right[:, :k].max(1).values)
        results["best of"][str(k)] = table
    report(results, args.json)


if __name__ == "__main__":
    main()
