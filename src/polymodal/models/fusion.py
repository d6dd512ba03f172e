"""Fusion classifiers: early, late and hybrid fusion of per-modality encoders.

Each input (a *tower*, :class:`~polymodal.nn.tower.Tower`: an encoder over one field of the
batch) becomes a sequence of token states with a mask. The strategies differ in where the modalities meet:

- ``early``: every tower's tokens, projected to one width and tagged with a modality
  embedding, form one sequence with a class token; a Transformer reads it all.
- ``late``: the towers meet only after their encoders. ``late_merge`` says how: each tower
  has its own head and their logits are merged (``mean`` over the modalities present, or
  ``learned`` weights); or their pooled embeddings meet in one head (``embedding``); or a
  fusion operator of :mod:`polymodal.nn.fusion` merges the encoders' features (``concat``,
  ``sum``, ``gated`` over pooled features; ``attention``, ``cross_attention``,
  ``cross_transformer`` over token states) and one head reads the result.
- ``hybrid``: the last tower's tokens (the question, say) pass through blocks that, at every
  depth, also attend to the other towers' tokens through a tanh-gated cross-attention that
  starts closed (as Flamingo does), so training begins from the single-modality model.
- ``single``: one tower and a head: the single-modality baselines.

A missing modality is a tower whose tokens are all masked: training drops each modality of
each sample with probability ``modality_dropout`` (never all of them), and at inference a
batch may simply lack a tower's field.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    check_encoder_specs,
    encoder_fields,
    encoder_image_size,
    evaluate_splits,
    load_saved,
    pretrained_standin,
    saved_config,
)
from polymodal.models.folder import write_model_folder
from polymodal.nn.encoders import INPUT_KIND, build_encoder
from polymodal.nn.fusion import FUSIONS, build_fusion, masked_mean
from polymodal.nn.layers import Block, Transformer, attention_mask
from polymodal.nn.tower import Tower, copy_matching_encoders

STRATEGIES = ("early", "late", "hybrid", "single")
LATE_MERGES = ("mean", "learned", "embedding", *FUSIONS)


@dataclass
class FusionConfig:
    towers: dict[str, dict] = field(default_factory=lambda: {
        "image": {"type": "cnn", "preset": "small"}, "question": {"type": "audio", "preset": "small"}},
        metadata={"check": check_encoder_specs})
    # batch field -> encoder spec; for hybrid the last tower is the stream that attends to the others
    strategy: str = "early"  # early | late | hybrid | single
    width: int = 192  # width of the fusion layers
    depth: int = 2  # fusion Transformer blocks (early), gated cross-attention blocks (hybrid) or
    # co-attention layers (late_merge cross_transformer)
    heads: int = 4
    classes: list[str] = field(default_factory=lambda: ["no", "yes"])  # label values, in logit order
    label_column: str = "fusion_label"  # metadata column holding the label
    multi_label: bool = False  # the column holds a list of classes per row: sigmoid outputs, BCE loss,
    # a sample is right when its whole set of labels is
    modality_dropout: float = 0.1  # chance of dropping each modality of a training sample
    freeze_encoders: bool = False  # keep the (pretrained) encoders fixed; train only the fusion layers
    fields: dict[str, str] = field(default_factory=dict)  # data fields read (name -> "modality[:column]");
    # empty: each tower's name, with its input kind's default column
    late_merge: str = "mean"  # late fusion (other strategies ignore it): mean of present modalities' logits | learned weights |
    # embedding: each tower's pooled embedding, L2-normalised, then one head on [e_1, e_2, e_1 * e_2] |
    # an operator of polymodal.nn.fusion on the encoders' features, then one head: concat | sum | gated (pooled
    # features) | attention | cross_attention (the last tower's tokens attend to the first's) | cross_transformer

    HEADS_DIVIDE_WIDTH = False  # heads split the width only in some strategies (the build checks)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.strategy == "single" and len(self.towers) != 1:
            raise ValueError("strategy 'single' takes exactly one tower")
        if self.strategy in ("early", "hybrid") and len(self.towers) < 2:
            raise ValueError(f"strategy {self.strategy!r} needs at least two towers")
        if self.late_merge not in LATE_MERGES:
            raise ValueError(f"unknown late_merge {self.late_merge!r}; choose from {LATE_MERGES}")
        pairwise = self.late_merge in ("embedding", "cross_attention")
        if pairwise and self.strategy == "late" and len(self.towers) != 2:
            raise ValueError(f"late_merge {self.late_merge!r} is late fusion of exactly two towers")

    @property
    def operator(self) -> str | None:
        """The :mod:`polymodal.nn.fusion` operator that merges the towers, if one does."""
        return self.late_merge if self.strategy == "late" and self.late_merge in FUSIONS else None


class FusionClassifier(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = c = config
        self.names = list(c.towers)
        # Each tower projects its tokens to the fusion width and tags them (an operator has its
        # own projections; late fusion of embeddings leaves them unused, but the parameter
        # counts in BENCHMARKS.md include them). Frozen encoders' features are cached per input
        # file (see _keys). Every encoder is built before any projection: the initialisation the
        # models measured in BENCHMARKS.md had.
        encoders = {n: build_encoder(spec) for n, spec in c.towers.items()}
        self.towers = nn.ModuleDict({
            n: Tower(n, spec, encoder=encoders[n], out_dim=None if c.operator else c.width,
                     modality_embedding=not c.operator, frozen=c.freeze_encoders)
            for n, spec in c.towers.items()})
        n_classes = len(c.classes)
        if c.strategy == "early":
            self.cls = nn.Parameter(torch.zeros(1, 1, c.width))
            self.fusion = Transformer(c.width, c.depth, c.heads)
            self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, n_classes))
        elif c.strategy == "hybrid":
            # self-attention, tanh-gated cross-attention to the other towers (closed at the start), MLP
            self.blocks = nn.ModuleList(Block(c.width, c.heads, cross_attention=True, cross_gate=True)
                                        for _ in range(c.depth))
            self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, n_classes))
        elif c.operator:  # the encoders' features merged by an operator of nn.fusion, one head
            reads = FUSIONS[c.operator].reads
            dims = {n: t.token_width if reads == "tokens" else t.width for n, t in self.towers.items()}
            options = {"heads": c.heads} if reads == "tokens" else {}
            if c.operator == "cross_attention":  # as in hybrid, the last tower attends to the other
                options.update(query=self.names[-1], context=self.names[0])
            if c.operator == "cross_transformer":
                options.update(depth=c.depth)
            self.merge = build_fusion(c.operator, dims, c.width, **options)
            self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, n_classes))
        elif c.strategy == "late" and c.late_merge == "embedding":  # late fusion of embeddings in one space
            self.projections = nn.ModuleDict({n: nn.Linear(self.towers[n].encoder.width, c.width, bias=False)
                                              for n in self.names})
            self.head = nn.Sequential(nn.Linear(3 * c.width, c.width), nn.GELU(), nn.Linear(c.width, n_classes))
        else:  # late, single: a head per tower
            self.heads = nn.ModuleDict({n: nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.width),
                                                         nn.GELU(), nn.Linear(c.width, n_classes))
                                        for n in self.names})
            self.merge_weights = nn.Parameter(torch.zeros(len(self.names)))

    def init_encoders_from(self, other) -> list[str]:
        """Copy each encoder from a tower of a contrastive model with the identical spec (and,
        for late fusion of embeddings of the same width, its projection)."""
        copied = []
        for name, match in copy_matching_encoders(self.towers, other.towers):
            copied.append(f"{name}<-{match}")
            if hasattr(self, "projections") and other.config.embed_dim == self.config.width:
                self.projections[name].load_state_dict(other.towers[match].projection.state_dict())
        return copied

    # ---- tokens of each tower ----

    def _column(self, name: str) -> str:
        from polymodal.data.dataset import DEFAULT_COLUMNS

        spec = self.config.fields.get(name) or INPUT_KIND[self.config.towers[name]["type"]]
        modality, _, column = spec.partition(":")
        return column or DEFAULT_COLUMNS[modality]

    def _keys(self, name: str, batch: dict) -> list | None:
        """The file (or text) each row's input to tower ``name`` came from: the key of its cached
        features while the encoders are frozen. Fixed encoders give the same states for the
        same file every epoch, so a fused model on frozen encoders pays for each input once and
        then trains at the speed of its fusion layers."""
        rows = batch.get("rows")
        if rows is None:
            return None
        column = self._column(name)
        return [r.get(column) for r in rows]

    def tokens(self, name: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, width)`` token states of one tower, projected and tagged, and their mask ``(B, T)``."""
        return self.towers[name].tokens(batch, self._keys(name, batch))

    def _drop_modalities(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training: mask whole modalities of some samples, never every modality of one."""
        p = self.config.modality_dropout
        if not self.training or p <= 0 or len(masks) < 2:
            return masks
        b = next(iter(masks.values())).shape[0]
        device = next(iter(masks.values())).device
        drop = torch.rand(b, len(masks), device=device) < p
        drop[drop.all(1), torch.randint(len(masks), (1,)).item()] = False  # keep one modality
        return {n: m & ~drop[:, i : i + 1] for i, (n, m) in enumerate(masks.items())}

    # ---- forward ----

    def forward(self, batch: dict) -> torch.Tensor:
        """Class logits ``(B, classes)`` from whichever towers' fields the batch has."""
        present = [n for n in self.names if n in batch]
        if not present:
            raise ValueError(f"the batch has none of this model's inputs {self.names}")
        if self.config.strategy == "late" and self.config.late_merge == "embedding":
            return self._embedding_logits(batch, present)
        if self.config.operator:
            return self._operator_logits(batch, present)
        states, masks = {}, {}
        for n in present:
            states[n], masks[n] = self.tokens(n, batch)
        masks = self._drop_modalities(masks)
        strategy = self.config.strategy
        if strategy == "early":
            b = next(iter(states.values())).shape[0]
            x = torch.cat([self.cls.expand(b, -1, -1), *states.values()], 1)
            mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), *masks.values()], 1)
            return self.head(self.fusion(x, key_mask=mask)[:, 0])
        if strategy == "hybrid":
            stream = self.names[-1]
            context_names = [n for n in present if n != stream]
            context = torch.cat([states[n] for n in context_names], 1) if context_names else None
            context_mask = torch.cat([masks[n] for n in context_names], 1) if context_names else None
            if stream not in states:  # no question: the context alone, pooled
                return self.head(masked_mean(context, context_mask))
            x = states[stream]
            self_mask = attention_mask(masks[stream], x.shape[1], causal=False)
            for block in self.blocks:
                x = block(x, self_mask, context=context, context_mask=context_mask)
            return self.head(masked_mean(x, masks[stream]))
        # late / single: per-modality logits, merged over the modalities each sample has
        logits = torch.stack([self.heads[n](masked_mean(states[n], masks[n])) for n in present], 1)  # (B, M, K)
        has = torch.stack([masks[n].any(1) for n in present], 1).to(logits.dtype)  # (B, M)
        if self.config.late_merge == "learned":
            weights = torch.softmax(self.merge_weights[[self.names.index(n) for n in present]], 0)
            has = has * weights
        return (logits * has[:, :, None]).sum(1) / has.sum(1, keepdim=True).clamp(min=1e-6)

    def _operator_logits(self, batch: dict, present: list[str]) -> torch.Tensor:
        """The present towers' encoder features (pooled or tokens, as the operator reads them)
        merged by the operator; a dropped modality is masked (a pooled feature is one token)."""
        features, masks = {}, {}
        for n in present:
            tower, keys = self.towers[n], self._keys(n, batch)
            if self.merge.reads == "tokens":
                features[n], masks[n] = tower.encoder_tokens(batch, keys)  # (B, T, C), (B, T)
            else:
                features[n] = tower.encoder_pooled(batch, keys)  # (B, C)
                masks[n] = torch.ones(features[n].shape[0], 1, dtype=torch.bool, device=features[n].device)
        return self.head(self.merge(features, self._drop_modalities(masks)))

    def _embedding_logits(self, batch: dict, present: list[str]) -> torch.Tensor:
        b = len(batch["rows"]) if "rows" in batch else batch[present[0]].shape[0]
        embeddings = []
        for n in self.names:
            if n not in batch:  # a missing modality contributes a zero embedding
                embeddings.append(next(self.parameters()).new_zeros(b, self.config.width))
                continue
            pooled = self.towers[n].encoder_pooled(batch, self._keys(n, batch))
            embeddings.append(F.normalize(self.projections[n](pooled), dim=-1))
        a, c = embeddings
        if self.training and self.config.modality_dropout > 0:
            keep = (torch.rand(b, 2, device=a.device) >= self.config.modality_dropout).to(a.dtype)
            keep[keep.sum(1) == 0, 0] = 1.0
            a, c = a * keep[:, :1], c * keep[:, 1:]
        return self.head(torch.cat([a, c, a * c], dim=-1))

    def labels(self, batch: dict) -> torch.Tensor:
        """Class indices ``(B,)``; multi-label: a multi-hot ``(B, classes)`` from a list per row."""
        column, classes = self.config.label_column, self.config.classes
        try:
            if not self.config.multi_label:
                return torch.tensor([classes.index(str(r[column])) for r in batch["rows"]])
            hot = torch.zeros(len(batch["rows"]), len(classes))
            for i, r in enumerate(batch["rows"]):
                values = r[column] if isinstance(r[column], list) else [r[column]]
                hot[i, [classes.index(str(v)) for v in values]] = 1.0
            return hot
        except (KeyError, ValueError) as e:
            raise ValueError(f"every row needs {column!r} with {'values' if self.config.multi_label else 'a value'} "
                             f"in {classes}: {e}") from e

    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per sample, whether the prediction is right (multi-label: the whole set of labels)."""
        if self.config.multi_label:
            return ((logits > 0).float() == labels).all(1)
        return logits.argmax(1) == labels

    # ---- the family (see polymodal.models.family) ----

    tasks = ("classify",)
    config_class = FusionConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> FusionClassifier:
        """The recipe's fields are remembered for evaluation; with ``init_from`` (a saved
        contrastive model), encoders with the same spec as one of its towers start from it."""
        from polymodal.models.clip import start_encoders_from

        spec = dict(spec)
        init_from = spec.pop("init_from", None)
        if "towers" in spec:
            spec["towers"] = build.sized(spec["towers"], "model.towers")
        model = cls(FusionConfig(**{**spec, "fields": spec.get("fields") or build.field_map()}))
        start_encoders_from(model, init_from)
        return model

    def fields(self) -> dict[str, str]:
        return encoder_fields(self.config.towers, self.config.fields)

    def input_size(self) -> int:
        return encoder_image_size(self.config.towers)

    def validator(self, items: list[dict], fields) -> Validator:
        """Accuracy on the validation items."""
        from polymodal.data.dataset import Collator

        def accuracy(model) -> dict[str, float]:
            correct, collate = 0, Collator(fields)
            for start in range(0, len(items), 500):
                batch = collate(items[start : start + 500])
                correct += model.hits(model(batch).cpu(), model.labels(batch)).sum().item()
            return {"accuracy": correct / max(len(items), 1)}

        return accuracy

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """Accuracy with every modality and with each one alone."""
        from polymodal.eval.understanding import fusion_metrics

        fields = self.fields()
        return evaluate_splits(data, splits, fields, options.image_size or self.input_size(),
                               lambda items: fusion_metrics(self, items, fields),
                               limit=options.limit, progress=options.progress)

    # ---- saving and loading ----

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return write_model_folder(directory, {"model_type": "fusion", **asdict(self.config)}, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FusionClassifier:
        """The config checked and the model sized and matched with its weights before anything is
        allocated (see :func:`~polymodal.models.family.load_saved`)."""
        config = saved_config(directory, "fusion", FusionConfig)
        standins = {n: pretrained_standin(spec) for n, spec in config.towers.items()}  # a MiniLM loads from disk
        counted = replace(config, towers={n: spec for n, (spec, _) in standins.items()})
        return load_saved(directory, lambda: cls(config), estimate=lambda: cls(counted),
                          extra_params=sum(n for _, n in standins.values()))

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(batch)
        labels = self.labels(batch).to(logits.device)
        if self.config.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        else:
            loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "accuracy": self.hits(logits, labels).float().mean().detach()}
