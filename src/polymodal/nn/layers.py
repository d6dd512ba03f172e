"""The one Transformer: attention, the block, the stack, masks, positions and the KV cache.

Every encoder, decoder and denoiser in polymodal is built from these parts:

- :class:`Attention`: multi-head self- or cross-attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (so the fastest kernel for the device is
  picked: flash / memory-efficient on GPUs, fused on CPU), with optional QK-norm, rotary
  positions and a KV cache.
- :class:`Block`: pre-norm self-attention (optional), cross-attention (optional, optionally
  behind a tanh gate that starts closed), MLP; optionally modulated adaLN-Zero style by
  shift / scale / gate tensors computed outside from a conditioning vector.
- :class:`Transformer`: a stack of blocks over ``(B, T, C)``.
- masks: :func:`attention_mask` (padding and causal) and :func:`segment_mask` (causal across
  the sequence, bidirectional inside each image block); :class:`KVCache` for incremental
  decoding.

Positions: learned absolute tables and sine-cosine codes are added to the inputs by the model
that owns them (the captioner's learned table, the UNet's and DiT's 2D codes); rotary positions
(:func:`rotary`) rotate q and k inside attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def channels_last(x: torch.Tensor | nn.Module):
    """Images (or a convolutional module's weights) in channels-last memory order: the same values,
    laid out so that oneDNN's convolutions run 1.2-1.6x faster on CPU (measured on this project's
    CNN, detector and autoencoder; BENCHMARKS.md). Saved weights are made contiguous again."""
    if isinstance(x, nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "relu": F.relu, "silu": F.silu}


# ---- masks ----------------------------------------------------------------------------------


def _shifted_eye(rows: int, cols: int, offset: int, device) -> torch.Tensor:
    """``(rows, cols)`` True where column = row + offset: query i on its own key."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril(offset).triu(offset)


def attention_mask(key_mask: torch.Tensor | None, query_len: int, causal: bool) -> torch.Tensor | None:
    """Boolean mask for SDPA, True = may attend: ``(B, 1, Tq, Tk)``, or None for full attention.

    ``key_mask`` is ``(B, Tk)``, True on real tokens; the queries are the last ``query_len``
    keys (all of them without a cache, the new ones with one). A query always sees its own key,
    so a padding query (a left pad with nothing before it) never has an empty row: kernels
    differ on empty rows (zeros on some, NaN on others). Real tokens never see padding.
    """
    if key_mask is None and not causal:
        return None
    tk = key_mask.shape[1] if key_mask is not None else query_len
    device = key_mask.device if key_mask is not None else None
    offset = tk - query_len  # query i is key offset + i
    mask = torch.ones(query_len, tk, dtype=torch.bool, device=device)[None, None]  # (1, 1, Tq, Tk)
    if causal:
        mask = mask.tril(offset)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :]) | _shifted_eye(query_len, tk, offset, device)
    return mask


def segment_mask(segment_ids: torch.Tensor, causal: bool = True, key_mask: torch.Tensor | None = None,
                 query_len: int | None = None) -> torch.Tensor:
    """Mask ``(B, 1, Tq, Tk)`` for a sequence of text tokens and image blocks, True = may attend.

    ``segment_ids`` ``(B, Tk)``: 0 on a text token, ``k > 0`` on every token of image block
    ``k`` (each block of a sequence has its own id; ids need not be ordered). With ``causal``
    a token sees every earlier token, and a token of block ``k`` also sees the *later* tokens of
    block ``k``: causal across the sequence, bidirectional inside each image (as Transfusion
    attends). Without ``causal`` every token sees every token. ``key_mask`` ``(B, Tk)`` hides
    padding (a token still sees itself). The queries are the last ``query_len`` keys (default:
    all), so the same mask serves a KV-cached step.
    """
    b, tk = segment_ids.shape
    tq = tk if query_len is None else query_len
    q_ids = segment_ids[:, tk - tq:]  # (B, Tq)
    mask = torch.ones(b, tq, tk, dtype=torch.bool, device=segment_ids.device)
    if causal:
        same_block = (q_ids[:, :, None] == segment_ids[:, None, :]) & (q_ids[:, :, None] > 0)  # (B, Tq, Tk)
        mask = mask.tril(tk - tq) | same_block
    if key_mask is not None:
        mask = (mask & key_mask[:, None, :]) | _shifted_eye(tq, tk, tk - tq, segment_ids.device)
    return mask[:, None]


