"""Text to speech in OpenAI's voices and formats: eSpeak NG speaks, PyAV encodes.

The voice names of OpenAI's speech API (``alloy``, ``ash``, ... ``verse``) each name an eSpeak
NG voice (US or British English), a variant (its timbre: ``m1``-``m7`` male, ``f1``-``f5``
female) and a pitch, so every name sounds different and a client written for OpenAI gets
speech from any of them. eSpeak NG is reached through :mod:`polymodal.modalities.speech` (the
library and its data ship in the ``espeakng-loader`` wheel, so no system package is needed).

``speed`` follows OpenAI's range, 0.25 to 4.0, 1.0 being :data:`WORDS_PER_MINUTE`. eSpeak NG
speaks at 80 to 450 words a minute; the part of a speed beyond that range is applied after
synthesis with FFmpeg's ``atempo`` filter (through PyAV), which changes the tempo and keeps the
pitch.

Formats, as OpenAI serves them: ``mp3`` (the default), ``opus`` (in Ogg), ``aac`` (ADTS),
``flac``, ``wav`` (16-bit PCM) and ``pcm`` (raw 16-bit little-endian samples, no header), all
at :data:`SAMPLE_RATE` Hz mono.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from polymodal.errors import InputError

SAMPLE_RATE = 24_000  # what OpenAI's speech endpoint returns (pcm is documented as 24 kHz)
WORDS_PER_MINUTE = 175  # speed 1.0
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's accepted range
ESPEAK_MIN_RATE, ESPEAK_MAX_RATE = 80, 450  # words a minute eSpeak NG itself speaks at
MAX_CHARS = 4096  # OpenAI's limit on the input of one request


@dataclass(frozen=True)
class Voice:
    espeak: str  # eSpeak NG voice and variant, "language+variant"
    pitch: int  # 0-100, eSpeak's default is 50
    description: str


# OpenAI voice name -> an eSpeak NG voice; every pair (voice, pitch) differs from the others
VOICES: dict[str, Voice] = {
    "alloy": Voice("en-us+f2", 45, "US English, neutral, low female"),
    "ash": Voice("en-us+m3", 45, "US English, male"),
    "ballad": Voice("en+m2", 55, "British English, male, soft"),
    "coral": Voice("en-us+f3", 58, "US English, female, bright"),
    "echo": Voice("en-us+m1", 50, "US English, male"),
    "fable": Voice("en+m3", 50, "British English, male"),
    "onyx": Voice("en-us+m2", 25, "US English, male, deep"),
    "nova": Voice("en-us+f1", 62, "US English, female"),
    "sage": Voice("en+f2", 50, "British English, female"),
    "shimmer": Voice("en-us+f4", 68, "US English, female, high"),
    "verse": Voice("en-us+m4", 52, "US English, male"),
}

# format -> (container, codec, media type)
FORMATS: dict[str, tuple[str | None, str | None, str]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
    "wav": ("wav", "pcm_s16le", "audio/wav"),
    "pcm": (None, None, "audio/pcm"),  # raw s16le samples, written without PyAV
}


def media_type(format: str) -> str:
    """The HTTP content type of audio in ``format``."""
    return FORMATS[_check_format(format)][2]


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise InputError("response_format", f"unknown audio format {format!r}; choose from {', '.join(FORMATS)}")
    return format


def _check_voice(voice: str) -> Voice:
    if voice not in VOICES:
        raise InputError("voice", f"unknown voice {voice!r}; choose from {', '.join(VOICES)}")
    return VOICES[voice]


def speak(text: str, voice: str = "alloy", speed: float = 1.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of ``text`` spoken in ``voice`` at ``speed``."""
    from polymodal.modalities.speech import synthesize

    if not isinstance(text, str) or not text.strip():
        raise InputError("input", "no text to speak")
    if len(text) > MAX_CHARS:
        raise InputError("input", f"{len(text):,} characters; the limit is {MAX_CHARS:,}")
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise InputError("speed", f"{speed!r} is not a number from {MIN_SPEED} to {MAX_SPEED}")
    spec = _check_voice(voice)
    wanted = WORDS_PER_MINUTE * speed
    rate = int(round(min(max(wanted, ESPEAK_MIN_RATE), ESPEAK_MAX_RATE)))
    samples = synthesize(text, spec.espeak, rate, spec.pitch, sample_rate=sample_rate)
    rest = wanted / rate
    return change_tempo(samples, sample_rate, rest) if abs(rest - 1.0) > 0.01 else samples


def change_tempo(samples: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """``samples`` played ``factor`` times faster at the same pitch (FFmpeg's ``atempo``)."""
    import av

    graph = av.filter.Graph()
    node = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                             time_base=Fraction(1, sample_rate))
    first = node
    # one atempo accepts 0.5..100; a slower factor is a chain of them
    while factor < 0.5:
        step = graph.add("atempo", "0.5")
        node.link_to(step)
        node, factor = step, factor / 0.5
    step = graph.add("atempo", f"{factor:.6f}")
    node.link_to(step)
    sink = graph.add("abuffersink")
    step.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
    first.push(frame)
    first.push(None)
    out = []
    while True:
        try:
            out.append(sink.pull().to_ndarray().reshape(-1))
        except (av.error.BlockingIOError, av.error.EOFError):
            break
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def encode_audio(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, format: str = "mp3") -> bytes:
    """Mono float samples in [-1, 1] as the bytes of an audio file in ``format`` (see :data:`FORMATS`)."""
    import av

    container_name, codec, _ = FORMATS[_check_format(format)]
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    if container_name is None:
        return pcm.tobytes()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_name) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        context = stream.codec_context
        # the encoder's own sample format and, for mp3 / aac / opus, its fixed frame size
        resampler = av.AudioResampler(format=context.format.name, layout="mono", rate=sample_rate,
                                      frame_size=context.frame_size or None)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, 0
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def synthesise(text: str, voice: str = "alloy", speed: float = 1.0, format: str = "mp3") -> bytes:
    """``text`` spoken in OpenAI's ``voice`` at ``speed``, encoded as ``format`` (mp3 by default)."""
    _check_format(format)
    return encode_audio(speak(text, voice, speed), SAMPLE_RATE, format)
