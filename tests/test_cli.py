import json
import shutil
import tarfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["data", "demo"]),
        (["data"], ["shapes", "inspect", "shard"]),
        (["data", "shapes"], ["--n", "--seed", "--no-speech", "--workers"]),
        (["data", "inspect"], ["--json", "--sheet", "--no-decode"]),
        (["data", "shard"], ["--samples-per-shard", "DIRECTORY", "OUT"]),
        (["demo"], ["--out", "--n"]),
    ],
)
def test_help(command, expected):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word.lower() in result.output.lower(), (word, result.output)


def test_no_arguments_shows_help():
    result = invoke()
    assert "Usage" in result.output and "data" in result.output


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "world"
    result = invoke("data", "shapes", out, "--n", "12", "--workers", "1", "--no-speech")
    assert result.exit_code == 0, result.output
    return out


def test_shapes_writes_rows(cli_world):
    rows = [json.loads(line) for line in (cli_world / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(12)]
    assert all("audio_file" not in r for r in rows)  # --no-speech
    assert all((cli_world / r["file_name"]).is_file() for r in rows)
    assert json.loads((cli_world / "world.json").read_text())["n"] == 12


def test_shapes_rejects_a_bad_config(tmp_path):
    result = invoke("data", "shapes", tmp_path / "w", "--n", "0", "--no-speech")
    assert result.exit_code == 2
    assert "n must be at least 1" in one_line(result.output)


def test_inspect_writes_sheet_and_json(cli_world, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke("data", "inspect", cli_world, "--json", report_path)
    assert result.exit_code == 0, result.output
    sheet = cli_world / "contact_sheet.png"
    assert sheet.is_file()
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    report = json.loads(report_path.read_text())
    assert report["samples"] == 12
    assert sum(report["per_split"].values()) == 12
    assert set(report["per_split"]) <= {"train", "val", "test", "test_novel"}
    assert report["bad"] == []
    assert report["sheet"] == str(sheet)
    for split, modalities in report["per_modality"].items():
        assert modalities["image"] == modalities["text"] == report["per_split"][split]
    assert "no bad samples found" in result.output


def test_inspect_lists_a_corrupt_png(cli_world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cli_world, broken)
    (broken / "images" / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report_path = tmp_path / "report.json"
    result = invoke("data", "inspect", broken, "--json", report_path, "--sheet",
                    tmp_path / "sheet.png")
    assert result.exit_code == 0, result.output
    assert "1 bad samples" in result.output
    assert "000004.png" in one_line(result.output)
    report = json.loads(report_path.read_text())
    assert report["samples"] == 12
    assert len(report["bad"]) == 1
    assert report["bad"][0]["source"].endswith("images/000004.png")
    assert "image" in report["bad"][0]["reason"]
    assert sum(m.get("image", 0) for m in report["per_modality"].values()) == 11
    assert (tmp_path / "sheet.png").is_file()


def test_shard_writes_tars_that_inspect_reads(cli_world, tmp_path):
    out = tmp_path / "shards"
    result = invoke("data", "shard", cli_world, out, "--samples-per-shard", "5")
    assert result.exit_code == 0, result.output
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert "000000.json" in names and "000000.file_name.png" in names
    assert "wrote 3 shards" in result.output and "no samples skipped" in result.output
    report_path = tmp_path / "shards.json"
    result = invoke("data", "inspect", out, "--json", report_path)
    assert result.exit_code == 0, result.output
    assert json.loads(report_path.read_text())["samples"] == 12


@pytest.mark.parametrize("command", [["data", "inspect"], ["data", "shard"]])
def test_missing_folder_exits_2_naming_it(tmp_path, command):
    missing = tmp_path / "no_such_data"
    args = [*command, missing] + ([tmp_path / "out"] if command[-1] == "shard" else [])
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "error" in text
    assert str(missing) in text


def test_demo_runs_every_step_and_reuses_its_models(tmp_path):
    import json

    from polymodal.demo import STEPS, run_demo

    state = run_demo(tmp_path, n=60, train_scale=0.004, judged_prompts=1)  # every step, a few training steps each
    assert (tmp_path / "contact_sheet.png").is_file()
    assert (state["world"] / "metadata.jsonl").read_text().count("\n") == 60
    assert (tmp_path / "clip" / "model" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "clip" / "metrics.json").read_text())
    assert "text->image R@5" in metrics["test"]
    assert (tmp_path / "search.png").is_file() and (tmp_path / "index" / "vectors.faiss").is_file()
    understanding = json.loads((tmp_path / "captions" / "metrics.json").read_text())
    assert {"scene-graph objects right", "vqa accuracy"} <= set(understanding["test"])
    assert (tmp_path / "captions.png").stat().st_size > 1000
    assert (tmp_path / "autoencoder" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "drawing" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "generated.png").stat().st_size > 1000
    drawing = json.loads((tmp_path / "drawing" / "metrics.json").read_text())
    assert "single_object colour+shape+position" in drawing["test"]
    drawn_with = json.loads((tmp_path / "drawing" / "model" / "config.json").read_text())
    assert drawn_with["text"]["type"] == "clip"  # prompts read by the demo CLIP's frozen text tower
    # a few training steps cannot reach the floors: the demo says so instead of looking fine
    assert state["failed"] and {c[0] for c in state["failed"]} >= {"clip: text->image R@5 (test)"}
    heard = json.loads((tmp_path / "listen" / "metrics.json").read_text())
    assert 0.0 <= heard["test"]["word error rate"]
    one_model = json.loads((tmp_path / "omni" / "metrics.json").read_text())  # captions, answers and drawings
    assert {"scene-graph objects right", "vqa accuracy", "single_object colour+shape+position"} <= set(one_model["test"])
    assert (tmp_path / "omni.png").stat().st_size > 1000
    assert state["trained"] == {"clip", "captions", "listen", "judge", "autoencoder", "drawing", "omni"}

    # run again into the same folder: every model is reused, nothing is trained
    chosen = [s for s in STEPS if s.name in ("world", "clip", "understand")]
    again = run_demo(tmp_path, n=60, train_scale=0.004, judged_prompts=1, steps=chosen)
    assert again["trained"] == set()
    # a saved model that no longer loads (here: weights that do not fit) is trained again, not reused
    (tmp_path / "captions" / "model" / "model.safetensors").write_bytes(b"not weights")
    third = run_demo(tmp_path, n=60, train_scale=0.004, judged_prompts=1, steps=chosen)
    assert third["trained"] == {"captions"}


def test_demo_runs_chosen_steps_only(tmp_path):
    result = invoke("demo", "--out", tmp_path, "--n", "12", "--steps", "world,inspect")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "contact_sheet.png").is_file() and not (tmp_path / "clip").exists()
    result = invoke("demo", "--out", tmp_path, "--steps", "world,dance")
    assert result.exit_code == 2 and "dance" in one_line(result.output)


def test_failed_shard_leaves_no_tar_behind(tmp_path):
    result = invoke("data", "shard", tmp_path / "no_such_data", tmp_path / "out")
    assert result.exit_code == 2
    assert not list((tmp_path / "out").glob("*.tar"))
