"""What the server may be asked, and how it runs: one dataclass of limits, one of settings.

Every limit bounds what a request can cost before the cost is paid (bytes read, pixels decoded,
seconds of audio, images drawn, tokens generated). All are configurable: ``polymodal serve
--limit max_audio_seconds=60`` or ``Settings(limits=Limits(max_n=2))``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * MIB  # a request body, JSON or multipart (a 25 MB audio upload fits)
    max_image_pixels: int = 4096 * 4096  # of one decoded image, judged from its header before decoding
    max_image_aspect: float = 20.0  # longer side / shorter side of an image (a 16M x 1 image would be
    # resized to 512M x 32 pixels before a model sees it)
    max_audio_seconds: float = 120.0  # of one audio clip, judged from its header before decoding
    max_n: int = 4  # images drawn by one request
    max_tokens: int = 256  # the most a request may ask a model to generate (max_tokens / max_completion_tokens)
    max_text_chars: int = 32_000  # of one text (a message part, an embedding input, a prompt)
    max_speech_chars: int = 4096  # of the text given to /v1/audio/speech (OpenAI's own limit)
    max_inputs: int = 256  # embedding inputs in one request
    max_messages: int = 200  # messages in one chat request
    max_media_parts: int = 16  # images and audio clips in one chat request
    max_image_side: int = 1024  # of a requested image size (WxH)
    max_diffusion_steps: int = 200  # denoising steps one generated image may take
    max_best_of: int = 16  # drawings one generated image may be chosen from (a model's own best_of included)
    max_remote_bytes: int = 16 * MIB  # of a remote image fetched with --allow-remote-urls

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"limit {f.name} must be a positive number, got {value!r}")

    def with_overrides(self, pairs: list[str]) -> Limits:
        """These limits with ``name=value`` overrides (an unknown name lists the known ones)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, int | float] = {}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(f"--limit {pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
            try:
                changes[name] = float(raw) if known[name].type in (float, "float") else int(raw)
            except ValueError:
                raise ValueError(f"--limit {pair!r}: {raw!r} is not a number") from None
        return replace(self, **changes)


@dataclass
class Settings:
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every /v1 route when set
    allow_remote_urls: bool = False  # fetch http(s) image URLs in chat requests (off: data: URLs only)
    store: Path | None = None  # the SQLite file of conversations, stored completions and media
    # (None: serve.sqlite in the models folder)
    limits: Limits = field(default_factory=Limits)
    preload: bool = False  # load every model at start (a broken model fails then, not at its first request)
    embedding_batch_window_ms: float = 5.0  # embedding requests arriving this close together share one
    # forward pass (0: each request runs alone)
    embedding_max_batch: int = 64  # inputs in one forward pass at most
    image_steps: int | None = None  # denoising steps of a generated image unless the request says otherwise
    # (None: the model's own, its config's drawing section, else 50)
    guidance: float | None = None  # classifier-free guidance of generated images (None: the model's own, else 3)
    recogniser: str | None = None  # a served model id, or what polymodal.speech.load_recogniser is given
    remote_timeout_s: float = 10.0  # for fetching a remote image
    audio_expires_s: int = 3600  # message.audio.expires_at is this long after the reply

    @classmethod
    def from_env(cls, **given) -> Settings:
        """Settings with the API key taken from ``POLYMODAL_API_KEY`` unless given."""
        if given.get("api_key") is None and os.environ.get("POLYMODAL_API_KEY"):
            given["api_key"] = os.environ["POLYMODAL_API_KEY"]
        return cls(**given)