# ---- positions ------------------------------------------------------------------------------


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by its ``positions`` ``(T,)`` or ``(B, T)`` (RoPE), or by a
    position for each of its channel pairs ``(B, T, D/2)`` (multi-axis RoPE: pairs given a row's
    or a column's index turn with it, as 2-D images' tokens do).

    Channel ``i`` and ``i + D/2`` form a pair turned by ``position * base^(-2i/D)``, so the dot
    product of a rotated query and key depends on their positions only through the offset.
    """
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (D/2,)
    positions = positions.to(x.device, torch.float32)
    if positions.dim() == 3 and positions.shape[-1] != half:
        raise ValueError(f"per-pair positions need {half} a token (head width {x.shape[-1]}), got {positions.shape[-1]}")
    angles = positions * freqs if positions.dim() == 3 else positions[..., None] * freqs  # (T | B, T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a per-sample scale and shift ``(B, C)`` of normalised tokens ``(B, T, C)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ---- the KV cache ---------------------------------------------------------------------------


class AttentionCache:
    """Keys and values ``(B, H, S, D)`` one attention layer has computed so far.

    Self-attention appends the new tokens' keys and values at every step; cross-attention
    computes them from its (fixed) context at the first step and reuses them afterwards.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]


@dataclass
class BlockCache:
    self_attn: AttentionCache = field(default_factory=AttentionCache)
    cross_attn: AttentionCache = field(default_factory=AttentionCache)


