import numpy as np
import pytest
import torch

from polymodal.data.memory import LengthBucketBatchSampler
from polymodal.errors import InputError
from polymodal.eval.retrieval import recall_at_k, retrieval_metrics
from polymodal.eval.zeroshot import shapes_attribute_prompts, shapes_count_prompts
from polymodal.index.vectors import VectorIndex, make_index
from polymodal.train.recipe import apply_overrides, load_recipe


def test_recall_at_k_counts_ranks_and_breaks_ties_against_the_query():
    q = torch.eye(3)
    c = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])  # candidate 1 ties with 0 for query 0
    r = recall_at_k(q, c, ks=(1, 2))
    assert r["R@1"] == pytest.approx(1 / 3)  # query 0: tie ranks it 2nd; query 1: 3rd (score 0); query 2: 1st
    assert r["R@2"] == pytest.approx(2 / 3)
    both = retrieval_metrics(q, c, "text", "image", ks=(1,))
    assert set(both) == {"text->image R@1", "image->text R@1"}


def test_shapes_prompts_cover_every_class_evenly():
    for attribute, classes in (("colour", 6), ("shape", 5), ("size", 2), ("position", 9)):
        prompts = shapes_attribute_prompts(attribute)
        assert len(prompts) == classes and len({len(v) for v in prompts.values()}) == 1
    assert all("red" in p for p in shapes_attribute_prompts("colour")["red"])
    counts = shapes_count_prompts(per_count=5)
    assert {k: len(v) for k, v in counts.items()} == {"1": 5, "2": 5, "3": 5}


def test_paraphrases_use_words_training_captions_never_use(small_world):
    import json

    from polymodal.data.scene import SceneObject, words_of
    from polymodal.data.shapes import paraphrase

    rows = [json.loads(x) for x in (small_world / "metadata.jsonl").read_text().splitlines()]
    caption_words = {w for r in rows for w in words_of(r["text"])}
    rng = np.random.default_rng(0)
    new_words = set()
    for r in rows:
        new_words |= set(words_of(paraphrase(rng, [SceneObject.from_dict(o) for o in r["objects"]])))
    assert {"scarlet", "azure", "ring", "tile", "huge"} & new_words
    assert not {"scarlet", "crimson", "azure", "cobalt", "emerald", "tangerine"} & caption_words


def test_length_buckets_cover_every_index_once_with_similar_lengths():
    lengths = list(np.random.default_rng(0).integers(10, 1000, size=1000))
    sampler = LengthBucketBatchSampler(lengths, batch_size=32, pool_batches=10)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(len(b) == 32 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and len(seen) >= 1000 - 32 * 10
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 200  # random batches of 32 would span about 900
    assert [b for b in sampler] != batches  # a new order each epoch


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_index_saves_opens_memory_mapped_and_finds_neighbours(tmp_path, kind):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(make_index(vectors, kind), [{"id": i} for i in range(500)], {"model": "m"})
    index.save(tmp_path)
    opened = VectorIndex.open(tmp_path)
    assert opened.info["kind"] == kind and opened.info["count"] == 500
    scores, ids = opened.search(vectors[[3, 77]], k=5)
    assert list(ids[:, 0]) == [3, 77] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="dimensions"):
        opened.search(np.zeros((1, 8), np.float32))


def test_auto_index_kind_switches_at_the_limit():
    v = np.eye(8, dtype=np.float32)
    assert make_index(v, exact_limit=10).ntotal == 8
    assert type(make_index(v, exact_limit=4)).__name__ == "IndexHNSWFlat"


def test_open_names_a_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(InputError, match="not an index folder"):
        VectorIndex.open(tmp_path)


def test_recipe_overrides_and_errors(tmp_path):
    raw = apply_overrides({"trainer": {"lr": 1.0}}, ["trainer.lr=0.5", "model.towers.image={type: cnn}", "name=x"])
    assert raw == {"trainer": {"lr": 0.5}, "model": {"towers": {"image": {"type": "cnn"}}}, "name": "x"}
    with pytest.raises(InputError, match="key=value"):
        apply_overrides({}, ["trainer.lr"])
    recipe = load_recipe("clip-shapes", ["trainer.max_minutes=3", "data.batch_size=64"])
    assert recipe.trainer.max_minutes == 3 and recipe.data.batch_size == 64 and recipe.model["type"] == "contrastive"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {type: contrastive}\noptimiser: {}\n")
    with pytest.raises(InputError, match="unknown sections"):
        load_recipe(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_recipe(bad)
    for recipe_file in ("clip-shapes", "clap-shapes", "bind-shapes", "lit-shapes"):
        assert load_recipe(recipe_file).model["type"] == "contrastive"
