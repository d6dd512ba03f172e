"""Contrastive models: one embedding space for two or more modalities.

CLIP (image-text), CLAP (audio-text) and bound models (image, text and audio in one space
through a shared anchor, as ImageBind) are the same class with different ``towers`` and
``pairs``. Each tower (:class:`~polymodal.nn.tower.Tower`) is an encoder from
:mod:`polymodal.nn.encoders` followed by a linear projection of its pooled feature to
``embed_dim``; embeddings are L2-normalised; each pair of modalities is trained
with the symmetric InfoNCE loss at a learnable temperature, initialised to 0.07 and clamped so
the logit scale never exceeds 100, as CLIP does.

With several processes, embeddings are gathered across them *with gradients*
(:func:`gather_with_grad`), so every process computes the loss of the global batch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polymodal.modalities.image import ImageTransform
from polymodal.modalities.text import TextTokenizer
from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    check_encoder_specs,
    evaluate_splits,
    load_saved,
    pretrained_standin,
    saved_config,
)
from polymodal.models.folder import read_tokenizer, write_model_folder
from polymodal.nn.encoders import INPUT_KIND
from polymodal.nn.tower import Tower, same_encoder

log = logging.getLogger("polymodal.models")


@dataclass
class ContrastiveConfig:
    towers: dict[str, dict] = field(default_factory=lambda: {
        "image": {"type": "cnn", "preset": "small"}, "text": {"type": "text", "preset": "small"}},
        metadata={"check": check_encoder_specs})
    # modality -> encoder spec (see polymodal.nn.encoders); "minilm" is the locked MiniLM text tower
    pairs: list[tuple[str, str]] = field(default_factory=lambda: [("image", "text")])  # trained pairs
    embed_dim: int = 256  # width of the shared space
    init_temperature: float = 0.07  # logit scale starts at 1 / this
    max_logit_scale: float = 100.0  # the logit scale is clamped to at most this
    locked: list[str] = field(default_factory=list)  # towers whose encoder is frozen, projection trained (LiT)
    frozen: list[str] = field(default_factory=list)  # towers frozen whole, encoder and projection (anchors)

    def __post_init__(self):
        self.pairs = [tuple(p) for p in self.pairs]
        for a, b in self.pairs:
            for m in (a, b):
                if m not in self.towers:
                    raise ValueError(f"pair ({a}, {b}) names {m!r}, which has no tower")
        for m in [*self.locked, *self.frozen]:
            if m not in self.towers:
                raise ValueError(f"locked or frozen tower {m!r} does not exist")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All processes' ``x`` concatenated in rank order; gradients flow back to each piece."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised ``a`` and ``b`` (N, D); row i of each is a pair.

    Local rows are scored against the global batch gathered from all processes; the result is
    the mean over the global batch, so it equals the single-process loss on the same batch.
    """
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    targets = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits_ab = logit_scale * a @ all_b.T  # (n, N)
    logits_ba = logit_scale * b @ all_a.T
    # Mean over local rows; DDP's gradient averaging over processes then gives the gradient of
    # the global-batch loss (all_gather's backward sums each process's share back to its owner).
    return (F.cross_entropy(logits_ab, targets) + F.cross_entropy(logits_ba, targets)) / 2


