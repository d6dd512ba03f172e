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
