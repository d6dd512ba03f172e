"""Speech to text, three ways behind one interface: :meth:`Recogniser.transcribe`.

- :class:`OwnRecogniser`: a polymodal captioner whose encoder hears audio (an encoder-decoder
  over log-mel, Whisper's shape; the ``asr-shapes`` recipe trains one on a data set's speech);
- :class:`WhisperRecogniser`: a Hugging Face Whisper folder (``transformers``'
  ``WhisperForConditionalGeneration`` and ``WhisperProcessor``), read offline;
- :class:`~polymodal.speech.sphinx.SphinxRecogniser`: PocketSphinx with its bundled English
  model, first with a language model built from the domain's sentences, then the general one.

:func:`load_recogniser` picks one from a spec: ``pocketsphinx``, ``pocketsphinx:SENTENCES``
(a data folder, whose training captions are the domain, or a text file of sentences), or a
model folder (a Whisper folder or a polymodal captioner that hears speech).

Every recogniser reads mono audio at :data:`SAMPLE_RATE`; :meth:`Recogniser.transcribe`
validates and resamples what it is given, and cuts audio longer than the model's window
(``max_chunk_seconds``) at its quietest moments, so a long recording becomes several windows,
each a :class:`Segment` with its times.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

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
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2):
        raise InputError("audio", f"expected samples (samples,) or (channels, samples), got {x.dtype} {x.shape}")
    if x.dtype.kind in "iu":  # integer PCM: scale to [-1, 1]
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


# ---- polymodal's own recogniser ----------------------------------------------------------------


class OwnRecogniser(Recogniser):
    """A polymodal captioner whose encoder hears audio: the log-mel of each window goes through
    its audio tower and the decoder writes what it heard (greedy, or beam search)."""

    max_chunk_seconds = 10.0  # the longest spoken caption it trained on is about as long (9.5 s)

    def __init__(self, model, *, decoding: str = "greedy", name: str = "polymodal recogniser"):
        super().__init__()
        from polymodal.nn.encoders import INPUT_KIND

        heard = [n for n, spec in model.config.encoders.items() if INPUT_KIND[spec["type"]] == "audio"]
        if not heard:
            raise ValueError("this captioner has no audio encoder; it cannot transcribe speech")
        self.model, self.field, self.decoding, self.name = model.eval(), heard[0], decoding, name

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs) -> OwnRecogniser:
        from polymodal.models import load_model

        model = load_model(path, task="caption")
        try:
            return cls(model, name=f"polymodal recogniser ({Path(path).name})", **kwargs)
        except ValueError as e:
            raise InputError(path, str(e)) from None

    @torch.no_grad()
    def transcribe_window(self, samples: np.ndarray) -> tuple[str, list[Word]]:
        from polymodal.modalities.audio import log_mel_spectrogram

        mel = log_mel_spectrogram(torch.from_numpy(samples))[None]  # (1, 80, T)
        batch = {self.field: mel, f"{self.field}_mask": torch.ones(1, mel.shape[-1], dtype=torch.bool)}
        return self.model.generate(batch, method=self.decoding)[0], []


# ---- Hugging Face Whisper ----------------------------------------------------------------------


class WhisperRecogniser(Recogniser):
    """A ``transformers`` Whisper folder: its processor makes the log-mel features (30 s windows)
    and ``generate`` writes the text. Multilingual folders are asked to transcribe in
    ``language`` (None: the model detects it)."""

    max_chunk_seconds = 30.0

    def __init__(self, path: str | os.PathLike, *, language: str | None = None, max_new_tokens: int = 200):
        super().__init__()
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.path = Path(path)
        self.processor = WhisperProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(self.path, local_files_only=True).eval()
        self.language, self.name = language, f"whisper ({self.path.name})"
        limit = self.model.config.max_target_positions
        self.max_new_tokens = max(1, min(max_new_tokens, limit - 4))  # leave room for the prompt tokens

    @torch.no_grad()
    def transcribe_window(self, samples: np.ndarray) -> tuple[str, list[Word]]:
        inputs = self.processor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        options: dict = {"max_new_tokens": self.max_new_tokens}
        if getattr(self.model.generation_config, "is_multilingual", False):
            options.update(task="transcribe", language=self.language)
        ids = self.model.generate(inputs.input_features, **options)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip(), []


# ---- choosing one ------------------------------------------------------------------------------


def domain_sentences(source: str | os.PathLike) -> list[str]:
    """The domain's sentences: the training split's captions of a data folder (its
    ``metadata.jsonl``), or the lines of a text file."""
    path = Path(source)
    if (path / "metadata.jsonl").is_file():
        from polymodal.data.dataset import MultimodalDataset

        sentences = [item["text"] for item in MultimodalDataset(path, {"text": "text:text"}, split="train")]
    elif path.is_file():
        sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        raise InputError(path, "not a data folder (with metadata.jsonl) or a text file of sentences")
    sentences = [s for s in sentences if s]
    if not sentences:
        raise InputError(path, "no sentences to build a domain language model from")
    return sentences


def load_recogniser(spec: str | os.PathLike = "pocketsphinx", **options) -> Recogniser:
    """A recogniser from ``spec``:

    - ``pocketsphinx``: PocketSphinx, its general English language model only;
    - ``pocketsphinx:PATH``: PocketSphinx with a domain language model built from ``PATH`` (a data
      folder's training captions, or a text file, a sentence a line), falling back to the
      general model when the domain decode is poor;
    - a folder with a Whisper ``config.json`` (``model_type: whisper``): :class:`WhisperRecogniser`;
    - a polymodal captioner folder whose encoder hears audio: :class:`OwnRecogniser`.

    ``options`` go to the recogniser's constructor.
    """
    text = str(spec)
    if text == "pocketsphinx" or text.startswith("pocketsphinx:"):
        from polymodal.speech.sphinx import SphinxRecogniser

        source = text.partition(":")[2]
        return SphinxRecogniser(domain_sentences(source) if source else None, **options)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise InputError(path, "not a model folder (no config.json), nor 'pocketsphinx' or 'pocketsphinx:SENTENCES'")
    from polymodal.models.folder import read_config

    if read_config(path).get("model_type") == "whisper":
        return WhisperRecogniser(path, **options)
    return OwnRecogniser.from_folder(path, **options)
