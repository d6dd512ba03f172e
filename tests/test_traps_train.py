"""The traps a new user fell into with ``polymodal train`` (issue 13), each shut: a run that cannot
take a step, mistyped settings, an epoch counter with no end, a warm-up longer than a short
budget, noise from Lightning, no word at the end, and a data set without splits."""

import json
import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.errors import InputError

TINY = ["model.towers.image={type: cnn, preset: tiny}", "model.towers.text={type: text, preset: tiny}",
        "model.embed_dim=16", "trainer.vocab_size=300", "data.val_limit=8", "trainer.val_every_minutes=0",
        "trainer.accelerator=cpu", "trainer.threads=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 40-sample shapes world without speech or video: about 30 training rows."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("traps_world")
    generate_world(out, WorldConfig(n=40, seed=5, speech=False, video_fraction=0.0), workers=1)
    return out


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def copy_world(world: Path, out: Path, change) -> Path:
    """``world``'s images with each row passed through ``change`` (row -> row)."""
    shutil.copytree(world / "images", out / "images")
    (out / "metadata.jsonl").write_text("".join(json.dumps(change(dict(r))) + "\n" for r in rows_of(world)))
    return out


def train_cli(world: Path, out: Path, *settings: str):
    return CliRunner().invoke(app, ["train", "clip-shapes", "--data", str(world), "--out", str(out), *TINY, *settings])


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- a run that cannot take one step ------------------------------------------------------------


def test_a_split_smaller_than_one_batch_is_an_error_naming_batch_and_splits(world, tmp_path):
    train_rows = Counter(r["split"] for r in rows_of(world))["train"]
    assert train_rows < 256
    result = train_cli(world, tmp_path / "run", "trainer.max_steps=5")  # the recipe's batch of 256
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "batch of 256" in text and "data.batch_size" in text and f"has {train_rows} usable samples" in text
    assert f"train {train_rows}" in text  # the split sizes
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "model").exists()  # no untrained model saved
    assert "model saved" not in text and "curves" not in text


def test_an_empty_training_split_names_the_splits_present(world, tmp_path):
    data = copy_world(world, tmp_path / "data", lambda r: {**r, "split": "test"})
    result = train_cli(data, tmp_path / "run", "trainer.max_steps=2", "data.batch_size=4")
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "training split 'train' is empty" in text and f"test {len(rows_of(world))}" in text
    assert "num_samples" not in text


def test_a_streamed_split_that_gives_no_batch_ends_at_once_with_an_error(world, tmp_path):
    # a minutes cap bounds the old behaviour (empty epoch after empty epoch until the cap, then a
    # saved untrained model); with a step budget alone that loop never ended
    result = train_cli(world, tmp_path / "run", "data.in_memory=false", "data.train_split=nope",
                       "trainer.max_minutes=0.05", "data.val_split=null")
    text = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "training split 'nope' is empty" in text and "train " in text
    assert not (tmp_path / "run" / "model").exists()


# ---- settings are checked before anything starts ------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("trainer.max_minutes=one", ["trainer.max_minutes", "'one'", "float or null"]),
    ("trainer.max_steps=5.5", ["trainer.max_steps", "5.5", "int or null"]),
    ("data.in_memory=1", ["data.in_memory", "bool"]),
    ("trainer.max_step=5", ["'trainer.max_step'", "did you mean 'trainer.max_steps'"]),
    ("traner.max_steps=5", ["'traner'", "did you mean 'trainer'"]),
    ("data.batchsize=8", ["did you mean 'data.batch_size'"]),
])
def test_a_mistyped_setting_is_one_line_before_anything_starts(world, tmp_path, override, words):
    result = train_cli(world, tmp_path / "run", "trainer.max_steps=2", override)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


