"""How the cost of an omni model's drawing grows with the number of images denoised in one
batch: what ``DRAW_ROWS`` (``polymodal.models.omni.generation``) is set from. For each batch
size, ``generate_image`` denoises that many images of one two-object prompt (guided: twice as
many rows) for ``--steps`` sampler steps, ``--repeats`` times; prints the median seconds and the
milliseconds an image a step, as JSON.

    OMP_NUM_THREADS=2 python benchmarks/omni_draw_batch.py MODEL [--sizes 400,800,1600] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from polymodal.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--sizes", default="400,800,1600", help="images a batch, comma-separated")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, task="generate image").eval()
    prefix = [[model.tokenizer.bos_id, *model._caption_ids("a small red circle and a large blue square")]]
    results = {"model": str(args.model), "threads": torch.get_num_threads(), "steps": args.steps, "batches": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate_image([prefix] * size, guidance=4.0, steps=args.steps, guidance_interval=(0, 400),
                                     guidance_outside=1.5)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results["batches"][str(size)] = {"seconds": round(median, 3),
                                         "ms an image a step": round(1000 * median / size / args.steps, 3)}
        print(size, results["batches"][str(size)], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
