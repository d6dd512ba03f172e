import numpy as np
import pytest
import torch

from polymodal.data.scene import SceneObject
from polymodal.data.shapes import sample_scene
from polymodal.eval.geneval import render_scenes
from polymodal.models.detector import DetectorConfig, GridDetector, gaussian_blur

TINY = dict(widths=(8, 16, 16), head_width=16)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 160-sample shapes world without speech or video, made once for this module."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("judge_world")
    generate_world(out, WorldConfig(n=160, seed=3, speech=False, video_fraction=0.0), workers=1)
    return out


def scene_batch(n=16, seed=0, size=32):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, "train", 64) for _ in range(n)]
    rows = [{"objects": [o.to_dict() for o in s]} for s in scenes]
    return {"image": render_scenes(scenes, size=size, seed=seed), "rows": rows}


@pytest.mark.parametrize("colour_from", ["pixels", "trunk"])
def test_forward_shapes_features_and_other_input_sizes(colour_from):
    torch.manual_seed(0)
    m = GridDetector(DetectorConfig(**TINY, colour_from=colour_from, colour_width=8)).eval()
    b = scene_batch(4)
    out = m(b["image"])
    assert out["occupied"].shape == (4, 9)
    assert out["shape"].shape == (4, 9, 5) and out["colour"].shape == (4, 9, 6) and out["size"].shape == (4, 9, 2)
    width = 16 + 8 if colour_from == "pixels" else 16  # trunk (and colour) features per cell
    assert m.features(b["image"]).shape == (4, 9 * width)
    big = scene_batch(4, size=64)["image"]  # 64x64 images are resized to the configured 32
    assert m(big)["shape"].shape == (4, 9, 5)
    assert len(m.detect(big)) == 4
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(3, 32, 32))


def test_detect_and_features_always_infer():
    torch.manual_seed(0)
    m = GridDetector(DetectorConfig(**TINY)).train()
    images = scene_batch(6)["image"]
    stats = m.stem[1].running_mean.clone()
    train_mode = (m.detect(images), m.features(images))
    assert m.training and torch.equal(m.stem[1].running_mean, stats)  # mode and statistics kept
    m.eval()
    assert m.detect(images) == train_mode[0] and torch.equal(m.features(images), train_mode[1])


def test_targets_label_occupied_cells_only():
    o = SceneObject("star", "blue", "small", 2, 1)
    t = GridDetector.targets([{"objects": [o.to_dict()]}, {"objects": []}])
    assert t["occupied"][0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert t["occupied"][1].sum() == 0
    assert t["shape"][0, 7] == 3 and t["colour"][0, 7] == 2 and t["size"][0, 7] == 0
    assert (t["shape"][0, :7] == -100).all() and (t["colour"][1] == -100).all()
    with pytest.raises(ValueError, match="no 'objects'"):
        GridDetector.targets([{"id": "x"}])


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    m = GridDetector(DetectorConfig(**TINY))
    b = scene_batch(16)
    m.eval()
    with torch.no_grad():
        before = m.loss(b)["loss"].item()
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    with torch.enable_grad():  # an evaluation run earlier in this process, turns it off
        for _ in range(40):
            out = m.loss(b)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    assert set(out) >= {"loss", "loss_occupied", "loss_shape", "loss_colour", "loss_size", "scene_accuracy"}
    m.eval()
    with torch.no_grad():
        after = m.loss(b)["loss"].item()
    assert after < 0.5 * before


def test_detect_reads_cells_and_estimates_boxes():
    m = GridDetector(DetectorConfig(**TINY)).eval()
    with torch.no_grad():  # every cell occupied by a large red star
        for head in (m.occupied_head, m.shape_head, m.colour_head, m.size_head):
            head.weight.zero_()
            head.bias.zero_()
        m.occupied_head.bias.fill_(5.0)
        m.shape_head.bias[3] = 1.0
        m.size_head.bias[1] = 1.0
    (found,) = m.detect(torch.zeros(1, 3, 64, 64))
    assert [(o.row, o.col) for o in found] == [divmod(c, 3) for c in range(9)]
    assert all(o.shape == "star" and o.colour == "red" and o.size == "large" for o in found)
    for o in found:  # the box lies in its cell, in the input image's pixels
        x0, y0, x1, y1 = o.bbox
        assert o.col * 64 / 3 <= x0 < x1 <= (o.col + 1) * 64 / 3
        assert o.row * 64 / 3 <= y0 < y1 <= (o.row + 1) * 64 / 3
    with torch.no_grad():
        m.occupied_head.bias.fill_(-5.0)
    assert m.detect(torch.zeros(2, 3, 32, 32)) == [[], []]


def test_augmentation_is_mild_and_keeps_the_range():
    torch.manual_seed(0)
    m = GridDetector(DetectorConfig(**TINY))
    images = scene_batch(8)["image"]
    out = m.augment(images)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert 0 < (out - images).abs().mean() < 0.1
    assert torch.allclose(gaussian_blur(images, torch.zeros(8)), images, atol=1e-5)
    blurred = gaussian_blur(images, torch.full((8,), 1.0))
    assert blurred.std() < images.std()


def test_recolouring_keeps_the_background_and_drops_colour_labels():
    torch.manual_seed(0)
    red_star = SceneObject("star", "red", "large", 1, 1, (22, 22, 42, 42))
    images = render_scenes([[red_star]] * 16, size=32)
    out = GridDetector.recolour(images)
    corner = (slice(None), slice(None), slice(0, 8), slice(0, 8))  # empty: background only
    assert (out[corner] - images[corner]).abs().mean() < 0.03
    centre = out[:, :, 16, 16]  # the star's colour, changed in most images
    assert ((centre - images[:, :, 16, 16]).abs().amax(1) > 0.2).float().mean() > 0.5
    m = GridDetector(DetectorConfig(**TINY, recolour_fraction=1.0)).train()
    loss = m.loss({"image": images, "rows": [{"objects": [red_star.to_dict()]}] * 16})
    assert loss["loss_colour"] == 0 and torch.isfinite(loss["loss"])  # every colour label ignored
    with pytest.raises(ValueError, match="colour_from"):
        DetectorConfig(colour_from="hue")


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = GridDetector(DetectorConfig(**TINY))
    b = scene_batch(8)
    m.train()
    with torch.no_grad():
        m.loss(b)  # moves the batch-norm statistics off their start
    m.eval()
    m.save_pretrained(tmp_path / "judge")
    loaded = GridDetector.from_pretrained(tmp_path / "judge")
    assert loaded.config == m.config
    for k, v in m(b["image"]).items():
        assert torch.equal(v, loaded(b["image"])[k])
    assert torch.equal(m.features(b["image"]), loaded.features(b["image"]))
    assert m.detect(b["image"]) == loaded.detect(b["image"])
    from polymodal.errors import InputError
    from polymodal.models.fusion import FusionClassifier

    with pytest.raises(InputError, match="not a 'fusion' model"):
        FusionClassifier.from_pretrained(tmp_path / "judge")


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="same, non-zero length"):
        DetectorConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="image_size"):
        DetectorConfig(image_size=8)


