"""Speech in and out, through :mod:`polymodal.speech`, imported on first use.

The server runs without it (embeddings, images, captions): a request that needs speech then
gets a clear error (501, ``speech_unavailable``) saying why, instead of the server refusing to
start. Recognition may also come from a served model: a captioner whose encoder reads audio
(the shapes world's recogniser is one) transcribes by captioning speech.
"""

from __future__ import annotations

import importlib
import threading
import types
from typing import Any

import torch

from polymodal.errors import InputError
from polymodal.modalities.audio import SAMPLE_RATE
from polymodal.serve.errors import APIError
from polymodal.speech.base import Segment, Transcript

SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # /v1/audio/speech response_format
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}




def as_transcript(result: Any, duration: float) -> Transcript:
    """A recogniser's answer (a string, or an object or dict with ``text`` and maybe ``segments``
    of ``start`` / ``end`` / ``text``) as a :class:`Transcript`; one segment spans the clip when
    the recogniser gives none."""
    def get(item, name, default=None):
        return item.get(name, default) if isinstance(item, dict) else getattr(item, name, default)

    text = result if isinstance(result, str) else str(get(result, "text", "") or "")
    segments = []
    for s in (get(result, "segments", None) or []) if not isinstance(result, str) else []:
        segments.append(Segment(float(get(s, "start", 0.0)), float(get(s, "end", duration)), str(get(s, "text", ""))))
    if not segments and text:
        segments = [Segment(0.0, duration, text)]
    language = get(result, "language", None) if not isinstance(result, str) else None
    return Transcript(text.strip(), duration, segments, language=language or "english")


class Speech:
    """The speech module, loaded once; its recogniser loaded once, used under a lock."""

    def __init__(self, recogniser: str | None = None):
        self.recogniser_spec = recogniser
        self._module = None
        self._error: str | None = None
        self._recogniser = None
        self._lock = threading.Lock()

    def module(self):
        """:mod:`polymodal.speech`, or a 501 saying why it cannot be used."""
        if self._module is None and self._error is None:
            try:
                self._module = importlib.import_module("polymodal.speech")
            except Exception as e:  # an ImportError, or a failing dependency inside it
                self._error = f"{type(e).__name__}: {e}"
        if self._module is None:
            raise unavailable(f"speech is not available on this server (polymodal.speech: {self._error})")
        return self._module

    def has(self, name: str) -> bool:
        try:
            self.function(name)
        except APIError:
            return False
        return True

    @property
    def can_speak(self) -> bool:
        return self.has("synthesise")

    @property
    def can_hear(self) -> bool:
        return self.has("load_recogniser")

    def function(self, name: str):
        """``polymodal.speech.<name>`` (found in its submodule of that name if the package does
        not export it), or a 501."""
        module = self.module()
        found = getattr(module, name, None)
        if found is None and getattr(module, "__path__", None):  # a package that does not export it (yet)
            try:
                found = importlib.import_module(f"{module.__name__}.{name}")
            except ImportError:
                found = None
        if isinstance(found, types.ModuleType):
            found = getattr(found, name, None)
        if not callable(found):
            raise unavailable(f"speech is not available on this server (polymodal.speech has no {name})")
        return found

    def synthesise(self, text: str, voice: str, speed: float, format: str) -> bytes:
        """Encoded speech of ``text``; an unknown voice or format is the client's error (400)."""
        synthesise = self.function("synthesise")
        try:
            return synthesise(text, voice, speed, format)
        except InputError as e:  # an unknown voice, text it cannot speak
            raise APIError(400, f"cannot speak this: {e.problem}", param=e.source, code="invalid_value") from None
        except ValueError as e:
            raise APIError(400, f"cannot speak this: {e}", param="voice" if "voice" in str(e) else None,
                           code="invalid_value") from None

    def transcribe(self, waveform: torch.Tensor) -> Transcript:
        """What is said in ``waveform`` (mono, 16 kHz)."""
        with self._lock:
            if self._recogniser is None:
                load = self.function("load_recogniser")
                self._recogniser = load(self.recogniser_spec) if self.recogniser_spec else load()
            result = self._recogniser.transcribe(waveform, SAMPLE_RATE)
        return as_transcript(result, waveform.shape[-1] / SAMPLE_RATE)


def unavailable(message: str) -> APIError:
    return APIError(501, message, type="server_error", code="speech_unavailable")
