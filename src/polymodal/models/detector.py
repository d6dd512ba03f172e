"""A grid detector: reads a shapes-world image back into its scene graph.

The shapes world puts at most one object in each cell of a 3x3 grid, and an object never
leaves its cell, so detection is classification per cell: is the cell occupied, and if so,
what shape, colour and size is its object. The heads are *factorised* (one for shape, one
for colour, one for size) and shared by the nine cells, so every cell's object trains the
same heads.

Separate heads are not enough for shape-colour pairs never seen together in training (the
world's ``test_novel`` pairs): heads on shared features learn shortcuts such as "red, so not
a star" (measured: shape accuracy 0.43 on test_novel, 1.0 on test). Two things remove them:

- shape and size are read by a trunk that half of each batch trains on *recoloured* images
  (RGB channels permuted and scaled about the background, or greyed; colour labels then
  ignored), so their reading does not depend on colour;
- colour is read by its own per-pixel branch (1x1 convolutions, pooled over the cell with
  learned per-pixel weights): it sees colours and no shapes, so it cannot learn which colours
  go with which shapes.

It is the judge of generated images (:mod:`polymodal.eval.geneval`): ``detect`` gives each
image's objects for :func:`polymodal.data.scene.check_caption`, and ``features`` the vectors
for a Fréchet distance between generated and real images. It also trains with mild
augmentation that keeps every label valid (pixel noise, slight blur, a small brightness
change; no flips or shifts, since where an object is is a label), so that its verdicts hold
on slightly imperfect generated images.

Architecture (32x32 input): a small ResNet-style trunk that keeps full resolution for its
first stage (a small object is about 5 pixels across) and halves it once; each cell's
features are pooled (mean and max over the cell's part of the feature map), tagged with a
learned cell embedding and passed through a shared MLP to the occupied, shape and size heads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.data.scene import COLOURS, SHAPES, SIZES, SceneObject
from polymodal.errors import InputError
from polymodal.models.family import (
    DEFAULT_SPLITS,
    BuildContext,
    EvalOptions,
    Validator,
    evaluate_splits,
    load_saved,
    saved_config,
)
from polymodal.models.folder import read_config, write_model_folder
from polymodal.nn.encoders import ResidualBlock
from polymodal.nn.layers import channels_last

log = logging.getLogger("polymodal.models")

GRID = 3  # the shapes world's grid is GRID x GRID cells
CELLS = GRID * GRID
# Object radius as a share of the cell side, by size (as polymodal.data.shapes draws them):
# the detector's box estimate.
RADIUS = {"small": 0.25, "large": 0.42}


@dataclass
class DetectorConfig:
    image_size: int = 32  # input side in pixels; other sizes are resized to it
    widths: tuple[int, ...] = (24, 48, 64)  # channels per stage; stage 1 runs at full resolution, stage 2 halves it
    blocks: tuple[int, ...] = (1, 1, 1)  # residual blocks per stage
    head_width: int = 64  # per-cell hidden width of the shape / size / occupied heads
    # Where the colour head reads from: "pixels" (a per-pixel branch of 1x1 convolutions,
    # pooled over the cell with learned weights: it sees colours and no shapes, so it cannot
    # learn which colours go with which shapes) or "trunk" (the cell features the other heads read).
    colour_from: str = "pixels"
    colour_width: int = 16  # channels of the per-pixel colour branch
    occupied_threshold: float = 0.5  # a cell holds an object when P(occupied) exceeds this
    # training augmentation (labels stay valid; all on images in [-1, 1])
    noise_std: float = 0.08  # Gaussian pixel noise, standard deviation up to this
    blur_sigma: float = 1.0  # Gaussian blur of sigma up to this (pixels), on half the images
    brightness: float = 0.06  # a shift of all pixels by up to +-this
    # Share of each training batch whose objects are recoloured (RGB channels permuted and
    # scaled about the background level, sometimes greyed) and whose colour labels are then
    # ignored: shape and size learn to be read whatever the colour, so a shape-colour pair
    # never seen in training is read as well as any other.
    recolour_fraction: float = 0.5

    def __post_init__(self):
        self.widths, self.blocks = tuple(self.widths), tuple(self.blocks)
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} need the same, non-zero length")
        if self.colour_from not in ("pixels", "trunk"):
            raise ValueError(f"unknown colour_from {self.colour_from!r}; choose pixels or trunk")
        if self.image_size < 12:
            raise ValueError(f"image_size must be at least 12 pixels, got {self.image_size}")


class GridDetector(nn.Module):
    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = c = config or DetectorConfig()
        self.stem = nn.Sequential(nn.Conv2d(3, c.widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c.widths[0]), nn.ReLU())
        layers, cin = [], c.widths[0]
        for i, (w, n) in enumerate(zip(c.widths, c.blocks, strict=True)):
            for j in range(n):
                layers.append(ResidualBlock(cin, w, 2 if (i == 1 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.cell_embedding = nn.Parameter(torch.randn(CELLS, 2 * cin) * 0.02)
        self.cell_mlp = nn.Sequential(nn.LayerNorm(2 * cin), nn.Linear(2 * cin, c.head_width), nn.ReLU())
        self.occupied_head = nn.Linear(c.head_width, 1)
        self.shape_head = nn.Linear(c.head_width, len(SHAPES))
        if c.colour_from == "pixels":
            self.pixel_colour = nn.Sequential(nn.Conv2d(3, c.colour_width, 1), nn.ReLU(),
                                              nn.Conv2d(c.colour_width, c.colour_width, 1), nn.ReLU())
            self.pixel_weight = nn.Conv2d(c.colour_width, 1, 1)
            self.colour_norm = nn.LayerNorm(c.colour_width)
        self.colour_head = nn.Linear(c.colour_width if c.colour_from == "pixels" else c.head_width, len(COLOURS))
        self.size_head = nn.Linear(c.head_width, len(SIZES))
        channels_last(self)

    # ---- inference ----

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] at the configured size (others are resized)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W); got shape {tuple(images.shape)}")
        size = self.config.image_size
        images = images.to(self.cell_embedding.device, torch.float32)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return channels_last(images)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map ``(B, C, g, g)`` of images in [-1, 1] (half their side)."""
        return self.stages(self.stem(self.prepare(images)))

    def cell_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell hidden features of the trunk (B, CELLS, head_width) and of the colour
        reader (B, CELLS, colour_width; the trunk's again when colour_from is "trunk")."""
        x = self.prepare(images)
        fmap = self.stages(self.stem(x))  # (B, C, g, g)
        pooled = torch.cat([F.adaptive_avg_pool2d(fmap, GRID), F.adaptive_max_pool2d(fmap, GRID)], 1)  # (B, 2C, 3, 3)
        cells = pooled.flatten(2).transpose(1, 2)  # (B, CELLS, 2C), row-major cells
        h = self.cell_mlp(cells + self.cell_embedding)
        if self.config.colour_from == "trunk":
            return h, h
        pixels = self.pixel_colour(x)  # (B, P, H, W)
        weight = F.softplus(self.pixel_weight(pixels))  # (B, 1, H, W): how much each pixel counts
        colour = F.adaptive_avg_pool2d(weight * pixels, GRID) / (F.adaptive_avg_pool2d(weight, GRID) + 1e-6)
        return h, self.colour_norm(colour.flatten(2).transpose(1, 2))  # (B, CELLS, P)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per cell: occupied (B, 9), shape (B, 9, 5), colour (B, 9, 6), size (B, 9, 2)."""
        h, colour = self.cell_features(images)
        return {"occupied": self.occupied_head(h).squeeze(-1), "shape": self.shape_head(h),
                "colour": self.colour_head(colour), "size": self.size_head(h)}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, for a Fréchet distance: every cell's trunk features and (with
        colour_from "pixels") its colour features, (B, CELLS * (head_width + colour_width)).
        Always in inference mode (batch-norm running statistics)."""
        was_training = self.training
        self.eval()
        h, colour = self.cell_features(images)
        self.train(was_training)
        return (h if self.config.colour_from == "trunk" else torch.cat([h, colour], -1)).flatten(1)

    @torch.no_grad()
    def detect(self, images: torch.Tensor, batch_size: int = 500) -> list[list[SceneObject]]:
        """The objects in each image, in cell order. ``bbox`` is an estimate in the input
        image's pixels: the cell's centre and the world's radius for the predicted size.
        Always in inference mode (batch-norm running statistics)."""
        side = images.shape[-1]
        found: list[list[SceneObject]] = []
        was_training = self.training
        self.eval()
        for start in range(0, len(images), batch_size):
            out = self(images[start : start + batch_size])
            occupied = torch.sigmoid(out["occupied"]) > self.config.occupied_threshold
            shape, colour, size = (out[k].argmax(-1) for k in ("shape", "colour", "size"))
            for i in range(len(occupied)):
                objects = []
                for cell in occupied[i].nonzero().flatten().tolist():
                    row, col = divmod(cell, GRID)
                    size_name = SIZES[size[i, cell]]
                    step = side / GRID
                    cx, cy, r = (col + 0.5) * step, (row + 0.5) * step, RADIUS[size_name] * step
                    objects.append(SceneObject(SHAPES[shape[i, cell]], COLOURS[colour[i, cell]], size_name,
                                               row, col, (cx - r, cy - r, cx + r, cy + r)))
                found.append(objects)
        self.train(was_training)
        return found

    # ---- training ----

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel noise, slight blur and a small brightness change, each of random strength per image."""
        c = self.config
        b = images.shape[0]
        if c.blur_sigma > 0:
            sigma = torch.rand(b, device=images.device) * c.blur_sigma
            sigma = torch.where(torch.rand(b, device=images.device) < 0.5, sigma, torch.zeros_like(sigma))
            images = gaussian_blur(images, sigma)
        if c.brightness > 0:
            images = images + (torch.rand(b, 1, 1, 1, device=images.device) * 2 - 1) * c.brightness
        if c.noise_std > 0:
            images = images + torch.randn_like(images) * torch.rand(b, 1, 1, 1, device=images.device) * c.noise_std
        return images.clamp(-1, 1)

    @staticmethod
    def recolour(images: torch.Tensor) -> torch.Tensor:
        """Each image's colours changed about its background level (the per-channel median,
        grey in the shapes world): RGB channels permuted and each scaled by 0.6-1.4, or, for a
        fifth of the images, made grey. The background stays as it was; colour labels do not."""
        b = images.shape[0]
        device = images.device
        level = images.flatten(2).median(-1).values[:, :, None, None]  # (B, 3, 1, 1)
        mix = torch.stack([torch.eye(3, device=device)[torch.randperm(3, device=device)] for _ in range(b)])
        mix = mix * (0.6 + 0.8 * torch.rand(b, 3, 1, device=device))  # (B, 3, 3): out channel <- in channel
        grey = torch.rand(b, device=device) < 0.2
        mix[grey] = torch.full((3, 3), 1 / 3, device=device)
        deviation = torch.einsum("boc,bchw->bohw", mix, images - level)
        return (level + deviation).clamp(-1, 1)

    @staticmethod
    def targets(rows: list[dict], device=None) -> dict[str, torch.Tensor]:
        """Per-cell labels from the rows' scene graphs: occupied (B, 9) in {0, 1}; shape, colour,
        size (B, 9) class indices, -100 (ignored) where a cell is empty."""
        b = len(rows)
        occupied = torch.zeros(b, CELLS)
        labels = {k: torch.full((b, CELLS), -100, dtype=torch.long) for k in ("shape", "colour", "size")}
        for i, row in enumerate(rows):
            if "objects" not in row:
                raise ValueError(f"row {row.get('id', i)!r} has no 'objects' scene graph to learn from")
            for d in row["objects"]:
                o = SceneObject.from_dict(d)
                occupied[i, o.cell] = 1.0
                labels["shape"][i, o.cell] = SHAPES.index(o.shape)
                labels["colour"][i, o.cell] = COLOURS.index(o.colour)
                labels["size"][i, o.cell] = SIZES.index(o.size)
        return {k: v.to(device) for k, v in {"occupied": occupied, **labels}.items()}

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.cell_embedding.device)
        t = self.targets(batch["rows"], images.device)
        if self.training:
            recoloured = round(self.config.recolour_fraction * len(images))
            if recoloured:
                images = torch.cat([self.recolour(images[:recoloured]), images[recoloured:]])
                t["colour"][:recoloured] = -100  # their colours are no longer the labels
            images = self.augment(images)
        out = self(images)
        parts = {"occupied": F.binary_cross_entropy_with_logits(out["occupied"], t["occupied"])}
        for k in ("shape", "colour", "size"):  # only occupied cells have these labels
            logits, labels = out[k].flatten(0, 1), t[k].flatten()
            total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            parts[k] = total / (labels != -100).sum().clamp(min=1)  # 0 when no cell has a label
        with torch.no_grad():
            right = ((out["occupied"] > 0).float() == t["occupied"]).all(1)
            for k in ("shape", "colour", "size"):
                right &= ((out[k].argmax(-1) == t[k]) | (t[k] == -100)).all(1)
        result = {"loss": sum(parts.values())}
        result.update({f"loss_{k}": v.detach() for k, v in parts.items()})
        result["scene_accuracy"] = right.float().mean()
        return result

    # ---- the family (see polymodal.models.family) ----

    tasks = ("detect",)
    config_class = DetectorConfig  # what a recipe's model section and a saved config.json are checked against
    default_splits = DEFAULT_SPLITS

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> GridDetector:
        if spec.get("init_from"):
            raise ValueError("model.init_from: a detector starts from scratch")
        config = DetectorConfig(**spec)
        if build.image_size != config.image_size:
            log.info("detector reads %dx%d images; data are decoded at %d and resized", config.image_size,
                     config.image_size, build.image_size)
        return cls(config)

    def fields(self) -> dict[str, str]:
        return {"image": "image"}

    def input_size(self) -> int:
        return self.config.image_size

    def validator(self, items: list[dict], fields) -> Validator:
        """Per-attribute accuracy on the validation images."""
        from polymodal.eval.geneval import judge_metrics

        def judge_accuracy(model) -> dict[str, float]:
            if not items:
                return {}
            images = torch.stack([item["image"] for item in items])
            return judge_metrics(model, images, [item["row"] for item in items])

        return judge_accuracy

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        """Accuracy of shape, colour, size and position over objects, of the count and the whole
        scene over images (:func:`polymodal.eval.geneval.judge_metrics`)."""
        from polymodal.eval.geneval import judge_metrics

        def score(items: list[dict]) -> dict[str, float]:
            if "objects" not in items[0]["row"]:
                raise ValueError(f"{data}: rows have no 'objects' scene graph; a detector is scored on a shapes world")
            return judge_metrics(self, torch.stack([item["image"] for item in items]), [item["row"] for item in items])

        return evaluate_splits(data, splits, self.fields(), options.image_size or self.input_size(), score,
                               limit=options.limit, progress=options.progress)

    @classmethod
    def load_judge(cls, directory: str | os.PathLike) -> GridDetector:
        """The detector saved in ``directory``, ready to judge images; an error naming the folder
        when it holds another kind of model."""
        found = read_config(directory).get("model_type")
        if found != "detector":
            raise InputError(directory, f"the judge must be a detector model, not a {found!r} model")
        return cls.from_pretrained(directory).eval()

    # ---- saving and loading ----

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        config = {"model_type": "detector", **asdict(self.config)}
        return write_model_folder(directory, config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GridDetector:
        """The config checked and the model sized and matched with its weights before anything is
        allocated (see :func:`~polymodal.models.family.load_saved`)."""
        config = saved_config(directory, "detector", DetectorConfig)
        return load_saved(directory, lambda: cls(config))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) with a 5x5 Gaussian of its own ``sigma`` (B,); 0 leaves it as is."""
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)  # (5,)
    s = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-offsets[None] ** 2 / (2 * s**2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5); sigma -> 0 gives [0, 0, 1, 0, 0]
    b, c, h, w = images.shape
    x = F.pad(images.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    k = kernel.repeat_interleave(c, 0)  # (B*C, 5)
    x = F.conv2d(x, k[:, None, None, :], groups=b * c)  # along rows
    x = F.conv2d(x, k[:, None, :, None], groups=b * c)  # along columns
    return x.reshape(b, c, h, w)
