"""Fusion operators: many modalities' features in, one fused representation out.

Every operator has the same interface::

    fused = op(features, masks)   # (B, out_dim)

``features`` maps a modality name to its features, either pooled ``(B, C_m)`` or a token
sequence ``(B, T_m, C_m)``; ``masks`` optionally maps a modality to ``(B, T_m)`` (True = real
token). A modality may be missing from ``features`` altogether (missing at inference time):
every operator then fuses what is there. Operators are built with the widths of the
modalities they may see (``dims``) and their output width. ``reads`` says which features an
operator is meant for: ``pooled`` ones (each modality one vector) or the ``tokens``; a model
feeds it those (:class:`~polymodal.models.fusion.FusionClassifier`, ``late_merge``).

| ``type``            | reads  | what it does                                                 |
| ------------------- | ------ | ------------------------------------------------------------ |
| ``concat``          | pooled | pool each, concatenate (zeros for a missing modality), project |
| ``sum``             | pooled | pool and project each, add                                   |
| ``gated``           | pooled | pool and project each, weigh by learned sigmoid gates, add   |
| ``attention``       | tokens | all tokens in one set (with modality embeddings), one learned query |
| ``cross_attention`` | tokens | one modality's tokens query another's, then pool             |
| ``cross_transformer``| tokens | co-attention layers: each modality's tokens attend to the others' |

A sample whose tokens of a modality are all masked (a modality dropped in training) gets
nothing from attending to them: the attention's update is zeroed for it, whatever the kernel
answers for a row with no keys.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.nn.encoders import masked_mean as _masked_mean
from polymodal.nn.layers import MLP, Attention


def as_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C)`` or ``(B, T, C)`` -> tokens ``(B, T, C)`` and a mask ``(B, T)``."""
    if x.ndim == 2:
        x = x[:, None]
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return x, mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of ``(B, T, C)`` (or ``(B, C)``) -> ``(B, C)``."""
    return _masked_mean(*as_tokens(x, mask))


def attend(attn: Attention, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``attn`` of ``x`` (B, T, C) to ``context`` (self-attention when None) whose real tokens
    are ``mask`` (B, S); zero for a sample with no real token to attend to."""
    out = attn(x, context=context, mask=mask[:, None, None, :])
    return out * mask.any(1)[:, None, None].to(out.dtype)


def _batch_size(features: dict[str, torch.Tensor]) -> int:
    if not features:
        raise ValueError("fusion needs at least one modality's features")
    return next(iter(features.values())).shape[0]


class ConcatFusion(nn.Module):
    reads = "pooled"

    def __init__(self, dims: dict[str, int], out_dim: int):
        super().__init__()
        self.dims = dict(dims)
        self.proj = nn.Linear(sum(dims.values()), out_dim)

    def forward(self, features, masks=None):
        masks = masks or {}
        b = _batch_size(features)
        ref = next(iter(features.values()))
        parts = [masked_mean(features[m], masks.get(m)) if m in features
                 else ref.new_zeros(b, d) for m, d in self.dims.items()]
        return self.proj(torch.cat(parts, dim=-1))


class SumFusion(nn.Module):
    reads = "pooled"

    def __init__(self, dims: dict[str, int], out_dim: int):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in dims.items()})

    def forward(self, features, masks=None):
        masks = masks or {}
        _batch_size(features)
        return sum(self.proj[m](masked_mean(x, masks.get(m))) for m, x in features.items())


class GatedFusion(nn.Module):
    """``sum_m sigmoid(g_m) * h_m``: each present modality's gate is computed from all present ones."""

    reads = "pooled"

    def __init__(self, dims: dict[str, int], out_dim: int):
        super().__init__()
        self.modalities = list(dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in dims.items()})
        self.gate = nn.Linear(out_dim * len(dims), len(dims))

    def forward(self, features, masks=None):
        masks = masks or {}
        b = _batch_size(features)
        ref = next(iter(features.values()))
        hidden = [self.proj[m](masked_mean(features[m], masks.get(m))) if m in features
                  else ref.new_zeros(b, self.proj[m].out_features) for m in self.modalities]
        present = torch.tensor([m in features for m in self.modalities], device=ref.device)
        gates = torch.sigmoid(self.gate(torch.cat(hidden, dim=-1))) * present  # (B, M)
        return sum(gates[:, i : i + 1] * h for i, h in enumerate(hidden))


