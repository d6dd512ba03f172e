"""Train a tiny captioner (captions + VQA) and a tiny fusion classifier through the command
line, then score both with `polymodal eval --json`."""

import json

import pytest
from typer.testing import CliRunner

from polymodal.cli import app

TINY_TRAIN = ["trainer.max_steps=3", "trainer.val_every_minutes=0", "trainer.vocab_size=300", "data.batch_size=16",
              "data.val_limit=10", "model.init_from=null"]
TINY_CAPTIONER = ["model.encoders.image={type: cnn, preset: tiny}", "model.width=32", "model.depth=1", "model.heads=2"]
TINY_FUSION = ["model.towers.image={type: cnn, preset: tiny}", "model.towers.question={type: audio, preset: tiny}",
               "model.width=32", "model.depth=1", "model.heads=2"]


@pytest.fixture(scope="module")
def captioner(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap")
    result = CliRunner().invoke(app, ["train", "caption-shapes", "--data", str(small_world), "--out",
                                      str(out), *TINY_TRAIN, *TINY_CAPTIONER])
    assert result.exit_code == 0, result.output
    return out / "model"


def test_eval_of_a_captioner_reports_captions_and_vqa_per_type(captioner, small_world, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["eval", str(captioner), "--data", str(small_world), "--split", "test",
                                      "--decoding", "beam", "--examples", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())["test"]
    for name in ("BLEU-4", "CIDEr", "scene-graph objects right", "scene-graph all true", "vqa accuracy",
                 "vqa colour", "vqa count", "vqa exist"):
        assert 0.0 <= m[name] <= 10.0, name
    assert len(m["examples"]) == 2 and set(m["examples"][0]) == {"id", "reference", "generated"}
    assert m["vqa questions"] >= m["samples"]  # several questions per image


def test_fusion_training_with_question_pairs_and_eval_of_each_missing_modality(small_world, tmp_path):
    out = tmp_path / "fusion"
    result = CliRunner().invoke(app, ["train", "fusion-shapes", "--data", str(small_world), "--out",
                                      str(out), *TINY_TRAIN, *TINY_FUSION, "model.strategy=hybrid",
                                      "data.augment=question_pairs", "model.freeze_encoders=true"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["fields"] == {"image": "image", "question": "audio:fusion_audio_file"}
    metrics = tmp_path / "f.json"
    result = CliRunner().invoke(app, ["eval", str(out / "model"), "--data", str(small_world), "--json", str(metrics)])
    assert result.exit_code == 0, result.output
    m = json.loads(metrics.read_text())["test"]
    assert set(m) == {"samples", "accuracy", "accuracy image only", "accuracy question only"}


def test_eval_of_a_folder_that_is_no_model_is_an_error(small_world, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", str(small_world)])
    assert result.exit_code == 2 and "config.json" in result.output
