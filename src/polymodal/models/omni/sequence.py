"""The omni model's settings and sequences: :class:`OmniConfig`, the segments of an example
(:class:`OmniExample`), packed batches (:class:`Interleaved`), training examples from the shapes
world's rows (:func:`examples_from_rows`) and the KV cache that remembers segments
(:class:`OmniCache`). The design: :mod:`polymodal.models.omni`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from polymodal.data.scene import SceneObject
from polymodal.data.shapes import caption
from polymodal.modalities.text import TextTokenizer
from polymodal.models.family import (
    check_diffusion_settings,
    check_drawing_settings,
)
from polymodal.nn.diffusion import DiffusionConfig
from polymodal.nn.encoders import config_from_spec
from polymodal.nn.layers import KVCache

IMAGE_KINDS = ("vq", "latent")
LAYOUTS = ("dense", "mot")
PATCHES = ("linear", "conv")
TIME_CONDITIONINGS = ("input", "adaln")
IMAGE_POSITIONS = ("learned", "sincos")
ROTARIES = ("1d", "2d")
TEXT, IMAGE = 0, 1  # modality ids; in ``mot`` also the index of each block's parameter set
AUTOENCODER_FOLDER = "autoencoder"  # subfolder of a saved model holding its autoencoder
# Transfusion's diffusion: epsilon prediction, cosine schedule, a plain mean squared error. The
# sampler clamps its clean-sample estimates to +-4.5: the latents have unit spread (latent_scale),
# 99.9% of training latents lie inside +-5.2; without it the first step (alpha_bar 2e-9) made
# latents of standard deviation ~1,000. 4.5 drew the best Frechet distance of 3.0 / 4.5 / 7.0 on
# validation prompts (BENCHMARKS.md, "Transfusion on the shapes world")
DIFFUSION_DEFAULTS = {"prediction": "epsilon", "schedule": "cosine", "weighting": "none", "clip_sample": True,
                      "clip_sample_range": 4.5}
TOKEN_CACHE_LIMIT = 50_000  # training images whose codes or latents are kept (an 8x8x4 latent grid is
# 1 KB: at most about 50 MB); images beyond it are encoded each time they come
VALIDATION_LOSS_ITEMS = 250  # validation items whose losses are scored during training
VALIDATION_WRITTEN_ITEMS = 32  # of those, items captioned (and asked their questions) during training



@dataclass
class OmniConfig:
    image: str = "latent"  # vq (Chameleon: codes in the vocabulary) | latent (Transfusion: diffusion on latents)
    layout: str = "dense"  # dense (shared parameters) | mot (per-modality norms, projections and MLPs)
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True  # LayerNorm on each head's queries and keys (Chameleon's fix for diverging logits)
    rotary_base: float = 10_000.0  # rotary positions over the whole sequence
    rotary: str = "1d"  # 1d (every token turned by its place in the sequence) | 2d (image tokens: of each
    # head's channel pairs, every third turned by the image's place in the sequence, the others by the
    # cell's row or its column, in turn, counted from there; text as 1d): attention between cells sees
    # their offset on the grid, not in a raster line, as multi-axis RoPE in vision-language models
    context_length: int = 128  # longest sequence, image tokens and <boi>/<eoi> included
    vocab_size: int | None = None  # of the text tokenizer (None: whatever it has; the builder records it)
    z_loss: float = 1e-5  # weight of log^2 Z of the next-token logits (both image kinds)
    diffusion_weight: float = 5.0  # latent: lambda, the weight of the diffusion loss against the text loss
    diffusion: dict = field(default_factory=dict, metadata={"check": check_diffusion_settings})
    drawing: dict = field(default_factory=dict, metadata={"check": check_drawing_settings})  # how it draws when
    # not told: guidance, guidance_interval, guidance_outside, steps, best_of (DrawingSettings)
    # latent: DiffusionConfig settings over DIFFUSION_DEFAULTS (epsilon, cosine, unweighted)
    latent_channels: int = 4  # latent: channels of a latent cell (the autoencoder's)
    patch: str = "linear"  # latent: how cells become tokens and tokens predictions: linear (one map a
    # cell) | conv (two 3x3 convolutions over the latent grid each way, the paper's U-Net patch layers
    # in small: a token sees its neighbouring cells)
    time_conditioning: str = "input"  # latent: how image tokens know their noise level: input (its
    # embedding added to each token, as the paper) | adaln (also every block's norms on image tokens
    # scaled and shifted and their residual updates scaled by it, as DiT's adaLN; text untouched)
    text_condition: bool = False  # latent: an image's condition (its timestep's, added to its tokens, and
    # with adaln the blocks' modulation) also carries the mean input embedding of the text before it in
    # its row, as DiT's pooled text: every image token gets its prompt in one vector, not only through
    # attention
    image_positions: str = "learned"  # how a cell's learned 2-D place embedding starts: learned (small random
    # values) | sincos (DiT's fixed 2-D sine-cosine codes, so neighbouring cells start out alike)
    align_encoder: str | None = None  # latent: a saved model with an image feature map (a detector) whose
    # features of each clean training image the image tokens' hidden states after ``align_depth``
    # blocks are taught to predict, through a small MLP (REPA, Yu et al. 2024): the denoiser learns what
    # is in the picture, not only its pixels. Training only: a saved model needs no encoder
    align_depth: int = 2  # blocks before the aligned hidden states
    align_weight: float = 0.5  # weight of the alignment loss (1 - cosine similarity, averaged over cells)
    codebook_size: int = 512  # vq: codes of the VQ autoencoder (extra tokens of the vocabulary)
    latent_grid: int = 8  # side of an image's latent grid (the autoencoder's; 8: 64 cells for a 32x32 image)
    patch_size: int = 1  # latent: cells a token takes along each side (2: a token holds a 2x2 block of
    # cells, C x 4 values; an 8x8 grid becomes 16 tokens), the paper's patch size: a quarter of the
    # image tokens for the same picture, so a drawing costs less of every step
    latent_scale: float | None = None  # latent: latents are multiplied by this (None: 1; the builder
    # measures 1 / the standard deviation of the training latents, so diffusion sees unit variance)
    image_first_share: float = 0.2  # share of image-caption pairs with the image first (captioning)
    image_first_max_timestep: int = 500  # latent: an image before its text is noised at most this much
    caption_dropout: float = 0.1  # chance a caption-first pair loses its caption (classifier-free guidance)
    recaption: float = 0.0  # share of caption-first pairs (drawings) whose caption is written afresh from the
    # row's scene graph (objects_column) by the world's caption generator, its sizes left out with chance
    # 1/2 and its places with chance 1/2: the model learns to draw from descriptions of every detail,
    # "a red circle and a blue star" as well as the world's full captions (which always give each
    # object's size and place). Rows without a scene graph keep their caption; captions read after an
    # image are never rewritten. At 0.5 the MoT recipe drew worse on test, colours and shapes too
    # (overall 0.20 / 0.13 against 0.33 / 0.28; BENCHMARKS.md, "The model checks its own drawings"): off
    vqa_share: float = 0.3  # share of training images (with questions) that give a question and answer
    questions_per_sample: int = 1  # a question-giving image gives up to this many of its questions, each
    # followed by its answer, in one sequence (in a random order; as many as fit context_length)
    autoencoder: str | None = None  # the saved autoencoder the images come from (a saved model keeps
    # its own copy in autoencoder/)
    image_size: int = 32  # side of the images, in pixels
    image_field: str = "image"  # batch field of the training images
    caption_column: str = "text"  # metadata column with the caption
    qa_column: str = "qa"  # metadata column with [{"question", "answer", "type"}, ...]
    objects_column: str = "objects"  # metadata column with the scene graph (for recaption)
    fields: dict[str, str] = field(default_factory=dict)  # data fields read when training

    PRESETS = {
        "tiny": dict(width=32, depth=2, heads=2),
        "small": dict(width=256, depth=6, heads=4),
        "base": dict(width=384, depth=8, heads=6),
    }

    def __post_init__(self):
        for name, value, known in (("image", self.image, IMAGE_KINDS), ("layout", self.layout, LAYOUTS),
                                   ("patch", self.patch, PATCHES), ("image_positions", self.image_positions, IMAGE_POSITIONS),
                                   ("rotary", self.rotary, ROTARIES),
                                   ("time_conditioning", self.time_conditioning, TIME_CONDITIONINGS)):
            if value not in known:
                raise ValueError(f"{name}: unknown {value!r}; choose from {list(known)}")
        for name in ("image_first_share", "caption_dropout", "vqa_share", "recaption"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share, from 0 to 1; got {getattr(self, name)}")
        for name in ("z_loss", "diffusion_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is a loss weight, at least 0; got {getattr(self, name)}")
        if self.image == "vq" and self.drawing.get("guidance_interval") is not None:
            raise ValueError("drawing.guidance_interval is a range of diffusion timesteps: it is for latent images; "
                             "a vq model samples its codes")
        if self.time_conditioning == "adaln" and self.image != "latent":
            raise ValueError("time_conditioning adaln needs image: latent (vq codes have no timestep)")
        if self.align_encoder is not None and self.image != "latent":
            raise ValueError("align_encoder needs image: latent (the hidden states of noised images are aligned)")
        if self.align_encoder is not None and not 1 <= self.align_depth <= self.depth:
            raise ValueError(f"align_depth must be from 1 to depth ({self.depth}), got {self.align_depth}")
        if self.align_weight < 0:
            raise ValueError(f"align_weight is a loss weight, at least 0; got {self.align_weight}")
        if self.text_condition and self.image != "latent":
            raise ValueError("text_condition needs image: latent (vq codes have no condition vector)")
        if self.questions_per_sample < 1:
            raise ValueError(f"questions_per_sample must be at least 1, got {self.questions_per_sample}")
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base must be positive, got {self.rotary_base}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"rotary positions need an even head width; {self.width} / {self.heads} heads is odd")
        if self.rotary == "2d" and self.width // self.heads < 6:
            raise ValueError(f"rotary 2d needs a head width of at least 6 (3 channel pairs); {self.width} / "
                             f"{self.heads} heads is {self.width // self.heads}")
        if not 1 <= self.latent_grid <= 256:
            raise ValueError(f"latent_grid must be from 1 to 256, got {self.latent_grid}")
        if self.patch_size < 1 or self.latent_grid % self.patch_size:
            raise ValueError(f"patch_size must be at least 1 and divide latent_grid {self.latent_grid}; got {self.patch_size}")
        if self.patch_size > 1 and self.image != "latent":
            raise ValueError("patch_size above 1 needs image: latent (vq codes are one token a cell)")
        if self.latent_scale is not None and self.latent_scale <= 0:
            raise ValueError(f"latent_scale must be positive, got {self.latent_scale}")
        shortest = self.image_tokens + 8  # an image, its frame and a few text tokens
        if self.context_length < shortest:
            raise ValueError(f"context_length {self.context_length} cannot hold an image of {self.image_tokens} "
                             f"tokens and its text; at least {shortest}")
        steps = self.diffusion_config().train_steps
        if not 0 <= self.image_first_max_timestep < steps:
            raise ValueError(f"image_first_max_timestep must be from 0 to {steps - 1}, got {self.image_first_max_timestep}")

    @property
    def image_tokens(self) -> int:
        """Tokens of one image (without its ``<boi>`` and ``<eoi>``)."""
        return self.token_grid**2

    @property
    def caption_tokens(self) -> int:
        """Most text tokens of a caption or prompt: the context less an image, ``<bos> <boi> <eoi>`` and two ``<eos>``."""
        return self.context_length - self.image_tokens - 6

    @property
    def token_grid(self) -> int:
        """Side of an image's grid of tokens: the latent grid over the patch size."""
        return self.latent_grid // self.patch_size

    @property
    def token_channels(self) -> int:
        """Values of one latent image token: the latent channels of its ``patch_size``-square cells."""
        return self.latent_channels * self.patch_size**2

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(**{**DIFFUSION_DEFAULTS, **self.diffusion})

    @classmethod
    def from_spec(cls, spec: dict) -> OmniConfig:
        """A config from a recipe's settings, with an optional size ``preset``."""
        return config_from_spec(cls, spec, "model")


