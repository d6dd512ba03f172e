"""Encoders for each modality, built from one set of layers, each with a config dataclass.

Every encoder maps its input to pooled features ``(B, width)`` with ``forward`` and to a
sequence of token states ``(B, N, width)`` with ``tokens`` (for cross-attention later). Each
config has named size ``PRESETS``, always including ``tiny`` for tests.

| type    | input                                  | architecture                                 |
| ------- | -------------------------------------- | -------------------------------------------- |
| ``vit`` | images (B, 3, H, W)                    | patch embedding + Transformer, cls/mean pool |
| ``cnn`` | images (B, 3, H, W)                    | ResNet-style stages; position-keeping pool   |
| ``text``| token ids (B, T) + mask                | Transformer, eos/mean pool                   |
| ``audio``| log-mel (B, 80, T) + mask             | strided conv stem + Transformer, mean pool   |
| ``video``| frames (B, N, 3, H, W) + log-mel track| image encoder per frame + audio encoder       |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.modalities.text import TextTokenizer
from polymodal.nn.layers import Transformer


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
        self.width = c.width

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding  # (B, 1 + N, C)
        x = self.transformer(self.pre_norm(x))
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(1)
        return self.norm(pooled)


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

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))  # (B, C, g, g)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).flatten(2).transpose(1, 2)  # (B, g*g, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(images)
        if self.config.pool == "flatten":
            pooled = self.head(F.relu(self.reduce(fmap)).flatten(1))
        elif self.config.pool == "mean":
            pooled = self.head(fmap.mean((2, 3)))
        else:
            x = fmap.flatten(2).transpose(1, 2) + self.position  # (B, N, C)
            weights = torch.softmax(x @ self.query, dim=1)  # (B, N)
            pooled = self.head((weights[:, :, None] * x).sum(1))
        return self.norm(pooled)


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
        self.width = c.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer; pass one when building it")
        ids, mask = self.tokenizer.batch(texts, max_length=self.config.context_length)
        return {"ids": ids, "mask": mask}

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, C)
        return self.norm(self.transformer(x, key_mask=mask, causal=self.config.causal))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids, mask)
        if self.config.pool == "eos":
            last = mask.long().sum(1) - 1  # index of the last real token
            return x[torch.arange(x.shape[0], device=x.device), last]
        m = mask[:, :, None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


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
        self.width = c.width

    def tokens(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem((mel - self.config.mel_mean) / self.config.mel_std).transpose(1, 2)  # (B, T', C)
        x = x + sinusoidal(x.shape[1], x.shape[2], x.device)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:  # a frame is real if the first frame it covers is
            mask = mask[:, :: self.config.stem_stride][:, : x.shape[1]]
        return self.norm(self.transformer(x, key_mask=mask)), mask

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.tokens(mel, mask)
        m = mask[:, :, None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


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


class VideoEncoder(nn.Module):
    """Frames through an image encoder, sound through an audio encoder, pooled over time, fused."""

    def __init__(self, config: VideoConfig):
        super().__init__()
        self.config = config
        self.frame_encoder = build_encoder(config.frames)
        self.audio_encoder = build_encoder(config.audio)
        self.time_embedding = nn.Parameter(torch.zeros(64, self.frame_encoder.width))
        self.fuse = nn.Linear(self.frame_encoder.width + self.audio_encoder.width, config.width)
        self.norm = nn.LayerNorm(config.width)
        self.width = config.width

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n = frames.shape[:2]
        per_frame = self.frame_encoder(frames.flatten(0, 1)).view(b, n, -1) + self.time_embedding[:n]
        has_sound = audio.shape[-1] > 0
        sound = self.audio_encoder(audio, audio_mask) if has_sound else per_frame.new_zeros(b, self.audio_encoder.width)
        return self.norm(self.fuse(torch.cat([per_frame.mean(1), sound], dim=-1)))


# ---- building from a dict ----------------------------------------------------------------------

ENCODERS = {
    "vit": (ViTConfig, ViT),
    "cnn": (CNNConfig, CNN),
    "text": (TextConfig, TextTransformer),
    "audio": (AudioConfig, AudioEncoder),
    "video": (VideoConfig, VideoEncoder),
}


# the kind of input each encoder type reads ("minilm" is the pretrained text encoder)
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
    config = encoder_config(spec) if isinstance(spec, dict) else spec
    return ENCODERS[config.type][1](config, **kwargs)
