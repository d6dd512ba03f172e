"""A hostile data set: rows and files that try to reach outside their folder, to cost unbounded
memory or time, or to end a run.

The bar (``test_every_command_survives_the_hostile_corpus``): ``data inspect``, ``data shard``
and a short ``train`` — in memory and streamed, from the folder and from shards — each finish,
name every bad sample with its reason, never open the sentinel outside the folder (an audit hook
records every file the process opens), and stay under 2 GB of peak memory (its VmHWM, of a
fresh process). The other tests check one class of input each, in this process, in seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import PEAK_BYTES
from PIL import Image, ImageDraw

from polymodal.data.dataset import DecodeOptions, MultimodalDataset
from polymodal.data.inspect import inspect_dataset
from polymodal.data.memory import MemoryDataset, load_split
from polymodal.data.source import SkipLog, iter_shards, write_shards
from polymodal.errors import InputError
from polymodal.modalities.audio import load_audio
from polymodal.modalities.image import load_image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
PEAK_LIMIT = 2 * 2**30


# ---- small files -----------------------------------------------------------------------------------


def shape_png(colour: str, shape: str, size: int = 32) -> bytes:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def tone_wav(freq: float = 440.0, seconds: float = 0.25, rate: int = 16_000, fmt: str = "WAV",
             subtype: str | None = "PCM_16", channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        samples = np.repeat(samples[:, None], channels, axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def wav_declaring(rate: int) -> bytes:
    """A valid 16-bit WAV whose header claims ``rate`` samples a second (bytes 24-31 of the RIFF header)."""
    data = bytearray(tone_wav())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", (rate * 2) & 0xFFFFFFFF)
    return bytes(data)


def image_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(image_bytes(Image.new("P", (2, 2)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(image_bytes(Image.new("RGB", (2, 2)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims ``width`` x ``height`` (14 bits each, minus one)."""
    data = bytearray(image_bytes(Image.new("RGB", (8, 8), "red"), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    rest = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
    data[21:25] = struct.pack("<I", rest | (width - 1) | ((height - 1) << 14))
    return bytes(data)


class Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as they are read (a gzip bomb's payload)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def add_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else Zeros(size))


# ---- the corpus --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile sample and how it must be named: a skip message holding ``source`` and one of
    ``reasons``. ``shard``: ``data shard`` (which copies files without decoding) skips it too;
    ``trained``: a ``train`` over image, text and audio meets it."""

    name: str
    source: str
    reasons: tuple[str, ...]
    shard: bool = False
    trained: bool = True


@dataclass
class Corpus:
    root: Path
    folder: Path
    outside: Path
    sentinel: Path
    watched: list[Path]  # paths that must never be opened
    shards: Path
    recipe: Path
    cases: list[Case] = field(default_factory=list)
    shard_cases: list[Case] = field(default_factory=list)
    good_ids: list[str] = field(default_factory=list)


def build_corpus(root: Path) -> Corpus:
    folder, outside = root / "data", root / "outside"
    for d in (folder / "images", folder / "audio", folder / "video", outside):
        d.mkdir(parents=True)
    sentinel = outside / "sentinel.png"
    # a perfectly good image and sound: read, they would be trained on without a word
    noise = np.random.default_rng(99).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sentinel.write_bytes(image_bytes(Image.fromarray(noise), "PNG"))
    (outside / "sentinel.wav").write_bytes(tone_wav(880))
    (outside / "metadata.jsonl").write_text(json.dumps(
        {"id": "outside-row", "file_name": "sentinel.png", "text": "a red square", "split": "train"}) + "\n")
    (outside / "other.jsonl").write_text(json.dumps(
        {"id": "outside-other", "file_name": "../outside/sentinel.png", "text": "x", "split": "train"}) + "\n")
    corpus = Corpus(root, folder, outside, sentinel.resolve(), [outside.resolve()], root / "shards", root / "recipe.yaml")
    lines: list[bytes] = []

    def look() -> tuple[str, str]:
        return list(COLOURS)[len(lines) % 4], SHAPES[len(lines) % 2]

    def row(id_: str, split: str = "train", **values) -> dict:
        colour, shape = look()
        base = {"id": id_, "file_name": f"images/{id_}.png", "audio_file": f"audio/{id_}.wav",
                "text": f"a {colour} {shape}", "split": split}
        return {**base, **values}

    def write(id_: str, split: str = "train", **values) -> dict:
        r = row(id_, split, **values)
        if "file_name" not in values:
            (folder / r["file_name"]).write_bytes(shape_png(*look()))
        if "audio_file" not in values:
            (folder / r["audio_file"]).write_bytes(tone_wav())
        lines.append(json.dumps(r).encode())
        return r

    def path_case(name: str, value, reasons, *, column: str = "file_name", shard: bool = True, source=None):
        write(name, **{column: value})
        shown = source if source is not None else str(folder / str(value)) if isinstance(value, str) else name
        corpus.cases.append(Case(name, shown, reasons, shard=shard, trained=column != "video_file"))

    def file_case(name: str, column: str, data: bytes, reasons, ext: str):
        value = f"{'images' if column == 'file_name' else 'audio'}/{name}.{ext}"
        (folder / value).write_bytes(data)
        write(name, **{column: value})
        corpus.cases.append(Case(name, str(folder / value), reasons))

    def line_case(name: str, line: bytes, reasons, *, trained: bool = True):
        lines.append(line)
        corpus.cases.append(Case(name, f"data/metadata.jsonl line {len(lines)}", reasons, shard=trained,
                                 trained=trained))

    # good samples: every format that should work, large images decoded at reduced size
    for i in range(16):
        corpus.good_ids.append(write(f"good-{i:02d}")["id"])
    for i in range(4):
        corpus.good_ids.append(write(f"good-val-{i}", "val")["id"])
    (folder / "images/good-jpeg.jpg").write_bytes(image_bytes(Image.new("RGB", (4000, 3000), "blue"), "JPEG", quality=50))
    (folder / "audio/good-ogg.ogg").write_bytes(tone_wav(fmt="OGG", subtype="VORBIS"))
    (folder / "audio/good-flac.flac").write_bytes(tone_wav(rate=44_056, fmt="FLAC"))
    corpus.good_ids.append(write("good-jpeg", file_name="images/good-jpeg.jpg", audio_file="audio/good-ogg.ogg")["id"])
    (folder / "images/good-big.png").write_bytes(image_bytes(Image.new("1", (6000, 5000), 1), "PNG"))
    corpus.good_ids.append(write("good-big", file_name="images/good-big.png", audio_file="audio/good-flac.flac")["id"])

    # leaving the folder: '..', absolute paths, links (to a file, through a folder), devices
    path_case("dotdot", "../outside/sentinel.png", ("'..' leads outside",))
    path_case("absolute", str(sentinel), ("an absolute path outside",))
    os.symlink(sentinel, folder / "images/link.png")
    path_case("symlink", "images/link.png", ("a symbolic link leads outside",))
    os.symlink(outside, folder / "images/elsewhere")
    path_case("linked-folder", "images/elsewhere/sentinel.png", ("a symbolic link leads outside",))
    path_case("dev-zero", "/dev/zero", ("an absolute path outside",))
    os.symlink("/dev/zero", folder / "images/zero.png")
    path_case("dev-zero-link", "images/zero.png", ("a symbolic link leads outside",))
    path_case("audio-dotdot", "../outside/sentinel.wav", ("'..' leads outside",), column="audio_file")
    path_case("video-dotdot", "../outside/sentinel.png", ("'..' leads outside",), column="video_file")
    # inside, but not a regular file, or not there, or not a path
    os.mkfifo(folder / "images/pipe.png")
    corpus.watched.append((folder / "images/pipe.png").resolve())
    path_case("fifo", "images/pipe.png", ("FIFO",))
    path_case("directory", "images", ("a directory, not a regular file",))
    path_case("missing", "images/nowhere.png", ("file not found",))
    os.symlink("loop-b.png", folder / "images/loop-a.png")
    os.symlink("loop-a.png", folder / "images/loop-b.png")
    path_case("link-loop", "images/loop-a.png", ("cannot resolve", "not found", "loop"))
    path_case("int-path", 7, ("expected a file path",), source="data/metadata.jsonl line")
    path_case("list-path", ["images/good-00.png"], ("expected a file path",), source="data/metadata.jsonl line")
    path_case("nul-path", "images/good-00.png\u0000.txt", ("NUL",), source="data/metadata.jsonl line")

    # files whose header promises a huge decoding cost, or that do not decode at all
    too_big = ("exceeds the limit", "too large")
    file_case("huge-png", "file_name", image_bytes(Image.new("1", (7999, 7999)), "PNG"), too_big, "png")
    file_case("huge-tiff", "file_name", image_bytes(Image.new("1", (7000, 7000)), "TIFF", compression="group4"),
              too_big, "tif")
    file_case("huge-gif", "file_name", gif_declaring(7000, 7000), too_big, "gif")
    file_case("huge-bmp", "file_name", bmp_declaring(7000, 7000), too_big, "bmp")
    file_case("huge-bomb-bmp", "file_name", bmp_declaring(60000, 60000), too_big, "bmp")
    file_case("huge-webp", "file_name", webp_declaring(7000, 7000), too_big + ("corrupt", "unrecognised"), "webp")
    half = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    file_case("truncated-png", "file_name", half[: len(half) // 2], ("truncated",), "png")
    file_case("empty-png", "file_name", b"", ("zero-length",), "png")
    file_case("noise-png", "file_name", np.random.default_rng(1).bytes(3000), ("unrecognised",), "png")
    file_case("eps-as-png", "file_name", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
              ("unrecognised",), "png")
    rate = ("sample rate",)
    file_case("rate-2147483647", "audio_file", wav_declaring(2_147_483_647), rate, "wav")
    file_case("rate-999983", "audio_file", wav_declaring(999_983), rate, "wav")
    file_case("rate-zero", "audio_file", wav_declaring(0), rate + ("cannot decode",), "wav")
    file_case("flac-384k", "audio_file", tone_wav(rate=384_000, fmt="FLAC", seconds=0.01), rate, "flac")
    long_flac = io.BytesIO()
    sf.write(long_flac, np.zeros(700 * 8000, dtype=np.float32), 8000, format="FLAC")
    file_case("flac-700s", "audio_file", long_flac.getvalue(), ("s long; the limit",), "flac")
    nan = io.BytesIO()
    sf.write(nan, np.full(800, np.nan, dtype=np.float32), 16_000, format="WAV", subtype="FLOAT")
    file_case("wav-nan", "audio_file", nan.getvalue(), ("not finite",), "wav")
    file_case("wav-9-channels", "audio_file", tone_wav(channels=9), ("channels",), "wav")
    file_case("wav-truncated", "audio_file", tone_wav()[:3000], ("truncated",), "wav")
    file_case("wav-empty", "audio_file", b"", ("zero-length",), "wav")
    file_case("wav-noise", "audio_file", np.random.default_rng(2).bytes(3000), ("cannot decode",), "wav")
    for name, data in (("video-empty", b""), ("video-noise", np.random.default_rng(3).bytes(4000))):
        (folder / f"video/{name}.mp4").write_bytes(data)
        write(name, video_file=f"video/{name}.mp4")
        corpus.cases.append(Case(name, str(folder / f"video/{name}.mp4"), ("zero-length", "cannot open"),
                                 trained=False))
    write("long-text", text="word " * 4000)  # 20,000 characters: under the line limit, over the text limit
    corpus.cases.append(Case("long-text", "data/metadata.jsonl line", ("the limit is",)))

    # rows that are not rows
    line_case("deep-json", b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ("nested too deeply",))
    line_case("deep-40", b'{"id": "deep40", "x": ' + b"[" * 40 + b"]" * 40 + b"}", ("nested more than",))
    line_case("split-list", json.dumps(row("split-list", split=["train"])).encode(), ("field 'split'",))
    line_case("id-dict", json.dumps(row("x", id={"a": 1})).encode(), ("field 'id'",))
    line_case("nan", json.dumps(row("nan", count=float("nan"))).encode(), ("NaN is not valid JSON",))
    line_case("infinity", b'{"id": "inf", "text": "a", "split": "train", "w": -Infinity}', ("-Infinity is not valid",))
    line_case("1e999", b'{"id": "big", "text": "a", "split": "train", "w": 1e999}', ("out of range",))
    line_case("many-digits", b'{"id": "digits", "n": ' + b"9" * 10_000 + b"}", ("invalid JSON",))
    line_case("latin-1", '{"id": "latin", "text": "caf\u00e9", "split": "train"}'.encode("latin-1"), ("not UTF-8",))
    line_case("array", b'["train", "a red square"]', ("expected a JSON object",))
    line_case("invalid", b'{"id": "cut", "text": "a red', ("invalid JSON",))
    line_case("huge-line", b'{"id": "huge", "text": "' + b"a" * (3 * 2**20) + b'"}', ("longer than",))

    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # metadata files that are not what they seem
    os.symlink(outside, folder / "linked")  # a folder link: its metadata.jsonl is never read
    (folder / "sub").mkdir()
    os.symlink(outside / "other.jsonl", folder / "sub/metadata.jsonl")
    corpus.cases.append(Case("meta-link", str(folder / "sub/metadata.jsonl"), ("metadata file skipped",), shard=True))
    (folder / "piped").mkdir()
    os.mkfifo(folder / "piped/metadata.jsonl")
    corpus.watched.append((folder / "piped/metadata.jsonl").resolve())
    corpus.cases.append(Case("meta-fifo", "piped/metadata.jsonl", ("FIFO",), shard=True))
    corpus.watched.append(Path("/dev/zero"))

    build_shards(corpus)
    corpus.recipe.write_text(RECIPE)
    return corpus


def build_shards(corpus: Corpus) -> None:
    """A shard folder: a good shard, a gzip bomb, rows that are not rows, and shards that are not tars."""
    shards = corpus.shards
    shards.mkdir()
    with tarfile.open(shards / "a-good.tar", "w") as tar:
        for i in range(12):
            text = f"a {list(COLOURS)[i % 4]} {SHAPES[i % 2]}"
            split = "train" if i < 10 else "val"
            row = {"id": f"s{i:02d}", "text": text, "split": split, "file_name": "s.png", "audio_file": "s.wav"}
            add_member(tar, f"s{i:02d}.json", json.dumps(row).encode())
            add_member(tar, f"s{i:02d}.file_name.png", shape_png(*text.split()[1:]))
            add_member(tar, f"s{i:02d}.audio_file.wav", tone_wav())
    with open(shards / "b-bomb.tar", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        add_member(tar, "bomb.json", json.dumps({"id": "bomb", "text": "a red square", "split": "train",
                                                 "file_name": "bomb.png"}).encode())
        add_member(tar, "bomb.file_name.png", size=300 * 2**20)  # 300 MB of zeros in about 300 KB
        add_member(tar, "after.json", json.dumps({"id": "after", "text": "a red square", "split": "train"}).encode())
    with tarfile.open(shards / "c-rows.tar", "w") as tar:
        add_member(tar, "deep.json", b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        add_member(tar, "nan.json", b'{"id": "nan", "text": "a", "split": "train", "w": NaN}')
        add_member(tar, "list.json", b'["a list"]')
        add_member(tar, "split.json", b'{"id": "split", "text": "a", "split": ["train"]}')
        add_member(tar, "nojson.file_name.png", shape_png("red", "square"))
    (shards / "d-noise.tar").write_bytes(np.random.default_rng(4).bytes(5000))
    (shards / "e-empty.tar").write_bytes(b"")
    os.mkfifo(shards / "f-pipe.tar")
    corpus.watched.append((shards / "f-pipe.tar").resolve())
    corpus.shard_cases = [
        Case("bomb", "b-bomb.tar", ("compression bomb",)),
        Case("deep", "c-rows.tar:deep", ("nested too deeply",)),
        Case("nan", "c-rows.tar:nan", ("NaN is not valid JSON",)),
        Case("list", "c-rows.tar:list", ("expected a JSON object",)),
        Case("split", "c-rows.tar:split", ("field 'split'",)),
        Case("nojson", "c-rows.tar:nojson", ("no .json member",)),
        Case("noise", "d-noise.tar", ("unreadable shard",)),
        Case("empty", "e-empty.tar", ("unreadable shard",)),
        Case("fifo", "f-pipe.tar", ("FIFO",)),
    ]


RECIPE = """
name: hostile
model:
  type: contrastive
  embed_dim: 16
  towers:
    image: {type: cnn, preset: tiny}
    text: {type: text, preset: tiny}
    audio: {type: audio, preset: tiny}
  pairs: [[image, text], [audio, text]]
data:
  fields: [image, text, audio]
  batch_size: 4
  val_limit: 8
trainer:
  max_steps: 2
  val_every_minutes: 0
  vocab_size: 300
  log_every_steps: 1
  accelerator: cpu
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def named(messages: list[str], case: Case) -> bool:
    return any(case.source in m and any(r in m for r in case.reasons) for m in messages)


def skip_messages(skips: SkipLog) -> list[str]:
    return [f"skipped {b.source}: {b.reason}" for b in skips.bad]


def unnamed(messages: list[str], cases: list[Case]) -> list[str]:
    return [f"{c.name} ({c.source}: {' | '.join(c.reasons)})" for c in cases if not named(messages, c)]


# ---- in this process: one class of input at a time ------------------------------------------------------


def test_inspect_names_every_bad_sample_and_sheets_only_good_ones(corpus, tmp_path):
    report = inspect_dataset(corpus.folder, sheet=tmp_path / "sheet.png", sheet_size=40)
    messages = skip_messages(report.skips)
    assert unnamed(messages, corpus.cases) == []
    assert not [m for m in messages if "good-" in m]
    assert report.sheet.is_file()
    assert all(max(image.size) <= 128 for image, _ in report.sheet_items)  # thumbnails, not decoded originals
    labels = " ".join(label for _, label in report.sheet_items)
    assert "good-big" in labels and "good-jpeg" in labels and "dotdot" not in labels


def test_streaming_a_split_skips_every_bad_sample_and_keeps_the_good(corpus):
    skips = SkipLog()
    items = list(MultimodalDataset(corpus.folder, ["image", "text", "audio"], skips=skips))
    ids = sorted(item["row"]["id"] for item in items)
    assert ids == sorted(corpus.good_ids + [c.name for c in corpus.cases if not c.trained])  # bad videos unread
    assert unnamed(skip_messages(skips), [c for c in corpus.cases if c.trained]) == []
    assert all(b.source != str(corpus.sentinel) or "outside" in b.reason for b in skips.bad)
    assert any(str(corpus.sentinel) in f"{b.source} {b.reason}" for b in skips.bad)  # the sentinel is named


def test_shards_never_carry_a_file_from_outside_the_folder(corpus, tmp_path):
    skips = SkipLog()
    shards = write_shards(corpus.folder, tmp_path / "packed", skips=skips)
    sentinel = corpus.sentinel.read_bytes()
    keys = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                keys.add(member.name.partition(".")[0])
                assert tar.extractfile(member).read() != sentinel, member.name
    assert not keys & {c.name for c in corpus.cases if c.shard}
    assert set(corpus.good_ids) <= keys and "outside-row" not in keys
    assert unnamed(skip_messages(skips), [c for c in corpus.cases if c.shard]) == []


def test_hostile_shards_are_skipped_sample_by_sample(corpus):
    skips = SkipLog()
    items = list(MultimodalDataset(corpus.shards, ["image", "text", "audio"], skips=skips))
    assert sorted(item["row"]["id"] for item in items) == [f"s{i:02d}" for i in range(12)]
    assert unnamed(skip_messages(skips), corpus.shard_cases) == []


def test_a_shard_member_over_the_limit_is_skipped_from_its_header(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, size in (("big", 5000), ("small", 10)):
            add_member(tar, f"{key}.json", json.dumps({"id": key, "text": "a red square"}).encode())
            add_member(tar, f"{key}.file_name.png", size=size)
    skips = SkipLog()
    rows = [raw.row["id"] for raw in iter_shards(tmp_path / "s.tar", skips, max_file_bytes=1000)]
    assert rows == ["small"]
    assert "big.file_name.png" in skips.bad[0].source and "5,000 bytes exceeds" in skips.bad[0].reason


def test_outside_paths_are_read_only_when_allowed_and_devices_never(corpus):
    allowed = DecodeOptions(allow_outside_paths=True)
    skips = SkipLog()
    items = list(MultimodalDataset(corpus.folder, ["image"], options=allowed, skips=skips))
    ids = {item["row"]["id"] for item in items}
    assert {"dotdot", "absolute", "symlink", "linked-folder"} <= ids  # the user asked for them
    reasons = {b.source: b.reason for b in skips.bad}
    assert "a character device, not a regular file" in reasons["/dev/zero"]
    assert "FIFO" in reasons[str(corpus.folder / "images/pipe.png")]


def test_inspect_checks_paths_without_decoding_and_opts_in_on_the_command_line(corpus, tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app

    def bad_sources(*flags: str) -> dict[str, str]:
        out = tmp_path / "report.json"
        result = CliRunner().invoke(app, ["data", "inspect", str(corpus.folder), "--no-decode", "--json", str(out),
                                          "--sheet", str(tmp_path / "sheet.png"), *flags])
        assert result.exit_code == 0, result.output
        return {b["source"]: b["reason"] for b in json.loads(out.read_text())["bad"]}

    confined = bad_sources()
    assert "'..' leads outside" in confined[str(corpus.folder / "../outside/sentinel.png")]
    assert "FIFO" in confined[str(corpus.folder / "images/pipe.png")]
    assert not any("huge-png" in s for s in confined)  # not decoded: its header is not read
    allowed = bad_sources("--allow-outside-paths")
    assert str(corpus.folder / "../outside/sentinel.png") not in allowed
    assert "character device" in allowed["/dev/zero"]


def test_in_memory_split_streams_instead_when_estimated_over_the_limit(corpus, caplog):
    fields = ["image", "text"]
    kept = load_split(corpus.folder, fields, split="val", memory_limit_gb=1.0)
    assert isinstance(kept, MemoryDataset) and len(kept) == 4
    skips = SkipLog()
    with caplog.at_level("INFO", logger="polymodal.data"):
        streamed = load_split(corpus.folder, fields, split="train", skips=skips, memory_limit_gb=1e-5)
    assert isinstance(streamed, MultimodalDataset) and not isinstance(streamed, MemoryDataset)
    line = next(r.getMessage() for r in caplog.records if "memory_limit_gb" in r.getMessage())
    assert "rows x" in line and "streamed" in line
    assert skips.total == 0  # nothing counted twice: the streamed pass counts its own skips
    ids = {item["row"]["id"] for item in streamed}
    assert {i for i in corpus.good_ids if "val" not in i} <= ids and not ids & {"dotdot", "symlink", "fifo"}
    assert skips.counts["bad"] > 0


def test_large_images_decode_reduced_and_huge_ones_are_refused_from_the_header():
    jpeg = image_bytes(Image.new("RGB", (4000, 3000), "blue"), "JPEG", quality=50)
    assert load_image(jpeg, target_size=64).size == (250, 188)  # decoded at 1/8 scale, then shrunk
    assert load_image(jpeg).size == (4000, 3000)
    big = image_bytes(Image.new("L", (3000, 2000), 200), "PNG")
    small = load_image(big, target_size=32)
    assert min(small.size) >= 64 and small.size[0] < 3000
    with pytest.raises(InputError, match="exceeds the limit"):
        load_image(image_bytes(Image.new("1", (7999, 7999)), "PNG"), target_size=64)


def test_odd_sample_rates_resample_with_a_bounded_filter_and_absurd_ones_are_refused():
    audio = load_audio(tone_wav(rate=44_056, seconds=0.5))  # 16,000 / 44,056 = 2,000 / 5,507
    assert abs(len(audio) - 8000) <= 2
    for rate in (2_147_483_647, 999_983, 4_000):
        with pytest.raises(InputError, match="sample rate"):
            load_audio(wav_declaring(rate))


# ---- the bar: each command in a fresh process, its peak memory and every file it opens ------------------

RUNNER = PEAK_BYTES + textwrap.dedent("""
    import json, logging, os, sys
    watched, result, commands = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    opened = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))  # a link is judged by where it leads
            if any(path == w or path.startswith(w + os.sep) for w in watched):
                opened.append(path)

    sys.addaudithook(audit)
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("polymodal").addHandler(Keep())
    from typer.testing import CliRunner
    from polymodal.cli import app
    runs = []
    for args in commands:
        start, first_open = len(messages), len(opened)
        outcome = CliRunner().invoke(app, args)
        runs.append({"args": args, "exit_code": outcome.exit_code, "error": repr(outcome.exception),
                     "output": outcome.output[-3000:], "messages": messages[start:], "opened": opened[first_open:]})
    peak = peak_bytes()
    json.dump({"runs": runs, "opened": opened, "peak": peak}, open(result, "w"))
""")


def run_commands(corpus: Corpus, commands: list[list[str]], tmp_path: Path) -> dict:
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    watched = json.dumps([str(p) for p in corpus.watched])
    subprocess.run([sys.executable, "-c", RUNNER, watched, str(result), json.dumps(commands)],
                   check=True, env=env, timeout=900, cwd=tmp_path)
    return json.loads(result.read_text())


@pytest.mark.slow
def test_every_command_survives_the_hostile_corpus(corpus, tmp_path):
    folder, shards, recipe = str(corpus.folder), str(corpus.shards), str(corpus.recipe)
    # a stream is read only as far as the steps need: five steps of four pass the end of the data once
    streamed = ["data.in_memory=false", "trainer.max_steps=5"]
    commands = [
        ["data", "inspect", folder, "--json", str(tmp_path / "inspect.json"), "--sheet", str(tmp_path / "sheet.png")],
        ["data", "shard", folder, str(tmp_path / "packed")],
        ["data", "inspect", shards, "--sheet", str(tmp_path / "shards.png")],
        ["train", recipe, "--data", folder, "--out", str(tmp_path / "in-memory")],
        ["train", recipe, "--data", folder, "--out", str(tmp_path / "streamed"), *streamed],
        ["train", recipe, "--data", shards, "--out", str(tmp_path / "shards-in-memory")],
        ["train", recipe, "--data", shards, "--out", str(tmp_path / "shards-streamed"), *streamed],
        # the user opts in: the audit sees the sentinel read (so it would have seen it above), never a FIFO
        ["data", "inspect", folder, "--allow-outside-paths", "--sheet", str(tmp_path / "allowed.png")],
    ]
    result = run_commands(corpus, commands, tmp_path)
    *runs, allowed = result["runs"]
    inspect_folder, shard, inspect_shards, *trains = runs
    for run in result["runs"]:
        assert run["exit_code"] == 0, (run["args"], run["error"], run["output"])
    for run in runs:
        assert run["opened"] == [], run["args"]  # neither the sentinel, nor a FIFO, nor /dev/zero
    assert str(corpus.sentinel) in allowed["opened"]
    outside = corpus.outside.resolve()
    assert set(allowed["opened"]) <= {str(outside / name) for name in ("sentinel.png", "sentinel.wav", "other.jsonl")}
    assert result["peak"] < PEAK_LIMIT, f"peak memory {result['peak'] / 2**30:.2f} GB"

    assert unnamed(inspect_folder["messages"], corpus.cases) == []
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert unnamed([f"{b['source']}: {b['reason']}" for b in report["bad"]], corpus.cases) == []
    assert unnamed(shard["messages"], [c for c in corpus.cases if c.shard]) == []
    assert unnamed(inspect_shards["messages"], corpus.shard_cases) == []
    for run in trains[:2]:
        assert unnamed(run["messages"], [c for c in corpus.cases if c.trained]) == [], run["args"]
    for run in trains[2:]:
        assert unnamed(run["messages"], corpus.shard_cases) == [], run["args"]
    for run in runs:
        assert not [m for m in run["messages"] if "good-" in m and "skipped" in m], run["args"]
    sentinel = corpus.sentinel.read_bytes()
    for path in (tmp_path / "packed").glob("*.tar"):
        with tarfile.open(path) as tar:
            assert all(tar.extractfile(m).read() != sentinel for m in tar.getmembers())
    for run in ("in-memory", "streamed", "shards-in-memory", "shards-streamed"):
        assert (tmp_path / run / "model" / "model.safetensors").is_file()
