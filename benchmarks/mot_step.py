"""Mixture-of-Transformers against the dense layout of the same omni model
(``polymodal.models.omni``, ``image: latent``): the training step, in one process, the two
interleaved. MoT costs the same FLOPs a token as dense (counted here too); what it adds is moving
tokens to their modality's parameters and back, and smaller matrix products (each modality's
share of the batch instead of all of it), which on a CPU with few cores costs wall time.

The batch is the omni recipes' at their width: 64 sequences of real shapes-world captions
(polymodal's tokenizer) and 8x8x4 latent images, 70% caption first and 30% image first, so both
modalities' parameters get their share. A step is the loss, backward and AdamW.

    OMP_NUM_THREADS=2 python benchmarks/mot_step.py --data WORLD [--width 192] [--repeats 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transfusion_peer import BATCH, CHANNELS, GRID, TEXT, captions, flops, report


def side(texts: list[str], layout: str, width: int, depth: int, heads: int):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.omni import OmniConfig, OmniExample, OmniModel

    tokenizer = TextTokenizer.train(texts * 4, vocab_size=300)
    torch.manual_seed(0)
    config = OmniConfig(image="latent", layout=layout, width=width, depth=depth, heads=heads, context_length=128,
                        latent_channels=CHANNELS, latent_grid=GRID, caption_dropout=0.0,
                        vocab_size=tokenizer.vocab_size)
    model = OmniModel(config, tokenizer)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    examples = []
    for i, text in enumerate(texts):
        words, image = tokenizer.encode(text, add_special_tokens=False)[:TEXT], torch.randn(CHANNELS, GRID, GRID)
        if i % 10 < 7:
            examples.append(OmniExample([[bos, *words], image, [eos]]))
        else:
            examples.append(OmniExample([[bos], image, [eos, *words, eos]], max_timestep=500))

    def step(optimizer):
        model.loss(examples)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, lambda: model.loss(examples)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a shapes world (its captions are the text)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    texts = captions(args.data, BATCH)
    sides = {layout: side(texts, layout, args.width, args.depth, args.heads) for layout in ("dense", "mot")}
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "batch": BATCH, "width": args.width, "depth": args.depth, "image_tokens": GRID * GRID}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, *_) in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for name, (model, step, loss) in sides.items():
        results[f"{name} parameters"] = sum(p.numel() for p in model.parameters())
        results[f"{name} GFLOP a step"] = flops(loss, model) / 1e9
        model.train()
        step(optimizers[name])  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, (_, step, _) in sides.items():
            start = time.perf_counter()
            step(optimizers[name])
            times[name].append(time.perf_counter() - start)
    for name in sides:
        results[f"{name} step s (median)"] = statistics.median(times[name])
    results["FLOP ratio (mot / dense)"] = results["mot GFLOP a step"] / results["dense GFLOP a step"]
    results["step ratio (mot / dense)"] = results["mot step s (median)"] / results["dense step s (median)"]
    report(results, args.json)


if __name__ == "__main__":
    main()
