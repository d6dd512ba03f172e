import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.text_to_image import (
    TextToImage,
    TextToImageConfig,
    clip_text_tower,
    split_conjunction,
)

PROMPTS = ["a small red circle in the top left", "a large blue square in the center", "two green stars"]
TINY_UNET = {"type": "unet", "channels": [16, 32], "attention": [False, True], "heads": 2, "groups": 4}
TINY_TEXT = {"type": "text", "width": 24, "depth": 1, "heads": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(PROMPTS * 4, vocab_size=300)


def make(tokenizer, ae: Autoencoder | None = None, text_encoder=None, **kw) -> TextToImage:
    torch.manual_seed(0)
    settings = dict(denoiser=TINY_UNET, text=TINY_TEXT, image_size=16)
    return TextToImage(TextToImageConfig(**{**settings, **kw}), tokenizer, ae, text_encoder)


def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    return {"image": images, "rows": [{"text": p} for p in PROMPTS]}


@pytest.mark.parametrize("denoiser", [TINY_UNET, {"type": "dit", "width": 32, "depth": 2, "heads": 2, "patch": 2}],
                         ids=["unet", "dit"])
def test_it_learns_a_fixed_batch(tokenizer, denoiser):
    m = make(tokenizer, denoiser=denoiser, condition_dropout=0.0)
    b = batch()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 3e-3)
    g = torch.Generator().manual_seed(5)
    first = sum(m.loss(b, generator=torch.Generator().manual_seed(i))["loss"].item() for i in range(4))
    for _ in range(100):
        loss = m.loss(b, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = sum(m.loss(b, generator=torch.Generator().manual_seed(i))["loss"].item() for i in range(4))
    assert last < 0.8 * first


def test_generation_is_seeded_and_guidance_mixes_conditions(tokenizer):
    m = make(tokenizer).eval()
    with torch.no_grad():  # give the untrained denoiser a nonzero output so conditions matter
        for p in m.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a = m.generate(PROMPTS[:2], steps=4, seed=1)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, m.generate(PROMPTS[:2], steps=4, seed=1))
    assert not torch.equal(a, m.generate(PROMPTS[:2], steps=4, seed=2))
    # guidance 0 is the unconditional model: the prompt no longer matters
    u1 = m.generate([PROMPTS[0]], steps=4, seed=3, guidance=0.0)
    u2 = m.generate([PROMPTS[1]], steps=4, seed=3, guidance=0.0)
    assert torch.allclose(u1, u2, atol=1e-6)
    c1 = m.generate([PROMPTS[0]], steps=4, seed=3, guidance=3.0)
    c2 = m.generate([PROMPTS[1]], steps=4, seed=3, guidance=3.0)
    assert not torch.allclose(c1, c2)
    assert m.generate([PROMPTS[0]], steps=3, seed=3, sampler="ddpm").shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no prompts"):
        m.generate([])


def test_prompts_split_into_the_parts_of_a_conjunction():
    assert split_conjunction("a red circle and a blue star") == ["a red circle", "a blue star"]
    assert split_conjunction("a red circle, a blue star and a green cross") == [
        "a red circle", "a blue star", "a green cross"]
    assert split_conjunction("three red stars") == ["three red stars"]
    assert split_conjunction("a small red circle to the left of a large blue star") == [
        "a small red circle to the left of a large blue star"]
    assert split_conjunction("a sandy band") == ["a sandy band"]  # "and" inside a word is no conjunction


def test_composed_guidance_adds_each_parts_direction(tokenizer):
    m = make(tokenizer).eval()
    with torch.no_grad():
        for p in m.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    one, two = PROMPTS[0], PROMPTS[1]
    # a prompt with one part draws as it does without composing
    assert torch.allclose(m.generate([one], steps=4, seed=3, compose=True), m.generate([one], steps=4, seed=3),
                          atol=1e-5)
    # "X and X" at guidance g adds X's direction twice: X alone at guidance 2g
    assert torch.allclose(m.generate([f"{one} and {one}"], steps=4, seed=3, guidance=1.5, compose=True),
                          m.generate([one], steps=4, seed=3, guidance=3.0), atol=1e-5)
    # prompts with different numbers of parts share a batch; each image is its own prompt's
    composed = m.generate([f"{one} and {two}", two], steps=4, seed=3, compose=True)
    plain = m.generate([f"{one} and {two}", two], steps=4, seed=3)
    assert torch.allclose(composed[1], plain[1], atol=1e-5)
    assert not torch.allclose(composed[0], plain[0], atol=1e-3)