def test_trains_and_evaluates_through_a_recipe(tiny_world, tmp_path):
    from polymodal.models import EvalOptions, evaluate
    from polymodal.train.recipe import Recipe
    from polymodal.train.run import train

    recipe = Recipe(model={"type": "detector", "widths": [8, 16, 16], "head_width": 16},
                    name="judge-test")
    recipe.data.fields = ["image"]
    recipe.data.image_size = 32
    recipe.data.batch_size = 16
    recipe.data.val_limit = 16
    recipe.trainer.max_steps = 3
    recipe.trainer.warmup_steps = 1
    model_dir = train(recipe, tiny_world, tmp_path / "run", progress=False)
    judge = GridDetector.from_pretrained(model_dir)
    assert judge.config.widths == (8, 16, 16)
    results = evaluate(model_dir, tiny_world, ["test"])
    metrics = results["test"]
    for key in ("shape accuracy", "colour accuracy", "size accuracy", "position accuracy", "count accuracy",
                "scene accuracy", "shape accuracy (small)", "shape accuracy (large)"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["samples"] > 0
    logs = (tmp_path / "run" / "logs" / "csv").rglob("metrics.csv")
    assert any("val/scene accuracy" in p.read_text() for p in logs)  # validated with the judge's metrics

    # an autoencoder is scored by its reconstruction error and by what the judge reads on its
    # reconstructions, beside what the judge reads on the originals
    from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig

    torch.manual_seed(0)
    Autoencoder(AutoencoderConfig(channels=(8, 16), image_size=32)).save_pretrained(tmp_path / "ae")
    ae_metrics = evaluate(tmp_path / "ae", tiny_world, ["test"], EvalOptions(judge=model_dir))["test"]
    assert ae_metrics["judge scene accuracy on real"] == metrics["scene accuracy"]
    assert ae_metrics["mse"] > 0 and ae_metrics["psnr"] == pytest.approx(10 * np.log10(4 / ae_metrics["mse"]))
    assert 0.0 <= ae_metrics["judge shape accuracy on reconstructions"] <= 1.0
    with pytest.raises(ValueError, match="objects"):
        from polymodal.eval.reconstruction import autoencoder_metrics

        autoencoder_metrics(Autoencoder.from_pretrained(tmp_path / "ae"), torch.zeros(2, 3, 32, 32), [{}, {}],
                            judge=GridDetector.load_judge(model_dir))
