"""Cross-modal retrieval metrics on paired embeddings."""

from __future__ import annotations

import torch


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Query i's match is candidate i. Both L2-normalised ``(N, D)``; returns ``{"R@k": ...}``.

    Ties are broken against the query: a candidate scoring equal to the match ranks above it.
    """
    scores = queries @ candidates.T  # (N, N)
    true = scores.diagonal()[:, None]
    rank = (scores >= true).sum(1) - 1  # candidates at least as good as the match, excluding it
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions, keyed ``"text->image R@1"`` and so on."""
    out = {}
    for q, c, qn, cn in ((a, b, name_a, name_b), (b, a, name_b, name_a)):
        for key, value in recall_at_k(q, c, ks).items():
            out[f"{qn}->{cn} {key}"] = value
    return out
