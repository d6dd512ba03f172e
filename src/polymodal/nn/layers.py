"""Attention and the pre-norm Transformer that every encoder and decoder in polymodal uses.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``, so the fastest
kernel for the device is picked (flash / memory-efficient on GPUs, fused on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "relu": F.relu, "silu": F.silu}


def attention_mask(key_mask: torch.Tensor | None, query_len: int, causal: bool) -> torch.Tensor | None:
    """Boolean mask for SDPA, True = may attend: ``(B, 1, Tq, Tk)``, or None for full attention.

    ``key_mask`` is ``(B, Tk)``, True on real tokens.
    """
    if key_mask is None and not causal:
        return None
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        tk = key_mask.shape[1] if key_mask is not None else query_len
        device = key_mask.device if key_mask is not None else None
        tri = torch.ones(query_len, tk, dtype=torch.bool, device=device).tril(tk - query_len)
        mask = tri[None, None] if mask is None else mask & tri[None, None]
    return mask


class Attention(nn.Module):
    """Multi-head attention; self-attention, or cross-attention when ``context`` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        context = x if context is None else context
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, C/H)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, activation: str = "gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks over ``(B, T, C)``; ``key_mask`` (B, T) marks real tokens."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 activation: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, activation, eps) for _ in range(depth))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        mask = attention_mask(key_mask, x.shape[1], causal)
        for block in self.blocks:
            x = block(x, mask)
        return x
