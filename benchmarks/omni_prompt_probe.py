"""Does an omni model's denoiser read its prompt? For one-object images of ``--split`` (those
whose caption names the colour and shape as the world does, not by a synonym), each noised at a
few timesteps, the error of the clean latent the model predicts after the image's own caption
against after the same caption with its colour (or shape) word swapped for another.
A model that reads the word predicts worse after the wrong one; prints, per word kind and
timestep, the mean errors and the share of images whose own caption did better, as JSON.

    OMP_NUM_THREADS=2 python benchmarks/omni_prompt_probe.py MODEL --data WORLD [--images 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def main() -> None:
    from polymodal.models import load_model
    from polymodal.models.family import split_items
    from polymodal.models.omni import OmniExample

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--timesteps", default="300,600,900")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model).eval()
    if getattr(model.config, "image", None) != "latent":
        raise SystemExit(f"{args.model}: not an omni model with latent images")
    world = json.loads((args.data / "world.json").read_text())
    words = {"colour": world["colours"], "shape": world["shapes"]}
    items = [item for item in split_items(args.data, ["image"], args.split, model.input_size(), limit=args.images * 4)
             if len(item["row"].get("objects", [])) == 1
             and all(item["row"]["objects"][0][kind] in item["row"]["text"].split() for kind in ("colour", "shape"))
             ][: args.images]  # the caption names the colour and shape as the world does (not a synonym)
    if not items:
        raise SystemExit(f"{args.data}: no one-object images in split {args.split!r}")
    with torch.no_grad():
        latents = model.image_tokens(torch.stack([item["image"] for item in items]))
    tok, rng = model.tokenizer, random.Random(0)

    def errors(captions: list[str], t: int) -> torch.Tensor:
        seq = model.pack([OmniExample([[tok.bos_id, *tok.encode(c, add_special_tokens=False)], x, [tok.eos_id]])
                          for c, x in zip(captions, latents, strict=True)])
        steps = torch.full((len(seq.clean),), t)
        noise = torch.randn(seq.clean.shape, generator=torch.Generator().manual_seed(t))
        noisy = model.diffusion.add_noise(seq.clean, noise, steps)
        with torch.no_grad():
            hidden = model(seq.with_images(noisy, steps))
            clean = model.diffusion.predict_x0(model.patch_out(hidden.flatten(0, 1)[seq.image_index]), noisy, steps)
        return (clean - seq.clean).pow(2).mean((1, 2))

    own = [item["row"]["text"] for item in items]
    timesteps = [int(t) for t in args.timesteps.split(",")]
    right = {t: errors(own, t) for t in timesteps}  # the own captions' errors, the same for every word kind
    results = {"model": str(args.model), "images": len(items), "probes": []}
    for kind, choices in words.items():
        swapped = []
        for item, caption in zip(items, own, strict=True):
            word = item["row"]["objects"][0][kind]
            swapped.append(caption.replace(word, rng.choice([w for w in choices if w != word])))
        for t in timesteps:
            wrong = errors(swapped, t)
            results["probes"].append({"word": kind, "timestep": t, "own caption": round(right[t].mean().item(), 4),
                                      "swapped": round(wrong.mean().item(), 4),
                                      "own better": round((right[t] < wrong).float().mean().item(), 3)})
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
