"""The one table of model families: a toy family added to it trains, validates, evaluates, saves
and loads through the same code paths as the real ones, and the generic code names no family."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import polymodal
from polymodal.cli import app
from polymodal.errors import InputError
from polymodal.models import FAMILIES, load_model, model_type
from polymodal.models.family import DEFAULT_SPLITS, BuildContext, EvalOptions, evaluate_splits
from polymodal.models.folder import read_model_folder, write_model_folder


@dataclass
class ToyConfig:
    width: int = 4  # hidden width of the colour classifier


class ToyColours(nn.Module):
    """The colour of a one-object scene from the image's mean pixel: small enough to train in a
    few steps, and a family in every respect the table asks for."""

    tasks = ("classify",)
    default_splits = ("val", "test")
    COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(3, config.width), nn.ReLU(), nn.Linear(config.width, len(self.COLOURS)))

    @classmethod
    def from_recipe(cls, spec: dict, build: BuildContext) -> ToyColours:
        assert build.train_split == "train" and build.data.is_dir()
        return cls(ToyConfig(**spec))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.mean((2, 3)))

    def labels(self, rows: list[dict]) -> torch.Tensor:
        return torch.tensor([self.COLOURS.index(r["objects"][0]["colour"]) for r in rows])

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self(batch["image"]), self.labels(batch["rows"]))}

    def fields(self) -> dict[str, str]:
        return {"image": "image"}

    def input_size(self) -> int:
        return 32

    def accuracy(self, items: list[dict]) -> dict[str, float]:
        with torch.no_grad():
            images = torch.stack([item["image"] for item in items])
            right = self(images).argmax(1) == self.labels([item["row"] for item in items])
        return {"toy accuracy": right.float().mean().item(), "samples": float(len(items))}

    def validator(self, items: list[dict], fields):
        return lambda model: model.accuracy(items)

    def evaluate(self, data, splits, options: EvalOptions) -> dict[str, dict[str, float]]:
        return evaluate_splits(data, splits, self.fields(), self.input_size(), self.accuracy, limit=options.limit)

    def save_pretrained(self, directory) -> Path:
        return write_model_folder(directory, {"model_type": "toy", **asdict(self.config)}, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory) -> ToyColours:
        raw, state = read_model_folder(directory, "toy")
        model = cls(ToyConfig(**raw))
        model.load_state_dict(state)
        return model.eval()


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", ToyColours)


def test_a_family_added_to_the_table_trains_evaluates_saves_and_loads(toy_family, small_world, tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("model: {type: toy, width: 8}\ndata: {fields: [image], image_size: 32, batch_size: 8, "
                      "val_limit: 12}\ntrainer: {max_steps: 5, log_every_steps: 1, val_every_minutes: 0}\n")
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(recipe), "--data", str(small_world), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    folder = tmp_path / "run" / "model"
    assert model_type(folder) == "toy"
    model = load_model(folder, task="classify")
    assert isinstance(model, ToyColours) and model.config.width == 8 and not model.training
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs" / "csv").rglob("metrics.csv"))
    assert "val/toy accuracy" in logs  # the trainer ran the family's own validation

    scored = runner.invoke(app, ["eval", str(folder), "--data", str(small_world), "--json", str(tmp_path / "m.json")])
    assert scored.exit_code == 0, scored.output
    results = json.loads((tmp_path / "m.json").read_text())
    assert set(results) == {"val", "test"}  # the family's default splits
    assert 0.0 <= results["test"]["toy accuracy"] <= 1.0 and results["test"]["samples"] > 0

    with pytest.raises(InputError, match="cannot generate image"):
        load_model(folder, task="generate image")


def test_unknown_families_and_foreign_folders_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="'bert' is not a polymodal model"):
        model_type(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        load_model(tmp_path)
    from polymodal.models import build_model

    with pytest.raises(ValueError, match="unknown model type 'cnp'.*contrastive"):
        build_model({"type": "cnp"}, BuildContext(data=tmp_path))


def test_every_family_answers_the_whole_interface():
    for name, cls in FAMILIES.items():
        for attribute in ("from_recipe", "from_pretrained", "save_pretrained", "loss", "validator", "evaluate",
                          "fields", "input_size", "tasks", "default_splits"):
            assert hasattr(cls, attribute), f"{name}: {cls.__name__} has no {attribute}"
        assert set(cls.default_splits) <= set(DEFAULT_SPLITS)


def test_generic_code_names_no_family():
    """The trainer, the command line and the demo go through the table: they import no family
    module, name no family class and compare with no family name."""
    root = Path(polymodal.__file__).parent
    files = [*sorted((root / "train").glob("*.py")), *sorted((root / "cli").glob("*.py")), root / "demo.py"]
    modules = "|".join(sorted({cls.__module__.rsplit(".", 1)[1] for cls in FAMILIES.values()}))
    classes = "|".join(sorted(cls.__name__ for cls in FAMILIES.values()))
    keys = "|".join(sorted(FAMILIES))
    patterns = [rf"polymodal\.models\.({modules})\b", rf"\b({classes})\b", rf"(==|!=|\bin)\s*\(?[\"']({keys})[\"']"]
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            found = re.search(pattern, text)
            assert found is None, f"{path.name} names a family: {found.group(0)!r}"


def test_every_shipped_recipe_loads_by_name_with_a_step_budget():
    from polymodal.train.recipe import load_recipe, shipped_recipes

    names = shipped_recipes()
    assert {"clip-shapes", "caption-shapes", "t2i-dit-latent-shapes"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.model["type"] in FAMILIES, name
        assert isinstance(recipe.trainer.max_steps, int) and recipe.trainer.max_steps > 0, name
        assert 0.0 <= recipe.trainer.warmup < 0.5 and recipe.trainer.max_minutes is None, name
    with pytest.raises(InputError, match="shipped: .*clip-shapes"):
        load_recipe("clip-shapse")
