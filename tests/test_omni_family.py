"""The omni model as a family (polymodal.models.omni): it trains from the shipped recipes with
`polymodal train`, is scored by `polymodal eval` under the captioner's and the text-to-image
family's keys, loads with `load_model` for each of its tasks, captions, answers and draws from
the command line, and is served like any other family. Tiny sizes: a small shapes world at
16x16, untrained tiny autoencoders and judge, a few steps."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.models import EvalOptions, evaluate, load_model, model_type
from polymodal.models.omni import OmniModel

SIZE = 16  # image side of the omni_parts fixture (conftest): a 4x4 grid, 16 image tokens
QUESTION = "what colour is the circle?"


def tiny_overrides(autoencoder) -> list[str]:
    """A shipped recipe shrunk to seconds: the same model family, design and layout."""
    return [f"model.autoencoder={autoencoder}", "model.width=32", "model.depth=1", "model.heads=2",
            "model.context_length=64", f"data.image_size={SIZE}", "data.batch_size=8", "data.val_limit=8",
            "trainer.max_steps=2", "trainer.val_every_minutes=0", "trainer.log_every_steps=1",
            "trainer.vocab_size=300", "trainer.warmup=0.0"]


@pytest.fixture(scope="module")
def parts(omni_parts):
    """A 100-sample shapes world without speech, tiny KL and VQ autoencoders and a tiny judge."""
    return omni_parts


def train(recipe: str, autoencoder, out) -> object:
    result = CliRunner().invoke(app, ["train", recipe, "--data", str(out.parent / "world"), "--out", str(out),
                                      *tiny_overrides(autoencoder)])
    assert result.exit_code == 0, result.output
    return out / "model"


@pytest.fixture(scope="module")
def transfusion(parts):
    """A Transfusion model trained for two steps from the shipped recipe."""
    return train("omni-transfusion-shapes", parts / "ae-kl", parts / "transfusion")


def a_world_image(parts) -> str:
    rows = [json.loads(line) for line in (parts / "world" / "metadata.jsonl").read_text().splitlines()]
    return str(parts / "world" / rows[0]["file_name"])


# ---- training ----------------------------------------------------------------------------------


def test_transfusion_trains_from_its_recipe_and_loads_for_every_task(transfusion):
    assert model_type(transfusion) == "omni"
    for task in ("caption", "answer", "generate image"):
        model = load_model(transfusion, task=task)
        assert isinstance(model, OmniModel) and not model.training
    assert (model.config.image, model.config.layout, model.config.latent_grid) == ("latent", "dense", 4)
    assert model.config.latent_scale is not None  # measured on the training images by the builder
    logs = "".join(p.read_text() for p in (transfusion.parent / "logs" / "csv").rglob("metrics.csv"))
    for metric in ("val/text loss", "val/diffusion loss", "val/scene-graph objects right", "val/vqa accuracy"):
        assert metric in logs  # the family's own cheap validation ran


@pytest.mark.parametrize("recipe, kind, image, layout", [("omni-chameleon-shapes", "vq", "vq", "dense"),
                                                         ("omni-mot-shapes", "kl", "latent", "mot")])
def test_chameleon_and_mot_train_from_their_recipes(parts, recipe, kind, image, layout):
    model = load_model(train(recipe, parts / f"ae-{kind}", parts / recipe))
    assert (model.config.image, model.config.layout) == (image, layout)
    assert model.config.image_tokens == (4 if image == "latent" else 16)  # mot: a token a 2x2 block of cells
    drawn = model.generate(["a red circle"], steps=2, seed=1)
    assert drawn.shape == (1, 3, SIZE, SIZE) and drawn.abs().max() <= 1.0
    assert torch.equal(drawn, model.generate(["a red circle"], steps=2, seed=1))  # seeded
    from polymodal.train.recipe import load_recipe

    assert model.config.drawing == load_recipe(recipe).model.get("drawing", {})  # kept as the recipe gives it


def test_an_autoencoder_of_another_size_than_the_data_is_named(parts, tmp_path):
    result = CliRunner().invoke(app, ["train", "omni-transfusion-shapes", "--data", str(parts / "world"),
                                      "--out", str(tmp_path / "run"), *tiny_overrides(parts / "ae-kl"),
                                      "data.image_size=32"])
    assert result.exit_code == 2 and "data.image_size" in result.output


def test_training_images_are_encoded_once_per_file(transfusion, monkeypatch):
    import polymodal.models.omni.model as omni

    model = load_model(transfusion)
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    rows = [{"file_name": f"images/{i}.png"} for i in range(3)]
    calls = []
    encode = model.autoencoder.encode
    monkeypatch.setattr(model.autoencoder, "encode", lambda x: calls.append(len(x)) or encode(x))
    first = model.training_tokens(images, rows)
    assert calls == [3] and torch.allclose(first, model.image_tokens(images))
    calls.clear()
    again = model.training_tokens(images[[2, 0]], [rows[2], rows[0]])
    assert calls == [] and torch.equal(again, first[[2, 0]])  # from the cache
    model.training_tokens(images[:2], [{"file_name": "images/new.png"}, rows[0]])
    assert calls == [1]  # only the new file
    model.training_tokens(images[:2], [{"text": "no file"}, rows[0]])
    assert calls == [1, 2]  # rows that name no file: encoded as they come
    monkeypatch.setattr(omni, "TOKEN_CACHE_LIMIT", len(model._token_cache))  # full: no more are kept
    model.training_tokens(images[:1], [{"file_name": "images/more.png"}])
    assert "images/more.png" not in model._token_cache


# ---- evaluation --------------------------------------------------------------------------------


def test_eval_scores_under_the_captioners_and_text_to_images_keys(parts, transfusion, tmp_path):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig
    from polymodal.models.text_to_image import TextToImage, TextToImageConfig

    result = CliRunner().invoke(app, ["eval", str(transfusion), "--data", str(parts / "world"), "--judge",
                                      str(parts / "judge"), "--per-category", "2", "--steps", "2",
                                      "--json", str(tmp_path / "omni.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "omni.json").read_text())
    assert set(scores) == {"val", "test", "test_novel"}

    # a captioner and a text-to-image model scored on the same splits give the same keys
    tokenizer = TextTokenizer.train([QUESTION, "a red circle", "red"] * 4, vocab_size=300)
    Captioner(CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny", "image_size": SIZE}},
                              tasks={"caption": 0.5, "vqa": 0.5}, width=32, depth=1, heads=2), tokenizer
              ).save_pretrained(tmp_path / "captioner")
    TextToImage(TextToImageConfig(
        denoiser={"type": "unet", "channels": [16, 32], "attention": [False, True], "heads": 2, "groups": 4},
        text={"type": "text", "width": 24, "depth": 1, "heads": 2}, image_size=SIZE), tokenizer
    ).save_pretrained(tmp_path / "t2i")
    splits = ["test", "test_novel"]
    options = EvalOptions(judge=parts / "judge", per_category=2, sample_steps=2)
    captioner = evaluate(tmp_path / "captioner", parts / "world", splits, options)
    drawing = evaluate(tmp_path / "t2i", parts / "world", splits, options)
    for split in splits:
        assert set(scores[split]) == set(captioner[split]) | set(drawing[split]), split
        for key in ("scene-graph objects right", "vqa accuracy", "CIDEr", "single_object colour+shape+position",
                    "overall", "judge scene accuracy on real"):
            assert 0.0 <= scores[split][key] <= 1.0 or key == "CIDEr", (split, key)

    unjudged = evaluate(transfusion, parts / "world", ["test"], EvalOptions())  # no judge: no drawing scored
    assert set(unjudged["test"]) == set(captioner["test"])

    # best of N: omni drawings are chosen by the model's own reading; a model that only draws cannot choose
    best = evaluate(transfusion, parts / "world", ["test"], EvalOptions(judge=parts / "judge", per_category=2,
                                                                        sample_steps=2, best_of=2, limit=2))
    assert 0.0 <= best["test"]["overall"] <= 1.0
    with pytest.raises(ValueError, match="TextToImage draws but does not read"):
        evaluate(tmp_path / "t2i", parts / "world", splits, EvalOptions(judge=parts / "judge", best_of=2))
    refused = CliRunner().invoke(app, ["generate", "image", str(tmp_path / "t2i"), "a red circle", "--best-of", "2"])
    assert refused.exit_code == 2 and "cannot choose among its drawings" in refused.output


def test_eval_decodes_captions_with_the_beams_asked_for(parts, transfusion, monkeypatch):
    from polymodal.models.omni import OmniModel

    asked = []
    write = OmniModel.write

    def spy(self, batch, prompts=None, **decoding):
        asked.append((decoding.get("method"), decoding.get("beams")))
        return write(self, batch, prompts, **decoding)

    monkeypatch.setattr(OmniModel, "write", spy)
    scores = evaluate(transfusion, parts / "world", ["test"], EvalOptions(decoding="beam", beams=2, limit=4))
    assert ("beam", 2) in asked and 0.0 <= scores["test"]["scene-graph objects right"] <= 1.0
    refused = CliRunner().invoke(app, ["eval", str(transfusion), "--data", str(parts / "world"), "--decoding", "beam",
                                       "--beams", "0"])
    assert refused.exit_code == 2 and "--beams must be at least 1" in refused.output
    refused = CliRunner().invoke(app, ["eval", str(transfusion), "--data", str(parts / "world"), "--best-of", "0"])
    assert refused.exit_code == 2 and "best-of is the number of drawings" in refused.output


# ---- generation from Python and the command line -------------------------------------------------


def test_each_tasks_entry_point_from_python(transfusion, parts):
    from polymodal.modalities.image import ImageTransform, load_image

    model = load_model(transfusion, task="caption")
    image = ImageTransform(SIZE)(load_image(a_world_image(parts)))
    batch = {"image": torch.stack([image, image])}
    captions = model.generate(batch)
    answers = model.generate(batch, [QUESTION, None], max_new_tokens=4)
    assert len(captions) == len(answers) == 2 and all(isinstance(c, str) for c in captions + answers)
    ids = model.prompt_ids([QUESTION])
    asked = len(model.tokenizer.encode(QUESTION, add_special_tokens=False))
    assert ids.shape == (1, 1 + 16 + 2 + asked + 1)  # <bos> <boi> image <eoi> question <eos>
    drawn = model.generate(["a red circle", "two blue stars"], steps=2)
    assert drawn.shape == (2, 3, SIZE, SIZE)
    beams = model.generate(batch, method="beam", beams=3, max_new_tokens=6)
    assert len(beams) == 2 and all(isinstance(c, str) for c in beams)
    with pytest.raises(ValueError, match="greedy, beam, nucleus"):
        model.generate(batch, method="sampling")
    with pytest.raises(ValueError, match="compose"):
        model.generate(["a red circle and a blue star"], steps=2, compose=True)


def test_generate_commands_caption_answer_and_draw(transfusion, parts, tmp_path):
    runner = CliRunner()
    image = a_world_image(parts)
    for extra in ([], ["--question", QUESTION]):
        result = runner.invoke(app, ["generate", "text", str(transfusion), "--image", image, "--max-tokens", "6",
                                     *extra])
        assert result.exit_code == 0, result.output
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["generate", "image", str(transfusion), "a small red circle", "--n", "2",
                                 "--steps", "2", "--columns", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        assert grid.width >= 2 * SIZE * 4
    beam = runner.invoke(app, ["generate", "text", str(transfusion), "--image", image, "--decoding", "beam",
                               "--beams", "2", "--max-tokens", "6"])
    assert beam.exit_code == 0, beam.output
    none = runner.invoke(app, ["generate", "text", str(transfusion), "--image", image, "--decoding", "beam",
                               "--beams", "0"])
    assert none.exit_code == 2 and "--beams must be at least 1" in none.output
    best = runner.invoke(app, ["generate", "image", str(transfusion), "a small red circle", "--n", "2", "--steps", "2",
                               "--best-of", "3", "--out", str(tmp_path / "best.png")])
    assert best.exit_code == 0 and (tmp_path / "best.png").exists(), best.output
    for bad in ("0", "-2"):
        refused = runner.invoke(app, ["generate", "image", str(transfusion), "a red circle", "--best-of", bad])
        assert refused.exit_code == 2 and "best-of" in refused.output and "Traceback" not in refused.output



def test_generate_interleaved_draws_in_place_and_says_what_it_drew(transfusion, tmp_path, monkeypatch):
    from polymodal.models.omni.generation import OmniGeneration

    decode, contexts = OmniGeneration._decode_text, []

    def opens_an_image_first(self, prefixes, allow_images, *args):  # the tiny model's first word: <boi>
        contexts.append(list(prefixes[0]))
        if len(contexts) == 1:
            return [[self.tokenizer.boi_id]]
        return decode(self, prefixes, allow_images, *args)

    monkeypatch.setattr(OmniGeneration, "_decode_text", opens_an_image_first)
    out = tmp_path / "seq"
    result = CliRunner().invoke(app, ["generate", "interleaved", str(transfusion), "a small red circle", "--describe",
                                      "--steps", "2", "--max-tokens", "5", "--scale", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[image 1:" in result.output
    with Image.open(out / "image-1.png") as picture:
        assert picture.size == (2 * SIZE, 2 * SIZE)
    sequence = json.loads((out / "sequence.json").read_text())["sequence"]
    assert sequence[:2] == [{"image": "image-1.png"}, {"asked": "describe the image"}] and "text" in sequence[2]
    assert "[asked: describe the image]" in result.output
    model = load_model(transfusion)
    eos = model.tokenizer.eos_id
    # after the drawn image, <eos> asks for its caption (as image-first rows read), then the model writes
    assert isinstance(contexts[1][-2], torch.Tensor) and contexts[1][-1] == [eos]
    monkeypatch.undo()  # --draw: the first image right after the prompt, whatever the model would write
    drawn = CliRunner().invoke(app, ["generate", "interleaved", str(transfusion), "a small red circle", "--draw",
                                     "--ask", QUESTION, "--steps", "2", "--max-tokens", "3", "--cfg-interval", "0,500",
                                     "--out", str(tmp_path / "d")])
    assert drawn.exit_code == 0, drawn.output
    sequence = json.loads((tmp_path / "d" / "sequence.json").read_text())["sequence"]
    assert sequence[:2] == [{"image": "image-1.png"}, {"asked": QUESTION}]
    assert sum("image" in part for part in sequence) == 1  # --max-images 1: the forced one
    both = CliRunner().invoke(app, ["generate", "interleaved", str(transfusion), "a red circle", "--describe",
                                    "--ask", "what?"])
    assert both.exit_code == 2 and "not both" in both.output
    empty = CliRunner().invoke(app, ["generate", "interleaved", str(transfusion), " "])
    assert empty.exit_code == 2 and "empty" in empty.output
    late = CliRunner().invoke(app, ["generate", "interleaved", str(transfusion), "a red circle", "--cfg-interval", "0,1000"])
    assert late.exit_code == 2 and "guidance interval" in late.output

# ---- serving -----------------------------------------------------------------------------------


def test_the_server_lists_and_calls_an_omni_model_by_its_tasks(transfusion, parts, tmp_path, monkeypatch):
    from test_serve import circle, fake_speech, png_data_url

    from polymodal.serve import Settings, create_app

    monkeypatch.setitem(sys.modules, "polymodal.speech", fake_speech())
    served = tmp_path / "models"
    shutil.copytree(transfusion, served / "omni" / "model")
    with TestClient(create_app(served, Settings(store=tmp_path / "store.sqlite", image_steps=2))) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        omni = listed["omni"]
        assert omni["family"] == "omni" and omni["tasks"] == ["caption", "answer", "generate image"]
        assert omni["input_modalities"] == ["text", "image"] and omni["output_modalities"] == ["text", "image"]
        assert omni["capabilities"] == ["chat.completions", "images.generations"]
        assert omni["image_size"] == f"{SIZE}x{SIZE}"

        asked = client.post("/v1/chat/completions", json={"model": "assistant", "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}]}]})
        assert asked.status_code == 200, asked.text
        assert asked.json()["polymodal"]["models"] == ["omni"]
        named = client.post("/v1/chat/completions", json={"model": "omni", "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}]}]})
        assert named.status_code == 200, named.text  # named and sent an image: it answers, it does not draw
        assert not named.json()["choices"][0]["message"].get("images")
        drawn = client.post("/v1/chat/completions", json={"model": "assistant", "modalities": ["image", "text"],
                                                          "messages": [{"role": "user", "content": "draw a red circle"}]})
        assert drawn.status_code == 200, drawn.text
        assert drawn.json()["polymodal"]["models"] == ["omni"]
        images = client.post("/v1/images/generations", json={"model": "omni", "prompt": "a red circle", "n": 1,
                                                             "response_format": "b64_json"})
        assert images.status_code == 200, images.text
        picture = Image.open(io.BytesIO(base64.b64decode(images.json()["data"][0]["b64_json"])))
        assert picture.size == (SIZE, SIZE)


def test_an_omni_model_draws_with_its_own_settings_on_the_command_line_and_the_server(transfusion, parts, tmp_path,
                                                                                       monkeypatch):
    from test_serve import fake_speech

    from polymodal.serve import Limits, Settings, create_app

    own = tmp_path / "models" / "omni" / "model"
    shutil.copytree(transfusion, own)
    config = json.loads((own / "config.json").read_text())
    config["drawing"] = {"guidance": 2.5, "guidance_interval": [0, 500], "guidance_outside": 1.5, "steps": 2,
                         "best_of": 2}
    (own / "config.json").write_text(json.dumps(config))
    draw, calls = OmniModel.draw, []

    def recorded(self, prompts, **options):
        calls.append(options)
        return draw(self, prompts, **options)

    monkeypatch.setattr(OmniModel, "draw", recorded)
    settings = ("guidance", "guidance_interval", "guidance_outside", "steps", "best_of")
    mine = {"guidance": 2.5, "guidance_interval": (0, 500), "guidance_outside": 1.5, "steps": 2, "best_of": 2}
    result = CliRunner().invoke(app, ["generate", "image", str(own), "a red circle", "--n", "1",
                                      "--out", str(tmp_path / "own.png")])
    assert result.exit_code == 0, result.output
    assert {k: calls[-1][k] for k in settings} == mine
    assert "at t 0-500, 1.5 elsewhere, best of 2, 2 steps" in " ".join(result.output.split())  # said, as drawn
    told = CliRunner().invoke(app, ["generate", "image", str(own), "a red circle", "--n", "1", "--best-of", "1",
                                    "--cfg", "3", "--out", str(tmp_path / "told.png")])
    assert told.exit_code == 0, told.output
    assert "best_of" not in calls[-1] and calls[-1]["guidance"] == 3.0 and calls[-1]["guidance_interval"] == (0, 500)

    monkeypatch.setitem(sys.modules, "polymodal.speech", fake_speech())
    limits = Limits(max_best_of=4, max_diffusion_steps=10)
    with TestClient(create_app(own.parent.parent, Settings(store=tmp_path / "store.sqlite", limits=limits))) as client:
        def image(**body):
            return client.post("/v1/images/generations", json={"model": "omni", "prompt": "a red circle", **body})

        assert image().status_code == 200
        assert {k: calls[-1][k] for k in settings} == mine  # the model's own, as on the command line
        assert image(best_of=3, guidance=4.0).status_code == 200
        assert calls[-1]["best_of"] == 3 and calls[-1]["guidance"] == 4.0 and calls[-1]["steps"] == 2
        for body, param in (({"best_of": 5}, "best_of"), ({"steps": 11}, "steps")):
            over = image(**body)
            assert over.status_code == 400 and over.json()["error"]["param"] == param, over.text
        drawn = client.post("/v1/chat/completions", json={"model": "assistant", "modalities": ["image", "text"],
                                                          "messages": [{"role": "user", "content": "draw a red circle"}]})
        assert drawn.status_code == 200, drawn.text
        assert {k: calls[-1][k] for k in settings} == mine  # the assistant draws as the model would
    config["drawing"]["steps"] = 20  # more than the server allows: said so, naming whose setting it is
    (own / "config.json").write_text(json.dumps(config))
    with TestClient(create_app(own.parent.parent, Settings(store=tmp_path / "store2.sqlite", limits=limits))) as client:
        over = client.post("/v1/images/generations", json={"model": "omni", "prompt": "a red circle"})
        assert over.status_code == 400 and "the model's own drawing setting" in over.json()["error"]["message"]
        assert client.post("/v1/images/generations", json={"model": "omni", "prompt": "a red circle",
                                                           "steps": 3}).status_code == 200