def test_dropped_captions_use_the_learned_null_condition(tokenizer):
    m = make(tokenizer)
    states, mask, pooled = m.condition([PROMPTS[0], None, PROMPTS[2]], torch.device("cpu"))
    assert mask[1].sum() == 1 and torch.equal(states[1, 0], m.text.null_token.detach())
    full, _, _ = m.condition([PROMPTS[0]], torch.device("cpu"))
    n = full.shape[1]
    assert torch.allclose(states[0, :n], full[0])


def test_save_and_load_round_trip(tokenizer, tmp_path):
    m = make(tokenizer).eval()
    m.save_pretrained(tmp_path / "t2i")
    config = json.loads((tmp_path / "t2i" / "config.json").read_text())
    assert config["model_type"] == "text_to_image" and (tmp_path / "t2i" / "tokenizer.json").is_file()
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert torch.equal(m.generate(PROMPTS[:1], steps=3), loaded.generate(PROMPTS[:1], steps=3))
    with pytest.raises(InputError, match="not a 'text_to_image' model|no config.json"):
        TextToImage.from_pretrained(tmp_path)


def test_training_images_of_the_wrong_size_are_refused(tokenizer):
    m = make(tokenizer)
    with pytest.raises(ValueError, match="data.image_size"):
        m.loss({"image": torch.zeros(3, 3, 32, 32), "rows": [{"text": p} for p in PROMPTS]})


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoders_learn_to_reconstruct(kind, tmp_path):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(kind=kind, channels=(16, 32), latent_channels=4, codebook_size=32, image_size=16))
    images = batch()["image"]
    opt = torch.optim.AdamW(ae.parameters(), 3e-3)
    first = ae.loss({"image": images})["reconstruction"].item()
    for _ in range(80):
        out = ae.loss({"image": images})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["reconstruction"].item() < 0.7 * first
    ae.eval()
    z = ae.encode(images)
    assert z.shape == (3, 4, 8, 8) and ae.decode(z).shape == images.shape
    if kind == "vq":
        codes = ae.encode_codes(images)
        assert codes.shape == (3, 8, 8) and codes.max() < 32
        assert torch.allclose(ae.decode_codes(codes), ae.decode(z), atol=1e-5)
    else:
        with pytest.raises(ValueError, match="vq"):
            ae.encode_codes(images)
    ae.save_pretrained(tmp_path / "ae")
    assert torch.allclose(Autoencoder.from_pretrained(tmp_path / "ae").encode(images), z)


def test_latent_diffusion_generates_full_size_images(tokenizer, tmp_path):
    ae = Autoencoder(AutoencoderConfig(kind="kl", channels=(16, 32), latent_channels=4, image_size=16))
    ae.save_pretrained(tmp_path / "ae")
    m = make(tokenizer, Autoencoder.from_pretrained(tmp_path / "ae"), autoencoder=str(tmp_path / "ae"), latent_scale=0.5)
    assert m.latent_size == 8 and m.channels == 4
    assert m.loss(batch())["loss"].item() > 0
    drawn = m.eval().generate(PROMPTS[:1], steps=2)
    assert drawn.shape == (1, 3, 16, 16)
    m.save_pretrained(tmp_path / "t2i")  # the autoencoder is saved in its own subfolder
    from safetensors.torch import load_file

    assert not any(k.startswith("autoencoder.") for k in load_file(str(tmp_path / "t2i" / "model.safetensors")))
    assert (tmp_path / "t2i" / "autoencoder" / "model.safetensors").is_file()
    # the saved model stands alone: moved elsewhere, with the folder it was built from deleted
    shutil.rmtree(tmp_path / "ae")
    shutil.move(tmp_path / "t2i", tmp_path / "moved")
    loaded = TextToImage.from_pretrained(tmp_path / "moved")
    assert loaded.latent_size == 8
    assert torch.allclose(loaded.generate(PROMPTS[:1], steps=2), drawn, atol=1e-5)


