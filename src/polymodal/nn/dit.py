"""A DiT denoiser: a Transformer over image patches (Peebles & Xie 2023), conditioned on text.

The (noisy) image is cut into ``patch`` x ``patch`` patches, each a token with a fixed 2-D
sine-cosine position. Every block modulates its normalised inputs with a scale, shift and
gate computed from the conditioning vector (timestep embedding + pooled text): adaLN-Zero,
whose gates start at zero so each block starts as the identity. Between self-attention and the
MLP, every token cross-attends to the text token states (as PixArt-alpha does), which binds
words to places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.nn.layers import Block, modulate
from polymodal.nn.unet import timestep_embedding


@dataclass
class DiTConfig:
    type: str = "dit"
    in_channels: int = 3  # image (or latent) channels in and out
    patch: int = 2  # pixels per patch side
    width: int = 256  # token width
    depth: int = 6  # blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0
    context_dim: int = 128  # width of the text token states it cross-attends to
    max_side: int = 64  # largest image side (in pixels) it accepts

    PRESETS = {
        "tiny": dict(width=32, depth=2, heads=2),
        "small": dict(width=256, depth=6, heads=4),
        "base": dict(width=384, depth=12, heads=6),
    }


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions ``(side * side, dim)``, row-major."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    half = dim // 2
    return torch.cat([timestep_embedding(ys.flatten(), half, 100.0), timestep_embedding(xs.flatten(), half, 100.0)], 1)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        self.patch_in = nn.Linear(c.in_channels * c.patch**2, c.width)
        self.register_buffer("positions", sincos_2d(c.max_side // c.patch, c.width), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.text_to_cond = nn.Linear(c.context_dim, c.width)
        # each block, and the linear map from the conditioning vector to its shift, scale and gate
        # (for self-attention, then the MLP), zero-initialised: adaLN-Zero, every block starts as
        # the identity. The cross-attention's output projection starts at zero too.
        self.blocks, self.ada = nn.ModuleList(), nn.ModuleList()
        for _ in range(c.depth):
            self.blocks.append(Block(c.width, c.heads, c.mlp_ratio, cross_attention=True, context_dim=c.context_dim,
                                     modulated=True))
            self.ada.append(nn.Linear(c.width, 6 * c.width))
            for layer in (self.ada[-1], self.blocks[-1].cross_attn.out):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.norm_out = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(c.width, 2 * c.width)
        self.patch_out = nn.Linear(c.width, c.in_channels * c.patch**2)
        for layer in (self.ada_out, self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                pooled: torch.Tensor) -> torch.Tensor:
        """Denoiser output (B, C, H, W); arguments as :meth:`polymodal.nn.unet.UNet.forward`."""
        b, ch, h, w = x.shape
        p = self.config.patch
        if h % p or w % p or max(h, w) > self.config.max_side:
            raise ValueError(f"dit: image side {(h, w)} must be divisible by patch {p} and at most {self.config.max_side}")
        gh, gw = h // p, w // p
        tokens = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, ch * p * p)
        side = self.config.max_side // p
        index = (torch.arange(gh, device=x.device)[:, None] * side + torch.arange(gw, device=x.device)[None]).flatten()
        h_ = self.patch_in(tokens) + self.positions[index]  # (B, N, W)
        cond = self.time_mlp(timestep_embedding(t, self.config.width)) + self.text_to_cond(pooled)  # (B, W)
        for block, ada in zip(self.blocks, self.ada, strict=True):
            modulation = ada(F.silu(cond)).view(b, 6, -1)  # (B, 6, W): shift, scale, gate twice
            h_ = block(h_, context=context, context_mask=context_mask, modulation=modulation)
        shift, scale = self.ada_out(F.silu(cond)).chunk(2, -1)
        out = self.patch_out(modulate(self.norm_out(h_), shift, scale))  # (B, N, C*p*p)
        out = out.view(b, gh, gw, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, ch, h, w)
