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
from pathlib import Path

import numpy as np
import torch

from polymodal.errors import InputError
from polymodal.modalities.audio import SAMPLE_RATE
from polymodal.speech.base import Recogniser, Word

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
