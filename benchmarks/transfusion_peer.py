"""polymodal's Transfusion (``polymodal.models.omni``, ``image: latent``) against the
``transfusion-pytorch`` package on the same sequences at matched FLOPs, in one process:
training step time and image sampling time. Speed only: the peer trains with flow matching and
conditions image tokens with adaLN, so their losses and samples are not comparable.

Both models: width 256, 4 heads of 64, MLP 4x, over a batch of 64 sequences of one caption (real
shapes-world captions, polymodal's tokenizer) followed by one 8x8x4 latent image (64 image
tokens, as the omni recipes). polymodal has 6 layers; the peer, whose layers cost about three
times as much (adaLN projections of its time condition at every token, a gated MLP, skip
projections), gets the depth whose training step comes nearest polymodal's in FLOPs (counted by
``torch.utils.flop_counter`` on the real batch; ``--peer-depth`` sets it by hand). Steps are
forward, backward and AdamW. Sampling: one 8x8 image with 16
denoising steps and guidance 3 (the peer: 16 ODE steps of its midpoint solver, its modality
forced at the start; polymodal: 16 DDIM steps after the caption prefix).

    pip install -c constraints.txt transfusion-pytorch        # benchmark-only; not a dependency
    OMP_NUM_THREADS=2 python benchmarks/transfusion_peer.py --data WORLD [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

WIDTH, DEPTH, HEADS, BATCH, GRID, CHANNELS, STEPS = 256, 6, 4, 64, 8, 4, 16
TEXT = 56  # caption tokens kept (as training cuts them to fit the 128-token context beside the image)


def captions(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()[:n * 4]]
    texts = [r["text"] for r in rows if r.get("split") == "train" and r.get("text")][:n]
    if len(texts) < n:
        raise SystemExit(f"{data}: fewer than {n} training captions")
    return texts


def polymodal_side(texts: list[str]):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.omni import OmniConfig, OmniExample, OmniModel

    tokenizer = TextTokenizer.train(texts * 4, vocab_size=300)
    config = OmniConfig(image="latent", layout="dense", width=WIDTH, depth=DEPTH, heads=HEADS,
                        context_length=128, latent_channels=CHANNELS, latent_grid=GRID, caption_dropout=0.0,
                        vocab_size=tokenizer.vocab_size)
    model = OmniModel(config, tokenizer)
    examples = [OmniExample([[tokenizer.bos_id, *tokenizer.encode(t, add_special_tokens=False)[:TEXT]],
                             torch.randn(CHANNELS, GRID, GRID), [tokenizer.eos_id]]) for t in texts]
    prompt = [[tokenizer.bos_id, *tokenizer.encode(texts[0], add_special_tokens=False)]]

    def step(optimizer):
        loss = model.loss(examples)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sample():
        with torch.no_grad():
            model.generate_image([prompt], guidance=3.0, steps=STEPS, sampler="ddim", seed=0)

    return model, step, sample, lambda: model.loss(examples)["loss"], tokenizer.vocab_size


def peer_side(texts: list[str], vocab: int, depth: int):
    from transfusion_pytorch import Transfusion

    from polymodal.modalities.text import TextTokenizer

    tokenizer = TextTokenizer.train(texts * 4, vocab_size=vocab)
    model = Transfusion(num_text_tokens=vocab, dim_latent=CHANNELS, channel_first_latent=True,
                        modality_default_shape=(GRID, GRID),
                        transformer=dict(dim=WIDTH, depth=depth, heads=HEADS, dim_head=WIDTH // HEADS))
    batch = [[torch.tensor(tokenizer.encode(t, add_special_tokens=False)[:TEXT]), torch.randn(CHANNELS, GRID, GRID)]
             for t in texts]

    def step(optimizer):
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sample():
        with torch.no_grad():
            model.sample_one(force_modality_at_start=0, fixed_modality_shape=(GRID, GRID), modality_steps=STEPS,
                             max_length=GRID * GRID + 3, cfg_scale=3.0)

    return model, step, sample, lambda: model(batch)


def flops(loss_fn, model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from polymodal.bench.omni import cpu_attention_flops

    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
    with counter:
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def report(results: dict, path: Path | None) -> None:
    """Print ``results`` as JSON, and write them to ``path`` too when given."""
    print(json.dumps(results, indent=2))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a shapes world (its captions are the text)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peer-depth", type=int, default=None,
                        help="the peer's layers (default: the depth whose step FLOPs come nearest polymodal's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    texts = captions(args.data, BATCH)
    ours, our_step, our_sample, our_loss, vocab = polymodal_side(texts)
    our_flops = flops(our_loss, ours)
    depth = args.peer_depth
    if depth is None:  # the peer's depth nearest polymodal's FLOPs a step
        costs = {}
        for d in range(1, DEPTH + 1):
            torch.manual_seed(0)
            model, _, _, loss = peer_side(texts, vocab, d)
            costs[d] = flops(loss, model)
        depth = min(costs, key=lambda d: abs(costs[d] - our_flops))
    torch.manual_seed(0)
    peer, peer_step, peer_sample, peer_loss = peer_side(texts, vocab, depth)
    sides = {"polymodal": (ours, our_step, our_sample, our_loss), "transfusion-pytorch": (peer, peer_step, peer_sample, peer_loss)}
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "batch": BATCH, "width": WIDTH, "polymodal depth": DEPTH, "transfusion-pytorch depth": depth,
                     "image_tokens": GRID * GRID,
                     "sample_steps": STEPS}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, *_) in sides.items()}
    train_times: dict[str, list[float]] = {name: [] for name in sides}
    sample_times: dict[str, list[float]] = {name: [] for name in sides}
    for name, (model, step, sample, loss) in sides.items():
        results[f"{name} parameters"] = sum(p.numel() for p in model.parameters())
        results[f"{name} GFLOP a step"] = flops(loss, model) / 1e9
        step(optimizers[name])  # warm-up
        sample()
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, (model, step, sample, _) in sides.items():
            model.train()
            start = time.perf_counter()
            step(optimizers[name])
            train_times[name].append(time.perf_counter() - start)
            model.eval()
            start = time.perf_counter()
            sample()
            sample_times[name].append(time.perf_counter() - start)
    for name in sides:
        results[f"{name} step s (median)"] = statistics.median(train_times[name])
        results[f"{name} sample s (median)"] = statistics.median(sample_times[name])
    results["FLOP ratio (peer / polymodal)"] = (results["transfusion-pytorch GFLOP a step"]
                                                / results["polymodal GFLOP a step"])
    results["step ratio (peer / polymodal)"] = (results["transfusion-pytorch step s (median)"]
                                                / results["polymodal step s (median)"])
    results["sample ratio (peer / polymodal)"] = (results["transfusion-pytorch sample s (median)"]
                                                  / results["polymodal sample s (median)"])
    report(results, args.json)


if __name__ == "__main__":
    main()
