"""Encoders for each modality, built from one set of layers, each with a config dataclass.

Every encoder answers the same two calls, whatever it reads::

    states, mask = encoder.tokens(x, mask=None)  # (B, T, token_width), (B, T) bool, True = real
    pooled = encoder(x, mask=None)               # (B, width) = encoder.pool(states, mask)

so a model (through :class:`polymodal.nn.tower.Tower`) treats every modality alike: fusion and
captioning read the token states, contrastive models the pooled features. ``mask`` marks the
real frames or tokens of a padded input; images have no padding and ignore it. Each config has
named size ``PRESETS``, always including ``tiny`` for tests.

| type       | ``x``                                 | architecture                                     | tokens                        |
| ---------- | ------------------------------------- | ------------------------------------------------ | ----------------------------- |
| ``vit``    | images (B, 3, H, W)                   | patch embedding + Transformer, cls/mean pool     | class token + patches         |
| ``cnn``    | images (B, 3, H, W)                   | ResNet-style stages; position-keeping pool       | cells of the last feature map |
| ``text``   | token ids (B, T), mask (B, T)         | Transformer, eos/mean pool                       | one per text token            |
| ``audio``  | log-mel (B, 80, T), mask (B, T)       | strided conv stem + Transformer, mean pool       | one per stem step             |
| ``video``  | :class:`VideoInput`: frames + log-mel | image encoder per frame + audio encoder          | one per frame, sound fused in |
| ``minilm`` | token ids (B, T), mask (B, T)         | pretrained BERT (:mod:`polymodal.nn.pretrained`) | one per text token            |

``width`` is the pooled width, ``token_width`` the width of the token states (they differ for
the CNN, whose tokens are its last stage's channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.modalities.text import TextTokenizer
from polymodal.nn.layers import Transformer, channels_last
from polymodal.nn.pretrained import MiniLMConfig, MiniLMTextEncoder


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, C) over the real positions of ``mask`` (B, T) -> (B, C); zeros where none is."""
    m = mask[:, :, None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def all_real(x: torch.Tensor) -> torch.Tensor:
    """The mask ``(B, T)`` of tokens ``x`` (B, T, C) that has no padding."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _preset(cls, name: str, overrides: dict):
    if name not in cls.PRESETS:
        raise ValueError(f"{cls.__name__}: unknown preset {name!r}; choose from {sorted(cls.PRESETS)}")
    return replace(cls(), **{**cls.PRESETS[name], **overrides})


# ---- images: ViT -------------------------------------------------------------------------------


@dataclass
class ViTConfig:
    type: str = "vit"
    image_size: int = 64  # input side in pixels
    patch_size: int = 8  # side of a square patch
    width: int = 192  # token width
    depth: int = 4  # Transformer blocks
    heads: int = 3  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width
    activation: str = "gelu"  # gelu | quick_gelu
    pool: str = "cls"  # cls (class token) | mean (of patch tokens)
    pre_norm: bool = False  # LayerNorm on the embeddings before the blocks (as CLIP's ViT)
    eps: float = 1e-5  # LayerNorm epsilon

    PRESETS = {
        "tiny": dict(width=32, depth=1, heads=2),
        "small": dict(width=192, depth=4, heads=3),
        "base": dict(width=384, depth=6, heads=6),
    }


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not divisible by patch_size {c.patch_size}")
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=False)
        n = (c.image_size // c.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(n + 1, c.width) * 0.02)
        self.pre_norm = nn.LayerNorm(c.width, eps=c.eps) if c.pre_norm else nn.Identity()
        self.transformer = Transformer(c.width, c.depth, c.heads, c.mlp_ratio, c.activation, c.eps)
        self.norm = nn.LayerNorm(c.width, eps=c.eps)
        self.width = self.token_width = c.width

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token and the patch tokens after the blocks ``(B, 1 + N, C)`` (the final
        norm belongs to the pooled feature); ``mask`` is ignored: every patch is real."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding  # (B, 1 + N, C)
        x = self.transformer(self.pre_norm(x))
        return x, all_real(x)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = states[:, 0] if self.config.pool == "cls" else states[:, 1:].mean(1)
        return self.norm(pooled)  # (B, C)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(images, mask))


# ---- images: CNN -------------------------------------------------------------------------------


@dataclass
class CNNConfig:
    type: str = "cnn"
    image_size: int = 64  # input side in pixels
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of each stage; each after the first halves the grid
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # residual blocks in each stage
    stem_stride: int = 2  # stride of the first convolution
    pool: str = "flatten"  # flatten (keeps where things are) | mean | attention
    flatten_channels: int = 64  # channels kept per cell before flattening
    width: int = 512  # output feature width

    PRESETS = {
        "tiny": dict(widths=(8, 16), blocks=(1, 1), flatten_channels=8, width=32),
        "small": dict(widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), width=512),
        "base": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), width=768),
    }


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CNN(nn.Module):
    """ResNet-style image encoder. ``pool="flatten"`` keeps each cell's features in place, so
    the embedding knows *where* things are, which a global average forgets."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(nn.Conv2d(3, c.widths[0], 3, c.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(c.widths[0]), nn.ReLU())
        layers, cin = [], c.widths[0]
        for i, (w, n) in enumerate(zip(c.widths, c.blocks, strict=True)):
            for j in range(n):
                layers.append(ResidualBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.grid = c.image_size // c.stem_stride // 2 ** (len(c.widths) - 1)
        if c.pool == "flatten":
            self.reduce = nn.Conv2d(cin, c.flatten_channels, 1)
            self.head = nn.Linear(c.flatten_channels * self.grid**2, c.width)
        elif c.pool in ("mean", "attention"):
            self.head = nn.Linear(cin, c.width)
            if c.pool == "attention":
                self.position = nn.Parameter(torch.randn(self.grid**2, cin) * 0.02)
                self.query = nn.Parameter(torch.randn(cin) * cin**-0.5)
        else:
            raise ValueError(f"unknown pool {c.pool!r}; choose flatten, mean or attention")
        self.norm = nn.LayerNorm(c.width)
        self.width = c.width
        self.token_width = cin  # the last stage's channels
        channels_last(self)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(channels_last(images)))  # (B, C, g, g)

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per cell of the last feature map, row by row ``(B, g*g, C)``; ``mask`` is
        ignored: every cell is real."""
        x = self.feature_map(images).flatten(2).transpose(1, 2)  # (B, g*g, C)
        return x, all_real(x)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooled feature from the cells ``(B, g*g, C)``; "flatten" keeps their order."""
        if self.config.pool == "flatten":
            cells = states.transpose(1, 2)[..., None]  # (B, C, g*g, 1): the feature map, cells in a column
            pooled = self.head(F.relu(self.reduce(cells)).flatten(1))  # channel-major, as the map flattens
        elif self.config.pool == "mean":
            pooled = self.head(states.mean(1))
        else:
            x = states + self.position  # (B, N, C)
            weights = torch.softmax(x @ self.query, dim=1)  # (B, N)
            pooled = self.head((weights[:, :, None] * x).sum(1))
        return self.norm(pooled)  # (B, width)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(images, mask))


# ---- text --------------------------------------------------------------------------------------


@dataclass
class TextConfig:
    type: str = "text"
    vocab_size: int = 1024  # set from the tokenizer when one is trained
    context_length: int = 64  # longest token sequence
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False  # causal attention (as CLIP's text tower) or bidirectional
    pool: str = "eos"  # eos (state at the last real token) | mean (over real tokens)
    eps: float = 1e-5

    PRESETS = {
        "tiny": dict(width=32, depth=1, heads=2),
        "small": dict(width=256, depth=4, heads=4),
        "base": dict(width=512, depth=6, heads=8),
    }


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.config = c = config
        self.tokenizer = tokenizer
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.randn(c.context_length, c.width) * 0.01)
        self.transformer = Transformer(c.width, c.depth, c.heads, c.mlp_ratio, c.activation, c.eps)
        self.norm = nn.LayerNorm(c.width, eps=c.eps)
        self.width = self.token_width = c.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer; pass one when building it")
        ids, mask = self.tokenizer.batch(texts, max_length=self.config.context_length)
        return {"ids": ids, "mask": mask}

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, T, C)`` of right-padded ``ids`` (B, T); ``mask`` True on real tokens."""
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, C)
        return self.norm(self.transformer(x, key_mask=mask, causal=self.config.causal)), mask

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "eos":
            last = mask.long().sum(1) - 1  # index of the last real token
            return states[torch.arange(states.shape[0], device=states.device), last]
        return masked_mean(states, mask)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(ids, mask))


# ---- audio -------------------------------------------------------------------------------------


@dataclass
class AudioConfig:
    type: str = "audio"
    n_mels: int = 80
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    stem_stride: int = 4  # time downsampling of the conv stem (a power of 2)
    mel_mean: float = -8.0  # log-mel values are standardised with these constants
    mel_std: float = 4.0
    activation: str = "gelu"

    PRESETS = {
        "tiny": dict(width=32, depth=1, heads=2),
        "small": dict(width=192, depth=4, heads=3),
        "base": dict(width=384, depth=6, heads=6),
    }


def sinusoidal(length: int, dim: int, device=None) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class AudioEncoder(nn.Module):
    """Log-mel spectrogram -> strided 1-D conv stem -> Transformer -> mean over real frames."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = c = config
        steps = int(math.log2(c.stem_stride))
        convs, cin = [], c.n_mels
        for _ in range(max(steps, 1)):
            convs += [nn.Conv1d(cin, c.width, 3, 2 if steps else 1, 1), nn.GELU()]
            cin = c.width
        self.stem = nn.Sequential(*convs)
        self.transformer = Transformer(c.width, c.depth, c.heads, c.mlp_ratio, c.activation)
        self.norm = nn.LayerNorm(c.width)
        self.width = self.token_width = c.width

    def tokens(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per stem step ``(B, T / stem_stride, C)``; ``mask`` (B, T) over mel frames."""
        x = self.stem((mel - self.config.mel_mean) / self.config.mel_std).transpose(1, 2)  # (B, T', C)
        x = x + sinusoidal(x.shape[1], x.shape[2], x.device)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:  # a frame is real if the first frame it covers is
            mask = mask[:, :: self.config.stem_stride][:, : x.shape[1]].bool()
        return self.norm(self.transformer(x, key_mask=mask)), mask

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(states, mask)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(mel, mask))


# ---- video -------------------------------------------------------------------------------------


@dataclass
class VideoConfig:
    type: str = "video"
    frames: dict = field(default_factory=lambda: {"type": "cnn", "preset": "tiny"})  # image encoder
    audio: dict = field(default_factory=lambda: {"type": "audio", "preset": "tiny"})  # sound track encoder
    width: int = 256

    PRESETS = {
        "tiny": dict(width=32),
        "small": dict(frames={"type": "cnn", "preset": "small"}, audio={"type": "audio", "preset": "small"},
                      width=512),
    }


class VideoInput(NamedTuple):
    """What a video encoder reads: a batch of clips' frames and their sound track.

    A clip is frames and sound together, so they travel as one ``x``; a batch without sound
    (``audio`` None, or zero mel frames) is silent, and so is a clip whose ``audio_mask`` row is
    all False.
    """

    frames: torch.Tensor  # (B, N, 3, H, W)
    audio: torch.Tensor | None = None  # (B, 80, T) log-mel of the sound track
    audio_mask: torch.Tensor | None = None  # (B, T), True on real mel frames


class VideoEncoder(nn.Module):
    """Frames through an image encoder, sound through an audio encoder, fused per frame, pooled
    over time.

    Each frame's token is ``fuse([frame feature + time embedding, the clip's sound feature])``
    ``(B, N, width)``; the pooled feature is the normalised mean over (real) frames. As ``fuse``
    is linear, that is the same as fusing the mean frame feature with the sound.
    """

    def __init__(self, config: VideoConfig):
        super().__init__()
        self.config = config
        self.frame_encoder = build_encoder(config.frames)
        self.audio_encoder = build_encoder(config.audio)
        self.time_embedding = nn.Parameter(torch.zeros(64, self.frame_encoder.width))
        self.fuse = nn.Linear(self.frame_encoder.width + self.audio_encoder.width, config.width)
        self.norm = nn.LayerNorm(config.width)
        self.width = self.token_width = config.width

    def tokens(self, x: VideoInput, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per frame ``(B, N, width)``; ``mask`` (B, N) marks real frames."""
        frames = x.frames
        b, n = frames.shape[:2]
        per_frame = self.frame_encoder(frames.flatten(0, 1)).view(b, n, -1) + self.time_embedding[:n]  # (B, N, Cf)
        if x.audio is not None and x.audio.shape[-1] > 0:
            sound = self.audio_encoder(x.audio, x.audio_mask)  # (B, Ca)
        else:
            sound = per_frame.new_zeros(b, self.audio_encoder.width)
        states = self.fuse(torch.cat([per_frame, sound[:, None].expand(-1, n, -1)], dim=-1))  # (B, N, width)
        return states, (all_real(states) if mask is None else mask.bool())

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(masked_mean(states, mask))

    def forward(self, x: VideoInput, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(*self.tokens(x, mask))


# ---- building from a dict ----------------------------------------------------------------------

ENCODERS = {
    "vit": (ViTConfig, ViT),
    "cnn": (CNNConfig, CNN),
    "text": (TextConfig, TextTransformer),
    "audio": (AudioConfig, AudioEncoder),
    "video": (VideoConfig, VideoEncoder),
    "minilm": (MiniLMConfig, MiniLMTextEncoder),
}


# the kind of input each encoder type reads
INPUT_KIND = {"cnn": "image", "vit": "image", "text": "text", "minilm": "text", "audio": "audio", "video": "video"}


def encoder_config(spec: dict):
    """``{"type": "cnn", "preset": "small", "width": 384}`` -> a filled config dataclass."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder type {kind!r}; choose from {sorted(ENCODERS)}")
    return config_from_spec(ENCODERS[kind][0], spec, f"{kind} encoder")


def config_from_spec(cls, spec: dict, name: str):
    """A filled ``cls`` config dataclass from ``spec`` (without its ``type``; an optional size
    ``preset``, lists read as tuples); unknown settings are errors naming ``name``."""
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    known = {f.name for f in fields(cls)}
    unknown = set(spec) - known - {"preset"}
    if unknown:
        raise ValueError(f"{name}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    preset = spec.pop("preset", None)
    return _preset(cls, preset, spec) if preset else cls(**spec)


def build_encoder(spec: dict | object, **kwargs) -> nn.Module:
    """An encoder from a spec dict or a filled config; ``kwargs`` go to its class (a text
    encoder's ``tokenizer``)."""
    config = encoder_config(spec) if isinstance(spec, dict) else spec
    return ENCODERS[config.type][1](config, **kwargs)
