"""Images and audio sent to the server: ``data:`` URLs, base64, remote URLs, decoded within limits.

Everything here is read before it costs time or memory: a data URL's base64 is checked
strictly (a stray character is an error, not silently dropped), its length bounds the bytes,
an image's header bounds its pixels and an audio file's header its seconds
(:func:`polymodal.modalities.image.load_image`, :func:`polymodal.modalities.audio.load_audio`).
Remote URLs are refused unless the server was started with ``--allow-remote-urls``: fetching
them would let any client make the server reach other machines.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
from PIL import Image

from polymodal.errors import InputError
from polymodal.modalities.audio import SAMPLE_RATE, load_audio
from polymodal.modalities.image import load_image
from polymodal.serve.errors import APIError, bad_request, from_input_error
from polymodal.serve.settings import Settings

DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<base64>;base64)?,",
                      re.IGNORECASE)


@dataclass
class Media:
    """Bytes sent in a request, with the MIME type they came with."""

    data: bytes
    mime: str

    def data_url(self) -> str:
        return data_url(self.data, self.mime)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_base64(text: str, param: str, max_bytes: int) -> bytes:
    """Strict base64 (standard alphabet, padding required; whitespace allowed between lines)."""
    if len(text) > max_bytes * 4 // 3 + 8:
        raise APIError(413, f"{param}: the data is larger than the limit of {max_bytes:,} bytes", param=param,
                       code="request_too_large")
    try:
        return binascii.a2b_base64(re.sub(r"\s+", "", text), strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param}: invalid base64 data ({e})", param) from None


def parse_data_url(url: str, param: str, max_bytes: int) -> Media:
    """The bytes and MIME type of a ``data:`` URL (base64 only: binary media are never sent as
    percent-encoded text)."""
    match = DATA_URL.match(url)
    if not match:
        raise bad_request(f"{param}: not a data URL (expected data:<mime type>;base64,<data>)", param)
    if not match["base64"]:
        raise bad_request(f"{param}: a data URL must be base64-encoded (data:<mime type>;base64,...)", param)
    data = decode_base64(url[match.end():], param, max_bytes)
    if not data:
        raise bad_request(f"{param}: the data URL holds no data", param)
    return Media(data, (match["mime"] or "application/octet-stream").lower())


def fetch_remote(url: str, param: str, settings: Settings) -> Media:
    """An http(s) URL's bytes, when the server allows remote URLs; bounded in size and time."""
    if not settings.allow_remote_urls:
        raise APIError(400, f"{param}: remote URLs are not fetched by this server; send the image inline as a "
                       "data: URL (or start the server with --allow-remote-urls)", param=param,
                       code="remote_url_not_allowed")
    limit = settings.limits.max_remote_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "polymodal-serve"})
    try:
        with urllib.request.urlopen(request, timeout=settings.remote_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(limit + 1)
            mime = response.headers.get_content_type()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"{param}: could not fetch {url}: {e}", param, code="remote_url_failed") from None
    if len(data) > limit:
        raise APIError(413, f"{param}: {url} is larger than the limit of {limit:,} bytes", param=param,
                       code="request_too_large")
    return Media(data, mime)


def read_url(url: object, param: str, settings: Settings) -> Media:
    """A media URL of a request: ``data:`` inline, http(s) when allowed, nothing else."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: expected a URL string", param, code="invalid_type")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return parse_data_url(url, param, settings.limits.max_body_bytes)
    if scheme in ("http", "https"):
        return fetch_remote(url, param, settings)
    raise bad_request(f"{param}: unsupported URL scheme {scheme or url[:20]!r}; send a data: URL", param)


def decode_image(data: bytes, param: str, settings: Settings) -> Image.Image:
    """An RGB image, or a 400 naming ``param`` (corrupt, truncated, not an image, too many pixels)."""
    try:
        image = load_image(data, name=param, max_pixels=settings.limits.max_image_pixels)
    except InputError as e:
        problem = e.problem.replace("(max_pixels)", "(the server's limit max_image_pixels)")
        raise from_input_error(InputError(param, problem), param) from None
    width, height = image.size
    if max(width, height) > settings.limits.max_image_aspect * min(width, height):
        raise bad_request(f"{param}: a {width}x{height} image; one side may be at most "
                          f"{settings.limits.max_image_aspect:g} times the other", param)
    return image


def decode_audio(data: bytes, param: str, settings: Settings) -> torch.Tensor:
    """Mono samples at 16 kHz, or a 400 naming ``param`` (not audio, too long, corrupt)."""
    try:
        return load_audio(data, name=param, sample_rate=SAMPLE_RATE, max_seconds=settings.limits.max_audio_seconds)
    except InputError as e:
        problem = re.sub(r"Error opening <[^>]*>: ", "", e.problem)  # the decoder names an in-memory file
        problem = problem.replace("raise max_seconds to accept it", "the server's limit max_audio_seconds")
        raise from_input_error(InputError(param, problem), param) from None


def png_bytes(image: Image.Image, format: str = "png") -> bytes:
    """``image`` encoded as PNG (or JPEG / WebP)."""
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(format, "PNG"))
    return buffer.getvalue()
