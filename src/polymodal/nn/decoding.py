"""Decoding written once: greedy, beam search and nucleus sampling over a step function.

A model offers ``step(ids, cache) -> logits (B, vocab)``: the next-token logits after ``ids``.
With a :class:`~polymodal.nn.layers.KVCache`, ``ids`` ``(B, t)`` are only the tokens the cache
has not seen (the whole prompt at the first step, then one token), so every new token costs
one position instead of the whole prefix. With ``cache=None`` the loops pass the whole
sequence every step and the model recomputes it: the peer the cached path is tested and
benchmarked against (the same tokens, more work).

Every loop takes ``ids`` ``(B, T)``: prompts left-padded with ``pad`` so all rows grow at the
right end; the model masks ``pad`` (in its cache too). A row that has ended goes on with
``pad``. Each returns the new tokens of every row, without the closing ``eos``. ``eos=None``
never stops early: exactly ``max_new`` tokens (for fair speed comparisons).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polymodal.nn.layers import KVCache

Step = Callable[[torch.Tensor, KVCache | None], torch.Tensor]
METHODS = ("greedy", "beam", "nucleus")  # the decodings a text-writing model offers by name


def _sample(step: Step, ids: torch.Tensor, choose: Callable[[torch.Tensor], torch.Tensor], max_new: int,
            eos: int | None, pad: int, cache: KVCache | None) -> list[list[int]]:
    """The loop greedy and nucleus share: ``choose(logits (B, V)) -> tokens (B,)``."""
    b = ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    new, feed = [], ids  # feed: what the model has not seen yet
    for _ in range(max_new):
        logits = step(feed if cache is not None else ids, cache)  # (B, V)
        token = choose(logits)
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        ids, feed = torch.cat([ids, token[:, None]], 1), token[:, None]
        if eos is not None:
            done |= token == eos
            if done.all():
                break
    seqs = torch.stack(new, 1).tolist() if new else [[] for _ in range(b)]
    return [s[: s.index(eos)] if eos in s else s for s in seqs]


@torch.no_grad()
def greedy(step: Step, ids: torch.Tensor, *, max_new: int, eos: int | None, pad: int,
           cache: KVCache | None = None) -> list[list[int]]:
    """The most likely token at every step."""
    return _sample(step, ids, lambda logits: logits.argmax(-1), max_new, eos, pad, cache)


@torch.no_grad()
def nucleus(step: Step, ids: torch.Tensor, *, max_new: int, eos: int | None, pad: int, top_p: float = 0.9,
            temperature: float = 1.0, generator: torch.Generator | None = None,
            cache: KVCache | None = None) -> list[list[int]]:
    """Sample from the smallest set of tokens whose probability (at ``temperature``) reaches ``top_p``."""

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / max(temperature, 1e-5), -1)
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(1, pick)[:, 0]

    return _sample(step, ids, choose, max_new, eos, pad, cache)


@torch.no_grad()
def beam(step: Step, ids: torch.Tensor, *, beams: int, max_new: int, eos: int, pad: int,
         cache: KVCache | None = None) -> list[list[int]]:
    """Beam search with ``beams`` beams per row; finished hypotheses rank by mean log-probability.

    Rows ``i * beams .. (i + 1) * beams - 1`` of the model's batch are row ``i``'s beams: the
    step function must serve ``B * beams`` rows (repeat its conditioning with
    ``repeat_interleave``). After each step every beam continues one parent, and the cache is
    reordered to match. It stops once every row has ``beams`` finished hypotheses and none of
    its live beams could still beat the best of them.
    """
    k = beams
    b, t0 = ids.shape
    ids = ids.repeat_interleave(k, 0)  # (B*k, T)
    scores = torch.full((b, k), float("-inf"), device=ids.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    feed = ids
    for n in range(max_new):
        logp = torch.log_softmax(step(feed if cache is not None else ids, cache), -1)  # (B*k, V)
        v = logp.shape[-1]
        total = (scores[:, :, None] + logp.view(b, k, v)).view(b, -1)  # (B, k*V)
        top, index = total.topk(2 * k, -1)
        parent, token = index // v, index % v
        parents, tokens = [], []  # of every next beam, as rows of the batch
        next_scores = torch.full((b, k), float("-inf"), device=ids.device)
        for i in range(b):
            kept = 0
            for s, bm, tk in zip(top[i].tolist(), parent[i].tolist(), token[i].tolist(), strict=True):
                if s == float("-inf"):
                    break
                if tk == eos:
                    seq = ids[i * k + bm, t0:].tolist()
                    finished[i].append((s / (len(seq) + 1), seq))  # the eos counts in the length
                    continue
                if kept < k:
                    parents.append(i * k + bm)
                    tokens.append(tk)
                    next_scores[i, kept] = s
                    kept += 1
            while kept < k:  # pad with dead beams
                parents.append(i * k)
                tokens.append(pad)
                kept += 1
        order, new = torch.tensor(parents, device=ids.device), torch.tensor(tokens, device=ids.device)
        ids, scores, feed = torch.cat([ids[order], new[:, None]], 1), next_scores, new[:, None]
        if cache is not None:
            cache.reorder(order)
        best_alive = scores.max(1).values
        if all(len(finished[i]) >= k and max(f[0] for f in finished[i]) >= best_alive[i].item() / (n + 1)
               for i in range(b)):
            break
    out = []
    for i in range(b):
        if not finished[i]:  # nothing ended: take the best live beam
            j = int(scores[i].argmax())
            finished[i].append((0.0, [x for x in ids[i * k + j, t0:].tolist() if x != pad]))
        out.append(max(finished[i], key=lambda f: f[0])[1])
    return out
