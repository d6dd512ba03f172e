"""A tower: one input field of a model, its encoder, and what the model puts on its tokens.

Every model that reads images, text, sound or video (contrastive, fusion, captioner, the text
encoder of text-to-image) reads each input through a :class:`Tower`:

- the **encoder** (:mod:`polymodal.nn.encoders`): ``tokens`` ``(B, T, C)`` and pooled ``(B, C)``;
- an optional **projection** (a Linear to the model's width) of the tokens (fusion, captioner)
  or of the pooled feature (contrastive: into the shared space);
- an optional **modality embedding** added to every token, so a model that mixes towers' tokens
  knows which tower each came from, and optional **learned positions** (the captioner's image
  tokens);
- a **cache of frozen features**: a fixed encoder gives the same features for the same input
  every epoch, so each input (named by a key the caller gives: its file, or a text) is encoded
  once and then read back (:class:`FeatureCache`, bounded).

:meth:`Tower.inputs` is the one place that knows which batch fields a kind of input comes in
(see :class:`~polymodal.data.dataset.Collator`): image ``NAME``; audio ``NAME`` and
``NAME_mask``; text ``NAME_ids`` / ``NAME_mask``, or the raw strings in ``NAME`` (tokenised
here); video ``NAME``, ``NAME_audio`` and ``NAME_audio_mask``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from polymodal.nn.encoders import INPUT_KIND, VideoInput, build_encoder

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB of features per tower: 700,000 pooled MiniLM features (1.5 kB
# each), or the token states of 36,000 three-second clips through the bind recipe's audio tower (29 kB)
CHUNK = 256  # inputs encoded at once when filling the cache


class FeatureCache:
    """Tensors by key, at most ``max_bytes`` of them; the least recently used go first.

    ``max_bytes`` 0 turns the cache off (nothing is kept). A model trains on frozen features at
    the speed of its own layers while the data set's features fit; beyond that, the oldest are
    dropped and encoded again when they come back.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"cache size must be at least 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0  # held now
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def build_tower_encoder(spec: dict, tokenizer=None) -> nn.Module:
    """The encoder of ``spec``; a trained text encoder gets ``tokenizer`` and its vocabulary size."""
    if spec.get("type") == "text":
        if tokenizer is None:
            raise ValueError("a text tower needs a tokenizer")
        return build_encoder({**spec, "vocab_size": tokenizer.vocab_size}, tokenizer=tokenizer)
    return build_encoder(spec)


