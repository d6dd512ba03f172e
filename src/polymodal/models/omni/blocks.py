"""The omni model's block: one parameter set per modality (``mot``) or one for all (``dense``),
attention over the whole sequence. The design: :mod:`polymodal.models.omni`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.nn.layers import MLP, Attention, rotary

# ---- the block: one parameter set per modality, attention over everything ------------------


class Routing:
    """Which positions of a ``(B, T)`` batch go through which parameter set: each position its
    modality's (``mot``), or all through the one (``dense``, where nothing is moved)."""

    def __init__(self, modality: torch.Tensor, experts: int):
        self.shape = modality.shape
        if experts == 1:
            self.index = None
            return
        flat = modality.flatten()
        self.index = [(flat == e).nonzero().squeeze(1) for e in range(experts)]  # positions of each modality
        order = torch.cat(self.index)
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(len(order), device=order.device)

    def apply(self, experts: nn.ModuleList, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
        """``fn(expert, x)`` with each position of ``x`` ``(B, T, ...)`` through its own expert;
        every position computed once, so the FLOPs are those of one shared expert."""
        if self.index is None:
            return fn(experts[0], x)
        flat = x.flatten(0, 1)  # (B*T, ...)
        parts = [fn(expert, flat[index]) for expert, index in zip(experts, self.index, strict=True)]
        out = torch.cat(parts)[self.inverse]
        return out.view(*self.shape, *out.shape[1:])


class ModalityWeights(nn.Module):
    """One modality's parameters of a block: the norms, the attention projections (with QK-norm)
    of :class:`~polymodal.nn.layers.Attention` and the :class:`~polymodal.nn.layers.MLP`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qk_norm="layer" if qk_norm else None, rotary=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values ``(..., 3, H, D)`` of tokens ``x`` ``(..., C)`` (QK-normed)."""
        h = self.norm1(x)
        heads = self.attn.heads
        q = self.attn.q(h).unflatten(-1, (heads, -1))  # (..., H, D)
        k, v = self.attn.kv(h).unflatten(-1, (2, heads, -1)).unbind(-3)
        if self.attn.q_norm is not None:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        return torch.stack([q, k, v], -3)


class OmniBlock(nn.Module):
    """Pre-norm self-attention and MLP, each residual, with ``experts`` parameter sets: 1 shared by
    every position (dense), or one per modality (MoT). The attention itself is one SDPA over the
    whole sequence, whatever parameters made its queries, keys and values."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, experts: int,
                 rotary_base: float = 10_000.0):
        super().__init__()
        self.heads, self.rotary_base = heads, rotary_base
        self.experts = nn.ModuleList(ModalityWeights(width, heads, mlp_ratio, qk_norm) for _ in range(experts))

    def forward(self, x: torch.Tensor, routing: Routing, mask: torch.Tensor, positions: torch.Tensor,
                cache=None) -> torch.Tensor:
        """``x`` (B, T, C); ``mask`` (B, 1, T, S); ``positions`` (B, T); ``cache`` an AttentionCache."""
        b, t, c = x.shape
        qkv = routing.apply(self.experts, lambda e, y: e.qkv(y), x)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        q, k = rotary(q, positions, self.rotary_base), rotary(k, positions, self.rotary_base)
        if cache is not None:
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, c)
        x = x + routing.apply(self.experts, lambda e, y_: e.attn.out(y_), y)
        return x + routing.apply(self.experts, lambda e, y_: e.mlp(e.norm2(y_)), x)
