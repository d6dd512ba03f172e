"""Audio: decode with soundfile, mix to mono, resample to 16 kHz, log-mel spectrogram.

Log-mel features (``log_mel_spectrogram``), exactly:

1. ``x``: mono waveform at 16,000 Hz, float32 in [-1, 1].
2. STFT with ``torch.stft``: window = periodic Hann of 400 samples (25 ms), n_fft = 400,
   hop = 160 samples (10 ms), ``center=True`` with reflect padding, so a clip of ``L``
   samples gives ``1 + L // 160`` frames. Power spectrum ``P = |X|^2`` (201 bins, 0..8 kHz).
3. Mel filter bank: 80 triangular filters whose corners are equally spaced on the HTK mel
   scale ``m(f) = 2595 * log10(1 + f / 700)`` between 0 Hz and 8,000 Hz; each filter is
   scaled to unit area in Hz (Slaney normalisation, ``2 / (f_right - f_left)``).
4. ``log_mel = ln(max(F @ P, 1e-10))``, shape ``(80, frames)``.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from polymodal.errors import InputError

SAMPLE_RATE = 16_000
N_MELS = 80
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz
N_FFT = 400
LOG_FLOOR = 1e-10
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_MAX_CHANNELS = 8
MIN_SAMPLE_RATE = 8_000  # telephone speech; a header outside these rates is refused before reading
MAX_SAMPLE_RATE = 192_000  # studio recordings
MAX_RESAMPLE_TERM = 1_000  # largest up / down factor of the polyphase resampler (see resample)

Source = str | os.PathLike | bytes


def _read_bytes(source: Source, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), name or "<audio bytes>"
    path = Path(source)
    if not path.is_file():
        raise InputError(path, "file not found")
    return path.read_bytes(), name or str(path)


def _check_riff(data: bytes, name: str) -> None:
    """libsndfile reads a truncated WAV without complaint; the RIFF header tells the truth."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        declared = int.from_bytes(data[4:8], "little")
        if 0 < declared < 0xFFFFFFF0 and declared + 8 > len(data):
            raise InputError(
                name, f"truncated WAV: header declares {declared + 8} bytes, file has {len(data)}"
            )


def load_audio(
    source: Source,
    *,
    name: str | None = None,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_channels: int = DEFAULT_MAX_CHANNELS,
    min_rate: int = MIN_SAMPLE_RATE,
    max_rate: int = MAX_SAMPLE_RATE,
) -> torch.Tensor:
    """Decode an audio file (path or bytes) to a mono float32 tensor ``(samples,)`` at ``sample_rate``.

    The cost is bounded from the header before any sample is read: the sample rate must lie in
    ``min_rate``..``max_rate`` (a 32 KB WAV may declare 2,147,483,647 Hz), the channels and the
    length must be within their limits; then the file is read in blocks, mixed to mono as it goes,
    and reading stops at the length limit whatever the header said.

    Raises :class:`InputError` naming the file for: a missing or zero-length file, a format
    soundfile cannot decode, a truncated WAV, a sample rate out of range, more than
    ``max_channels`` channels, a clip longer than ``max_seconds``, no samples at all, or samples
    that are not finite numbers.
    """
    data, name = _read_bytes(source, name)
    if not data:
        raise InputError(name, "zero-length file")
    _check_riff(data, name)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = f.samplerate, f.channels
            if not min_rate <= rate <= max_rate:
                raise InputError(name, f"sample rate {rate:,} Hz is outside {min_rate:,}..{max_rate:,} Hz")
            if not 0 < channels <= max_channels:
                raise InputError(name, f"{channels} channels; 1 to {max_channels} are accepted")
            most = int(max_seconds * rate)
            if f.frames > most:
                raise InputError(
                    name,
                    f"{f.frames / rate:.1f} s long; the limit is {max_seconds:g} s "
                    "(raise max_seconds to accept it)",
                )
            blocks, frames = [], 0
            for block in f.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                frames += block.shape[0]
                if frames > most:
                    raise InputError(name, f"longer than the limit of {max_seconds:g} s")
                blocks.append(block.mean(axis=1))
    except InputError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError, EOFError, MemoryError) as e:  # LibsndfileError is a RuntimeError
        raise InputError(name, f"cannot decode audio (unsupported format or corrupt file): {e}") from e
    if frames == 0:
        raise InputError(name, "no audio samples")
    mono = np.concatenate(blocks)
    if not np.isfinite(mono).all():
        raise InputError(name, "samples that are not finite numbers (NaN or infinity)")
    return torch.from_numpy(np.ascontiguousarray(resample(mono, rate, sample_rate)))


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) of a 1-D float array.

    The polyphase filter grows with the reduced ratio's terms (999,983 Hz to 16 kHz is
    16,000 / 999,983: a filter of 20 million taps); a ratio whose terms exceed
    :data:`MAX_RESAMPLE_TERM` is replaced by the nearest one within it, which changes the
    pitch by less than one part in a million (e.g. 44,056 Hz).
    """
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    ratio = Fraction(int(to_rate), int(from_rate))
    if max(ratio.numerator, ratio.denominator) > MAX_RESAMPLE_TERM:
        ratio = ratio.limit_denominator(MAX_RESAMPLE_TERM)
        if ratio.numerator > MAX_RESAMPLE_TERM:  # upsampling by more than the bound: bound the numerator
            ratio = 1 / (1 / Fraction(int(to_rate), int(from_rate))).limit_denominator(MAX_RESAMPLE_TERM)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def save_wav(path: str | os.PathLike, samples: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono samples in [-1, 1] as 16-bit PCM WAV."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filter_bank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Triangular HTK-mel filters with unit area, shape ``(n_mels, n_fft // 2 + 1)``."""
    bins_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    corners = mel_to_hz(torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    left, centre, right = corners[:-2, None], corners[1:-1, None], corners[2:, None]
    rising = (bins_hz - left) / (centre - left)
    falling = (right - bins_hz) / (right - centre)
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (triangles * (2.0 / (right - left))).float()


def log_mel_spectrogram(waveform: torch.Tensor) -> torch.Tensor:
    """``(samples,)`` or ``(B, samples)`` at 16 kHz -> ``(80, frames)`` or ``(B, 80, frames)``."""
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be (samples,) or (batch, samples), got {tuple(waveform.shape)}")
    window = torch.hann_window(WINDOW, periodic=True, device=waveform.device)
    # reflect padding needs more than n_fft / 2 samples; shorter clips are padded with zeros
    pad_mode = "reflect" if waveform.shape[-1] > N_FFT // 2 else "constant"
    spec = torch.stft(
        waveform.float(), N_FFT, hop_length=HOP, win_length=WINDOW, window=window,
        center=True, pad_mode=pad_mode, return_complex=True,
    )
    power = spec.abs() ** 2  # (..., 201, frames)
    mel = mel_filter_bank().to(waveform.device) @ power
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


def num_frames(num_samples: int) -> int:
    """Frames of ``log_mel_spectrogram`` for a clip of ``num_samples`` samples."""
    return 1 + num_samples // HOP
