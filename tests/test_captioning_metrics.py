import math

import pytest

from polymodal.data.scene import SceneObject
from polymodal.eval.captioning import bleu_cider, judge_caption, scene_graph_scores

RED = SceneObject("circle", "red", "small", 0, 0)
BLUE = SceneObject("square", "blue", "large", 1, 1)


def test_identical_captions_score_full_bleu_and_high_cider():
    refs = [["a small red circle in the top left"], ["a large blue square in the center"]]
    scores = bleu_cider(refs, ["a small red circle in the top left", "a large blue square in the center"])
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    wrong = bleu_cider(refs, ["a large blue square in the center", "a small red circle in the top left"])
    assert scores["CIDEr"] > wrong["CIDEr"] and wrong["BLEU-4"] < scores["BLEU-4"]


def test_bleu_by_hand():
    scores = bleu_cider([["the red circle is here"]], ["the red circle is there"])
    # clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; same length, brevity penalty 1
    expected = math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert scores["BLEU-4"] == pytest.approx(expected, rel=1e-6)
    assert scores["BLEU-1"] == pytest.approx(4 / 5, rel=1e-6)


def test_cider_rewards_consensus_over_common_words():
    refs = [["a red circle", "a red circle in the top left"], ["a blue square", "a big blue square"]]
    good = bleu_cider(refs, ["a red circle", "a blue square"])["CIDEr"]
    generic = bleu_cider(refs, ["a", "a"])["CIDEr"]
    assert good > 1.0 > generic


@pytest.mark.parametrize("caption, right, true", [
    ("a small red circle in the top left and a large blue square in the center", True, True),
    ("a red circle to the left of a blue square", True, True),
    ("a red circle", False, True),  # misses the square
    ("a red circle and a green square", False, False),
    ("a large red circle and a blue square", False, False),  # wrong size
    ("two red circles and a blue square", False, False),
])
def test_judge(caption, right, true):
    verdict = judge_caption(caption, [RED, BLUE])
    assert verdict == {"objects_right": right, "all_true": true}


def test_scene_graph_scores_average():
    scores = scene_graph_scores(["a red circle and a blue square", "a red circle"], [[RED, BLUE], [RED, BLUE]])
    assert scores == {"scene-graph objects right": 0.5, "scene-graph all true": 1.0}