def test_generate_image_command_writes_a_grid(tokenizer, tmp_path):
    make(tokenizer).save_pretrained(tmp_path / "t2i")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["generate", "image", str(tmp_path / "t2i"), PROMPTS[0], "--n", "3",
                                      "--steps", "2", "--columns", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        assert grid.width > 3 * 16 * 4
    composed = CliRunner().invoke(app, ["generate", "image", str(tmp_path / "t2i"), f"{PROMPTS[0]} and {PROMPTS[1]}",
                                        "--n", "2", "--steps", "2", "--compose", "--out", str(tmp_path / "and.png")])
    assert composed.exit_code == 0, composed.output
    assert (tmp_path / "and.png").is_file()
    bad = CliRunner().invoke(app, ["generate", "image", str(tmp_path), "a star"])
    assert bad.exit_code == 2 and "config.json" in bad.output


def test_a_frozen_text_encoder_is_cached_and_matches_direct_encoding(tokenizer, tmp_path):
    from polymodal.models.clip import ContrastiveConfig, ContrastiveModel

    clip = ContrastiveModel(ContrastiveConfig(towers={"image": {"type": "cnn", "preset": "tiny"},
                                                      "text": {"type": "text", "preset": "tiny"}}), tokenizer)
    clip.save_pretrained(tmp_path / "clip")
    m = make(tokenizer, text_encoder=clip_text_tower(str(tmp_path / "clip")),
             text={"type": "clip", "path": str(tmp_path / "clip")})
    assert m.text.frozen and not any(p.requires_grad for p in m.text.encoder.parameters())
    states, mask, pooled = m.text(PROMPTS, torch.device("cpu"))
    assert {text for _, text in m.text.cache.keys()} == set(PROMPTS)
    direct, direct_mask = m.text.encoder.tokens(*m.text.inputs({"text": PROMPTS}))  # not through the cache
    assert torch.equal(mask, direct_mask)
    assert torch.allclose(states[mask], direct[direct_mask], atol=1e-6)
    again, _, _ = m.text(PROMPTS[::-1], torch.device("cpu"))  # from the cache, in another order
    assert torch.allclose(again[2, : mask[0].sum()], states[0, : mask[0].sum()])
    assert m.loss(batch())["loss"].item() > 0
    # the frozen tower is saved with the model: it draws with the contrastive model's folder gone
    drawn = m.eval().generate(PROMPTS[:2], steps=2)
    m.save_pretrained(tmp_path / "t2i")
    shutil.rmtree(tmp_path / "clip")
    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert torch.allclose(loaded.generate(PROMPTS[:2], steps=2), drawn, atol=1e-5)
    with pytest.raises(ValueError, match="text encoder of a saved contrastive model"):
        make(tokenizer, text={"type": "clip", "path": "anywhere"})


def test_training_latents_are_encoded_once_per_sample(tokenizer, tmp_path):
    ae = Autoencoder(AutoencoderConfig(kind="kl", channels=(16, 32), latent_channels=4, image_size=16))
    m = make(tokenizer, ae, autoencoder="ae", latent_scale=0.5)
    b = batch()
    rows = [{"id": str(i), **row} for i, row in enumerate(b["rows"])]
    calls = []
    encode = m.autoencoder.encode
    m.autoencoder.encode = lambda images: calls.append(len(images)) or encode(images)
    first = m.training_latents(b["image"], rows)
    assert torch.allclose(first, m.to_latent(b["image"]))
    calls.clear()
    again = m.training_latents(b["image"][[2, 0]], [rows[2], rows[0]])  # seen before: not encoded again
    assert calls == [] and torch.equal(again, first[[2, 0]])
    m.training_latents(b["image"][:2], [rows[0], {**rows[1], "id": "new"}])
    assert calls == [1]  # only the new sample
    m.training_latents(b["image"][:2], [{"text": "no id"}, rows[0]])  # rows without ids: encoded as they come
    assert calls == [1, 2]


def test_a_guidance_interval_guides_only_the_steps_inside_it(tokenizer):
    m = make(tokenizer).eval()
    with torch.no_grad():
        for p in m.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = PROMPTS[:2]  # 4 DDIM steps: timesteps 999, 749, 499, 249
    guided = m.generate(prompts, steps=4, seed=3, guidance=3.0)
    assert torch.equal(m.generate(prompts, steps=4, seed=3, guidance=3.0, guidance_interval=(0, 999)), guided)
    unguided = m.generate(prompts, steps=4, seed=3, guidance=1.0)
    none_inside = m.generate(prompts, steps=4, seed=3, guidance=3.0, guidance_interval=(500, 700))
    torch.testing.assert_close(none_inside, unguided, atol=1e-5, rtol=0)
    low = m.generate(prompts, steps=4, seed=3, guidance=3.0, guidance_interval="0,500")
    assert not torch.allclose(low, guided, atol=1e-4) and not torch.allclose(low, unguided, atol=1e-4)
    # the scale outside the interval: 3 outside an interval of no step is 3 everywhere
    outside = m.generate(prompts, steps=4, seed=3, guidance=1.0, guidance_interval=(500, 700), guidance_outside=3.0)
    torch.testing.assert_close(outside, guided, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="guidance interval"):
        m.generate(prompts, steps=4, guidance_interval=(600, 100))
