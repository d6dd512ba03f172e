from collections import Counter

from polymodal.data.augment import QuestionPairs, question_pair
from polymodal.data.memory import MemoryDataset
from polymodal.data.scene import SceneObject, answer_question


def test_question_pairs_are_labelled_by_the_scene_graph(small_world):
    items = MemoryDataset(small_world, {"image": "image", "question": "audio:fusion_audio_file"}, split="train").items
    pairs = QuestionPairs(items, "question", keep=0.0, seed=1)
    labels, repaired = Counter(), 0
    for _ in range(3):
        for i in range(len(pairs)):
            item = pairs[i]
            row = item["row"]
            objects = [SceneObject.from_dict(o) for o in row["objects"]]
            assert row["fusion_label"] == answer_question(row["fusion_question"], objects)
            colour, shape = question_pair(row["fusion_question"])
            if row["fusion_label"] == "no":  # a near miss
                assert any(o.colour == colour or o.shape == shape for o in objects)
            repaired += item["question"] is not items[i]["question"]
            labels[row["fusion_label"]] += 1
    assert repaired > len(pairs)
    assert abs(labels["yes"] - labels["no"]) < 0.2 * sum(labels.values())


def test_fresh_captions_are_true_of_the_scene_and_vary(small_world):
    import pytest

    from polymodal.data.augment import FreshCaptions
    from polymodal.data.scene import check_caption, parse_claims

    items = MemoryDataset(small_world, {"image": "image"}, split="train").items
    fresh = FreshCaptions(items, keep=0.0, unplaced=0.5, seed=0)
    changed = unplaced = 0
    for _ in range(3):
        for i in range(len(fresh)):
            item = fresh[i]
            text, objects = item["row"]["text"], [SceneObject.from_dict(o) for o in item["row"]["objects"]]
            assert check_caption(text, objects) == [], text  # every claim holds
            assert item["image"] is items[i]["image"]  # the image stays its own
            changed += text != items[i]["row"]["text"]
            unplaced += all(m.cell is None for m in parse_claims(text).mentions)
    assert changed > len(fresh)  # most captions are new
    assert unplaced > 0.3 * 3 * len(fresh)  # about half name the objects without places
    kept = FreshCaptions(items, keep=1.0)
    assert all(kept[i]["row"]["text"] == items[i]["row"]["text"] for i in range(len(kept)))
    with pytest.raises(ValueError, match="objects"):
        FreshCaptions([{"row": {"text": "a cat"}}])
