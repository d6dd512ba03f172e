import json
import math

import numpy as np
import pytest
import torch

from polymodal.data.scene import SceneObject, check_caption, parse_claims
from polymodal.data.shapes import HELD_OUT_PAIRS, sample_scene
from polymodal.eval.geneval import (
    CATEGORIES,
    clip_score,
    evaluate_generator,
    frechet_distance,
    geneval_prompts,
    render_scenes,
    scene_generator,
    score_images,
)
from polymodal.models.detector import DetectorConfig, GridDetector

HELD = set(HELD_OUT_PAIRS)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 200-sample shapes world without speech or video, made once for this module."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("geneval_world")
    generate_world(out, WorldConfig(n=200, seed=3, speech=False, video_fraction=0.0), workers=1)
    return out


def world_rows(world, split):
    rows = [json.loads(line) for line in (world / "metadata.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def scene_rows(split, n, seed=0):
    """Rows of ``n`` scenes sampled as the world samples them (no files)."""
    rng = np.random.default_rng(seed)
    return [{"id": f"{i:04d}", "split": split, "objects": [o.to_dict() for o in sample_scene(rng, split, 64)]}
            for i in range(n)]


def objects_of(prompt):
    return [SceneObject.from_dict(d) for d in prompt["objects"]]


class PerfectJudge:
    """Detects exactly the scenes it is given, whatever the images."""

    def __init__(self, scenes):
        self.scenes = scenes

    def detect(self, images):
        assert len(images) == len(self.scenes)
        return [list(s) for s in self.scenes]


def test_prompts_cover_every_category_and_are_deterministic():
    rows = scene_rows("test", 300)
    prompts = geneval_prompts(rows, "test", per_category=8, seed=1)
    assert [p["category"] for p in prompts] == [c for c in CATEGORIES for _ in range(8)]
    assert prompts == geneval_prompts(rows, "test", per_category=8, seed=1)
    assert prompts != geneval_prompts(rows, "test", per_category=8, seed=2)
    assert all({"category", "prompt", "objects", "split", "source"} <= set(p) for p in prompts)
    json.dumps(prompts)  # plain data


def test_prompts_parse_back_into_the_objects_they_were_built_from():
    prompts = geneval_prompts(scene_rows("test", 300), "test", per_category=10, seed=0)
    for p in prompts:
        objects = objects_of(p)
        assert check_caption(p["prompt"], objects) == [], p
        claims = parse_claims(p["prompt"])
        m = claims.mentions
        c = p["category"]
        if c == "single_object":
            (o,) = objects
            assert len(m) == 1 and (m[0].shape, m[0].colour, m[0].size, m[0].cell) == (o.shape, o.colour, o.size, o.cell)
        elif c == "counting":
            assert len(m) == 1 and m[0].count == len(objects) in (2, 3)
            assert all(m[0].matches(o) for o in objects) and len({o.cell for o in objects}) == len(objects)
        elif c == "colours":
            (o,) = objects
            assert len(m) == 1 and (m[0].shape, m[0].colour, m[0].size, m[0].cell) == (o.shape, o.colour, None, None)
        else:
            assert len(m) == 2 and len(objects) == 2
            for mention, o in zip(m, objects, strict=True):
                assert (mention.shape, mention.colour) == (o.shape, o.colour)
                assert mention.size == (None if c == "colour_attribution" else o.size)
                assert mention.cell is None
            if c == "position":
                assert len(claims.relations) == 1 and claims.relations[0][0] == 0 and claims.relations[0][2] == 1
            if c == "colour_attribution":
                assert objects[0].colour != objects[1].colour and objects[0].shape != objects[1].shape


def test_novel_prompts_all_name_a_held_out_pair():
    rows = scene_rows("test_novel", 300)
    prompts = geneval_prompts(rows, "test_novel", per_category=10, seed=0)
    assert {p["category"] for p in prompts} == set(CATEGORIES)
    for p in prompts:
        named = [(m.shape, m.colour) for m in parse_claims(p["prompt"]).mentions]
        assert any(pair in HELD for pair in named), p["prompt"]
    plain = geneval_prompts(scene_rows("test", 300), "test", per_category=10, seed=0)
    assert not any((o.shape, o.colour) in HELD for p in plain for o in objects_of(p))


def test_counting_is_filled_with_constructed_scenes():
    rows = [{"id": "a", "objects": [SceneObject("star", "red", "small", 0, 0, (1, 1, 11, 11)).to_dict()]},
            {"id": "b", "objects": [SceneObject("circle", "blue", "large", 1, 1, (22, 22, 40, 40)).to_dict()]}]
    counting = [p for p in geneval_prompts(rows, "test", per_category=6, seed=0) if p["category"] == "counting"]
    assert len(counting) == 6 and all(p["source"] == "constructed" for p in counting)
    assert [len(p["objects"]) for p in counting] == [3, 2, 3, 2, 3, 2]
    for p in counting:
        objects = objects_of(p)
        assert {(o.shape, o.colour) for o in objects} <= {("star", "red"), ("circle", "blue")}
        for o in objects:  # laid out inside its own cell
            x0, y0, x1, y1 = o.bbox
            assert o.col * 64 / 3 <= x0 < x1 <= (o.col + 1) * 64 / 3
            assert o.row * 64 / 3 <= y0 < y1 <= (o.row + 1) * 64 / 3
    with pytest.raises(ValueError, match="no 'objects'"):
        geneval_prompts([{"id": "x"}], "test")


def test_a_perfect_judge_scores_true_scenes_one_and_catches_mistakes():
    prompts = geneval_prompts(scene_rows("test", 300), "test", per_category=10, seed=0)
    truth = [objects_of(p) for p in prompts]
    images = torch.zeros(len(prompts), 3, 32, 32)
    scores = score_images(PerfectJudge(truth), prompts, images)
    assert all(scores[c] == 1.0 for c in CATEGORIES) and scores["overall"] == 1.0
    for k in ("colour", "shape", "size", "position", "colour+shape+position"):
        assert scores[f"single_object {k}"] == 1.0

    def first(category):
        return next(i for i, p in enumerate(prompts) if p["category"] == category)

    wrong = [list(s) for s in truth]
    other = {"red": "green"}
    i = first("colours")  # wrong colour
    o = wrong[i][0]
    wrong[i] = [SceneObject(o.shape, other.get(o.colour, "red"), o.size, o.row, o.col)]
    wrong[first("two_objects")] = wrong[first("two_objects")][:1]  # a missing object
    i = first("position")  # the two objects swap cells: the relation is now false
    a, b = wrong[i]
    wrong[i] = [SceneObject(a.shape, a.colour, a.size, b.row, b.col), SceneObject(b.shape, b.colour, b.size, a.row, a.col)]
    i = first("colour_attribution")  # colours swapped between the shapes
    a, b = wrong[i]
    wrong[i] = [SceneObject(a.shape, b.colour, a.size, a.row, a.col), SceneObject(b.shape, a.colour, b.size, b.row, b.col)]
    i = first("counting")  # one too many
    extra = next(c for c in range(9) if c not in {o.cell for o in wrong[i]})
    wrong[i] = wrong[i] + [SceneObject(wrong[i][0].shape, wrong[i][0].colour, "small", *divmod(extra, 3))]
    i = first("single_object")  # the right object, and another one
    wrong[i] = wrong[i] + [SceneObject("cross", "orange", "large", *divmod((wrong[i][0].cell + 1) % 9, 3))]
    i = first("single_object") + 1  # the right object in the wrong cell
    o = wrong[i][0]
    wrong[i] = [SceneObject(o.shape, o.colour, o.size, *divmod((o.cell + 4) % 9, 3))]
    worse = score_images(PerfectJudge(wrong), prompts, images)
    for c in CATEGORIES:
        assert worse[c] == pytest.approx(0.9 if c != "single_object" else 0.8), c
    assert worse["overall"] < 1.0
    assert worse["single_object colour"] == pytest.approx(0.9)  # the extra object breaks "exactly one"
    assert worse["single_object position"] == pytest.approx(0.8)
    assert worse["single_object colour+shape+position"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="prompts but"):
        score_images(PerfectJudge(truth), prompts, images[:3])


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    b = rng.normal(size=(200, 6)) * 2
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # 1-D by hand: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2, sample variances
    x, y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0, 7.0])
    expected = (1.5 - 4.0) ** 2 + (math.sqrt(5 / 3) - math.sqrt(20 / 3)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.tensor(x)[:, None], torch.tensor(y)[:, None]) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))


