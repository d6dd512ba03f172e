"""The output-modality router: the shipped request set and head, its held-out accuracy, the
idioms it must read as people mean them, explicit modalities winning, and `polymodal route`."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from typer.testing import CliRunner

from polymodal.assistant import router
from polymodal.assistant.router import (
    DATA,
    HEAD,
    MODALITIES,
    Features,
    RouterConfig,
    RouterHead,
    accuracy,
    confusion,
    explicit_modality,
    family_folds,
    file_sha256,
    fit_head,
    load_requests,
    named_modality,
    read_requests,
    route,
)
from polymodal.cli import app
from polymodal.errors import InputError

runner = CliRunner()

# The examples issue 14 names, then paraphrases of them that are not in the request set.
TRAPS = [
    ("paint me a picture with words", "text"),
    ("draw up a list", "text"),
    ("draw a conclusion", "text"),
    ("illustrate your point", "text"),
    ("sketch out a plan", "text"),
    ("say it out loud", "speech"),
    ("I'm driving, talk me through it", "speech"),
    ("read this to me", "speech"),
    ("draw a red star", "image"),
    ("show me what a blue square looks like", "image"),
    ("can you picture a green circle in the corner?", "image"),
    ("Paint me a picture, in words, of a harbour at night.", "text"),
    ("what conclusion should I draw from these numbers?", "text"),
    ("Can you illustrate your point with an example from history?", "text"),
    ("please draw up a list of chores for the week", "text"),
    ("sketch out a plan for my first month at the new job", "text"),
    ("draw attention to the main risk", "text"),
    ("write a speech for my brother's wedding", "text"),
    ("how do i draw a circle in python with turtle", "text"),
    ("describe this picture", "text"),
    ("say the answer out loud", "speech"),
    ("i'm driving so talk me through the route", "speech"),
    ("please read this email to me", "speech"),
    ("draw me a cat", "image"),
    ("make a picture of a yellow triangle above a purple circle", "image"),
]


@pytest.fixture(scope="module")
def rows():
    return load_requests()


# ---- the request set and the head that ship (no MiniLM needed) ----


def test_request_set_is_large_varied_and_split_by_family(rows):
    assert len(rows) >= 600
    by_modality = defaultdict(int)
    splits_of_family = defaultdict(set)
    for r in rows:
        by_modality[r["modality"]] += 1
        splits_of_family[r["family"]].add(r["split"])
    assert all(by_modality[m] >= 150 for m in MODALITIES), by_modality
    assert all(len(s) == 1 for s in splits_of_family.values()), "a paraphrase family crosses splits"
    requests = [r["request"].strip().lower() for r in rows]
    assert len(set(requests)) == len(requests), "duplicate requests"
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) >= 100 and {r["modality"] for r in test} == set(MODALITIES)
    # not one wording repeated: the set opens with many different words
    assert len({r.split()[0] for r in requests}) >= 150


def test_the_shipped_head_was_trained_on_the_shipped_requests():
    head = RouterHead.load(HEAD)
    assert head.info["data_sha256"] == file_sha256(DATA), (
        "requests.jsonl changed since the head was trained: python -m polymodal.assistant.router")
    assert head.info["test_accuracy"] >= 0.95
    assert 1 / 3 < head.config.threshold < 1


def test_explicit_modalities_and_endpoints_win_without_the_classifier(monkeypatch):
    def no_classifier(*_):
        raise AssertionError("the classifier ran although the request named its output")

    monkeypatch.setattr(router, "features", no_classifier)
    requests = ["draw a red star", "say it out loud"]
    assert route(requests, modalities=["text", "audio"]) == [("speech", 1.0)] * 2
    assert route(requests, modalities=["image", "text"]) == [("image", 1.0)] * 2
    assert route(requests, modalities=["text"]) == [("text", 1.0)] * 2
    assert route(requests, endpoint="/v1/images/generations") == [("image", 1.0)] * 2
    assert route(["paint me a picture with words"], endpoint="/v1/audio/speech") == [("speech", 1.0)]
    assert explicit_modality(None) is None and explicit_modality(None, "/v1/chat/completions") is None
    with pytest.raises(InputError, match="unknown modality 'video'"):
        route(requests, modalities=["video"])
    with pytest.raises(InputError, match="both image and speech"):
        route(requests, modalities=["image", "audio"])
    with pytest.raises(InputError, match="list of strings"):
        route("draw a red star")
    assert route(["", "   "]) == [("text", 1.0)] * 2  # nothing asked: text, no classifier


def test_bad_request_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request": "hi", "modality": "text", "split": "train"}\n{"request": "x", "modality": "video", "split": "test"}\n')
    with pytest.raises(InputError, match="bad.jsonl line 2: 'modality' must be one of"):
        load_requests(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not JSON"):
        read_requests(bad)
    with pytest.raises(InputError, match="no such file"):
        read_requests(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="no router head"):
        RouterHead.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a head")
    with pytest.raises(InputError, match="not a router head"):
        RouterHead.load(tmp_path / "junk.safetensors")


def test_head_learns_a_cue_wherever_it_stands_and_round_trips(tmp_path):
    """Word-piece detectors max-pooled: a class marked by one cue token at a random position."""
    g = torch.Generator().manual_seed(0)
    n, t, d = 90, 8, 16
    tokens = torch.nn.functional.normalize(torch.randn(n, t, d, generator=g), dim=-1)
    labels = [MODALITIES[i % 3] for i in range(n)]
    cues = torch.eye(d)[:3] * 3
    for i, m in enumerate(labels):
        tokens[i, int(torch.randint(t, (1,), generator=g))] = cues[MODALITIES.index(m)]
    mask = torch.ones(n, t, dtype=torch.bool)
    x = Features(tokens, mask, torch.nn.functional.normalize(tokens.mean(1), dim=-1))
    config = RouterConfig(width=d, hidden=8, members=2, threshold=0.4)
    head = fit_head(x, labels, config, steps=150, seed=3)
    with torch.inference_mode():
        predicted = [m for m, _ in head.decide(head.probabilities(x))]
    assert accuracy(labels, predicted) > 0.95
    again = fit_head(x, labels, config, steps=150, seed=3)  # the same seed gives the same head
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    head.save(tmp_path / "head.safetensors")
    loaded = RouterHead.load(tmp_path / "head.safetensors")
    with torch.inference_mode():
        assert torch.allclose(loaded.probabilities(x), head.probabilities(x))
    assert loaded.config == config


def test_text_when_unsure():
    head = RouterHead(RouterConfig(threshold=0.6))
    p = torch.tensor([[0.3, 0.55, 0.15], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    assert head.decide(p) == [("text", 0.3), ("image", 0.7), ("speech", 0.7), ("text", 0.5)]


@pytest.mark.parametrize(("request_text", "named"), [
    ("Give me the answer as speech.", "speech"),
    ("tell me a joke out loud", "speech"),
    ("narrate this story in a spooky voice", "speech"),
    ("send me a voice note saying I'll be late", "speech"),
    ("No picture needed, just tell me in text what a zebra looks like", "text"),
    ("paint me a picture with words", "text"),
    ("write a story my kids can read aloud together", None),  # words for the user to say
    ("rewrite this in your voice, less stiff", None),
    ("How does text to speech technology work?", None),
    ("draw a red star", None),
])
def test_requests_that_name_their_output_in_words(request_text, named, monkeypatch):
    assert named_modality(request_text) == named
    if named:  # decided without the classifier
        monkeypatch.setattr(router, "features", lambda *_: pytest.fail("the classifier ran"))
        assert route([request_text]) == [(named, 1.0)]


def test_family_folds_keep_families_together():
    rows = [{"request": f"r{i}", "family": f"f{i // 3}"} for i in range(30)]
    folds = family_folds(rows, 5)
    assert set(folds) == set(range(5))
    for i in range(0, 30, 3):
        assert len(set(folds[i:i + 3])) == 1


def test_confusion_rows_are_truth():
    assert confusion(["text", "image", "image"], ["text", "text", "image"]) == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


# ---- the classifier itself (loads the offline MiniLM once) ----


def test_held_out_accuracy(rows):
    """Requests of the test split: their paraphrase families were never trained on."""
    test = [r for r in rows if r["split"] == "test"]
    predicted = [m for m, _ in route([r["request"] for r in test])]
    truth = [r["modality"] for r in test]
    held_out = accuracy(truth, predicted)
    matrix = confusion(truth, predicted)
    assert held_out >= 0.95, (held_out, matrix)
    assert abs(held_out - RouterHead.load(HEAD).info["test_accuracy"]) < 0.011  # what training reported
    assert all(matrix[i][i] / sum(matrix[i]) >= 0.9 for i in range(len(MODALITIES))), matrix


def test_idioms_and_traps_are_read_as_people_mean_them():
    routed = route([request for request, _ in TRAPS])
    wrong = [(request, want, got) for (request, want), (got, _) in zip(TRAPS, routed, strict=True) if got != want]
    assert not wrong
    assert all(0 < confidence <= 1 for _, confidence in routed)


# ---- polymodal route ----


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_cli_prints_one_json_object_a_line():
    result = runner.invoke(app, ["route", "draw a red star", "draw a conclusion", "say it out loud"])
    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert [o["modality"] for o in out] == ["image", "text", "speech"]
    assert [o["request"] for o in out] == ["draw a red star", "draw a conclusion", "say it out loud"]
    assert all(set(o) == {"request", "modality", "confidence"} and 0 < o["confidence"] <= 1 for o in out)


def test_cli_reads_files_and_honours_explicit_modalities(tmp_path):
    plain = tmp_path / "requests.txt"
    plain.write_text("draw a red star\n\nread this to me\n", encoding="utf-8")
    labelled = tmp_path / "requests.jsonl"
    labelled.write_text(json.dumps({"request": "illustrate your point", "modality": "text"}) + "\n")
    result = runner.invoke(app, ["route", "--file", str(plain)])
    assert result.exit_code == 0, result.output
    assert [(o["request"], o["modality"]) for o in lines(result.stdout)] == [
        ("draw a red star", "image"), ("read this to me", "speech")]
    result = runner.invoke(app, ["route", "--file", str(labelled), "sketch out a plan"])
    assert [(o["request"], o["modality"]) for o in lines(result.stdout)] == [
        ("sketch out a plan", "text"), ("illustrate your point", "text")]
    result = runner.invoke(app, ["route", "--modalities", "text,audio", "draw a red star"])
    assert lines(result.stdout) == [{"request": "draw a red star", "modality": "speech", "confidence": 1.0}]


@pytest.mark.parametrize(("args", "message"), [
    (["route"], "no requests"),
    (["route", "--file", "/no/such/requests.txt"], "no such file"),
    (["route", "--modalities", "smell", "draw a star"], "unknown modality 'smell'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""