# ---- examples and packed batches -----------------------------------------------------------

Segment = list[int] | torch.Tensor  # text token ids, or an image: codes (h, w) long | latents (C, h, w) float


@dataclass
class OmniExample:
    """One interleaved sequence: text ids (without ``<boi>``/``<eoi>``, which packing adds around
    each image) and images. ``max_timestep`` caps the noise on its images while training (an
    image that is read rather than drawn); None: the whole schedule."""

    segments: list[Segment]
    max_timestep: int | None = None


@dataclass
class Interleaved:
    """A packed batch: one tensor per position property, each ``(B, T)`` unless said otherwise.

    ``latents`` ``(B, T, C)`` and ``timesteps`` hold the (noisy) latent and noise level at latent
    image tokens (zeros elsewhere; None for ``vq``). For training, ``image_index`` ``(N, cells)``
    is the flat position (in ``B * T``) of every token of each of the batch's ``N`` images,
    ``clean`` ``(N, cells, C)`` their clean latents and ``max_timestep`` ``(N,)`` their noise cap.
    """

    ids: torch.Tensor  # token ids; placeholders (<pad>) at latent image tokens
    modality: torch.Tensor  # 0 text, 1 image
    segment: torch.Tensor  # 0 text, k on the tokens of the row's k-th image
    cell: torch.Tensor  # the latent cell of an image token (0 on text)
    key_mask: torch.Tensor  # True on real tokens, False on padding
    latents: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    max_timestep: torch.Tensor | None = None

    def cat(self, other: Interleaved) -> Interleaved:
        """``other``'s positions after this batch's (row by row); the training bookkeeping is dropped."""
        def join(a, b):
            return None if a is None else torch.cat([a, b], 1)

        return Interleaved(*(join(getattr(self, n), getattr(other, n)) for n in
                             ("ids", "modality", "segment", "cell", "key_mask", "latents", "timesteps")))

    def repeat_rows(self, times: int) -> Interleaved:
        """Each row ``times`` times in a row (beam search's rows); the training bookkeeping is dropped."""
        def repeat(a):
            return None if a is None else a.repeat_interleave(times, 0)

        return Interleaved(*(repeat(getattr(self, n)) for n in
                             ("ids", "modality", "segment", "cell", "key_mask", "latents", "timesteps")))

    def with_images(self, latents: torch.Tensor, timesteps: torch.Tensor) -> Interleaved:
        """The batch with its images' tokens set to ``latents`` ``(N, cells, C)`` at ``timesteps`` ``(N,)``."""
        b, t, c = self.latents.shape
        flat = self.latents.reshape(b * t, c).index_copy(0, self.image_index.flatten(), latents.reshape(-1, c))
        steps = self.timesteps.flatten().index_copy(
            0, self.image_index.flatten(), timesteps[:, None].expand_as(self.image_index).flatten())
        return replace(self, latents=flat.view(b, t, c), timesteps=steps.view(b, t))


