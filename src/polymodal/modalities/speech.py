"""Speech synthesis with eSpeak NG through its documented C API (ctypes).

The ``espeakng-loader`` package ships ``libespeak-ng`` and its data, so no system package is
needed. Synthesis runs in synchronous mode: ``espeak_Synth`` returns once every chunk of audio
has been handed to our callback. The library keeps global state: calls are serialised by a lock,
and an utterance can differ by a few milliseconds of samples depending on what the process
spoke before (the words and voice are always the same).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from polymodal.modalities.audio import SAMPLE_RATE, resample

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# Voices shipped in espeak-ng-data that read English; "+variant" changes the timbre.
ENGLISH_VOICES = ("en-us", "en", "en-us+f3", "en+m3", "en-us+f2", "en+m7")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_native_rate = 0


def _initialise(lib: ctypes.CDLL) -> int:
    import espeakng_loader

    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise RuntimeError(f"eSpeak NG failed to initialise (returned {rate})")
    return rate


def _load() -> tuple[ctypes.CDLL, int]:
    global _library, _native_rate
    if _library is None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        rate = _initialise(lib)
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        _library, _native_rate = lib, rate
    return _library, _native_rate


def synthesize(
    text: str, voice: str = "en-us", words_per_minute: int = 160, pitch: int = 50,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Speak ``text``; returns mono float32 samples in [-1, 1] at ``sample_rate`` Hz."""
    if not text.strip():
        raise ValueError("cannot speak empty text")
    lib, native_rate = _load()
    chunks: list[np.ndarray] = []

    def on_audio(wav, n, _events):  # called by the library for each chunk of samples
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    callback = _CALLBACK(on_audio)
    data = text.encode("utf-8") + b"\0"
    with _lock:
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice named {voice!r}")
        lib.espeak_SetParameter(_ESPEAK_RATE, int(words_per_minute), 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        lib.espeak_SetSynthCallback(callback)
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
    if err != 0:
        raise RuntimeError(f"eSpeak NG failed to speak {text!r} (error {err})")
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    return resample(samples, native_rate, sample_rate)