def tiny_clip():
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.clip import ContrastiveConfig, ContrastiveModel

    tokenizer = TextTokenizer.train(["a red circle", "two blue stars", "a small green square in the top left"],
                                    vocab_size=300)
    towers = {"image": {"type": "cnn", "preset": "tiny"}, "text": {"type": "text", "preset": "tiny"}}
    torch.manual_seed(0)
    return ContrastiveModel(ContrastiveConfig(towers=towers, embed_dim=16), tokenizer).eval()


def test_clip_score_resizes_images_and_is_bounded():
    clip = tiny_clip()
    assert clip.image_size == 64
    images = render_scenes([[SceneObject("circle", "red", "large", 1, 1, (24, 24, 40, 40))]] * 3, size=32)
    texts = ["a red circle", "two blue stars", "a small green square in the top left"]
    score = clip_score(clip, images, texts)
    big = torch.nn.functional.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    cos = (clip.embed_image(big) * clip.embed_text(texts)).sum(-1)
    assert score == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert 0.0 <= score <= 100.0


def test_evaluate_generator_end_to_end(tiny_world):
    torch.manual_seed(0)
    judge = GridDetector(DetectorConfig(widths=(8, 16, 16), head_width=16))
    train_rows = world_rows(tiny_world, "train")[:32]
    batch = {"image": render_scenes([[SceneObject.from_dict(d) for d in r["objects"]] for r in train_rows]),
             "rows": train_rows}
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    with torch.enable_grad():  # an evaluation run earlier in this process, turns it off
        for _ in range(3):
            loss = judge.loss(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    judge.eval()

    rows_by_split = {s: world_rows(tiny_world, s) for s in ("test", "test_novel")}
    prompts = [p for s, rows in rows_by_split.items() for p in geneval_prompts(rows, s, per_category=4, seed=5)]
    generate = scene_generator(prompts)  # renders the scene each prompt was built from

    from polymodal.data.dataset import DecodeOptions
    from polymodal.data.memory import MemoryDataset
    from polymodal.modalities.image import ImageTransform

    items = MemoryDataset(tiny_world, ["image"], split="test", options=DecodeOptions(image_transform=ImageTransform(32))).items
    real = {"test": torch.stack([i["image"] for i in items])}
    rows_by_split["test"] = [i["row"] for i in items]  # the same order as the real images
    results = evaluate_generator(generate, judge, rows_by_split, per_category=4, seed=5, clip=tiny_clip(),
                                 real_images_by_split=real, batch_size=7)
    assert set(results) == {"test", "test_novel"}
    for split, metrics in results.items():
        for key in (*CATEGORIES, "overall", "single_object colour+shape+position", "judge shape accuracy on real",
                    "judge count accuracy on real", "judge scene accuracy on real", "frechet distance", "clip score"):
            assert key in metrics and math.isfinite(metrics[key]), (split, key)
        assert all(0.0 <= metrics[c] <= 1.0 for c in CATEGORIES)
        assert metrics["frechet distance"] >= 0
    assert results["test"]["prompts"] == 24

    with pytest.raises(ValueError, match="generate"):
        evaluate_generator(lambda texts, seed: torch.zeros(len(texts), 32, 32), judge,
                           {"test": rows_by_split["test"]}, per_category=2)