class Tower(nn.Module):
    """One input field ``name`` of a batch, read by the encoder of ``spec``.

    - ``encoder``: an encoder built already (e.g. taken from another model); else built from
      ``spec`` (``tokenizer``: a trained text encoder's).
    - ``out_dim``: width of a Linear ``projection`` (``bias`` or not) of the encoder's tokens
      (``project="tokens"``) or of its pooled feature (``project="pooled"``); None: no projection.
    - ``modality_embedding``: a learned vector (zeros at first) added to every token.
    - ``positions``: a table of that many learned positions added to the tokens (before the
      modality embedding), for encoders whose tokens carry no position a model can read.
    - ``frozen``: the encoder is fixed (no gradients, always in eval mode) and its features are
      cached by the keys the caller gives (a text tower's raw strings key themselves), at most
      ``cache_bytes`` of them.
    """

    def __init__(self, name: str, spec: dict, *, tokenizer=None, encoder: nn.Module | None = None,
                 out_dim: int | None = None, project: str = "tokens", bias: bool = True,
                 modality_embedding: bool = False, positions: int = 0, frozen: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        super().__init__()
        if spec.get("type") not in INPUT_KIND:
            raise ValueError(f"tower {name!r}: unknown encoder type {spec.get('type')!r}; "
                             f"choose from {sorted(INPUT_KIND)}")
        if project not in ("tokens", "pooled"):
            raise ValueError(f"tower {name!r}: project must be tokens or pooled, got {project!r}")
        self.name, self.spec, self.kind = name, dict(spec), INPUT_KIND[spec["type"]]
        self.project, self.frozen = project, frozen
        self.encoder = encoder if encoder is not None else build_tower_encoder(spec, tokenizer)
        self.projection = None
        if out_dim is not None:
            in_dim = self.encoder.token_width if project == "tokens" else self.encoder.width
            self.projection = nn.Linear(in_dim, out_dim, bias=bias)
        dim = self.token_width
        self.modality_embedding = nn.Parameter(torch.zeros(dim)) if modality_embedding else None
        self.position = nn.Parameter(torch.randn(positions, dim) * 0.02) if positions else None
        self.cache = FeatureCache(cache_bytes)
        if frozen:
            self.encoder.requires_grad_(False).eval()

    @property
    def token_width(self) -> int:
        """Width of :meth:`tokens`."""
        projected = self.projection is not None and self.project == "tokens"
        return self.projection.out_features if projected else self.encoder.token_width

    @property
    def width(self) -> int:
        """Width of :meth:`pooled`."""
        projected = self.projection is not None and self.project == "pooled"
        return self.projection.out_features if projected else self.encoder.width

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a fixed encoder keeps its normalisation statistics and has no dropout
            self.encoder.eval()
        return self

    # ---- reading a batch ----

    def inputs(self, batch: dict) -> tuple[object, torch.Tensor | None]:
        """The encoder's ``(x, mask)`` from the batch fields of this tower (see the module doc)."""
        n = self.name
        if self.kind == "text":
            if f"{n}_ids" in batch:  # tokenised already
                return batch[f"{n}_ids"], batch[f"{n}_mask"]
            encoded = self.encoder.tokenize(list(batch[n]))
            return encoded["ids"].to(self.device), encoded["mask"].to(self.device)
        if self.kind == "video":
            return VideoInput(batch[n], batch.get(f"{n}_audio"), batch.get(f"{n}_audio_mask")), batch.get(f"{n}_mask")
        return batch[n], batch.get(f"{n}_mask")

    def _keys(self, batch: dict, keys: Sequence[Hashable] | None) -> list[Hashable] | None:
        """The cache keys of the batch's inputs, or None where features are not cached."""
        if not self.frozen or self.cache.max_bytes == 0:
            return None
        if keys is None and self.kind == "text" and f"{self.name}_ids" not in batch:
            keys = list(batch[self.name])  # a text is its own identity
        if keys is None or any(k is None for k in keys):
            return None
        return list(keys)

    # ---- the encoder's features, through the cache ----

    def encoder_tokens(self, batch: dict, keys: Sequence[Hashable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's own token states ``(B, T, C)`` and mask ``(B, T)``.

        With a frozen encoder and keys, a cached input comes back with its real tokens first and
        the padding after them.
        """
        keys = self._keys(batch, keys)
        if keys is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                return self.encoder.tokens(*self.inputs(batch))

        def real_tokens(x, mask) -> list[torch.Tensor]:
            states, mask = self.encoder.tokens(x, mask)
            return [s[m] for s, m in zip(states, mask, strict=True)]  # (T_i, C) each

        rows = self._cached("tokens", batch, keys, real_tokens)
        lengths = torch.tensor([len(r) for r in rows])
        states = pad_sequence(rows, batch_first=True)  # (B, T, C)
        mask = torch.arange(states.shape[1])[None] < lengths[:, None]  # (B, T)
        return states.to(self.device), mask.to(self.device)

    def encoder_pooled(self, batch: dict, keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """The encoder's pooled features ``(B, C)``."""
        keys = self._keys(batch, keys)
        if keys is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                return self.encoder(*self.inputs(batch))
        rows = self._cached("pooled", batch, keys, lambda x, mask: list(self.encoder(x, mask)))
        return torch.stack(rows).to(self.device)

    @torch.no_grad()
    def _cached(self, what: str, batch: dict, keys: list[Hashable],
                compute: Callable[[object, torch.Tensor | None], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``compute(x, mask)`` per input, each distinct key encoded once while it stays cached."""
        found = {}
        for key in dict.fromkeys(keys):
            value = self.cache.get((what, key))
            if value is not None:
                found[key] = value
        first = {}  # each missing key's first row
        for i, key in enumerate(keys):
            if key not in found:
                first.setdefault(key, i)
        if first:
            x, mask = self.inputs(batch)
            missing = list(first.items())
            for start in range(0, len(missing), CHUNK):
                chunk = missing[start : start + CHUNK]
                index = torch.tensor([i for _, i in chunk])
                values = compute(_select(x, index), None if mask is None else _select(mask, index))
                for (key, _), value in zip(chunk, values, strict=True):
                    found[key] = value.detach().cpu()
                    self.cache.put((what, key), found[key])
        return [found[k] for k in keys]

    # ---- what the model reads ----

    def tokens(self, batch: dict, keys: Sequence[Hashable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, T, token_width)``: the encoder's, projected, plus positions and the
        modality embedding where the tower has them; and their mask ``(B, T)``."""
        x, mask = self.encoder_tokens(batch, keys)
        if self.projection is not None and self.project == "tokens":
            x = self.projection(x)
        if self.position is not None:
            if x.shape[1] > len(self.position):
                raise ValueError(f"tower {self.name!r}: {x.shape[1]} tokens, but only {len(self.position)} positions")
            x = x + self.position[: x.shape[1]]
        if self.modality_embedding is not None:
            x = x + self.modality_embedding
        return x, mask

    def pooled(self, batch: dict, keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """Pooled features ``(B, width)``: the encoder's, projected where the projection reads them."""
        x = self.encoder_pooled(batch, keys)
        if self.projection is not None and self.project == "pooled":
            x = self.projection(x)
        return x


def _select(x, index: torch.Tensor):
    """Rows ``index`` of an encoder input or mask (a tensor, or a :class:`VideoInput` of them)."""
    if isinstance(x, VideoInput):
        return VideoInput(*(None if v is None else v[index.to(v.device)] for v in x))
    return x[index.to(x.device)]


def same_encoder(a: Tower, b: Tower) -> bool:
    """The two towers' encoders are built alike: the same spec, or specs that fill to the same
    config (one spelling a default that the other leaves out, e.g. an ``image_size``)."""
    if a.spec == b.spec:
        return True
    ca, cb = getattr(a.encoder, "config", None), getattr(b.encoder, "config", None)
    return ca is not None and type(ca) is type(cb) and ca == cb


def copy_matching_encoders(towers: nn.ModuleDict, others: nn.ModuleDict) -> list[tuple[str, str]]:
    """Load each tower's encoder from the first of ``others`` with the identical spec (e.g. a
    saved contrastive model's towers); returns the ``(tower, other tower)`` pairs copied."""
    copied = []
    for name, tower in towers.items():
        match = next((m for m, other in others.items() if same_encoder(other, tower)), None)
        if match is not None:
            tower.encoder.load_state_dict(others[match].encoder.state_dict())
            copied.append((name, match))
    return copied
