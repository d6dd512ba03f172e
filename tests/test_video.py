import av
import numpy as np
import pytest

from polymodal.errors import InputError
from polymodal.modalities.video import load_video, write_video

SIZE, FPS, N = 64, 8, 16  # 2 s of video


def moving_square_frames() -> np.ndarray:
    """A red 16x16 square moving left to right across a white frame."""
    frames = np.full((N, SIZE, SIZE, 3), 255, dtype=np.uint8)
    for t in range(N):
        x = round(t * (SIZE - 16) / (N - 1))
        frames[t, 24:40, x : x + 16] = (255, 0, 0)
    return frames


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "square.mp4"
    write_video(str(path), moving_square_frames(), FPS, tone(N / FPS))
    return path


@pytest.fixture(scope="module")
def silent_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "silent.mp4"
    write_video(str(path), moving_square_frames(), FPS)
    return path


def red_mask(frame) -> np.ndarray:
    r, g, b = (frame[c].numpy() for c in range(3))
    return (r > 0.7) & (g < 0.3) & (b < 0.3)


def test_round_trip_frames_and_motion(clip_path):
    clip = load_video(clip_path, num_frames=4)
    assert clip.frames.shape == (4, 3, SIZE, SIZE)
    assert 0.0 <= clip.frames.min() and clip.frames.max() <= 1.0
    assert clip.fps == pytest.approx(FPS)
    assert clip.duration == pytest.approx(N / FPS)
    xs = []
    for frame in clip.frames:
        mask = red_mask(frame)
        assert mask.sum() > 150  # most of the 256 square pixels are clearly red
        rows, cols = np.nonzero(mask)
        assert 22 <= rows.mean() <= 42  # the square stays in its lane
        xs.append(cols.mean())
        background = frame[:, 2:20, :].mean().item()  # white above the lane
        assert background > 0.9
    assert all(b > a + 5 for a, b in zip(xs, xs[1:], strict=False)), xs  # left to right
    assert xs[0] < SIZE / 2 < xs[-1]


def test_round_trip_audio_length(clip_path):
    clip = load_video(clip_path.read_bytes(), name="square.mp4", num_frames=2)
    assert clip.has_audio
    assert abs(len(clip.audio) / 16_000 - N / FPS) < 0.1
    assert 0.1 < clip.audio.abs().max().item() <= 1.0


def test_more_frames_than_the_clip_has_repeats_the_last(clip_path):
    clip = load_video(clip_path, num_frames=N + 4)
    assert clip.frames.shape[0] == N + 4
    assert (clip.frames[N:] == clip.frames[N - 1]).all()


def test_video_without_audio(silent_path):
    clip = load_video(silent_path, num_frames=3)
    assert not clip.has_audio
    assert clip.audio.numel() == 0
    assert clip.frames.shape == (3, 3, SIZE, SIZE)


def expect_error(source, name_part: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_video(source, **kwargs)
    assert name_part in str(info.value), str(info.value)
    return info.value


def test_missing_file(tmp_path):
    error = expect_error(tmp_path / "gone.mp4", "gone.mp4")
    assert "not found" in error.problem


def test_zero_length(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert "zero-length" in expect_error(path, "empty.mp4").problem


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    assert "cannot open video" in expect_error(path, "garbage.mp4").problem


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, clip_path, keep):
    data = clip_path.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(path, "cut.mp4")


def test_truncated_faststart_file(tmp_path, clip_path):
    """With the index (moov) first, a cut file opens; decoding must notice the missing frames."""
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(clip_path)) as src, av.open(
        str(faststart), "w", format="mp4", options={"movflags": "faststart"}
    ) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            dst.mux(packet)
    data = faststart.read_bytes()
    assert data.find(b"moov") < 100
    assert load_video(data, num_frames=2).frames.shape[0] == 2
    for keep in (0.5, 0.97):
        cut = tmp_path / f"cut_{keep}.mp4"
        cut.write_bytes(data[: int(len(data) * keep)])
        error = expect_error(cut, cut.name)
        assert "corrupt" in error.problem or "truncated" in error.problem


def test_truncated_bytes_named(clip_path):
    data = clip_path.read_bytes()
    expect_error(data[: len(data) // 2], "shard-000000.tar:000001.video_file",
                 name="shard-000000.tar:000001.video_file")


def test_max_pixels(clip_path):
    error = expect_error(clip_path, "square.mp4", max_pixels=SIZE * SIZE - 1)
    assert "64x64" in error.problem
    assert load_video(clip_path, num_frames=1, max_pixels=SIZE * SIZE).frames.shape[0] == 1


def test_max_seconds(clip_path):
    error = expect_error(clip_path, "square.mp4", max_seconds=1.0)
    assert "limit" in error.problem


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError):
        write_video(str(tmp_path / "x.mp4"), np.zeros((2, 8, 8, 3), dtype=np.float32), FPS)
