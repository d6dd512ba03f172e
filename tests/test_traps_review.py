"""Traps found reviewing the channels-last, sized-encoder, CTC and data-set-kind changes: a model
saved before recipes filled in ``image_size`` still starts a new one with ``init_from``; a hostile
``world.json`` is one clear InputError; the CTC head takes part in every step."""

import json

import pytest
import torch

from polymodal.data.describe import dataset_kind
from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models.captioner import Captioner, CaptionerConfig
from polymodal.models.clip import ContrastiveConfig, ContrastiveModel
from polymodal.models.family import BuildContext

CAPTIONS = ["a red circle", "a blue square", "two green stars", "a big star"]
QA = [{"question": "what colour?", "answer": "red", "type": "colour"}]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CAPTIONS + ["what colour?", "red"], vocab_size=300)


def test_a_contrastive_model_saved_without_image_size_starts_a_new_one(tokenizer, tmp_path):
    """Recipes now fill each image encoder's ``image_size`` from ``data.image_size``; a CLIP saved
    before (its image tower's spec without one) must still start the towers it matches, as the
    bind recipe's frozen image tower does from the CLIP run."""
    towers = {"image": {"type": "cnn", "preset": "tiny"}, "text": {"type": "text", "preset": "tiny"}}
    old = ContrastiveModel(ContrastiveConfig(towers=towers, embed_dim=16), tokenizer)
    old.save_pretrained(tmp_path / "old")
    new = ContrastiveModel.from_recipe({"towers": towers, "embed_dim": 16, "init_from": str(tmp_path / "old")},
                                       BuildContext(data=tmp_path, image_size=64))
    assert new.config.towers["image"]["image_size"] == 64
    for name in towers:
        for key, value in old.towers[name].state_dict().items():
            assert torch.equal(value, new.towers[name].state_dict()[key]), f"{name}: {key} was not copied"
    # a tower that reads another size is a different encoder: not copied
    other = ContrastiveModel(ContrastiveConfig(towers={**towers, "image": {**towers["image"], "image_size": 32}},
                                               embed_dim=16), tokenizer)
    assert new.init_towers_from(other) == ["text"]


def test_a_hostile_description_is_one_input_error(tmp_path):
    """world.json is read from outside: nesting deeper than the JSON parser's stack, and a link
    that leads to itself, are InputErrors naming the file, not a RecursionError or RuntimeError."""
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "split": "test"}) + "\n")
    (tmp_path / "world.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested") as e:
        dataset_kind(tmp_path)
    assert "world.json" in str(e.value)
    (tmp_path / "world.json").unlink()
    (tmp_path / "world.json").symlink_to("loop")
    (tmp_path / "loop").symlink_to("world.json")
    with pytest.raises(InputError) as e:
        dataset_kind(tmp_path)
    assert "world.json" in str(e.value)


def ctc_captioner(tokenizer, tasks: dict) -> Captioner:
    torch.manual_seed(0)
    config = CaptionerConfig(encoders={"speech": {"type": "audio", "preset": "tiny"}}, tasks=tasks, ctc=0.3,
                             width=32, depth=1, heads=2, vocab_size=tokenizer.vocab_size)
    return Captioner(config, tokenizer)


def test_the_ctc_head_takes_part_in_a_step_without_captions(tokenizer):
    """A batch whose examples are all questions has nothing for CTC to align, but the head must
    still be in the graph: DDP (without find_unused_parameters) fails on a parameter that got no
    gradient."""
    rows = [{"id": str(i), "text": c, "qa": QA} for i, c in enumerate(CAPTIONS)]
    batch = {"speech": torch.randn(4, 80, 120) - 8, "speech_mask": torch.ones(4, 120, dtype=torch.bool), "rows": rows}
    with pytest.raises(ValueError, match="caption task"):  # CTC without captions could never train its head
        ctc_captioner(tokenizer, {"vqa": 1.0})
    model = ctc_captioner(tokenizer, {"caption": 1e-12, "vqa": 1.0})  # a batch that drew only questions
    out = model.loss(batch)
    assert float(out["ctc"]) == 0.0
    out["loss"].backward()
    assert all(p.grad is not None for p in model.ctc_head.parameters())
    captions = ctc_captioner(tokenizer, {"caption": 1.0}).loss(batch)
    assert float(captions["ctc"]) > 0 and torch.isfinite(captions["loss"])


def test_init_from_that_cannot_start_a_tower_says_so(tmp_path, caplog):
    """A tower that the init_from model has under the same name but built otherwise (another
    image size) starts from random weights: a warning names it, not only an info line."""
    import logging

    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig
    from polymodal.models.clip import ContrastiveConfig, ContrastiveModel, start_encoders_from

    tok = TextTokenizer.train(["a red circle", "a blue square"] * 4, vocab_size=260)
    clip = ContrastiveModel(ContrastiveConfig(towers={"image": {"type": "cnn", "preset": "tiny", "image_size": 64},
                                                      "text": {"type": "text", "preset": "tiny"}}), tok)
    clip.save_pretrained(tmp_path / "clip")
    for size, warned in ((32, True), (64, False)):
        model = Captioner(CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny", "image_size": size}},
                                          width=32, depth=1, heads=2), tok)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            start_encoders_from(model, tmp_path / "clip")
        assert any("does NOT start from" in r.getMessage() for r in caplog.records) == warned, size