class KVCache:
    """What a stack of blocks has seen, so each new token costs one position, not the prefix.

    Holds every block's keys and values and ``key_mask`` ``(B, S)``: which cached positions are
    real tokens (padding stays in the cache, masked, so every row keeps the same length).
    :meth:`reorder` follows beam search, which picks each row's parent beam at every step.
    """

    def __init__(self, depth: int):
        self.blocks = [BlockCache() for _ in range(depth)]
        self.key_mask: torch.Tensor | None = None  # (B, S)

    def __len__(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def extend(self, key_mask: torch.Tensor) -> torch.Tensor:
        """Remember the new tokens' mask ``(B, T)``; return the mask of all keys ``(B, S + T)``."""
        self.key_mask = key_mask if self.key_mask is None else torch.cat([self.key_mask, key_mask], 1)
        return self.key_mask

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` ``(B,)``."""
        for block in self.blocks:
            block.self_attn.reorder(index)
            block.cross_attn.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]


# ---- attention, MLP, block, stack -----------------------------------------------------------


NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}


class Attention(nn.Module):
    """Multi-head attention; self-attention, or cross-attention when ``context`` is given.

    ``qk_norm`` ("layer" | "rms") normalises each head's queries and keys, which keeps the
    attention logits bounded in deep or long-trained models. ``rotary`` turns q and k by their
    positions (self-attention only). With a cache, self-attention appends its new keys and
    values and attends to all of them; cross-attention computes its context's once.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True,
                 qk_norm: str | None = None, rotary: bool = False, rotary_base: float = 10_000.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if qk_norm not in (None, *NORMS):
            raise ValueError(f"unknown qk_norm {qk_norm!r}; choose from {sorted(NORMS)} or None")
        if rotary and (dim // heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got {dim // heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.q_norm = NORMS[qk_norm](dim // heads) if qk_norm else None
        self.k_norm = NORMS[qk_norm](dim // heads) if qk_norm else None
        self.rotary, self.rotary_base = rotary, rotary_base

    def _keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = source.shape
        k, v = self.kv(source).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, C/H) each
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: AttentionCache | None = None) -> torch.Tensor:
        """``x`` (B, T, C) -> (B, T, C). ``mask`` (B|1, 1, T, S) bool, True = may attend;
        ``positions`` (T,) or (B, T) for rotary (default: the cache's length onwards)."""
        b, t, c = x.shape  # (B, T, C)
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is None:  # self-attention
            k, v = self._keys_values(x)
            if self.rotary:
                if positions is None:
                    start = 0 if cache is None or cache.k is None else cache.k.shape[2]
                    positions = torch.arange(start, start + t, device=x.device)
                q, k = rotary(q, positions, self.rotary_base), rotary(k, positions, self.rotary_base)
            if cache is not None:
                k, v = cache.append(k, v)
        elif cache is not None and cache.k is not None:  # cross-attention, context seen already
            k, v = cache.k, cache.v
        else:
            k, v = self._keys_values(context)
            if cache is not None:
                cache.append(k, v)
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
    """The one Transformer block, pre-norm: self-attention, cross-attention, MLP, each residual.

    - ``self_attention`` off: no self-attention sublayer (the UNet's cheap full-resolution
      levels only cross-attend).
    - ``cross_attention``: ``x + attn(norm(x), context)`` to ``context`` tokens of width
      ``context_dim``; with ``cross_gate`` the update is scaled by ``tanh(gate)``, a learned
      scalar that starts at 0 so the block starts as if there were no context (Flamingo), and
      a sample whose context is all masked gets nothing from it.
    - ``modulated`` (adaLN-Zero, DiT): ``forward`` takes ``modulation`` ``(B, 6, C)``: shift,
      scale and gate of the self-attention, then of the MLP, computed by the model from its
      conditioning vector (zero-initialised there, so the block starts as the identity). The
      norms before those sublayers then have no affine parameters of their own (eps 1e-6, as DiT).
      The cross-attention is not modulated.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, activation: str = "gelu",
                 eps: float = 1e-5, *, self_attention: bool = True, cross_attention: bool = False,
                 context_dim: int | None = None, cross_gate: bool = False, modulated: bool = False,
                 qk_norm: str | None = None, rotary: bool = False):
        super().__init__()

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if modulated else nn.LayerNorm(dim, eps=eps)

        self.modulated = modulated
        self.norm1 = norm() if self_attention else None
        self.attn = Attention(dim, heads, qk_norm=qk_norm, rotary=rotary) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.cross_attn = Attention(dim, heads, context_dim, qk_norm=qk_norm) if cross_attention else None
        # tanh(0) = 0: the cross path starts closed
        self.gate = nn.Parameter(torch.zeros(1)) if cross_attention and cross_gate else None
        self.norm2 = norm()
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, modulation: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: BlockCache | None = None) -> torch.Tensor:
        """``x`` (B, T, C); ``mask`` (B|1, 1, T, S) for self-attention; ``context`` (B, M, D) with
        ``context_mask`` (B, M) True on real tokens; ``modulation`` (B, 6, C) when modulated."""
        if self.modulated:
            if modulation is None:
                raise ValueError("a modulated block needs modulation (B, 6, C)")
            shift1, scale1, gate1, shift2, scale2, gate2 = modulation.unbind(1)
        if self.attn is not None:
            h = self.norm1(x)
            h = modulate(h, shift1, scale1) if self.modulated else h
            h = self.attn(h, mask=mask, positions=positions, cache=cache.self_attn if cache is not None else None)
            x = x + (gate1[:, None] * h if self.modulated else h)
        if self.cross_attn is not None and context is not None:
            cross_mask = context_mask[:, None, None, :] if context_mask is not None else None  # (B, 1, 1, M)
            h = self.cross_attn(self.norm_cross(x), context=context, mask=cross_mask,
                                cache=cache.cross_attn if cache is not None else None)
            if self.gate is not None:
                if context_mask is not None:
                    h = h * context_mask.any(1)[:, None, None].to(x.dtype)  # no context: nothing from it
                h = torch.tanh(self.gate) * h
            x = x + h
        if self.modulated:
            return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` over ``(B, T, C)``; keyword options go to every block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 activation: str = "gelu", eps: float = 1e-5, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, activation, eps, **block_options)
                                    for _ in range(depth))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, causal: bool = False, *,
                mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``key_mask`` (B, T) marks real tokens of ``x``; ``mask`` (B|1, 1, T, S), e.g. from
        :func:`segment_mask`, replaces the one built from ``key_mask`` and ``causal``.

        With a ``cache``, ``x`` holds only the tokens after those cached: the cache keeps their
        keys, values and ``key_mask`` (all true when None), and they attend to every cached token.
        """
        if cache is not None:
            if key_mask is None:
                key_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            key_mask = cache.extend(key_mask)  # (B, S): every key, cached and new
        if mask is None:
            mask = attention_mask(key_mask, x.shape[1], causal)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, context=context, context_mask=context_mask, positions=positions,
                      cache=cache.blocks[i] if cache is not None else None)
        return x
