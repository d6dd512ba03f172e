"""Images: decode with PIL, validate, resize / centre-crop / normalise, patchify and back."""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from polymodal.errors import InputError

DEFAULT_MAX_PIXELS = 40_000_000  # pixels decoded at most (a 40-megapixel photo); raise it for larger images
# Formats read from data sets: what cameras, scanners and the web write. PIL's other plugins
# (EPS, which runs Ghostscript; PSD, ICNS, ...) are never tried on a stranger's file.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG opens multi-picture (MPO) files too
Source = str | os.PathLike | bytes


def load_image(
    source: Source, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> Image.Image:
    """Decode an image file (path or bytes) into an RGB PIL image.

    The cost of decoding is bounded before decoding, from the header: an image of more than
    ``max_pixels`` pixels is refused. With ``target_size`` (the shorter side the caller will
    resize to), a large image is decoded at reduced size where the format allows it (JPEG decodes
    at 1/2, 1/4 or 1/8 scale) and shrunk by a box filter to no less than twice ``target_size``
    before any colour conversion, so a 40-megapixel photo costs one decode and not five copies;
    a JPEG is then judged by the pixels it decodes, not by its header.

    Raises :class:`InputError` naming the file for: a missing or zero-length file, a format
    outside :data:`IMAGE_FORMATS`, a corrupt or truncated file, and too many pixels.
    """
    if isinstance(source, bytes | bytearray):
        data, name = bytes(source), name or "<image bytes>"
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise InputError(name, "file not found")
        data = path.read_bytes()
    if not data:
        raise InputError(name, "zero-length file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InputError(name, f"invalid image size {width}x{height}")
            if target_size and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (target_size, target_size))  # both sides stay >= target_size
            decoded = image.size[0] * image.size[1]
            if decoded > max_pixels:
                raise InputError(
                    name, f"{width}x{height} pixels exceeds the limit of {max_pixels:,} (max_pixels)"
                )
            image.load()  # decode now, so truncated data fails here and not later
            sixteen_bit = image.mode.startswith("I;16")
            if target_size:
                image = _shrink(image, 2 * target_size)
    except UnidentifiedImageError as e:
        raise InputError(name, "unsupported or unrecognised image format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(name, f"image too large: {e}") from e
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError,
            ZeroDivisionError, MemoryError) as e:  # what PIL's decoders raise on a corrupt file
        raise InputError(name, f"corrupt or truncated image: {e}") from e
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grey: scale to 8 bits
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if sixteen_bit else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode != "RGB":  # grey, palette, alpha, CMYK...: composite onto white, then RGB
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image


def _shrink(image: Image.Image, shorter_side: int) -> Image.Image:
    """Shrink ``image`` by a whole factor (box filter) while its shorter side stays >= ``shorter_side``."""
    factor = min(image.size) // shorter_side
    if factor < 2:
        return image
    if image.mode in ("1", "P", "PA"):  # averaging palette indices would mix unrelated colours
        image = image.convert("RGBA")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def thumbnail(image: Image.Image, size: int = 128) -> Image.Image:
    """A copy of ``image`` at most ``size`` pixels a side (for contact sheets)."""
    small = image.copy()
    small.thumbnail((size, size))
    return small


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image -> float tensor ``(3, H, W)`` in [0, 1]."""
    array = np.array(image)  # a writable copy
    if array.ndim == 2:
        array = array[:, :, None].repeat(3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError("image", f"expected 1, 3 or 4 channels (H, W, C); got shape {array.shape}")
    if array.shape[2] == 1:
        array = array.repeat(3, axis=2)
    array = array[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor ``(3, H, W)`` in [0, 1] -> RGB PIL image."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise InputError("image", f"expected a (3, H, W) or (1, H, W) tensor; got {tuple(tensor.shape)}")
    array = (tensor.detach().float().clamp(0, 1) * 255).round().byte().cpu()
    if array.shape[0] == 1:
        array = array.repeat(3, 1, 1)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``size``, centre-crop to ``size`` x ``size``, normalise.

    ``mean`` / ``std`` are per channel on [0, 1] values; the default maps [0, 1] to [-1, 1].
    """

    size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        if (width, height) != (self.size, self.size):
            scale = self.size / min(width, height)
            new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(new_size, self.resample)
            left = (new_size[0] - self.size) // 2
            top = (new_size[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return self.normalize(to_tensor(image))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (3, 1, 1) if x.ndim == 3 else (1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, C * p * p)`` with patches in row-major order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, C * p * p)`` -> ``(B, C, H, W)``."""
    b, n, d = patches.shape
    p = patch_size
    gh, gw = height // p, width // p
    if n != gh * gw or d != channels * p * p:
        raise ValueError(f"patches {tuple(patches.shape)} do not tile a {channels}x{height}x{width} image")
    x = patches.reshape(b, gh, gw, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 4, title: str | None = None,
               labels: list[str] | None = None) -> Image.Image:
    """A PNG-ready grid of normalised images ``(B, 3, H, W)`` in [-1, 1], each enlarged ``scale`` times
    (nearest neighbour, so pixels stay visible), with an optional title and per-image labels."""
    from PIL import ImageDraw

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid expects (B, 3, H, W) images, got {tuple(images.shape)}")
    b, _, h, w = images.shape
    columns = max(1, min(columns, b))
    rows = (b + columns - 1) // columns
    cell_w, cell_h, pad = w * scale, h * scale, 4
    label_h = 12 if labels else 0
    top = 16 if title else 0
    sheet = Image.new("RGB", (columns * (cell_w + pad) + pad, top + rows * (cell_h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0))
    for i in range(b):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell_w + pad), top + pad + r * (cell_h + label_h + pad)
        sheet.paste(to_pil(images[i] * 0.5 + 0.5).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        if labels:
            draw.text((x, y + cell_h), labels[i][: cell_w // 6], fill=(60, 60, 60))
    return sheet