class AttentionPoolFusion(nn.Module):
    """Every modality's tokens, projected and tagged with a modality embedding, pooled by one query."""

    reads = "tokens"

    def __init__(self, dims: dict[str, int], out_dim: int, heads: int = 4):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in dims.items()})
        self.modality_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(out_dim)) for m in dims})
        self.query = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim**-0.5)
        self.attn = Attention(out_dim, heads)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features, masks=None):
        masks = masks or {}
        b = _batch_size(features)
        tokens, keep = [], []
        for m, x in features.items():
            x, mask = as_tokens(x, masks.get(m))
            tokens.append(self.proj[m](x) + self.modality_embedding[m])
            keep.append(mask)
        context, mask = torch.cat(tokens, 1), torch.cat(keep, 1)  # (B, T, C), (B, T)
        pooled = attend(self.attn, self.query.expand(b, -1, -1), context, mask)
        return self.norm(pooled[:, 0])


class CrossAttentionFusion(nn.Module):
    """``query`` modality tokens attend to ``context`` modality tokens; residual, MLP, masked mean.

    Without the context modality it is the query modality alone; without the query modality,
    the context modality alone.
    """

    reads = "tokens"

    def __init__(self, dims: dict[str, int], out_dim: int, query: str, context: str, heads: int = 4):
        super().__init__()
        if query not in dims or context not in dims:
            raise ValueError(f"cross-attention needs {query!r} and {context!r} among {sorted(dims)}")
        self.query_name, self.context_name = query, context
        self.q_in = nn.Linear(dims[query], out_dim)
        self.c_in = nn.Linear(dims[context], out_dim)
        self.norm_q, self.norm_c = nn.LayerNorm(out_dim), nn.LayerNorm(out_dim)
        self.attn = Attention(out_dim, heads)
        self.norm_mlp = nn.LayerNorm(out_dim)
        self.mlp = MLP(out_dim, 4 * out_dim)

    def forward(self, features, masks=None):
        masks = masks or {}
        _batch_size(features)
        if self.query_name not in features:
            return masked_mean(self.c_in(as_tokens(features[self.context_name], None)[0]), masks.get(self.context_name))
        q, q_mask = as_tokens(features[self.query_name], masks.get(self.query_name))
        x = self.q_in(q)
        if self.context_name in features:
            c, c_mask = as_tokens(features[self.context_name], masks.get(self.context_name))
            x = x + attend(self.attn, self.norm_q(x), self.norm_c(self.c_in(c)), c_mask)
        x = x + self.mlp(self.norm_mlp(x))
        return masked_mean(x, q_mask)


class CoAttentionLayer(nn.Module):
    """Each stream attends to itself, then to the tokens of every other present stream."""

    def __init__(self, modalities: list[str], dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.ModuleDict({m: Attention(dim, heads) for m in modalities})
        self.cross_attn = nn.ModuleDict({m: Attention(dim, heads) for m in modalities})
        self.mlp = nn.ModuleDict({m: MLP(dim, 4 * dim) for m in modalities})
        self.norms = nn.ModuleDict({m: nn.ModuleList(nn.LayerNorm(dim) for _ in range(3)) for m in modalities})

    def forward(self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for m, x in streams.items():
            n1, n2, n3 = self.norms[m]
            x = x + attend(self.self_attn[m], n1(x), None, masks[m])
            others = [o for o in streams if o != m]
            if others:
                context = torch.cat([streams[o] for o in others], 1)
                c_mask = torch.cat([masks[o] for o in others], 1)
                x = x + attend(self.cross_attn[m], n2(x), context, c_mask)
            out[m] = x + self.mlp[m](n3(x))
        return out


class CrossModalTransformer(nn.Module):
    """Co-attention layers over per-modality token streams, then pooled streams concatenated."""

    reads = "tokens"

    def __init__(self, dims: dict[str, int], out_dim: int, depth: int = 2, heads: int = 4):
        super().__init__()
        self.modalities = list(dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in dims.items()})
        self.layers = nn.ModuleList(CoAttentionLayer(self.modalities, out_dim, heads) for _ in range(depth))
        self.out = nn.Linear(out_dim * len(dims), out_dim)

    def forward(self, features, masks=None):
        masks = masks or {}
        b = _batch_size(features)
        streams, keep = {}, {}
        for m, x in features.items():
            x, mask = as_tokens(x, masks.get(m))
            streams[m], keep[m] = self.proj[m](x), mask
        for layer in self.layers:
            streams = layer(streams, keep)
        ref = next(iter(streams.values()))
        pooled = [masked_mean(streams[m], keep[m]) if m in streams else ref.new_zeros(b, ref.shape[-1])
                  for m in self.modalities]
        return self.out(torch.cat(pooled, dim=-1))


FUSIONS = {
    "concat": ConcatFusion, "sum": SumFusion, "gated": GatedFusion, "attention": AttentionPoolFusion,
    "cross_attention": CrossAttentionFusion, "cross_transformer": CrossModalTransformer,
}


def build_fusion(kind: str, dims: dict[str, int], out_dim: int, **options) -> nn.Module:
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; choose from {sorted(FUSIONS)}")
    return FUSIONS[kind](dims, out_dim, **options)
