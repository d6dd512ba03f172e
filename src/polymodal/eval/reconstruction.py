"""Metrics of image autoencoders: reconstruction error, and what of a scene survives the latent
grid as a judge (a detector) reads it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


@torch.no_grad()
def autoencoder_metrics(model, images: torch.Tensor, rows: Sequence[dict], judge=None,
                        batch: int = 256) -> dict[str, float]:
    """Reconstruction error of an autoencoder (mean squared error and PSNR on [-1, 1] pixels); for a
    VQ autoencoder the share of its codes these images use and the codes' perplexity; with a
    ``judge`` (a loaded detector) and a shapes world, the judge's accuracy on the reconstructions,
    beside its accuracy on the originals: what of the scene survives the latent grid."""
    vq = getattr(model.config, "kind", None) == "vq"
    parts, codes = [], []
    for i in range(0, len(images), batch):
        if vq:  # the codes once: drawn back, and counted below
            codes.append(model.encode_codes(images[i: i + batch]))
            parts.append(model.decode_codes(codes[-1]).clamp(-1, 1))
        else:
            parts.append(model.reconstruct(images[i: i + batch]))
    recon = torch.cat(parts)
    mse = (recon - images).pow(2).mean().item()
    metrics = {"mse": mse, "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12)))}
    if vq:  # how much of the codebook these images use
        codes = torch.cat(codes).flatten()
        counts = torch.bincount(codes, minlength=model.config.codebook_size).double()
        share = counts / counts.sum()
        metrics["codebook usage"] = float((counts > 0).double().mean())
        metrics["codebook perplexity"] = float(torch.exp(-(share[share > 0] * share[share > 0].log()).sum()))
    if judge is not None:
        from polymodal.eval.geneval import judge_metrics

        if "objects" not in rows[0]:
            raise ValueError("a judge reads a shapes world: the rows have no 'objects' scene graph")
        for name, value in judge_metrics(judge, recon, rows).items():
            if name != "samples":
                metrics[f"judge {name} on reconstructions"] = value
        metrics["judge scene accuracy on real"] = judge_metrics(judge, images, rows)["scene accuracy"]
    return metrics
