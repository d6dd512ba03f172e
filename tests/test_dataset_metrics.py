"""A data set brings metrics of its own through one table keyed by the kind its description
names: the shapes world's (zero-shot attributes, paraphrase retrieval, the scene-graph judge)
come only when ``world.json`` says ``"name": "shapes"``, never from rows that merely carry
``objects``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.data.describe import dataset_kind, split_counts, splits_text
from polymodal.data.shapes import caption, questions, render, sample_scene
from polymodal.errors import InputError
from polymodal.eval.datasets import DATASET_METRICS, dataset_metrics
from polymodal.eval.shapes import ShapesWorldMetrics
from polymodal.modalities.text import TextTokenizer
from polymodal.models.captioner import Captioner, CaptionerConfig
from polymodal.models.clip import ContrastiveConfig, ContrastiveModel
from polymodal.models.family import EvalOptions

SHAPES_CONTRASTIVE = {"paraphrase text->image R@1", "paraphrase text->image R@5", "paraphrase text->image R@10",
                      "zero-shot colour", "zero-shot shape", "zero-shot size", "zero-shot position",
                      "zero-shot count"}
SHAPES_CAPTIONS = {"scene-graph objects right", "scene-graph all true"}


def scene_folder(folder: Path, n: int = 12, description: dict | None = None) -> Path:
    """A folder of shapes-world-like rows (scene graphs in ``objects``, captions, questions) in
    the test split, with ``description`` as its world.json (none: no world.json)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            objects = sample_scene(rng, "test", 64)
            render(objects, 64, rng).save(folder / "images" / f"{i:06d}.png")
            f.write(json.dumps({"id": f"{i:06d}", "file_name": f"images/{i:06d}.png", "split": "test",
                                "text": caption(rng, objects), "objects": [o.to_dict() for o in objects],
                                "qa": questions(rng, objects, "test")}) + "\n")
    if description is not None:
        (folder / "world.json").write_text(json.dumps(description))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(1)
    texts = [caption(rng, sample_scene(rng, "train", 64)) for _ in range(60)]
    texts += [qa[k] for _ in range(20) for qa in questions(rng, sample_scene(rng, "train", 64), "train")
              for k in ("question", "answer")]
    return TextTokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    clip = ContrastiveModel(ContrastiveConfig(towers={"image": {"type": "cnn", "preset": "tiny"},
                                                      "text": {"type": "text", "preset": "tiny"}}, embed_dim=16),
                            tokenizer).eval()
    captioner = Captioner(CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny"}}, width=32, depth=1,
                                          heads=2, tasks={"caption": 1.0, "vqa": 1.0}),
                          tokenizer).eval()
    return clip, captioner


def evaluate(models, folder: Path) -> tuple[dict, dict]:
    clip, captioner = models
    options = EvalOptions(limit=12)
    return clip.evaluate(folder, ["test"], options)["test"], captioner.evaluate(folder, ["test"], options)["test"]


def test_the_kind_of_a_data_set_is_read_from_its_description(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "split": "test"}) + "\n")
    assert dataset_kind(tmp_path) is None and dataset_metrics(tmp_path) is None
    (tmp_path / "world.json").write_text(json.dumps({"name": "shapes", "n": 1}))
    assert dataset_kind(tmp_path) == "shapes" and dataset_kind(tmp_path / "metadata.jsonl") == "shapes"
    assert isinstance(dataset_metrics(tmp_path), ShapesWorldMetrics) and DATASET_METRICS["shapes"] is ShapesWorldMetrics
    (tmp_path / "world.json").write_text(json.dumps({"name": "digits"}))
    assert dataset_kind(tmp_path) == "digits" and dataset_metrics(tmp_path) is None
    (tmp_path / "world.json").write_text(json.dumps({"n": 3}))
    assert dataset_kind(tmp_path) is None
    for bad, problem in (("{not json", "invalid JSON"), ("[1, 2]", "JSON object"), ('{"name": 3}', "name")):
        (tmp_path / "world.json").write_text(bad)
        with pytest.raises(InputError, match=problem) as e:
            dataset_kind(tmp_path)
        assert "world.json" in str(e.value)


def test_split_counts_live_with_the_data(tmp_path):
    rows = [{"file_name": f"{i}.png", "split": "train" if i < 3 else "test"} for i in range(5)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = split_counts(tmp_path)
    assert counts == {"train": 3, "test": 2} and splits_text(counts) == "train 3, test 2"


def test_a_shapes_world_gets_its_own_metrics(models, tmp_path):
    contrastive, captions = evaluate(models, scene_folder(tmp_path / "world", description={"name": "shapes"}))
    assert SHAPES_CONTRASTIVE <= set(contrastive)
    assert SHAPES_CAPTIONS <= set(captions) and "vqa colour" in captions


@pytest.mark.parametrize("description", [None, {"name": "my-scenes"}], ids=["no world.json", "another kind"])
def test_a_folder_that_is_no_shapes_world_gets_the_generic_metrics_only(models, tmp_path, description):
    """Rows with scene graphs in ``objects`` do not make a shapes world: only its description does."""
    contrastive, captions = evaluate(models, scene_folder(tmp_path / "plain", description=description))
    assert not SHAPES_CONTRASTIVE & set(contrastive)
    assert {"samples", "image->text R@1", "text->image R@10"} <= set(contrastive)
    assert not SHAPES_CAPTIONS & set(captions)
    assert {"samples", "BLEU-4", "CIDEr", "vqa accuracy", "vqa colour"} <= set(captions)


def test_shards_of_a_described_data_set_keep_its_description(tmp_path):
    """`data shard` copies world.json beside the shards: packed, a shapes world is still one."""
    from typer.testing import CliRunner

    from polymodal.cli import app
    from polymodal.data.describe import dataset_kind
    from polymodal.data.shapes import WorldConfig, generate_world

    world = tmp_path / "world"
    generate_world(world, WorldConfig(n=8, seed=0, speech=False, video_fraction=0.0))
    result = CliRunner().invoke(app, ["data", "shard", str(world), str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert dataset_kind(tmp_path / "shards") == "shapes"
    assert dataset_kind(next((tmp_path / "shards").glob("*.tar"))) == "shapes"
