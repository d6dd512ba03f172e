"""Image autoencoders: pixels <-> a smaller latent grid, continuous (KL) or discrete (VQ).

``kl``: the encoder gives a mean and log-variance per latent cell; training samples from that
Gaussian and adds a small KL penalty towards N(0, 1) (as the Stable Diffusion autoencoder);
``encode`` returns the mean. Diffusion can then run on the latent grid instead of the pixels.

``vq``: the encoder's vectors are replaced by their nearest entry of a learned codebook
(VQ-VAE, van den Oord et al. 2017), with the straight-through gradient and a commitment loss;
codebook entries follow their assigned vectors by exponential moving averages; the first batch
seeds the codebook and entries that fall out of use restart on the encoder outputs the codebook
represents worst. ``encode_codes`` turns an image into a
grid of integer tokens and ``decode_codes`` draws them back: the image tokens of native
multimodal models.

Both are trained by ``polymodal train`` (recipe type ``autoencoder``) with an L1 + squared
reconstruction loss.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    evaluate_splits,
    load_saved,
    saved_config,
)
from polymodal.models.folder import write_model_folder
from polymodal.nn.layers import channels_last

KINDS = ("kl", "vq")


@dataclass
class AutoencoderConfig:
    kind: str = "kl"  # kl (continuous latents) | vq (codebook tokens)
    channels: tuple[int, ...] = (64, 128, 128)  # encoder widths; each level after the first halves the side
    latent_channels: int = 4  # channels of the latent grid (kl) or of each code vector (vq)
    codebook_size: int = 512  # vq: number of codes
    commitment: float = 0.25  # vq: weight of the commitment loss
    codebook_decay: float = 0.99  # vq: EMA decay of the codebook
    dead_code_threshold: float = 0.25  # vq: a code whose moving average of vectors a batch falls below
    # this is restarted (an unused code falls from 1 to 0.25 in 138 steps at decay 0.99)
    kl_weight: float = 1e-6  # kl: weight of the KL penalty (summed over latent cells); 1e-4 keeps the
    # posteriors wide and blurs reconstructions (shapes world, 5-6 minutes: PSNR 30 vs 38 at 1e-6)
    image_size: int = 32  # side of the images it is trained on
    image_field: str = "image"  # batch field of the images

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.kind not in KINDS:
            raise ValueError(f"autoencoder kind {self.kind!r}; choose from {KINDS}")


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                 nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.net(x)


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        ch = c.channels
        self.downsample = 2 ** (len(ch) - 1)
        enc = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, width in enumerate(ch):
            enc.append(ConvBlock(ch[max(i - 1, 0)], width))
            if i < len(ch) - 1:
                enc.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        enc += [nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 2 * c.latent_channels if c.kind == "kl"
                                                              else c.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        if c.kind == "kl":  # posteriors start narrow (std 0.05): the decoder first sees the means, not
            nn.init.constant_(enc[-1].bias[c.latent_channels:], -6.0)  # noise that hides them
        dec = [nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1)]
        for i, width in reversed(list(enumerate(ch))):
            dec.append(ConvBlock(ch[min(i + 1, len(ch) - 1)], width))
            if i > 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        dec += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        if c.kind == "vq":
            self.register_buffer("codebook", torch.randn(c.codebook_size, c.latent_channels))
            self.register_buffer("code_counts", torch.ones(c.codebook_size))
            self.register_buffer("code_sums", self.codebook.clone())
            self.register_buffer("codebook_ready", torch.zeros((), dtype=torch.bool))  # set from the first batch
        channels_last(self)

    def _encoder(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(channels_last(images)).contiguous()

    # ---- latents ----

    def _moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self._encoder(images).chunk(2, 1)
        return mean, logvar.clamp(-20, 10)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, S/f, S/f)``: the posterior mean (kl) or the nearest codes' vectors (vq)."""
        if self.config.kind == "kl":
            return self._moments(images)[0]
        return self.codebook[self.encode_codes(images)].permute(0, 3, 1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(channels_last(latents)).contiguous()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images through the latent grid and back, clamped to [-1, 1]."""
        return self.decode(self.encode(images)).clamp(-1, 1)

    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """vq: the code index of every latent cell ``(B, S/f, S/f)``."""
        if self.config.kind != "vq":
            raise ValueError("encode_codes needs a vq autoencoder")
        return self._nearest(self._encoder(images))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.codebook[codes].permute(0, 3, 1, 2))

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C)
        distance = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)[None]
        return distance.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    # ---- training ----

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch[self.config.image_field]
        if self.config.kind == "kl":
            mean, logvar = self._moments(images)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            recon = self.decode(z)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
            rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
            return {"loss": rec + self.config.kl_weight * kl, "reconstruction": rec.detach(), "kl": kl.detach()}
        z = self._encoder(images)
        codes = self._nearest(z)
        quantized = self.codebook[codes].permute(0, 3, 1, 2)
        commit = F.mse_loss(z, quantized)
        recon = self.decode(z + (quantized - z).detach())  # straight-through gradient
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        if self.training:
            self._update_codebook(z.detach(), codes)
        used = codes.unique().numel() / self.config.codebook_size
        return {"loss": rec + self.config.commitment * commit, "reconstruction": rec.detach(),
                "codebook_used": torch.tensor(used)}

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Moving averages of each code's vectors; codes used less than ``dead_code_threshold``
        vectors a batch restart on this batch's vectors, drawn with chance proportional to their
        squared distance from their code (k-means++), so restarts go where the codebook is worst
        (on the shapes world: object edges rather than the background most cells show). The
        first batch seeds the whole codebook the same way instead of the random start."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if not bool(self.codebook_ready):
            self._restart(torch.ones(self.config.codebook_size, dtype=torch.bool, device=flat.device), flat,
                          torch.ones(len(flat), device=flat.device))
            self.codebook_ready.fill_(True)
            return
        onehot = F.one_hot(codes.flatten(), self.config.codebook_size).to(flat.dtype)  # (N, K)
        d = self.config.codebook_decay
        self.code_counts.mul_(d).add_(onehot.sum(0), alpha=1 - d)
        self.code_sums.mul_(d).add_(onehot.T @ flat, alpha=1 - d)
        self.codebook.copy_(self.code_sums / self.code_counts.clamp(min=1e-5)[:, None])
        dead = self.code_counts < self.config.dead_code_threshold
        if dead.any():
            error = (flat - self.codebook[codes.flatten()]).pow(2).sum(1)
            self._restart(dead, flat, error)

    def _restart(self, which: torch.Tensor, vectors: torch.Tensor, weight: torch.Tensor) -> None:
        n = int(which.sum())
        weight = weight.clamp(min=0) + 1e-12
        pick = torch.multinomial(weight, n, replacement=n > len(vectors))
        self.codebook[which] = vectors[pick]
        self.code_sums[which] = vectors[pick]
        self.code_counts[which] = 1.0

    # ---- the family (see polymodal.models.family) ----

    tasks = ("reconstruct",)
    config_class = AutoencoderConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> Autoencoder:
        if spec.get("init_from"):
            raise ValueError("model.init_from: an autoencoder starts from scratch")
        return cls(AutoencoderConfig(**spec))

    def fields(self) -> dict[str, str]:
        return {self.config.image_field: "image"}

    def input_size(self) -> int:
        return self.config.image_size

    def validator(self, items: list[dict], fields) -> Validator:
        """Reconstruction error on the validation images."""
        from polymodal.data.dataset import Collator

        def reconstruction(model) -> dict[str, float]:
            if not items:
                return {}
            images = Collator(fields)(items)[model.config.image_field]
            return {"reconstruction mse": float(F.mse_loss(model.decode(model.encode(images)), images))}

        return reconstruction

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """Reconstruction error; with ``options.judge``, the judge's accuracy on the reconstructions."""
        from polymodal.eval.reconstruction import autoencoder_metrics
        from polymodal.models.detector import GridDetector

        judge = GridDetector.load_judge(options.judge) if options.judge is not None else None  # once for every split
        field = self.config.image_field

        def score(items: list[dict]) -> dict[str, float]:
            images = torch.stack([item[field] for item in items])
            return autoencoder_metrics(self, images, [item["row"] for item in items], judge)

        return evaluate_splits(data, splits, self.fields(), options.image_size or self.input_size(), score,
                               limit=options.limit, progress=options.progress)

    # ---- saving ----

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return write_model_folder(directory, {"model_type": "autoencoder", **asdict(self.config)}, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Autoencoder:
        """The config checked and the model sized and matched with its weights before anything is
        allocated (see :func:`~polymodal.models.family.load_saved`)."""
        config = saved_config(directory, "autoencoder", AutoencoderConfig)
        return load_saved(directory, lambda: cls(config))
