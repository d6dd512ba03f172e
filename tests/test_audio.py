import io

import numpy as np
import pytest
import soundfile as sf
import torch

from polymodal.errors import InputError
from polymodal.modalities.audio import (
    HOP,
    N_MELS,
    SAMPLE_RATE,
    hz_to_mel,
    load_audio,
    log_mel_spectrogram,
    mel_filter_bank,
    mel_to_hz,
    num_frames,
    save_wav,
    wav_bytes,
)


def sine(freq: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def stereo_wav(path, seconds: float = 1.0, rate: int = 22_050) -> np.ndarray:
    left, right = sine(440, seconds, rate), sine(660, seconds, rate, amplitude=0.3)
    data = np.stack([left, right], axis=1)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return data


def test_stereo_22050_becomes_mono_16k(tmp_path):
    path = tmp_path / "stereo.wav"
    data = stereo_wav(path, seconds=1.5)
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.ndim == 1
    expected = round(len(data) * SAMPLE_RATE / 22_050)
    assert abs(len(audio) - expected) <= 2
    assert abs(len(audio) - 24_000) <= 2
    # mono is the mean of the channels: peak near (0.5 + 0.3) / 2 at most, clearly not silent
    assert 0.1 < audio.abs().max().item() <= 0.45
    assert torch.equal(load_audio(path.read_bytes(), name="stereo.wav"), audio)


def test_16k_mono_is_unchanged(tmp_path):
    samples = sine(300, 0.5)
    path = tmp_path / "mono.wav"
    save_wav(path, samples)
    audio = load_audio(path)
    assert len(audio) == len(samples)
    assert torch.allclose(audio, torch.from_numpy(samples), atol=1e-4)


def expect_error(source, name_part: str, problem_part: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_audio(source, **kwargs)
    message = str(info.value)
    assert name_part in message, message
    assert problem_part in info.value.problem.lower(), message
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "gone.wav", "gone.wav", "not found")


def test_truncated_wav(tmp_path):
    data = wav_bytes(sine(440, 1.0))
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "cut.wav", "truncated")


def test_zero_length(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    expect_error(path, "empty.wav", "zero-length")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(path, "noise.wav", "unsupported format")


def test_too_many_channels(tmp_path):
    path = tmp_path / "surround.wav"
    sf.write(str(path), np.zeros((1600, 3), dtype=np.float32), SAMPLE_RATE)
    expect_error(path, "surround.wav", "3 channels", max_channels=2)
    assert len(load_audio(path, max_channels=3)) == 1600


def test_too_long(tmp_path):
    path = tmp_path / "long.wav"
    save_wav(path, sine(200, 3.0))
    error = expect_error(path, "long.wav", "3.0 s long", max_seconds=2.0)
    assert "max_seconds" in error.problem
    assert len(load_audio(path, max_seconds=3.5)) == 48_000


def test_bytes_without_name_get_a_placeholder_name():
    expect_error(b"", "<audio bytes>", "zero-length")


def reference_filter_bank() -> np.ndarray:
    """The documented filter bank, computed independently in numpy (float64)."""
    bins = np.linspace(0, SAMPLE_RATE / 2, 201)
    mel = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), N_MELS + 2)
    corners = 700 * (10 ** (mel / 2595) - 1)
    bank = np.zeros((N_MELS, 201))
    for m in range(N_MELS):
        left, centre, right = corners[m : m + 3]
        tri = np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre))
        bank[m] = np.clip(tri, 0, None) * 2 / (right - left)
    return bank


def test_mel_filter_bank_shape_and_area():
    bank = mel_filter_bank()
    assert bank.shape == (N_MELS, 201)
    assert bank.dtype == torch.float32
    assert (bank >= 0).all()
    assert (bank.sum(dim=1) > 0).all()  # no empty filter
    assert np.allclose(bank.numpy(), reference_filter_bank(), rtol=1e-4, atol=1e-7)
    bin_width = SAMPLE_RATE / 400
    assert bin_width == 40
    area = bank.sum(dim=1) * bin_width
    corners = mel_to_hz(torch.linspace(0.0, hz_to_mel(8000.0).item(), N_MELS + 2))
    wide = (corners[2:] - corners[:-2]) >= 4 * bin_width  # filters spanning 4 bins or more
    assert wide.sum() >= 35
    assert torch.allclose(area[wide], torch.ones(int(wide.sum())), rtol=0.05), area[wide]
    assert abs(area.mean().item() - 1.0) < 0.02


def test_filters_are_ordered_by_frequency():
    peaks = mel_filter_bank().argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all()
    assert peaks[-1] > peaks[0]


def test_hz_mel_round_trip():
    hz = torch.tensor([0.0, 100.0, 1000.0, 8000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(hz)), hz, atol=1e-6)
    assert abs(hz_to_mel(1000.0).item() - 1000.0) < 1.0  # HTK: 1 kHz is about 1000 mel


@pytest.mark.parametrize("length", [201, 1000, 16_000, 16_001, 24_159])
def test_frame_count(length):
    spec = log_mel_spectrogram(torch.zeros(length) + 0.01 * torch.randn(length))
    assert spec.shape == (N_MELS, 1 + length // HOP)
    assert num_frames(length) == 1 + length // HOP


@pytest.mark.parametrize("length", [1, 160, 200])
def test_frame_count_of_very_short_clips(length):
    spec = log_mel_spectrogram(torch.full((length,), 0.01))
    assert spec.shape == (N_MELS, 1 + length // HOP)


def test_silence_hits_the_log_floor():
    spec = log_mel_spectrogram(torch.zeros(1600))
    assert torch.allclose(spec, torch.full_like(spec, float(np.log(1e-10))))


def test_1khz_sine_peaks_in_the_band_nearest_1khz():
    spec = log_mel_spectrogram(torch.from_numpy(sine(1000, 0.5)))
    mels = torch.linspace(hz_to_mel(0.0).item(), hz_to_mel(SAMPLE_RATE / 2).item(), N_MELS + 2)
    centres = mel_to_hz(mels[1:-1])
    nearest = int((centres - 1000).abs().argmin())
    energy = spec[:, 5:-5].mean(dim=1)  # frames away from the edges
    assert int(energy.argmax()) == nearest
    assert energy[nearest] > energy[nearest + 5] + 5 and energy[nearest] > energy[nearest - 5] + 5


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    waves = torch.from_numpy(rng.uniform(-0.5, 0.5, size=(3, 4000)).astype(np.float32))
    batched = log_mel_spectrogram(waves)
    assert batched.shape == (3, N_MELS, 1 + 4000 // HOP)
    for i in range(3):
        assert torch.allclose(batched[i], log_mel_spectrogram(waves[i]), atol=1e-4)


def test_bad_waveform_rank():
    with pytest.raises(ValueError):
        log_mel_spectrogram(torch.zeros(1, 2, 400))


def test_wav_bytes_round_trip():
    data = wav_bytes(sine(500, 0.25))
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SAMPLE_RATE and len(decoded) == 4000
    assert np.allclose(decoded, sine(500, 0.25), atol=1e-3)