class ContrastiveModel(nn.Module):
    def __init__(self, config: ContrastiveConfig, tokenizer: TextTokenizer | None = None,
                 image_transform: ImageTransform | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        # how an image file becomes the image tower's input; a Hugging Face folder brings its own
        self.image_transform = image_transform or ImageTransform(self.image_size)
        # A fixed encoder gives the same features for the same text: its tower caches them.
        self.towers = nn.ModuleDict({
            modality: Tower(modality, spec, tokenizer=tokenizer, out_dim=config.embed_dim, project="pooled",
                            bias=False, frozen=modality in self.fixed_encoders)
            for modality, spec in config.towers.items()})
        for modality in config.frozen:
            self.towers[modality].projection.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    # ---- embedding ----

    def encode(self, modality: str, batch: dict) -> torch.Tensor:
        """Unnormalised features ``(B, embed_dim)`` of ``modality`` from a collated batch (see
        Collator); a fixed text tower reads raw texts through its cache."""
        return self.towers[modality].pooled(batch)

    def input_kind(self, tower: str) -> str:
        """What the tower reads: image, text, audio or video."""
        return INPUT_KIND[self.config.towers[tower]["type"]]

    def tower_reading(self, kind: str) -> str | None:
        """The first tower that reads ``kind`` input, or None."""
        return next((m for m in self.config.towers if self.input_kind(m) == kind), None)

    @property
    def image_size(self) -> int:
        tower = self.tower_reading("image")
        return self.config.towers[tower].get("image_size", 64) if tower else 64

    @property
    def fixed_encoders(self) -> list[str]:
        """Towers whose encoder is fixed (locked or frozen): no gradients, always in eval mode."""
        return list(dict.fromkeys([*self.config.locked, *self.config.frozen]))

    def embed(self, modality: str, batch: dict) -> torch.Tensor:
        """L2-normalised embeddings ``(B, embed_dim)``."""
        return F.normalize(self.encode(modality, batch), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str], modality: str = "text") -> torch.Tensor:
        return self.embed(modality, {modality: list(texts)})

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor, modality: str = "image") -> torch.Tensor:
        return self.embed(modality, {modality: images.to(self.logit_scale.device)})

    @torch.no_grad()
    def embed_audio(self, mel: torch.Tensor, mask: torch.Tensor | None = None, modality: str = "audio") -> torch.Tensor:
        return self.embed(modality, {modality: mel, f"{modality}_mask": mask})

    # ---- training ----

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        needed = {m for pair in self.config.pairs for m in pair}
        embeddings = {m: self.embed(m, batch) for m in needed}
        scale = self.scale()
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for a, b in self.config.pairs:
            pair_loss = contrastive_loss(embeddings[a], embeddings[b], scale)
            out[f"loss_{a}_{b}"] = pair_loss.detach()
            total = total + pair_loss
        out["loss"] = total / len(self.config.pairs)
        out["logit_scale"] = scale.detach()
        return out

    def init_towers_from(self, other: ContrastiveModel) -> list[str]:
        """Copy the encoder and projection of every tower ``other`` has with the same spec (or a
        spec that fills to the same encoder: a model saved before recipes filled in each image
        encoder's ``image_size`` still starts one that reads the same size)."""
        copied = []
        for modality in self.config.towers:
            if (modality in other.towers and same_encoder(self.towers[modality], other.towers[modality])
                    and other.config.embed_dim == self.config.embed_dim):
                self.towers[modality].load_state_dict(other.towers[modality].state_dict())
                copied.append(modality)
        return copied

    # ---- the family (see polymodal.models.family) ----

    tasks = ("embed",)
    config_class = ContrastiveConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> ContrastiveModel:
        """A text tower gets a tokenizer trained on the training split, or the one of the model
        named by ``init_from``, whose towers with the same spec then start this one."""
        spec = dict(spec)
        init_from = spec.pop("init_from", None)
        if "towers" in spec:
            spec["towers"] = build.sized(spec["towers"], "model.towers")
        config = ContrastiveConfig(**spec)
        base = cls.from_pretrained(init_from) if init_from else None
        tokenizer = base.tokenizer if base is not None else None
        if tokenizer is None and any(t.get("type") == "text" for t in config.towers.values()):
            tokenizer = build.tokenizer()
        model = cls(config, tokenizer)
        if base is not None:
            copied = model.init_towers_from(base)
            log.info("towers %s start from %s", copied, init_from)
            warn_unmatched(model.towers, copied, base.towers, init_from)
        return model

    def fields(self) -> dict[str, str]:
        """Batch fields for each tower: tower name -> the kind of input it reads (default column)."""
        return {tower: self.input_kind(tower) for tower in self.config.towers}

    def input_size(self) -> int:
        return self.image_size

    def validator(self, items: list[dict], fields) -> Validator:
        """Recall@1/5 of each trained pair on the validation items."""
        from polymodal.eval.contrastive import pair_retrieval

        return lambda model: pair_retrieval(model, items, fields)

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """Retrieval both ways for every pair of towers and zero-shot classification, on at most
        ``options.limit`` samples a split (1,000 by default: the retrieval gallery), with the
        metrics the data set brings of its own (:mod:`polymodal.eval.datasets`)."""
        from polymodal.eval.contrastive import contrastive_metrics
        from polymodal.eval.datasets import dataset_metrics

        fields = self.fields()
        transform = ImageTransform(options.image_size) if options.image_size else self.image_transform
        dataset = dataset_metrics(data)
        return evaluate_splits(data, splits, fields, transform,
                               lambda items: contrastive_metrics(self, items, fields, options.class_names,
                                                                 dataset=dataset),
                               limit=1000 if options.limit is None else options.limit, progress=options.progress)

    # ---- saving and loading ----

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` atomically."""
        config = {"model_type": "contrastive", "towers": self.config.towers,
                  "pairs": [list(p) for p in self.config.pairs], "embed_dim": self.config.embed_dim,
                  "init_temperature": self.config.init_temperature,
                  "max_logit_scale": self.config.max_logit_scale, "locked": self.config.locked,
                  "frozen": self.config.frozen}
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(self._locked_prefixes())}
        tokenizer = self.tokenizer
        return write_model_folder(directory, config, state,
                                  extra=tokenizer.save_pretrained if tokenizer is not None else None)

    def _locked_prefixes(self) -> tuple[str, ...]:
        return model_locked_prefixes(self.config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ContrastiveModel:
        directory = Path(directory)
        from polymodal.models.hf_clip import hf_image_transform, is_hf_clip, read_hf_clip

        if is_hf_clip(directory):  # a transformers CLIPModel folder, converted tensor by tensor
            settings, tokenizer, state = read_hf_clip(directory)
            image_size = settings["towers"]["image"]["image_size"]
            model = cls(ContrastiveConfig(**settings), tokenizer, hf_image_transform(directory, image_size))
            model.load_state_dict(state, strict=True)
            return model.eval()
        # the config checked and the model sized and matched with its weights before anything is
        # allocated (see polymodal.models.family.load_saved)
        config = saved_config(directory, "contrastive", ContrastiveConfig)
        tokenizer = read_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
        # a locked MiniLM loads from disk: on the meta device a stand-in of its width is counted
        standins = {m: pretrained_standin(spec) for m, spec in config.towers.items()}
        counted = replace(config, towers={m: spec for m, (spec, _) in standins.items()})
        locked = model_locked_prefixes(config)
        return load_saved(directory, lambda: cls(config, tokenizer), estimate=lambda: cls(counted, tokenizer),
                          extra_params=sum(n for _, n in standins.values()),
                          saved=lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith(locked)})


def model_locked_prefixes(config: ContrastiveConfig) -> tuple[str, ...]:
    """State-dict prefixes a saved model leaves out: the locked MiniLM weights ship with their
    package; they are not copied into every model."""
    return tuple(f"towers.{m}.encoder." for m, s in config.towers.items() if s.get("type") == "minilm")


def start_encoders_from(model: nn.Module, init_from: str | os.PathLike | None) -> None:
    """With ``init_from`` (a saved contrastive model), start each encoder of ``model`` (a captioner
    or fusion classifier: ``init_encoders_from``) that has the same spec as one of its towers."""
    if init_from:
        base = ContrastiveModel.from_pretrained(init_from)
        copied = model.init_encoders_from(base)
        log.info("encoders %s start from %s", copied, init_from)
        warn_unmatched(model.towers, [c.split("<-")[0] for c in copied], base.towers, init_from)


def warn_unmatched(towers, copied: list[str], others, init_from) -> None:
    """A tower that ``init_from`` has under the same name but could not start (its encoder is built
    otherwise, e.g. for another image size) trains from random weights: say so, with both specs,
    instead of leaving it to an info line (a frozen one would stay random)."""
    for name in towers:
        if name in others and name not in copied:
            log.warning("tower %r does NOT start from %s: its encoder differs (%s here, %s there); it starts "
                        "from random weights", name, init_from, towers[name].spec, others[name].spec)
