"""The text-to-image commands end to end on tiny models: eval (GenEval-style), bench generation."""

import json

import pytest
import torch
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.modalities.text import TextTokenizer
from polymodal.models.detector import DetectorConfig, GridDetector
from polymodal.models.text_to_image import TextToImage, TextToImageConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from polymodal.data.shapes import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("generation")
    world = generate_world(root / "world", WorldConfig(n=150, seed=5, speech=False, video_fraction=0.0), workers=1)
    rows = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]
    tokenizer = TextTokenizer.train([r["text"] for r in rows], vocab_size=300)
    torch.manual_seed(0)
    config = TextToImageConfig(denoiser={"type": "unet", "channels": [16, 32], "attention": [False, True],
                                         "heads": 2, "groups": 4},
                               text={"type": "text", "width": 24, "depth": 1, "heads": 2}, image_size=32)
    model = TextToImage(config, tokenizer)
    run = root / "run"
    model.save_pretrained(run / "model")
    model.save_pretrained(run / "snapshots" / "step-000010")
    model.save_pretrained(run / "snapshots" / "step-000020")
    GridDetector(DetectorConfig(widths=(8, 16, 16), head_width=16, colour_width=8)).save_pretrained(root / "judge")
    return {"world": world, "run": run, "judge": root / "judge", "root": root}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_scores_a_text_to_image_model_by_category(setup):
    out = setup["root"] / "t2i.json"
    result = invoke("eval", setup["run"] / "model", "--data", setup["world"], "--judge", setup["judge"],
                    "--per-category", 2, "--steps", 2, "--json", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) <= {"test", "test_novel"} and "test" in metrics
    test = metrics["test"]
    for key in ("overall", "single_object", "single_object shape", "single_object colour+shape+position",
                "judge shape accuracy on real", "frechet distance"):
        assert key in test, key
        assert 0.0 <= test[key] <= 1.0 or key == "frechet distance"


def test_eval_and_generate_take_a_guidance_interval(setup):
    out = setup["root"] / "t2i-interval.json"
    result = invoke("eval", setup["run"] / "model", "--data", setup["world"], "--judge", setup["judge"],
                    "--split", "test", "--per-category", 1, "--steps", 2, "--cfg-interval", "0,500", "--json", out)
    assert result.exit_code == 0, result.output
    assert "overall" in json.loads(out.read_text())["test"]
    grid = setup["root"] / "interval.png"
    drawn = invoke("generate", "image", setup["run"] / "model", "a red circle", "--n", 2, "--steps", 2,
                   "--cfg", 4, "--cfg-interval", "0,400", "--cfg-outside", 1.5, "--out", grid)
    assert drawn.exit_code == 0, drawn.output
    assert grid.is_file()
    for command in (["eval", setup["run"] / "model", "--data", setup["world"], "--judge", setup["judge"]],
                    ["generate", "image", setup["run"] / "model", "a red circle", "--out", setup["root"] / "x.png"]):
        bad = invoke(*command, "--cfg-interval", "500,0")
        assert bad.exit_code == 2 and "guidance interval" in bad.output and "Traceback" not in bad.output
        alone = invoke(*command, "--cfg-outside", 1.5)
        assert alone.exit_code == 2 and "needs the interval" in alone.output
    assert not (setup["root"] / "x.png").exists()


def test_eval_of_a_text_to_image_model_needs_a_judge(setup):
    result = invoke("eval", setup["run"] / "model", "--data", setup["world"])
    assert result.exit_code == 2 and "--judge" in result.output
    wrong = invoke("eval", setup["run"] / "model", "--data", setup["world"], "--judge", setup["run"] / "model")
    assert wrong.exit_code == 2 and "detector" in wrong.output


def test_bench_generation_writes_sheets_sweep_and_training_curve(setup):
    out = setup["root"] / "bench"
    result = invoke("bench", "generation", setup["run"], "--data", setup["world"], "--judge", setup["judge"],
                    "--out", out, "--scales", "1,3", "--steps", 2, "--per-category", 1)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [p["guidance"] for p in results["guidance"]] == [1.0, 3.0]
    assert [p["step"] for p in results["training"]] == [10, 20]
    for name in ("guidance.png", "training.png", "samples_single_object.png", "samples_counting.png"):
        assert (out / name).stat().st_size > 1000, name


def test_a_model_draws_with_its_own_drawing_settings_unless_told_otherwise(setup, monkeypatch):
    import shutil

    own = setup["root"] / "own"
    shutil.copytree(setup["run"] / "model", own)
    config = json.loads((own / "config.json").read_text())
    config["drawing"] = {"guidance": 2.0, "guidance_interval": [0, 500], "guidance_outside": 1.5, "steps": 2}
    (own / "config.json").write_text(json.dumps(config))
    out = setup["root"] / "own.json"

    def scored(*extra):
        result = invoke("eval", own, "--data", setup["world"], "--judge", setup["judge"], "--split", "test",
                        "--per-category", 1, "--json", out, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["test"]

    drawn = scored()  # every setting the model's own, recorded beside the scores
    assert {k: drawn[k] for k in ("guidance", "guidance interval low", "guidance interval high", "guidance outside",
                                  "denoising steps", "best of")} == {
        "guidance": 2.0, "guidance interval low": 0.0, "guidance interval high": 500.0, "guidance outside": 1.5,
        "denoising steps": 2.0, "best of": 1.0}
    told = scored("--cfg", 3, "--cfg-interval", "all")  # the caller's scale, at every step: no outside scale kept
    assert told["guidance"] == 3.0 and told["denoising steps"] == 2.0
    assert not {"guidance interval low", "guidance outside"} & set(told)
    assert scored("--cfg-outside", 1.0)["guidance outside"] == 1.0  # alone: on the model's own interval

    calls = []
    monkeypatch.setattr(TextToImage, "generate", lambda self, prompts, **options: (
        calls.append(options), torch.zeros(len(prompts), 3, 32, 32))[1])
    grid = invoke("generate", "image", own, "a red circle", "--n", 1, "--out", setup["root"] / "own.png")
    assert grid.exit_code == 0, grid.output
    assert {k: calls[-1][k] for k in ("guidance", "guidance_interval", "guidance_outside", "steps")} == {
        "guidance": 2.0, "guidance_interval": (0, 500), "guidance_outside": 1.5, "steps": 2}
    assert "best_of" not in calls[-1]  # a text-to-image model draws once a picture

    config["drawing"] = {"best_of": 2}  # it cannot read what it draws: refused when the folder loads
    (own / "config.json").write_text(json.dumps(config))
    refused = invoke("generate", "image", own, "a red circle")
    assert refused.exit_code == 2 and "config.json" in refused.output and "drawing.best_of" in refused.output
    for bad, problem in (({"guidance_interval": [500, 0]}, "guidance interval"), ({"colour": 1}, "unknown setting"),
                         ({"steps": 0}, "at least 1"), ({"guidance_outside": 2.0}, "needs the interval")):
        config["drawing"] = bad
        (own / "config.json").write_text(json.dumps(config))
        refused = invoke("generate", "image", own, "a red circle")
        assert refused.exit_code == 2 and "drawing" in refused.output and problem in refused.output, refused.output
