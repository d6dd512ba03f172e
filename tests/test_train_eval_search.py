"""Train a tiny CLIP through the command line, resume it, evaluate it, index and search with it."""

import json

import pytest
from typer.testing import CliRunner

from polymodal.cli import app

TINY = ["model.towers.image={type: cnn, preset: tiny}", "model.towers.text={type: text, preset: tiny}",
        "model.embed_dim=16", "data.batch_size=16", "trainer.max_steps=4", "trainer.val_every_minutes=0",
        "trainer.vocab_size=300", "trainer.log_every_steps=1", "data.val_limit=20"]


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(app, ["train", "clip-shapes", "--data", str(small_world), "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


def test_training_writes_model_checkpoint_logs_and_curves(trained):
    from polymodal.models.clip import ContrastiveModel

    assert (trained / "model" / "model.safetensors").is_file()
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert list((trained / "logs").rglob("metrics.csv")) and list((trained / "logs").rglob("events.out.tfevents*"))
    assert (trained / "curves.png").stat().st_size > 1000
    model = ContrastiveModel.from_pretrained(trained / "model")
    assert model.embed_text(["a red circle"]).shape == (1, 16)


def test_resume_continues_from_the_last_checkpoint(trained, small_world):
    import torch

    before = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    result = CliRunner().invoke(app, ["train", "clip-shapes", "--data", str(small_world), "--out",
                                      str(trained), "--resume", *TINY, "trainer.max_steps=6"])
    assert result.exit_code == 0, result.output
    after = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert before == 4 and after == 6


def test_eval_writes_every_metric_keyed_by_split(trained, small_world, tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["eval", str(trained / "model"), "--data", str(small_world), "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"test", "test_novel"} <= set(metrics)
    for name in ("text->image R@1", "image->text R@5", "image->text R@10", "zero-shot colour",
                 "zero-shot shape", "zero-shot size", "zero-shot position", "zero-shot count"):
        assert 0.0 <= metrics["test"][name] <= 1.0, name


def test_index_and_search_by_text_and_image(trained, small_world, tmp_path):
    index = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "build", str(trained / "model"), str(small_world), str(index)])
    assert result.exit_code == 0, result.output
    info = json.loads((index / "index.json").read_text())
    assert info["count"] == 120 and info["kind"] == "exact"
    sheet = tmp_path / "hits.png"
    result = CliRunner().invoke(app, ["search", str(index), "a red star above a blue circle", "-k", "3", "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    assert sheet.is_file() and "top 3" in result.output
    image = small_world / "images" / "000005.png"
    result = CliRunner().invoke(app, ["search", str(index), "--image", str(image), "-k", "1", "--sheet", str(sheet)])
    assert result.exit_code == 0 and "000005" in result.output  # an image finds itself first


def test_bad_recipe_settings_are_named(small_world, tmp_path):
    result = CliRunner().invoke(app, ["train", "clip-shapes", "--data", str(small_world), "--out",
                                      str(tmp_path), "trainer.max_stepz=3"])
    assert result.exit_code == 2 and "max_stepz" in result.output


def test_zero_shot_over_a_label_column_of_user_data(trained, small_world, tmp_path):
    import shutil

    rows = [json.loads(x) for x in (small_world / "metadata.jsonl").read_text().splitlines()][:40]
    (tmp_path / "images").mkdir()
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for r in rows:
            shutil.copy(small_world / r["file_name"], tmp_path / r["file_name"])
            f.write(json.dumps({"file_name": r["file_name"], "text": r["text"], "split": "test",
                                "label": r["objects"][0]["colour"]}) + "\n")
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nyellow\npurple\norange\n")
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["eval", str(trained / "model"), "--data", str(tmp_path), "--split", "test",
                                      "--classes", str(tmp_path / "classes.txt"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["test"]
    assert 0.0 <= metrics["zero-shot label"] <= 1.0 and "zero-shot colour" not in metrics