def test_settings_take_their_declared_types():
    from polymodal.train.recipe import Recipe, check_recipe, load_recipe

    recipe = load_recipe("clip-shapes", ["trainer.lr=1e-4", "trainer.betas=[0.9, 0.99]", "trainer.max_steps=20"])
    assert recipe.trainer.lr == 1e-4 and isinstance(recipe.trainer.lr, float)  # YAML 1.1 reads 1e-4 as text
    assert recipe.trainer.betas == (0.9, 0.99)
    built = Recipe(model={"type": "contrastive"})
    built.trainer.max_minutes = "one"  # a recipe built in Python is checked when it is trained
    with pytest.raises(InputError, match="trainer.max_minutes"):
        check_recipe(built)


# ---- progress, summary, announced files, quiet logs ---------------------------------------------


def test_progress_summary_and_quiet_logs(world, tmp_path, caplog, recwarn):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    result = train_cli(world, out, "trainer.max_steps=3", "data.batch_size=8", "trainer.log_every_steps=1")
    assert result.exit_code == 0, result.output
    assert "step 3/3" in result.output and "Epoch" not in result.output  # steps of the budget
    said = caplog.text
    assert "training done: step 3/3" in said and "samples/s" in said
    assert "final training loss" in said
    assert "validation (best / last at step 3)" in said and "image->text R@1" in said
    assert f"model: {out / 'model'}" in said and f"curves: {out / 'curves.png'}" in said
    # quiet: no Lightning banner, no deprecation warning of Lightning's own code
    assert "GPU available" not in said and "LOCAL_RANK" not in said and "GPU available" not in result.output
    noisy = [str(w.message) for w in recwarn if "LeafSpec" in str(w.message) or "eval mode" in str(w.message)]
    assert noisy == []


