"""What every recogniser shares: the audio it is given, checked and resampled; long audio cut
into windows at pauses; and the :class:`Transcript` it returns (text, segments and word times,
the model that made it).

A recogniser (:class:`Recogniser`) says only how to transcribe one window of mono 16 kHz
samples; :meth:`Recogniser.transcribe` does the rest.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from polymodal.errors import InputError
from polymodal.modalities.audio import SAMPLE_RATE, load_audio, resample

MAX_SECONDS = 600.0  # the longest audio one call transcribes (as polymodal.modalities.audio reads)
MIN_RATE, MAX_RATE = 8_000, 192_000
FRAME = SAMPLE_RATE // 100  # 10 ms, the step at which pauses are looked for


@dataclass
class Word:
    word: str
    start: float  # seconds from the start of the audio
    end: float


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str


@dataclass
class Transcript:
    """What a recogniser heard: the text, its segments with times (one per window, or per
    pause-separated stretch), word times where the recogniser gives them, and which model made it."""

    text: str
    duration: float  # seconds of audio transcribed
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    model: str = ""
    language: str = "english"  # as OpenAI's verbose_json names it

    def __str__(self) -> str:
        return self.text


def as_samples(waveform: np.ndarray | torch.Tensor | list, sample_rate: int, *,
               max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Mono float32 samples at :data:`SAMPLE_RATE` from ``waveform`` ``(samples,)`` or
    ``(channels, samples)`` at ``sample_rate``; an :class:`InputError` for anything else."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise InputError("sample_rate", f"expected an integer, got {sample_rate!r}")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise InputError("sample_rate", f"{sample_rate:,} Hz is outside {MIN_RATE:,}..{MAX_RATE:,} Hz")
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    x = np.asarray(waveform)
    if x.dtype.kind not in "fi" or x.ndim not in (1, 2):
        raise InputError("audio", f"expected float or signed integer samples (samples,) or (channels, samples), "
                                  f"got {x.dtype} {x.shape}")
    if x.dtype.kind == "i":  # integer PCM: scale to [-1, 1]
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(0)
    if x.size == 0:
        raise InputError("audio", "no samples")
    if x.size > max_seconds * sample_rate:
        raise InputError("audio", f"{x.size / sample_rate:.1f} s long; the limit is {max_seconds:g} s")
    if not np.isfinite(x).all():
        raise InputError("audio", "samples that are not finite numbers (NaN or infinity)")
    return resample(x, int(sample_rate), SAMPLE_RATE)


def split_at_pauses(samples: np.ndarray, max_seconds: float) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges of at most ``max_seconds`` each that cover ``samples``,
    each cut at the quietest 10 ms of the last third of its window (a pause between words,
    when there is one), so no window ends in the middle of a word it could have kept."""
    longest = int(max_seconds * SAMPLE_RATE)
    ranges, start = [], 0
    while len(samples) - start > longest:
        window = samples[start : start + longest]
        frames = window[: len(window) // FRAME * FRAME].reshape(-1, FRAME)
        energy = (frames.astype(np.float64) ** 2).mean(1)
        first = len(energy) * 2 // 3
        cut = start + (first + int(np.argmin(energy[first:]))) * FRAME + FRAME // 2
        ranges.append((start, cut))
        start = cut
    ranges.append((start, len(samples)))
    return ranges


class Recogniser:
    """Speech to text. A subclass says how to transcribe one window of 16 kHz samples
    (:meth:`transcribe_window`); this class validates, resamples and windows the audio."""

    name = "recogniser"
    max_chunk_seconds = 30.0  # longest window the model reads at once

    def __init__(self):
        self._lock = threading.Lock()  # decoders keep state between calls: one call at a time

    def transcribe_window(self, samples: np.ndarray) -> tuple[str, list[Word]]:
        """Text of one window of mono 16 kHz samples, and its word times (seconds from the
        window's start) where the recogniser gives them."""
        raise NotImplementedError

    def transcribe(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> Transcript:
        """What is said in ``waveform`` (mono ``(samples,)`` or ``(channels, samples)``) at ``sample_rate`` Hz."""
        samples = as_samples(waveform, sample_rate)
        segments, words = [], []
        with self._lock:
            for start, end in split_at_pauses(samples, self.max_chunk_seconds):
                text, found = self.transcribe_window(samples[start:end])
                offset = start / SAMPLE_RATE
                segments.append(Segment(offset, end / SAMPLE_RATE, text))
                words += [Word(w.word, w.start + offset, w.end + offset) for w in found]
        text = " ".join(s.text for s in segments if s.text)
        return Transcript(text, len(samples) / SAMPLE_RATE, [s for s in segments if s.text], words,
                          model=self.describe())

    def transcribe_file(self, source: str | os.PathLike | bytes, *, name: str | None = None) -> Transcript:
        """What is said in an audio file (a path or its bytes; any format soundfile reads)."""
        return self.transcribe(load_audio(source, name=name, max_seconds=MAX_SECONDS), SAMPLE_RATE)

    def describe(self) -> str:
        """The model that made the last transcript (for a reply to say which models made it)."""
        return self.name
