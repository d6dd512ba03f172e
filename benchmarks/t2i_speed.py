"""Training and sampling speed of polymodal's text-to-image denoiser against diffusers'
``UNet2DConditionModel`` of the same size.

The peer is built to do the same work: the same widths per level, residual blocks per level,
cross-attention levels (``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` where polymodal has a
spatial Transformer, plain blocks elsewhere), heads, group norm and text width, on the same
input layout (polymodal's ``patch`` folds pixels into channels first, so the peer gets the
folded image: ``3 * patch^2`` channels at ``32 / patch`` pixels). Both get the same inputs;
steps are interleaved (A, B, A, B, ...) in one process and medians are reported.

Training step: forward, v-prediction mean squared error, backward, AdamW, at ``--batch``.
Sampling: ``--steps`` DDIM steps for ``--sample-batch`` images with classifier-free guidance
(the denoiser sees twice the batch at every step), from the same scheduler.

    python benchmarks/t2i_speed.py [--recipe t2i-shapes] [--batch 64] [--repeats 7]
    python benchmarks/t2i_speed.py --recipe t2i-latent-shapes --channels 4 --side 8

``--channels`` / ``--side`` give the denoiser's input (3 and 32 for 32x32 pixels; a latent
recipe diffuses its autoencoder's grid, e.g. 4 channels at 8x8). The autoencoder's decoder,
run once per image after the last step, is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONTEXT_TOKENS = 16


def build(recipe: str, channels: int, side: int):
    from diffusers import UNet2DConditionModel

    from polymodal.models.text_to_image import build_denoiser
    from polymodal.train.recipe import load_recipe

    spec = dict(load_recipe(recipe).model["denoiser"])
    if spec.get("type") != "unet":
        raise SystemExit("the peer is a UNet: the recipe's denoiser must be a unet")
    context_dim = load_recipe(recipe).model["text"].get("width", 128)
    torch.manual_seed(0)
    ours = build_denoiser(spec, channels, context_dim)
    c = ours.config
    down = [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in c.attention]
    up = [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(c.attention)]
    peer = UNet2DConditionModel(
        sample_size=side // c.patch, in_channels=channels * c.patch**2, out_channels=channels * c.patch**2,
        down_block_types=tuple(down), up_block_types=tuple(up), block_out_channels=tuple(c.channels),
        layers_per_block=c.blocks, cross_attention_dim=context_dim, attention_head_dim=c.heads,
        norm_num_groups=c.groups, mid_block_type="UNetMidBlock2DCrossAttn" if c.mid_attention else None)
    return ours, peer, c.patch, context_dim


def run_ours(model, x, t, context, mask, pooled):
    return model(x, t, context, mask, pooled)


def run_peer(model, patch):
    def run(_, x, t, context, mask, pooled):
        folded = F.pixel_unshuffle(x, patch) if patch > 1 else x
        out = model(folded, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        return F.pixel_shuffle(out, patch) if patch > 1 else out
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="t2i-shapes")
    parser.add_argument("--channels", type=int, default=3, help="denoiser input channels")
    parser.add_argument("--side", type=int, default=32, help="denoiser input side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from polymodal.nn.diffusion import Diffusion, DiffusionConfig

    ours, peer, patch, dim = build(args.recipe, args.channels, args.side)
    runners = {"polymodal": (ours, run_ours), "diffusers": (peer, run_peer(peer, patch))}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in runners.items()}
    g = torch.Generator().manual_seed(1)
    b = args.batch
    x = torch.randn(b, args.channels, args.side, args.side, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, CONTEXT_TOKENS, dim, generator=g)
    mask = torch.ones(b, CONTEXT_TOKENS, dtype=torch.bool)
    pooled = context.mean(1)
    target = torch.randn_like(x)
    optimizers = {name: torch.optim.AdamW(m.parameters(), 1e-4) for name, (m, _) in runners.items()}

    def train_step(name):
        model, run = runners[name]
        start = time.perf_counter()
        loss = F.mse_loss(run(model, x, t, context, mask, pooled), target)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()
        return time.perf_counter() - start

    diffusion = Diffusion(DiffusionConfig())
    s = args.sample_batch
    sample_context = torch.randn(2 * s, CONTEXT_TOKENS, dim, generator=g)
    sample_mask = torch.ones(2 * s, CONTEXT_TOKENS, dtype=torch.bool)

    @torch.no_grad()
    def sample(name):
        model, run = runners[name]
        model.eval()
        scheduler = diffusion.sampler("ddim", args.steps)
        latents = torch.randn(s, args.channels, args.side, args.side, generator=torch.Generator().manual_seed(2))
        start = time.perf_counter()
        for step in scheduler.timesteps:
            tt = torch.full((2 * s,), int(step))
            cond, uncond = run(model, torch.cat([latents, latents]), tt, sample_context, sample_mask,
                               sample_context.mean(1)).chunk(2)
            latents = scheduler.step(uncond + 3.0 * (cond - uncond), step, latents).prev_sample
        model.train()
        return time.perf_counter() - start

    for name in runners:  # warm up
        train_step(name)
    train_times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name in runners:
            train_times[name].append(train_step(name))
    sample_times = {name: [] for name in runners}
    for _ in range(args.sample_repeats):
        for name in runners:
            sample_times[name].append(sample(name))
    results = {"machine": platform.machine(), "threads": torch.get_num_threads(), "recipe": args.recipe,
               "batch": b, "sample_batch": s, "steps": args.steps, "input": [args.channels, args.side, args.side]}
    for name in runners:
        results[name] = {
            "parameters": params[name],
            "train_samples_per_s": b / statistics.median(train_times[name]),
            "sample_images_per_s": s / statistics.median(sample_times[name]),
        }
    for key in ("train_samples_per_s", "sample_images_per_s"):
        results[f"ratio_{key}"] = results["polymodal"][key] / results["diffusers"][key]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
