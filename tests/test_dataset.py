import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.dataset import (
    Collator,
    DecodeOptions,
    Field,
    MultimodalDataset,
    make_loader,
    parse_fields,
)
from polymodal.data.source import SkipLog, is_file_column, iter_source, write_shards
from polymodal.errors import InputError
from polymodal.modalities.audio import load_audio, num_frames, save_wav
from polymodal.modalities.image import ImageTransform
from polymodal.modalities.text import TextTokenizer


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def copy_rows(world: Path, out: Path, rows: list[dict]) -> Path:
    """A data set folder holding ``rows`` of ``world`` and their files."""
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for column, value in row.items():
            if is_file_column(column) and value:
                (out / value).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(world / value, out / value)
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def world_rows(small_world):
    return rows_of(small_world)


@pytest.fixture(scope="module")
def tokenizer(world_rows):
    return TextTokenizer.train([r["text"] for r in world_rows], vocab_size=400)


# ---- the key bar: bad samples are skipped, named and counted; the rest stream ------------------


def test_corrupt_files_and_bad_json_are_skipped_by_name(small_world, world_rows, tmp_path):
    rows = world_rows[:10]
    folder = copy_rows(small_world, tmp_path / "broken", rows)
    bad_png = rows[2]["file_name"]
    (folder / bad_png).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    bad_wav = rows[5]["audio_file"]
    wav = (folder / bad_wav).read_bytes()
    (folder / bad_wav).write_bytes(wav[: len(wav) // 2])
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines.insert(7, '{"id": "oops", "text": "unclosed')  # becomes line 8
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    skips = SkipLog()
    dataset = MultimodalDataset(folder, ["image", "text", "audio"], skips=skips)
    items = list(dataset)

    good = [r["id"] for i, r in enumerate(rows) if i not in (2, 5)]
    assert [item["row"]["id"] for item in items] == good
    assert skips.total == 3 and skips.counts == Counter(bad=3)
    assert len(skips.bad) == 3
    by_source = {b.source: b.reason for b in skips.bad}
    png_source = next(s for s in by_source if s.endswith(bad_png))
    assert "corrupt" in by_source[png_source] or "unrecognised" in by_source[png_source]
    wav_source = next(s for s in by_source if s.endswith(bad_wav))
    assert "truncated" in by_source[wav_source]
    json_source = next(s for s in by_source if "metadata.jsonl line" in s)
    assert json_source.endswith("metadata.jsonl line 8")
    assert "invalid JSON" in by_source[json_source]
    assert "3 samples skipped (3 bad)" == skips.summary()
    for item in items:
        assert item["image"].shape == (3, 64, 64)
        assert item["audio"].shape[0] == 80 and item["audio"].shape[1] > 10
        assert isinstance(item["text"], str) and item["text"]


def test_other_bad_rows_are_named(small_world, world_rows, tmp_path):
    rows = [dict(r) for r in world_rows[:6]]
    rows[0]["text"] = "   "  # whitespace-only caption
    rows[1]["file_name"] = "images/nowhere.png"  # file missing
    folder = tmp_path / "more"
    copy_rows(small_world, folder, [r for i, r in enumerate(rows) if i != 1])
    lines = [json.dumps(r) for r in rows] + ["[1, 2, 3]"]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n\n")
    skips = SkipLog()
    items = list(MultimodalDataset(folder, ["image", "text"], skips=skips))
    assert [i["row"]["id"] for i in items] == [r["id"] for r in rows[2:]]
    reasons = {b.source: b.reason for b in skips.bad}
    assert len(reasons) == 3, reasons
    text_source = next(s for s in reasons if "line 1" in s)
    assert "'text'" in text_source and "empty" in reasons[text_source]
    missing = next(s for s in reasons if s.endswith("nowhere.png"))
    assert "not found" in reasons[missing]
    assert "expected a JSON object" in reasons[next(s for s in reasons if s.endswith("line 7"))]


def test_very_short_audio_is_skipped_not_fatal(small_world, world_rows, tmp_path):
    folder = copy_rows(small_world, tmp_path / "short", world_rows[:3])
    save_wav(folder / world_rows[1]["audio_file"], np.full(100, 0.1, dtype=np.float32))
    skips = SkipLog()
    items = list(MultimodalDataset(folder, ["audio"], skips=skips))
    assert len(items) + skips.total == 3


# ---- WebDataset shards ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    skips = SkipLog()
    paths = write_shards(small_world, out, samples_per_shard=50, skips=skips)
    assert skips.total == 0
    return out, paths


def test_shards_hold_every_sample(shards):
    out, paths = shards
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(out.glob("*.tar")) == paths


def test_shards_stream_the_same_samples_as_the_folder(small_world, shards):
    fields = ["image", "text", "audio"]
    from_folder = list(MultimodalDataset(small_world, fields))
    from_shards = list(MultimodalDataset(shards[0], fields))
    assert len(from_folder) == len(from_shards) == 120
    for a, b in zip(from_folder, from_shards, strict=True):
        assert a["row"]["id"] == b["row"]["id"]
        assert a["row"] == b["row"]
        assert a["text"] == b["text"]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["audio"], b["audio"])


def test_shard_video_and_named_fields_match_the_folder(small_world, shards):
    fields = {"clip": "video", "question": "audio:fusion_audio_file"}
    from_folder = list(MultimodalDataset(small_world, fields))
    from_shards = list(MultimodalDataset(shards[0], fields))
    assert len(from_folder) == len(from_shards) > 0
    for a, b in zip(from_folder, from_shards, strict=True):
        assert a["row"] == b["row"]
        assert torch.equal(a["clip"]["frames"], b["clip"]["frames"])
        assert torch.equal(a["clip"]["audio"], b["clip"]["audio"])
        assert torch.equal(a["question"], b["question"])


def test_one_shard_file_streams_its_samples(shards, world_rows):
    _, paths = shards
    items = list(MultimodalDataset(paths[1], ["text"]))
    assert [i["row"]["id"] for i in items] == [r["id"] for r in world_rows[50:100]]


def test_shards_are_byte_identical_when_written_twice(small_world, shards, tmp_path):
    again = write_shards(small_world, tmp_path / "again", samples_per_shard=50)
    assert [p.name for p in again] == [p.name for p in shards[1]]
    for a, b in zip(shards[1], again, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_bad_member_in_a_shard_is_named(small_world, world_rows, tmp_path):
    folder = copy_rows(small_world, tmp_path / "few", world_rows[:4])
    (folder / world_rows[1]["file_name"]).write_bytes(b"not an image")
    paths = write_shards(folder, tmp_path / "few_shards")
    skips = SkipLog()
    items = list(MultimodalDataset(paths[0], ["image", "text"], skips=skips))
    assert len(items) == 3
    assert len(skips.bad) == 1
    assert skips.bad[0].source == f"shard-000000.tar:{world_rows[1]['id']}:file_name"


def test_write_shards_skips_rows_with_missing_files(small_world, world_rows, tmp_path):
    folder = copy_rows(small_world, tmp_path / "gap", world_rows[:4])
    (folder / world_rows[2]["audio_file"]).unlink()
    skips = SkipLog()
    paths = write_shards(folder, tmp_path / "gap_shards", skips=skips)
    assert len(skips.bad) == 1 and skips.bad[0].source.endswith(world_rows[2]["audio_file"])
    ids = [i["row"]["id"] for i in MultimodalDataset(paths[0], ["text"])]
    assert ids == [r["id"] for i, r in enumerate(world_rows[:4]) if i != 2]


def test_truncated_shard_is_logged(shards, tmp_path):
    data = shards[1][0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    skips = SkipLog()
    items = list(MultimodalDataset(cut, ["text"], skips=skips))
    assert 0 < len(items) < 50
    assert any(b.source.endswith("cut.tar") for b in skips.bad)


def test_missing_location_raises_naming_it(tmp_path):
    with pytest.raises(InputError) as info:
        list(iter_source(tmp_path / "nothing_here", SkipLog()))
    assert "nothing_here" in str(info.value)


# ---- loader and collator -------------------------------------------------------------------------


def test_image_and_text_batches(small_world, world_rows, tokenizer):
    loader = make_loader(small_world, ["image", "text"], batch_size=16, tokenizer=tokenizer)
    batches = list(loader)
    assert [len(b["rows"]) for b in batches] == [16] * 7 + [8]
    first = batches[0]
    assert first["image"].shape == (16, 3, 64, 64) and first["image"].dtype == torch.float32
    assert -1.0 <= first["image"].min() and first["image"].max() <= 1.0
    assert first["text"] == [r["text"] for r in world_rows[:16]]
    ids, mask = first["text_ids"], first["text_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 16 and mask.dtype == torch.bool
    for i, text in enumerate(first["text"]):
        expected = tokenizer.encode(text)
        assert mask[i].sum().item() == len(expected)
        assert ids[i, : len(expected)].tolist() == expected
        assert (ids[i, len(expected):] == tokenizer.pad_id).all()


def test_text_max_length(small_world, tokenizer):
    batch = next(iter(make_loader(small_world, ["text"], batch_size=8, tokenizer=tokenizer,
                                  max_text_length=6)))
    assert batch["text_ids"].shape[1] <= 6
    for row_ids, row_mask in zip(batch["text_ids"], batch["text_mask"], strict=True):
        assert row_ids[row_mask.sum() - 1].item() == tokenizer.eos_id


def test_audio_batches_and_masks(small_world):
    batch = next(iter(make_loader(small_world, ["audio"], batch_size=8)))
    specs, mask = batch["audio"], batch["audio_mask"]
    assert specs.shape[:2] == (8, 80) and mask.shape == (8, specs.shape[2])
    lengths = [num_frames(len(load_audio(small_world / r["audio_file"]))) for r in batch["rows"]]
    assert max(lengths) == specs.shape[2]
    assert len(set(lengths)) > 1  # the clips really differ in length
    for i, length in enumerate(lengths):
        assert mask[i].sum().item() == length
        assert mask[i, :length].all()
        assert (specs[i, :, length:] == 0).all()
        assert (specs[i, :, :length] != 0).any()


def test_video_batches(small_world, world_rows):
    video_rows = [r for r in world_rows if "video_file" in r]
    assert video_rows
    options = DecodeOptions(image_transform=ImageTransform(32), video_frames=4)
    skips = SkipLog()
    batches = list(make_loader(small_world, ["video", "text"], batch_size=64, options=options,
                               skips=skips))
    assert len(batches) == 1
    batch = batches[0]
    n = len(video_rows)
    assert [r["id"] for r in batch["rows"]] == [r["id"] for r in video_rows]
    assert batch["video"].shape == (n, 4, 3, 32, 32)
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    audio, mask = batch["video_audio"], batch["video_audio_mask"]
    assert audio.shape[:2] == (n, 80) and mask.shape == (n, audio.shape[2])
    assert (mask.sum(dim=1) > 50).all()  # every clip has a sound track of over half a second
    assert skips.counts == Counter(missing=120 - n)


def test_split_filter(small_world, world_rows):
    for split in ("train", "test", ["val", "test_novel"]):
        wanted = {split} if isinstance(split, str) else set(split)
        expected = [r["id"] for r in world_rows if r["split"] in wanted]
        assert expected
        ids = [i["row"]["id"] for i in MultimodalDataset(small_world, ["text"], split=split)]
        assert ids == expected


def test_where_filter(small_world, world_rows):
    items = MultimodalDataset(small_world, ["text"], where=lambda r: r["count"] == 1)
    assert [i["row"]["id"] for i in items] == [r["id"] for r in world_rows if r["count"] == 1]


def test_rows_missing_a_column_are_counted(small_world, world_rows, tmp_path):
    rows = [dict(r) for r in world_rows[:6]]
    del rows[1]["audio_file"]
    rows[3]["audio_file"] = ""
    folder = copy_rows(small_world, tmp_path / "holes", rows)
    skips = SkipLog()
    items = list(MultimodalDataset(folder, ["image", "audio"], skips=skips))
    assert len(items) == 4
    assert skips.counts == Counter(missing=2)
    assert all("audio_file" in b.reason for b in skips.bad)
    assert {b.source for b in skips.bad} == {f"{folder.name}/metadata.jsonl line {n}" for n in (2, 4)}


def test_named_fields(small_world, world_rows):
    fields = {"picture": "image", "question": "audio:fusion_audio_file", "answer": "text:fusion_label"}
    batch = next(iter(make_loader(small_world, fields, batch_size=4)))
    assert set(batch) == {"rows", "picture", "question", "question_mask", "answer"}
    assert batch["picture"].shape == (4, 3, 64, 64)
    assert batch["answer"] == [r["fusion_label"] for r in world_rows[:4]]
    lengths = [num_frames(len(load_audio(small_world / r["fusion_audio_file"])))
               for r in world_rows[:4]]
    assert batch["question_mask"].sum(dim=1).tolist() == lengths


def test_parse_fields():
    assert parse_fields(["image", "text"]) == [
        Field("image", "image", "file_name"), Field("text", "text", "text")]
    assert parse_fields({"q": "audio:fusion_audio_file", "v": "video"}) == [
        Field("q", "audio", "fusion_audio_file"), Field("v", "video", "video_file")]
    with pytest.raises(ValueError, match="smell"):
        parse_fields(["image", "smell"])
    with pytest.raises(ValueError, match="unknown modality"):
        parse_fields({"x": "pictures:file_name"})
    with pytest.raises(ValueError):
        parse_fields([])
    with pytest.raises(ValueError):
        Collator(["text", "touch"])


def write_image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def test_nested_split_folders(tmp_path):
    root = tmp_path / "nested"
    for split, n in (("train", 3), ("test", 2)):
        rows = []
        for k in range(n):
            write_image(root / split / f"img{k}.png", (k * 40, 0, 0))
            rows.append({"id": f"{split}{k}", "file_name": f"img{k}.png", "text": f"{split} {k}"})
        if split == "train":
            rows[0]["split"] = "val"  # an explicit split wins over the folder
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(MultimodalDataset(root, ["image", "text"]))
    assert {i["row"]["id"]: i["row"]["split"] for i in items} == {
        "test0": "test", "test1": "test", "train0": "val", "train1": "train", "train2": "train"}
    test_ids = [i["row"]["id"] for i in MultimodalDataset(root, ["image"], split="test")]
    assert test_ids == ["test0", "test1"]
    train = list(MultimodalDataset(root, ["image"], split="train"))
    assert [i["row"]["id"] for i in train] == ["train1", "train2"]
    assert train[0]["image"][0].mean().item() == pytest.approx(40 / 255 * 2 - 1, abs=1e-3)


def test_other_sub_folders_get_no_split(tmp_path):
    root = tmp_path / "plain"
    write_image(root / "part1" / "a.png", "red")
    (root / "part1" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    items = list(MultimodalDataset(root, ["image"]))
    assert len(items) == 1 and "split" not in items[0]["row"]


def test_workers_yield_every_sample_once(small_world, world_rows):
    loader = make_loader(small_world, ["image", "text"], batch_size=7, num_workers=2)
    ids = [r["id"] for batch in loader for r in batch["rows"]]
    assert len(ids) == 120
    assert Counter(ids) == Counter(r["id"] for r in world_rows)


def test_workers_report_skipped_samples(small_world, world_rows, tmp_path):
    folder = copy_rows(small_world, tmp_path / "w", world_rows[:6])
    (folder / world_rows[0]["file_name"]).write_bytes(b"")
    skips = SkipLog()
    ids = [r["id"] for b in make_loader(folder, ["image"], batch_size=2, num_workers=2,
                                        skips=skips) for r in b["rows"]]
    assert len(ids) == 5
    assert skips.counts == Counter(bad=1)
