"""The training step time of omni models on real batches: what a recipe's step budget is worked
out from. Each MODEL is a saved omni model folder, optionally with settings to change
(``FOLDER:width=192,layout=mot``): a fresh model of that config (new weights; the folder's
tokenizer and autoencoder) trains ``--steps`` steps of loss, backward and AdamW on batches of 64
training items of ``--data``, their image tokens encoded beforehand as training caches them. The
first two steps are left out; prints the median and fastest step, the parameters, and what a
row holds (its real tokens, the batch's padded length, the share of images drawn from their
caption rather than read) over the timed batches' examples, as JSON.

    OMP_NUM_THREADS=2 python benchmarks/omni_step_time.py --data WORLD MODEL [MODEL ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transfusion_peer import report


def main() -> None:
    from polymodal.models import load_model
    from polymodal.models.family import split_items
    from polymodal.models.omni import OmniConfig, OmniModel
    from polymodal.train.recipe import apply_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="FOLDER or FOLDER:key=value,...")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "batch": args.batch}
    items = None
    for spec in args.models:
        folder, _, changes = spec.partition(":")
        base = load_model(folder)
        if items is None:
            items = split_items(args.data, ["image"], "train", base.input_size(), limit=args.batch * args.steps)
        torch.manual_seed(0)
        config = OmniConfig.from_spec(apply_overrides(asdict(base.config), list(filter(None, changes.split(",")))))
        model = OmniModel(config, base.tokenizer, base.autoencoder).train()
        params = [p for name, p in model.named_parameters() if not name.startswith("autoencoder.")]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        batches = []
        for i in range(args.steps):
            chunk = items[i * args.batch : (i + 1) * args.batch]
            batch = {"image": torch.stack([item["image"] for item in chunk]), "rows": [item["row"] for item in chunk]}
            with torch.no_grad():
                model.training_tokens(batch["image"], batch["rows"])
            batches.append(batch)
        times = []
        for batch in batches:
            start = time.perf_counter()
            model.loss(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        kept = times[2:]
        real = padded = drawn = rows = 0
        for i, batch in enumerate(batches):  # what the loss packs: examples drawn as training draws them
            examples = model.examples(batch, random.Random(i))
            seq = model.pack(examples)
            real, padded = real + int(seq.key_mask.sum()), padded + seq.key_mask.numel()
            drawn, rows = drawn + sum(e.max_timestep is None for e in examples), rows + len(examples)
        median = statistics.median(kept)
        results[spec] = {"step s (median)": median, "step s (fastest)": min(kept),
                         "parameters": sum(p.numel() for p in params),
                         "real tokens a row": real / rows, "padded tokens a row": padded / rows,
                         "drawn share": drawn / rows, "real tokens a second": real / len(batches) / median}
    report(results, args.json)


if __name__ == "__main__":
    main()