def pair_positions(positions: torch.Tensor, seq: Interleaved, grid: int, head_width: int) -> torch.Tensor:
    """The rotary position of each channel pair of each token ``(B, T, head_width / 2)``
    (``rotary: 2d``) from the tokens' places in the sequence ``positions`` ``(B, T)``: a text
    token's pairs all at its place; an image token's pairs in turn at its image's place (its first
    cell's), that plus the cell's row on a ``grid`` x ``grid`` latent, and that plus its column."""
    image = seq.modality == IMAGE
    cell = torch.where(image, seq.cell, 0)
    start = positions - cell
    axes = torch.stack([torch.where(image, start, positions), torch.where(image, start + cell // grid, positions),
                        torch.where(image, start + cell % grid, positions)], -1)  # (B, T, 3)
    axis = torch.arange(head_width // 2, device=positions.device) % 3  # pairs take the axes in turn: each gets fast and slow ones
    return axes[..., axis]


def examples_from_rows(rows: Sequence[dict], images: torch.Tensor | Sequence[torch.Tensor], tokenizer: TextTokenizer,
                       config: OmniConfig, rng: random.Random | None = None) -> list[OmniExample]:
    """One training example per row of a shapes world (or any rows with captions and questions).

    ``images``: each row's image as its autoencoder gives it, codes ``(h, w)`` (vq) or a scaled
    latent grid ``(C, h, w)`` (latent). A row with questions gives, with chance ``vqa_share``,
    ``questions_per_sample`` of them (``<boi> image <eoi> question <eos> answer <eos> ...``); otherwise its caption, after
    the image with chance ``image_first_share`` (noise capped at ``image_first_max_timestep``),
    else before it, dropped with chance ``caption_dropout``. Text is cut to fit ``context_length``.
    """
    if len(rows) != len(images):
        raise ValueError(f"{len(rows)} rows but {len(images)} images")
    rng = rng or random
    tok, c = tokenizer, config
    budget = c.caption_tokens
    examples = []
    for row, image in zip(rows, images, strict=True):
        qa = row.get(c.qa_column) or []
        if qa and rng.random() < c.vqa_share:
            text = []
            for item in rng.sample(qa, min(c.questions_per_sample, len(qa))):
                question = tok.encode(item["question"], add_special_tokens=False)
                answer = tok.encode(item["answer"], add_special_tokens=False)
                if text and len(text) + len(question) + len(answer) + 2 > budget:
                    break  # the next question would not fit
                question = question[: budget // 2]
                answer = answer[: budget - len(question)]
                text += [*question, tok.eos_id, *answer, tok.eos_id]
            examples.append(OmniExample([[tok.bos_id], image, text], max_timestep=c.image_first_max_timestep))
            continue
        caption = tok.encode(row[c.caption_column], add_special_tokens=False)[:budget]
        if rng.random() < c.image_first_share:
            examples.append(OmniExample([[tok.bos_id], image, [tok.eos_id, *caption, tok.eos_id]],
                                        max_timestep=c.image_first_max_timestep))
        else:
            if c.recaption and row.get(c.objects_column) and rng.random() < c.recaption:
                caption = tok.encode(fresh_caption(row, c.objects_column, rng), add_special_tokens=False)[:budget]
            if rng.random() < c.caption_dropout:
                caption = []
            examples.append(OmniExample([[tok.bos_id, *caption], image, [tok.eos_id]]))
    return examples


def fresh_caption(row: dict, column: str, rng: random.Random) -> str:
    """A new description of ``row``'s scene graph (``row[column]``: its objects as
    :meth:`~polymodal.data.scene.SceneObject.to_dict` gives them) in the world's caption
    language, every object named, its sizes left out with chance 1/2 and its places with chance 1/2."""
    try:
        objects = [SceneObject.from_dict(o) for o in row[column]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"row {row.get('id', '?')!r}: {column} is not a scene graph of objects ({e})") from e
    sizes, places = rng.random() < 0.5, rng.random() < 0.5
    return caption(np.random.default_rng(rng.getrandbits(63)), objects, sizes=sizes, places=places)


# ---- the cache: keys and values, and the segments they belong to --------------------------


class OmniCache(KVCache):
    """A :class:`~polymodal.nn.layers.KVCache` that also remembers each cached position's segment
    id (the mask of a new image token depends on which earlier tokens share its image), and can
    be rolled back: the diffusion sampler runs the image block against the cached prefix at every
    step without keeping it."""

    def __init__(self, depth: int):
        super().__init__(depth)
        self.segment_ids: torch.Tensor | None = None  # (B, S)
        self.text_sum: torch.Tensor | None = None  # (B, W): the input embeddings of the cached text tokens, summed
        self.text_count: torch.Tensor | None = None  # (B, 1): how many there are

    def add(self, key_mask: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remember new positions ``(B, T)``; return the mask and segment ids of every key ``(B, S + T)``."""
        self.segment_ids = segment_ids if self.segment_ids is None else torch.cat([self.segment_ids, segment_ids], 1)
        return self.extend(key_mask), self.segment_ids

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.segment_ids is not None:
            self.segment_ids = self.segment_ids[index]
        if self.text_sum is not None:
            self.text_sum, self.text_count = self.text_sum[index], self.text_count[index]

    def snapshot(self) -> tuple:
        """What :meth:`restore` needs (appending makes new tensors, so references suffice)."""
        return ([(b.self_attn.k, b.self_attn.v) for b in self.blocks], self.key_mask, self.segment_ids,
                self.text_sum, self.text_count)

    def restore(self, state: tuple) -> None:
        kv, self.key_mask, self.segment_ids, self.text_sum, self.text_count = state
        for block, (k, v) in zip(self.blocks, kv, strict=True):
            block.self_attn.k, block.self_attn.v = k, v
