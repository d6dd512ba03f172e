import pytest

from polymodal.data.scene import (
    SceneObject,
    answer_question,
    caption_shows,
    check_caption,
    parse_claims,
    question_type,
)

RED_CIRCLE_TL = SceneObject("circle", "red", "small", 0, 0)
BLUE_SQUARE_C = SceneObject("square", "blue", "large", 1, 1)
GREEN_STAR_BR = SceneObject("star", "green", "large", 2, 2)
SCENE = [RED_CIRCLE_TL, BLUE_SQUARE_C, GREEN_STAR_BR]


def test_parse_reads_mentions_positions_and_relations():
    claims = parse_claims("a small red circle in the top left to the left of a big blue box")
    assert [(m.size, m.colour, m.shape) for m in claims.mentions] == [
        ("small", "red", "circle"), ("large", "blue", "square")]
    assert claims.mentions[0].cell == 0 and claims.mentions[1].cell is None
    assert claims.relations == [(0, "left of", 1)]


def test_parse_reads_counts_and_totals():
    claims = parse_claims("there are three shapes: two red circles and a violet plus")
    assert claims.total == 3
    assert claims.mentions[0].count == 2 and claims.mentions[0].shape == "circle"
    assert claims.mentions[1].colour == "purple" and claims.mentions[1].shape == "cross"


def test_position_before_the_object_attaches_to_it():
    claims = parse_claims("in the center there is a tiny blue square")
    assert claims.mentions[0].cell == 4


@pytest.mark.parametrize("caption", [
    "a small red circle in the top left",
    "there are three objects: a red circle, a blue square and a green star",
    "a red circle above a green star",
    "a big green star in the lower right",
    "a blue square to the right of a red circle",
])
def test_true_captions_pass(caption):
    assert check_caption(caption, SCENE) == []


@pytest.mark.parametrize("caption, problem", [
    ("a large red circle in the top left", "none"),
    ("a red circle in the center", "none"),
    ("a red circle below a green star", "false"),
    ("there are two objects: a red circle and a blue square", "2 objects"),
    ("two red circles", "scene has 1"),
    ("a yellow triangle", "none"),
    ("nothing to see here", "mentions no object"),
])
def test_false_captions_are_caught(caption, problem):
    problems = check_caption(caption, SCENE)
    assert problems and any(problem in p for p in problems), problems


@pytest.mark.parametrize("question, answer", [
    ("what colour is the star?", "green"),
    ("what color is the circle?", "red"),
    ("what shape is the blue object?", "square"),
    ("how many objects are there?", "three"),
    ("how many triangles are there?", "zero"),
    ("is there a green star?", "yes"),
    ("is there a green circle?", "no"),
    ("where is the blue square?", "center"),
])
def test_answers(question, answer):
    assert answer_question(question, SCENE) == answer


def test_ambiguous_and_foreign_questions_raise():
    with pytest.raises(ValueError, match="does not pick out one object"):
        answer_question("what colour is the triangle?", SCENE)
    with pytest.raises(ValueError, match="not a shapes-world question"):
        question_type("why is the sky blue?")


@pytest.mark.parametrize(("caption", "prompt", "shown"), [
    ("a small red circle in the top right", "a small red circle in the top right", True),
    ("a small red circle in the top right", "a red circle", True),
    ("a small red circle in the top right", "a red square", False),
    ("a small red circle in the top right", "a large red circle in the top right", False),
    ("a small red circle in the top right", "a small red circle at the bottom", False),
    # a prompt that places every object it names is the whole picture: nothing besides
    ("a small red circle in the top right and a large blue star on the left", "a small red circle in the top right",
     False),
    # otherwise more is allowed
    ("a small red circle in the top right and a large blue star on the left", "a red circle and a blue star", True),
    ("a small red circle in the top right and a large blue star on the left", "a blue star and a red square", False),
    ("a small red circle in the top right and a large blue star on the left",
     "a blue star to the left of a red circle", True),
    ("a small red circle in the top right and a large blue star on the left",
     "a blue star to the right of a red circle", False),
    ("a small red circle in the top left, a small red circle at the bottom and a large blue star in the center",
     "two red circles", True),
    ("a small red circle in the top left and a large blue star in the center", "two red circles", False),
    # a caption that relates its objects instead of placing them
    ("a small blue circle below a large red star", "a blue circle and a red star", True),
    ("a small blue circle below a large red star", "a red star above a blue circle", True),
    ("a small blue circle below a large red star", "a blue circle above a red star", False),
    ("a small blue circle below a small blue circle", "two blue circles", True),
    ("a small blue circle below a small blue circle", "three blue circles", False),
    # it cannot tell what it leaves out, or an object it does not name whole
    ("a small blue circle below a large red star", "a blue circle to the left of a red star", None),
    ("a small blue circle below a large red star", "a blue circle in the top left and a red star at the bottom", None),
    ("a small blue circle below a large red star", "a blue circle in the top left", False),  # two, not one
    ("a blue circle in the top left", "a small blue circle", None),
    ("a small blue thing in the top left", "a blue circle", None),
    ("a picture of nothing much", "a blue circle", None),
])
def test_caption_shows_what_a_prompt_asks_for(caption, prompt, shown):
    assert caption_shows(caption, prompt) is shown
