"""Video: PyAV decode into N evenly sampled frames plus the sound track (16 kHz mono).

A video is frames and sound together; :class:`VideoClip` carries both. Clips are written
with H.264 video and AAC audio in MP4 (:func:`write_video`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from polymodal.errors import InputError
from polymodal.modalities.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE

DEFAULT_MAX_SECONDS = 600.0
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_FPS = 240.0  # frames a second counted against max_seconds when a header claims more
FRAME_PIXELS = 640 * 480  # frames kept are scaled down to about this many pixels (they are resized
# for the model later): eight 4096 x 4096 frames would hold 400 MB
Source = str | os.PathLike | bytes


@dataclass
class VideoClip:
    frames: torch.Tensor  # (N, 3, H, W) float in [0, 1], evenly spaced in time
    audio: torch.Tensor  # (samples,) mono at 16 kHz; empty when the file has no sound track
    fps: float
    duration: float  # seconds

    @property
    def has_audio(self) -> bool:
        return self.audio.numel() > 0


def _read(source: Source, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), name or "<video bytes>"
    path = Path(source)
    if not path.is_file():
        raise InputError(name or path, "file not found")
    return path.read_bytes(), name or str(path)


def load_video(
    source: Source,
    *,
    name: str | None = None,
    num_frames: int = 8,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoClip:
    """Decode a video (path or bytes) into ``num_frames`` evenly spaced RGB frames and its sound.

    Raises :class:`InputError` naming the file for: a missing or zero-length file, a format
    PyAV cannot open, no video stream, frames over ``max_pixels``, a clip over ``max_seconds``,
    and a truncated file (fewer frames decoded than the container declares).
    """
    data, name = _read(source, name)
    if not data:
        raise InputError(name, "zero-length file")
    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, UnicodeDecodeError, OSError) as e:
        raise InputError(name, f"cannot open video (unsupported format or corrupt file): {e}") from e
    with container:
        if not container.streams.video:
            raise InputError(name, "no video stream")
        vstream = container.streams.video[0]
        width, height = vstream.codec_context.width, vstream.codec_context.height
        if width * height > max_pixels:
            raise InputError(name, f"{width}x{height} frames exceed the limit of {max_pixels:,} pixels")
        fps = float(vstream.average_rate or vstream.guessed_rate or 0) or 25.0
        declared = vstream.frames
        if declared and declared / fps > max_seconds:
            raise InputError(name, f"{declared / fps:.1f} s long; the limit is {max_seconds:g} s")
        astream = container.streams.audio[0] if container.streams.audio else None
        if astream is not None and not MIN_SAMPLE_RATE <= (astream.rate or 0) <= MAX_SAMPLE_RATE:
            raise InputError(name, f"sound track at {astream.rate or 0:,} Hz is outside "
                                   f"{MIN_SAMPLE_RATE:,}..{MAX_SAMPLE_RATE:,} Hz")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE) if astream else None
        wanted = _even_indices(declared, num_frames) if declared else None
        kept: dict[int, np.ndarray] = {}
        sampled: list[np.ndarray] = []  # without a declared count: every stride-th frame, thinned as it fills
        stride = 1
        sound: list[np.ndarray] = []
        decoded = 0
        size = _frame_size(width, height)
        most = max_seconds * min(fps, MAX_FPS)  # frames decoded at most, whatever the header says
        streams = [vstream] + ([astream] if astream else [])
        try:
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        if decoded > most:
                            raise InputError(name, f"longer than the limit of {max_seconds:g} s")
                        if wanted is None:
                            if decoded % stride == 0:
                                sampled.append(_rgb(frame, size))
                                if len(sampled) > 2 * num_frames:  # keep memory to a few frames
                                    sampled, stride = sampled[::2], stride * 2
                        elif decoded in wanted:
                            kept[decoded] = _rgb(frame, size)
                        decoded += 1
                    elif resampler is not None:
                        for out in resampler.resample(frame):
                            sound.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            raise InputError(name, f"corrupt video data after {decoded} frames: {e}") from e
        except (ValueError, RuntimeError, MemoryError, OSError) as e:
            raise InputError(name, f"cannot decode video after {decoded} frames: {e}") from e
        if resampler is not None:
            for out in resampler.resample(None):
                sound.append(out.to_ndarray().reshape(-1))
    if decoded == 0:
        raise InputError(name, "no decodable video frames")
    if declared and decoded < declared:
        raise InputError(name, f"truncated video: {decoded} of {declared} declared frames decode")
    if wanted is None:
        frames = [sampled[i] for i in _even_indices(len(sampled), num_frames)]
    else:
        frames = [kept[i] for i in sorted(wanted)]
    while len(frames) < num_frames:  # a clip shorter than num_frames repeats its last frame
        frames.append(frames[-1])
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    audio = torch.from_numpy(np.concatenate(sound)) if sound else torch.zeros(0)
    return VideoClip(frames=stacked, audio=audio.float(), fps=fps, duration=decoded / fps)


def _frame_size(width: int, height: int) -> tuple[int, int]:
    """The size frames are kept at: the stream's, scaled down (aspect kept) to at most
    :data:`FRAME_PIXELS`."""
    if width * height <= FRAME_PIXELS:
        return max(1, width), max(1, height)
    scale = (FRAME_PIXELS / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def _rgb(frame, size: tuple[int, int]) -> np.ndarray:
    """One frame as (H, W, 3) uint8 at ``size``: every kept frame has the same size, even when a
    stream changes size midway (or its header lied)."""
    if (frame.width, frame.height) == size:
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()


def _even_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``total`` frames (centres of n equal spans)."""
    if total <= n:
        return list(range(total))
    return sorted({int((i + 0.5) * total / n) for i in range(n)})


def write_video(
    path: str | os.PathLike | io.BytesIO, frames: np.ndarray, fps: int = 8,
    audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE,
) -> None:
    """Write ``frames`` (N, H, W, 3) uint8 and optional mono ``audio`` in [-1, 1] as H.264 + AAC MP4."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    with av.open(path, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"}
        video.codec_context.thread_count = 1
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
        for array in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            pcm = np.clip(audio, -1, 1).astype(np.float32)
            step = 1024
            for start in range(0, len(pcm), step):
                chunk = pcm[start : start + step][None, :]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
