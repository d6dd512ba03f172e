"""The omni model's block: one parameter set per modality (``mot``) or one for all (``dense``),
attention over the whole sequence. The design: :mod:`polymodal.models.omni`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.models.omni.sequence import IMAGE
from polymodal.nn.layers import MLP, Attention, modulate, rotary

# ---- the block: one parameter set per modality, attention over everything ------------------


def modulate_images(rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The rows ``(N*cells, C)`` of ``N`` whole images, each image's consecutive, scaled by
    ``1 + scale`` and shifted by ``shift`` (each ``(N, C)``, one per image; no shift: a gate)."""
    images = rows.view(len(scale), -1, rows.shape[-1])
    return (images * (1 + scale[:, None]) if shift is None else modulate(images, shift, scale)).view_as(rows)


class _Permute(torch.autograd.Function):
    """Rows of ``x`` in the order ``order``; the gradient goes back through the inverse order, a
    second gather instead of the scatter-add that indexing's backward is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Routing:
    """Which positions of a ``(B, T)`` batch go through which parameter set: each position its
    modality's (``mot``), or all through the one (``dense``); ``skip`` positions (padding) through
    none: their rows are left out of every projection and MLP, which give them zeros.

    Between blocks the residual stream is kept as rows ``(B*T, C)`` sorted by modality
    (:meth:`sort`), skipped positions last, so each parameter set reads one contiguous slice of
    it; only attention, which mixes positions, needs the batch's own layout (:meth:`unsort`), and
    its output is sorted again. A block so moves its tokens twice, whatever the number of
    parameter sets; a dense batch with nothing to skip is not moved at all."""

    def __init__(self, modality: torch.Tensor, experts: int, groups: int | None = None,
                 skip: torch.Tensor | None = None):
        self.shape = modality.shape
        self.experts = experts
        self.groups = experts if groups is None else groups  # a dense model groups its rows too when the
        # image rows need something of their own (the timestep's modulation)
        self.skipped = int(skip.sum()) if skip is not None else 0
        if self.groups == 1 and not self.skipped:
            self.order = None
            return
        flat = modality.flatten() if self.groups > 1 else torch.zeros_like(modality.flatten())  # each row's group
        if self.skipped:
            flat = torch.where(skip.flatten(), self.groups, flat)
        self.order = torch.argsort(flat, stable=True)  # positions of modality 0, then 1, ..., skipped ones last
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(self.order), device=self.order.device)
        self.sizes = torch.bincount(flat, minlength=self.groups + 1)[: self.groups + 1].tolist()

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, ...)`` -> rows ``(B*T, ...)`` grouped by modality."""
        flat = x.flatten(0, 1)
        return flat if self.order is None else _Permute.apply(flat, self.order, self.inverse)

    def unsort(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``(B*T, ...)`` grouped by modality -> ``(B, T, ...)``."""
        if self.order is not None:
            rows = _Permute.apply(rows, self.inverse, self.order)
        return rows.view(*self.shape, *rows.shape[1:])

    def each(self, experts: nn.ModuleList, fn: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
             rows: torch.Tensor) -> torch.Tensor:
        """``fn(expert, rows, modality)`` for sorted ``rows`` ``(B*T, ...)``, each modality's slice
        through its own expert (or all through the one of a dense model), zeros for skipped rows:
        every position computed at most once, so the FLOPs are those of one shared expert."""
        if self.order is None:
            return fn(experts[0], rows, 0)
        *slices, skipped = rows.split(self.sizes)
        parts = [fn(experts[m if len(experts) > 1 else 0], part, m) for m, part in enumerate(slices) if len(part)]
        if self.skipped:
            parts.append(parts[0].new_zeros(self.skipped, *parts[0].shape[1:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class ModalityWeights(nn.Module):
    """One modality's parameters of a block: the norms, the attention projections (with QK-norm)
    of :class:`~polymodal.nn.layers.Attention` and the :class:`~polymodal.nn.layers.MLP`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qk_norm="layer" if qk_norm else None, rotary=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def qkv(self, x: torch.Tensor, modulate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Queries, keys and values ``(..., 3, H, D)`` of tokens ``x`` ``(..., C)`` (QK-normed);
        ``modulate`` scales and shifts the normalised tokens first."""
        h = self.norm1(x)
        if modulate is not None:
            h = modulate(h)
        heads = self.attn.heads
        q = self.attn.q(h).unflatten(-1, (heads, -1))  # (..., H, D)
        k, v = self.attn.kv(h).unflatten(-1, (2, heads, -1)).unbind(-3)
        if self.attn.q_norm is not None:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        return torch.stack([q, k, v], -3)


class OmniBlock(nn.Module):
    """Pre-norm self-attention and MLP, each residual, with ``experts`` parameter sets: 1 shared by
    every position (dense), or one per modality (MoT). The attention itself is one SDPA over the
    whole sequence, whatever parameters made its queries, keys and values.

    With ``modulated`` (adaLN, as DiT's blocks), the image tokens' two norms are scaled and
    shifted, and their two residual updates scaled, by their image's timestep: ``forward`` then
    takes each image's condition ``(N, C)``. The projection starts at zero, so a new block is the
    plain one; text tokens are never modulated."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, experts: int,
                 rotary_base: float = 10_000.0, modulated: bool = False):
        super().__init__()
        self.heads, self.rotary_base = heads, rotary_base
        self.experts = nn.ModuleList(ModalityWeights(width, heads, mlp_ratio, qk_norm) for _ in range(experts))
        self.modulation = None
        if modulated:
            self.modulation = nn.Linear(width, 6 * width)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, rows: torch.Tensor, routing: Routing, mask: torch.Tensor, positions: torch.Tensor,
                cache=None, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` (B*T, C) of the residual stream, sorted by ``routing``; ``mask`` (B, 1, T, S);
        ``positions`` (B, T); ``cache`` an AttentionCache; ``condition`` (N, C): each image's
        timestep condition, in the order of the images' rows (modulated blocks only). Returns the
        stream as it came, sorted."""
        b, t = routing.shape
        shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = None
        if self.modulation is not None and condition is not None and len(condition):
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(condition)).chunk(6, -1)

        def per_image(m: int, y: torch.Tensor, scale, shift=None) -> torch.Tensor:
            return y if scale is None or m != IMAGE else modulate_images(y, scale, shift)

        qkv = routing.unsort(routing.each(
            self.experts, lambda e, y, m: e.qkv(y, lambda h: per_image(m, h, scale1, shift1)), rows))  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        q, k = rotary(q, positions, self.rotary_base), rotary(k, positions, self.rotary_base)
        if cache is not None:
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, -1)
        rows = rows + routing.each(self.experts, lambda e, y_, m: per_image(m, e.attn.out(y_), gate1), routing.sort(y))
        return rows + routing.each(
            self.experts, lambda e, y_, m: per_image(m, e.mlp(per_image(m, e.norm2(y_), scale2, shift2)), gate2), rows)
