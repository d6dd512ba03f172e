"""A UNet denoiser whose feature maps cross-attend to text token states (as Stable Diffusion / Imagen).

Levels of residual blocks halve the resolution on the way down and double it on the way up,
with skip connections between the two paths. Every residual block reads the conditioning
vector (timestep embedding, plus the pooled text unless ``pooled_text`` is off) as a per-channel
scale and shift after its first normalisation (adaptive group norm). At the levels marked in
``attention``, each residual block is followed by a spatial Transformer block: self-attention over the map's positions,
cross-attention from every position to the text tokens (how "star" reaches the pixels where
the star goes), and an MLP. A fixed 2D position code joins the map before attention: without it
a query knows what is under it but not where it is, and "in the top right" has nothing to match.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.nn.layers import Block


@dataclass
class UNetConfig:
    type: str = "unet"
    in_channels: int = 3  # image (or latent) channels in and out
    channels: tuple[int, ...] = (64, 128, 192)  # feature channels at each level; level i is 2^i times smaller
    blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attention: tuple[bool | str, ...] = (False, True, True)  # spatial Transformer blocks at each level:
    # true = self- and cross-attention, "cross" = cross-attention only (cheap at full resolution)
    heads: int = 4  # attention heads
    context_dim: int = 128  # width of the text token states it cross-attends to
    groups: int = 8  # group-norm groups
    mid_attention: bool = True  # a Transformer block between the two bottleneck residual blocks
    positions: bool = True  # add a 2D sine-cosine position code to the attention blocks' inputs, so
    # a position's query knows where it is and "top right" in the text can find the top right
    pooled_text: bool = True  # add the mean-pooled text to the timestep vector that every block reads;
    # off, the text reaches the map only through cross-attention, where each position reads its own words
    patch: int = 1  # pixels folded into channels before the first level (space-to-depth); 2 makes
    # the first level work at half the resolution, a quarter of the cost

    PRESETS = {
        "tiny": dict(channels=(16, 32), attention=(False, True), heads=2, groups=4),
        "small": dict(channels=(64, 128, 192)),
        "base": dict(channels=(128, 256, 256), blocks=2),
    }

    def __post_init__(self):
        self.channels, self.attention = tuple(self.channels), tuple(self.attention)
        if len(self.attention) != len(self.channels):
            raise ValueError(f"unet: attention has {len(self.attention)} levels, channels {len(self.channels)}")
        bad = [a for a in self.attention if a not in (True, False, "cross")]
        if bad:
            raise ValueError(f"unet: attention levels are true, false or 'cross', got {bad[0]!r}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"unet: every channel count must be divisible by groups={self.groups}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of (possibly fractional) timesteps ``(B,)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


@functools.lru_cache(maxsize=32)
def position_code(h: int, w: int, dim: int, device) -> torch.Tensor:
    """Fixed 2D sine-cosine code ``(h*w, dim)`` of each position of an ``h`` x ``w`` map: half the
    channels encode the row, half the column, from one cycle per side up to one per two positions."""
    quarter = dim // 4

    def axis(n: int) -> torch.Tensor:  # (n, 2 * quarter)
        cycles = torch.exp(torch.linspace(0.0, math.log(max(n / 2, 1.0)), quarter, device=device))
        angles = 2 * math.pi * ((torch.arange(n, device=device) + 0.5) / n)[:, None] * cycles[None]
        return torch.cat([angles.sin(), angles.cos()], -1)

    rows = axis(h)[:, None].expand(h, w, 2 * quarter)
    cols = axis(w)[None].expand(h, w, 2 * quarter)
    return F.pad(torch.cat([rows, cols], -1).reshape(h * w, 4 * quarter), (0, dim - 4 * quarter))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.scale_shift = nn.Linear(cond_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        scale, shift = self.scale_shift(cond)[:, :, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SpatialTransformer(nn.Module):
    """A feature map's positions through one Transformer block: self-attention (unless
    ``self_attention`` is off), cross-attention to the context, MLP; in and out through 1x1
    convolutions, the output one zero-initialised so the block starts as the identity."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, self_attention: bool = True,
                 positions: bool = True):
        super().__init__()
        self.positions = positions
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = Block(channels, heads, self_attention=self_attention, cross_attention=True,
                           context_dim=context_dim)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.positions:
            y = y + position_code(h, w, c, x.device)
        y = self.block(y, context=context, context_mask=context_mask)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks at one resolution, each followed by a spatial Transformer when asked."""

    def __init__(self, cins: list[int], cout: int, cond_dim: int, config: UNetConfig, attention: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin, cout, cond_dim, config.groups) for cin in cins)
        self.attn = nn.ModuleList(
            SpatialTransformer(cout, config.heads, config.context_dim, config.groups, self_attention=attention is True,
                               positions=config.positions) if attention else nn.Identity()
            for _ in cins)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.channels
        self.cond_dim = cond_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        # the pooled text joins the timestep: a global summary every position reads alike
        self.text_to_cond = nn.Linear(c.context_dim, cond_dim) if c.pooled_text else None
        self.conv_in = nn.Conv2d(c.in_channels * c.patch**2, ch[0], 3, padding=1)
        # down path: remember the width of every skip
        skips, self.down, self.downsample = [ch[0]], nn.ModuleList(), nn.ModuleList()
        prev = ch[0]
        for i, cout in enumerate(ch):
            cins = [prev] + [cout] * (c.blocks - 1)
            self.down.append(Level(cins, cout, cond_dim, c, c.attention[i]))
            skips += [cout] * c.blocks
            prev = cout
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(cout, cout, 3, stride=2, padding=1))
                skips.append(cout)
        self.mid1 = ResBlock(prev, prev, cond_dim, c.groups)
        self.mid_attn = (SpatialTransformer(prev, c.heads, c.context_dim, c.groups, positions=c.positions)
                         if c.mid_attention else None)
        self.mid2 = ResBlock(prev, prev, cond_dim, c.groups)
        # up path: each block takes one skip
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, cout in reversed(list(enumerate(ch))):
            cins = []
            for _ in range(c.blocks + 1):
                cins.append(prev + skips.pop())
                prev = cout
            self.up.append(Level(cins, cout, cond_dim, c, c.attention[i]))
            if i > 0:
                self.upsample.append(nn.Conv2d(cout, cout, 3, padding=1))
        self.norm_out = nn.GroupNorm(c.groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], c.in_channels * c.patch**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                pooled: torch.Tensor) -> torch.Tensor:
        """Denoiser output (B, C, H, W) for noisy ``x`` (B, C, H, W) at timesteps ``t`` (B,), text
        token states ``context`` (B, T, D) with ``context_mask`` (B, T) and pooled text (B, D)."""
        size = 2 ** (len(self.config.channels) - 1) * self.config.patch
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"unet: image side {tuple(x.shape[-2:])} must be divisible by {size}")
        cond = self.time_mlp(timestep_embedding(t, self.config.channels[0]))  # (B, 4C)
        if self.text_to_cond is not None:
            cond = cond + self.text_to_cond(pooled)
        h = self.conv_in(F.pixel_unshuffle(x, self.config.patch) if self.config.patch > 1 else x)
        skips = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = res(h, cond)
                h = attn(h, context, context_mask) if isinstance(attn, SpatialTransformer) else h
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid1(h, cond)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context, context_mask)
        h = self.mid2(h, cond)
        for j, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = res(torch.cat([h, skips.pop()], 1), cond)
                h = attn(h, context, context_mask) if isinstance(attn, SpatialTransformer) else h
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.config.patch) if self.config.patch > 1 else out