def test_files_that_were_not_written_are_not_announced(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"  # two steps, logged every ten, no validation: nothing to draw
    result = train_cli(world, out, "trainer.max_steps=2", "data.batch_size=8", "data.val_split=null")
    assert result.exit_code == 0, result.output
    assert (out / "model" / "config.json").is_file()
    assert not (out / "curves.png").exists()
    assert "curves.png" not in result.output and "curves.png" not in caplog.text
    assert "curves: none" in caplog.text


def test_budget_description_in_steps_or_minutes():
    from polymodal.progress import budget_description

    assert budget_description(120, 1000) == "step 120/1000"
    assert budget_description(120, None, 3.14, 5) == "step 120 · 3.1/5 min"
    assert budget_description(7, 10, 0.5, 2.5) == "step 7/10 · 0.5/2.5 min"


def test_validation_summary_knows_which_way_is_better(tmp_path):
    from polymodal.train.report import validation_scores

    folder = tmp_path / "csv" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("step,val/accuracy,val/reconstruction mse\n1,0.5,0.3\n2,0.7,0.1\n3,0.6,0.2\n")
    scores = validation_scores(tmp_path / "csv")
    assert scores["accuracy"] == (0.7, 0.6, 3.0)
    assert scores["reconstruction mse"] == (0.1, 0.2, 3.0)


# ---- the warm-up scales with the budget ---------------------------------------------------------


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.frozen = nn.Dropout(0.1).eval()  # a part kept in eval mode on purpose (Lightning warns)

    def loss(self, batch):
        return {"loss": (self.linear(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()}


def short_run(tmp_path: Path, warmup: float, max_steps: int = 10) -> list[float]:
    """The learning rate of each step of a ``max_steps`` run with a ``warmup`` share."""
    import lightning as L

    from polymodal.train.module import TrainModule
    from polymodal.train.quiet import quiet_lightning
    from polymodal.train.recipe import TrainerSettings
    from polymodal.train.run import build_trainer

    t = TrainerSettings(max_steps=max_steps, lr=0.01, warmup=warmup, accelerator="cpu", val_every_minutes=0,
                        log_every_steps=1)
    module = TrainModule(Regression(), lr=t.lr, weight_decay=0.0, warmup=t.warmup, max_steps=t.max_steps)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    x = torch.randn(32, 4)
    data = [{"x": x[i], "y": x[i].sum()} for i in range(32)]
    with quiet_lightning():
        trainer = build_trainer(t, tmp_path, progress=False)
        trainer.callbacks.append(Record())
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8, drop_last=True))
    return lrs


def test_a_short_budget_still_reaches_the_peak_learning_rate(tmp_path, recwarn):
    from polymodal.train.recipe import TrainerSettings, load_recipe, shipped_recipes

    shares = {load_recipe(name).trainer.warmup for name in shipped_recipes()} | {TrainerSettings().warmup}
    for warmup in (min(shares), max(shares), 0.5):
        lrs = short_run(tmp_path / str(warmup), warmup)
        assert len(lrs) == 10
        assert max(lrs) == pytest.approx(0.01), (warmup, lrs)  # the peak, not 91% of it
        assert lrs[-1] < 0.001  # and cooled down by the end
        if warmup >= 0.2:
            assert lrs[0] < 0.01  # still a warm-up
    assert [str(w.message) for w in recwarn if "eval mode" in str(w.message) or "LeafSpec" in str(w.message)] == []


# ---- data without splits ------------------------------------------------------------------------


def test_rows_without_a_split_get_one_by_a_fixed_rule():
    from polymodal.data.dataset import row_split

    drawn = Counter(row_split({"id": f"{i:06d}"}) for i in range(4000))
    assert set(drawn) == {"train", "val", "test"}
    assert abs(drawn["train"] / 4000 - 0.90) < 0.02 and abs(drawn["val"] / 4000 - 0.05) < 0.015
    again = Counter(row_split({"id": f"{i:06d}"}) for i in range(4000))
    assert again == drawn  # the same every time (a hash, not a shuffle)
    assert row_split({"file_name": "images/a.png"}) == row_split({"file_name": "images/a.png", "text": "x"})
    assert row_split({"id": "a", "split": "dev"}) == "dev"


def test_a_folder_without_splits_trains_on_its_rule(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = copy_world(world, tmp_path / "data", lambda r: {k: v for k, v in r.items() if k != "split"})
    result = train_cli(data, tmp_path / "run", "trainer.max_steps=2", "data.batch_size=8")
    assert result.exit_code == 0, result.output
    assert "rows without a 'split' get one from a hash of their id" in caplog.text
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_quiet_lightning_leaves_other_warnings_alone():
    from polymodal.train.quiet import quiet_lightning

    before = logging.getLogger("lightning.pytorch").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            warnings.warn_explicit("Found 3 module(s) in eval mode at the start of training.", UserWarning,
                                   "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
            warnings.warn_explicit("Found 3 module(s) in eval mode at the start of training.", UserWarning,
                                   "mine.py", 1, module="mypackage.training")
            warnings.warn("something else entirely", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Found 3 module(s) in eval mode at the start of training.",
                                                "something else entirely"]
    assert logging.getLogger("lightning.pytorch").level == before  # the banners' level is restored


@pytest.mark.parametrize("override, named", [
    ("model.width=abc", "model.width: expected an integer"),
    ("model.depth=-1", "model.depth: -1 is out of range"),
    ("model.widht=3", "model.widht: unknown setting"),
    ("model.heads=5", "model.heads: 5 heads do not divide the width"),
    ("model.type=captoiner", "model.type: 'captoiner' is not a model family"),
])
def test_model_overrides_are_checked_when_the_recipe_loads(override, named):
    from polymodal.errors import InputError
    from polymodal.train.recipe import load_recipe

    with pytest.raises(InputError, match=named.replace("(", r"\(")):
        load_recipe("caption-shapes", [override])


def test_every_shipped_recipe_passes_its_model_check():
    from polymodal.train.recipe import load_recipe, shipped_recipes

    for name in shipped_recipes():
        load_recipe(name)


def test_the_summary_takes_the_lowest_error_rate_as_best():
    """A recogniser's substitution, deletion and insertion rates are errors: best is the lowest."""
    from polymodal.train.report import lower_is_better

    for metric in ("val/word error rate", "val/substitution rate", "val/deletion rate", "val/insertion rate",
                   "val/denoising loss", "val/frechet distance"):
        assert lower_is_better(metric), metric
    for metric in ("val/BLEU-4", "val/vqa accuracy", "val/text->image R@1", "val/scene-graph objects right"):
        assert not lower_is_better(metric), metric
