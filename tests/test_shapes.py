import json
from collections import Counter

from polymodal.data.scene import SceneObject, answer_question, check_caption
from polymodal.data.shapes import HELD_OUT_PAIRS, WorldConfig, generate_world
from polymodal.modalities.audio import load_audio
from polymodal.modalities.image import load_image
from polymodal.modalities.video import load_video


def rows_of(world):
    return [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]


def test_every_caption_answer_and_label_agrees_with_the_scene_graph(small_world):
    rows = rows_of(small_world)
    assert len(rows) == 120
    for row in rows:
        objects = [SceneObject.from_dict(o) for o in row["objects"]]
        assert 1 <= len(objects) <= 3 and row["count"] == len(objects)
        assert check_caption(row["text"], objects) == [], (row["id"], row["text"])
        assert {q["type"] for q in row["qa"]} >= {"count", "exist"}
        for qa in row["qa"]:
            assert answer_question(qa["question"], objects) == qa["answer"], (row["id"], qa)
        assert answer_question(row["fusion_question"], objects) == row["fusion_label"], row["id"]
        if "video_text" in row:
            motion = row["video_motion"]
            assert motion["colour"] in row["video_text"] and motion["shape"] in row["video_text"]


def test_objects_do_not_overlap_and_sit_in_their_cells(small_world):
    for row in rows_of(small_world):
        boxes = [o["bbox"] for o in row["objects"]]
        cells = [(o["row"], o["col"]) for o in row["objects"]]
        assert len(set(cells)) == len(cells)
        for (x0, y0, x1, y1), (r, c) in zip(boxes, cells, strict=True):
            cell = 64 / 3
            assert c * cell <= x0 < x1 <= (c + 1) * cell and r * cell <= y0 < y1 <= (r + 1) * cell


def test_files_decode_and_speech_lasts_as_long_as_words_take(small_world):
    rows = rows_of(small_world)
    for row in rows[:20]:
        assert load_image(small_world / row["file_name"]).size == (64, 64)
        speech = load_audio(small_world / row["audio_file"])
        words = len(row["text"].split())
        seconds = len(speech) / 16000
        assert 0.15 * words < seconds < 1.0 * words + 1.5, (row["text"], seconds)
    videos = [r for r in rows if "video_file" in r]
    assert videos
    clip = load_video(small_world / videos[0]["video_file"], num_frames=4)
    assert clip.frames.shape == (4, 3, 64, 64) and clip.has_audio


def test_held_out_pairs_only_in_test_novel(small_world):
    held = {tuple(p) for p in HELD_OUT_PAIRS}
    splits = Counter()
    for row in rows_of(small_world):
        splits[row["split"]] += 1
        pairs = {(o["shape"], o["colour"]) for o in row["objects"]}
        if row["split"] == "test_novel":
            assert pairs & held
        else:
            assert not pairs & held, row
            assert not any(p in row["fusion_question"] for p in (f"{c} {s}" for s, c in held))
    assert splits["train"] > splits["test"] > 0


def test_same_seed_gives_byte_identical_metadata_whatever_the_workers(tmp_path):
    config = WorldConfig(n=40, seed=3, speech=False, video_fraction=0.0)
    a = generate_world(tmp_path / "a", config, workers=1)
    b = generate_world(tmp_path / "b", config, workers=2)
    c = generate_world(tmp_path / "c", WorldConfig(n=40, seed=4, speech=False, video_fraction=0.0), workers=1)
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert (a / "images/000007.png").read_bytes() == (b / "images/000007.png").read_bytes()
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()


def test_fusion_labels_are_balanced_and_negatives_are_near_misses(tmp_path):
    world = generate_world(tmp_path, WorldConfig(n=1500, seed=1, speech=False, video_fraction=0.0), workers=2)
    rows = rows_of(world)
    labels = Counter(r["fusion_label"] for r in rows)
    assert abs(labels["yes"] / len(rows) - 0.5) < 0.05
    for r in rows:
        if r["fusion_label"] == "no":
            colours = {o["colour"] for o in r["objects"]}
            shapes = {o["shape"] for o in r["objects"]}
            words = r["fusion_question"].rstrip("?").split()
            assert words[-2] in colours or words[-1] in shapes, r["fusion_question"]
    counts = Counter(r["count"] for r in rows)
    assert set(counts) == {1, 2, 3}
    assert {o["shape"] for r in rows for o in r["objects"]} == {"circle", "square", "triangle", "star", "cross"}


def test_captions_without_sizes_or_places_name_every_object_and_only_true_things():
    import numpy as np

    from polymodal.data.scene import parse_claims
    from polymodal.data.shapes import caption, sample_scene

    seen = set()
    for seed in range(200):
        objects = sample_scene(np.random.default_rng(seed), "train", 64)
        for sizes in (True, False):
            for places in (True, False):
                text = caption(np.random.default_rng(seed + 1), objects, sizes=sizes, places=places)
                assert check_caption(text, objects) == [], text
                mentions = parse_claims(text).mentions
                assert sum(m.count or 1 for m in mentions) == len(objects), text  # every object named
                assert sizes or all(m.size is None for m in mentions), text
                assert places or all(m.cell is None for m in mentions), text
                seen.add((sizes, places, any(m.size for m in mentions), any(m.cell is not None for m in mentions)))
    # the full captions do give sizes and places
    assert (True, True, True, True) in seen and (False, False, False, False) in seen
