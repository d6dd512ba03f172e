"""The native multimodal model (polymodal.models.omni): Chameleon (vq) and Transfusion (latent), dense
and Mixture-of-Transformers, at tiny sizes (seconds each)."""

import random
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.family import _Bad, check_settings
from polymodal.models.omni import OmniConfig, OmniExample, OmniModel, Routing, examples_from_rows
from polymodal.models.omni.generation import CHOICE_FLOOR

TEXTS = ["a red circle in the top left", "a blue square in the center", "two green stars",
         "what colour is the circle?", "red", "blue", "what shape is it?", "square"] * 3
GRID, CHANNELS, CODES = 4, 4, 16  # 16 tokens an image
KINDS = [(image, layout) for image in ("vq", "latent") for layout in ("dense", "mot")]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(TEXTS, vocab_size=300)


def make(tokenizer, image="latent", layout="dense", seed=0, **kw) -> OmniModel:
    torch.manual_seed(seed)
    config = OmniConfig(image=image, layout=layout, width=32, depth=2, heads=2, latent_grid=GRID,
                        codebook_size=CODES, latent_channels=CHANNELS, context_length=48, **kw)
    return OmniModel(config, tokenizer)


def an_image(image: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if image == "vq":
        return torch.randint(0, CODES, (GRID, GRID), generator=g)
    return torch.randn(CHANNELS, GRID, GRID, generator=g)


def words(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def caption_first(tokenizer, image, text="a red circle"):
    return OmniExample([[tokenizer.bos_id, *words(tokenizer, text)], image, [tokenizer.eos_id]])


# ---- the sequence and its mask --------------------------------------------------------------


def test_the_mask_is_causal_across_bidirectional_inside_an_image_and_padding_is_safe(tokenizer):
    m = make(tokenizer, "latent")
    long = OmniExample([[tokenizer.bos_id, *words(tokenizer, "a red")], an_image("latent"),
                        [tokenizer.eos_id, *words(tokenizer, "red")]])
    short = OmniExample([[tokenizer.bos_id, *words(tokenizer, "red")]])
    seq = m.pack([long, short])
    t = seq.ids.shape[1]
    boi = int((seq.ids[0] == tokenizer.boi_id).nonzero())
    first, last = boi + 1, boi + GRID * GRID  # the image's tokens
    assert seq.modality[0, first : last + 1].eq(1).all() and seq.modality[0, boi] == 0 == seq.modality[0, last + 1]
    assert seq.segment[0, first : last + 1].eq(1).all() and seq.ids[0, last + 1] == tokenizer.eoi_id
    mask = m.attention_mask(seq.segment, seq.key_mask, t)[:, 0]  # (B, T, T)
    row = mask[0]
    assert not row[boi, first] and not row[1, boi]  # text is causal: nothing sees what comes later
    assert row[first, last] and row[last, first]  # inside the image both ways
    assert not row[last, last + 1] and not row[first, t - 1]  # not the text after it
    assert row[last + 1, first : last + 1].all() and row[t - 1, : t].all()  # later text sees all of it
    # padding (on the right): real tokens never see it, a padded query sees itself; no NaN anywhere
    n = int(seq.key_mask[1].sum())
    assert not mask[1, :n, n:].any() and mask[1, n:, n:].diagonal().all()
    assert torch.isfinite(m(seq)).all()
    # vq: codes are generated in order, so causal everywhere
    vq = make(tokenizer, "vq")
    vq_seq = vq.pack([OmniExample([[tokenizer.bos_id], an_image("vq"), [tokenizer.eos_id]])])
    assert torch.equal(vq.attention_mask(vq_seq.segment, vq_seq.key_mask, vq_seq.ids.shape[1])[0, 0],
                       torch.ones(vq_seq.ids.shape[1], vq_seq.ids.shape[1]).tril().bool())


@pytest.mark.parametrize("image", ["vq", "latent"])
def test_a_later_image_token_leaves_earlier_text_unchanged(tokenizer, image):
    m = make(tokenizer, image, "mot").eval()
    a, b = an_image(image, 0), an_image(image, 0).clone()
    if image == "vq":
        b[-1, -1] = (b[-1, -1] + 1) % CODES
    else:
        b[:, -1, -1] += 1.0
    ha, hb = (m(m.pack([caption_first(tokenizer, x)])) for x in (a, b))
    boi = int((m.pack([caption_first(tokenizer, a)]).ids[0] == tokenizer.boi_id).nonzero())
    assert torch.equal(ha[0, : boi + 1], hb[0, : boi + 1])  # the text before (and <boi>)
    first = boi + 1
    if image == "latent":  # bidirectional inside: the first cell sees the last
        assert not torch.allclose(ha[0, first], hb[0, first])
    else:  # causal: the first code does not
        assert torch.equal(ha[0, first], hb[0, first])


def test_no_text_loss_at_boi_or_on_latent_image_tokens(tokenizer):
    for image in ("latent", "vq"):
        m = make(tokenizer, image)
        seq = m.pack([caption_first(tokenizer, an_image(image))])
        labels = m.targets(seq)[0]
        boi = int((seq.ids[0] == tokenizer.boi_id).nonzero())
        eoi = boi + GRID * GRID + 1
        assert labels[boi - 1] == tokenizer.boi_id  # the model learns when to open an image
        assert labels[eoi] == tokenizer.eos_id and labels[-1] == -100
        if image == "latent":  # the image is the diffusion loss's: no next-token loss at <boi> or inside
            assert labels[boi : eoi].eq(-100).all()
        else:  # Chameleon: next-token loss everywhere, codes included
            assert labels[boi : eoi - 1].ge(m.text_vocab).all() and labels[eoi - 1] == tokenizer.eoi_id


# ---- Mixture-of-Transformers ----------------------------------------------------------------


def block_params(model):
    return sum(p.numel() for p in model.blocks.parameters())


def test_mot_has_a_parameter_set_per_modality_at_the_flops_of_dense(tokenizer):
    for image in ("vq", "latent"):
        dense, mot = make(tokenizer, image, "dense"), make(tokenizer, image, "mot")
        assert block_params(mot) == 2 * block_params(dense)  # norms, attention projections, MLPs: twice
        names = {n for n, _ in mot.named_parameters()}
        assert {"blocks.0.experts.0.mlp.fc1.weight", "blocks.0.experts.1.attn.q.weight"} <= names
        seq = dense.pack([caption_first(tokenizer, an_image(image)),
                          OmniExample([[tokenizer.bos_id], an_image(image, 1), [tokenizer.eos_id]])])
        flops = []
        for model in (dense, mot):
            with FlopCounterMode(display=False) as counter:
                model(seq)
            flops.append(counter.get_total_flops())
        assert flops[0] == flops[1] > 0

    # each position goes through its own modality's parameters: change the image MLP of the
    # last block and only image positions change there
    m = make(tokenizer, "latent", "mot").eval()
    seq = m.pack([caption_first(tokenizer, an_image("latent"))])
    before = m(seq)
    with torch.no_grad():
        m.blocks[-1].experts[1].mlp.fc2.bias += 1.0
    after = m(seq)
    image = seq.modality[0] == 1
    assert torch.equal(before[0, ~image], after[0, ~image]) and not torch.allclose(before[0, image], after[0, image])


def test_routing_groups_rows_by_modality_and_puts_them_back_gradients_included():
    modality = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    routing = Routing(modality, 2)
    x = torch.randn(2, 5, 3, requires_grad=True)
    rows = routing.sort(x)
    assert torch.equal(rows[:5], x.detach()[modality == 0]) and torch.equal(rows[5:], x.detach()[modality == 1])
    assert torch.equal(routing.unsort(rows), x)
    weight = torch.randn(10, 3)
    (routing.unsort(rows * weight) ** 2).sum().backward()
    expected = 2 * x.detach() * routing.unsort(weight) ** 2  # the same loss without any moving
    assert torch.allclose(x.grad, expected)
    # dense: one parameter set, nothing moved
    dense = Routing(modality, 1)
    assert dense.sort(x).data_ptr() == x.data_ptr() and dense.unsort(dense.sort(x)).shape == x.shape


@pytest.mark.parametrize("experts", [1, 2])
def test_routing_leaves_skipped_rows_out_of_every_parameter_set(experts):
    modality = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 0, 0]])
    padding = torch.tensor([[False, False, False, False, True], [False, False, False, True, True]])
    routing = Routing(modality, experts, skip=padding)
    x = torch.randn(2, 5, 3)
    seen = []

    def fn(expert, part, m):
        seen.append((m, len(part)))
        return part * 2 + m

    out = routing.unsort(routing.each(torch.nn.ModuleList([torch.nn.Identity()] * experts), fn, routing.sort(x)))
    assert sum(n for _, n in seen) == int((~padding).sum())  # padding went through nothing
    assert torch.equal(out[padding], torch.zeros(3, 3))
    real = ~padding
    m = modality if experts == 2 else torch.zeros_like(modality)
    torch.testing.assert_close(out[real], x[real] * 2 + m[real, None])


# ---- losses and training --------------------------------------------------------------------


@pytest.mark.parametrize("image,layout", KINDS)
def test_losses_are_finite_and_reach_every_parameter_set(tokenizer, image, layout):
    m = make(tokenizer, image, layout)
    rows = [{"text": TEXTS[i], "qa": [{"question": "what colour is the circle?", "answer": "red"}]} for i in range(4)]
    examples = examples_from_rows(rows, [an_image(image, i) for i in range(4)], tokenizer, m.config, random.Random(0))
    out = m.loss(examples, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["text_loss"] > 0
    assert ("image_loss" if image == "vq" else "diffusion_loss") in out
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a text-only batch works too (in mot the image parameters then sit idle)
    text_only = m.loss([OmniExample([[tokenizer.bos_id, *words(tokenizer, "two green stars"), tokenizer.eos_id]])])
    assert torch.isfinite(text_only["loss"])


@pytest.mark.parametrize("image", ["vq", "latent"])
def test_a_tiny_model_overfits_one_example(tokenizer, image):
    m = make(tokenizer, image, "mot")
    example = [caption_first(tokenizer, an_image(image), "a blue square in the center")]

    def measured() -> float:  # the same noise and timesteps every time
        with torch.no_grad():
            return m.loss(example, generator=torch.Generator().manual_seed(0))["loss"].item()

    first = measured()
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    for _ in range(30):
        opt.zero_grad()
        m.loss(example)["loss"].backward()
        opt.step()
    assert measured() < 0.8 * first


@pytest.mark.parametrize("layout", ["dense", "mot"])
def test_conv_patch_layers_see_neighbouring_cells_train_and_sample(tokenizer, layout):
    m = make(tokenizer, "latent", layout, patch="conv")
    image = an_image("latent")
    cells = image.flatten(1).T  # (cells, C), row-major
    where = torch.arange(GRID * GRID)
    changed = cells.clone()
    changed[0] += 1.0  # the top-left cell
    a, b = m.patch_in(cells, where), m.patch_in(changed, where)
    assert not torch.allclose(a[1], b[1])  # its right-hand neighbour's token sees it
    torch.testing.assert_close(a[GRID * GRID - 1], b[GRID * GRID - 1])  # the far corner's does not
    with pytest.raises(ValueError, match="whole images"):
        m.patch_in(cells[1:], where[1:])
    rows = [{"text": TEXTS[i], "qa": [{"question": "what colour is the circle?", "answer": "red"}]} for i in range(4)]
    examples = examples_from_rows(rows, [an_image("latent", i) for i in range(4)], tokenizer, m.config, random.Random(0))
    out = m.loss(examples, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m.eval()
    with torch.no_grad():  # the head starts at zero: give it something to say
        m.latent_out[-1].weight.normal_(0, 0.1)
    prefixes = [m.image_prompt(image), m.image_prompt(an_image("latent", 1), "what colour is the circle?")]
    assert m.generate_text(prefixes, max_new_tokens=5) == m.generate_text(prefixes, max_new_tokens=5, use_cache=False)
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    images = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    assert images[0].shape == (2, CHANNELS, GRID, GRID) and images[0].abs().sum() > 0
    torch.testing.assert_close(images[0], images[1])


def test_patch_size_2_makes_a_token_of_each_2x2_block_of_cells(tokenizer):
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig(kind="kl", channels=(8, 8, 8), latent_channels=CHANNELS, image_size=16))
    config = OmniConfig(image="latent", layout="mot", width=32, depth=2, heads=2, latent_grid=GRID, patch_size=2,
                        latent_channels=CHANNELS, context_length=48, autoencoder="somewhere/kl", image_size=16)
    m = OmniModel(config, tokenizer, autoencoder)
    assert (config.image_tokens, config.token_grid, config.token_channels) == (4, 2, 4 * CHANNELS)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = autoencoder.encode(images) * m.latent_scale  # (2, C, 4, 4)
    tokens = m.image_tokens(images)
    assert tokens.shape == (2, 4 * CHANNELS, 2, 2)
    # the top-right token holds the 2x2 block of cells at rows 0-1, columns 2-3, every channel
    torch.testing.assert_close(tokens[0, :, 0, 1].view(CHANNELS, 2, 2), latents[0, :, 0:2, 2:4])
    torch.testing.assert_close(m.decode_images(tokens), autoencoder.decode(latents).clamp(-1, 1))
    seq = m.pack([m.image_prompt(tokens[0]), caption_first(tokenizer, tokens[1])])
    assert int(seq.modality.eq(1).sum()) == 2 * 4  # four tokens an image
    batch = {"image": images, "rows": [{"text": "a red circle", "qa": []}, {"text": "two green stars", "qa": []}]}
    m.loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert m.latent_in.weight.grad.shape == (32, 4 * CHANNELS) and torch.isfinite(m.latent_in.weight.grad).all()
    m.eval()
    with torch.no_grad():
        m.latent_out.weight.normal_(0, 0.1)
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    drawn = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    assert drawn[0].shape == (2, 4 * CHANNELS, 2, 2)
    torch.testing.assert_close(drawn[0], drawn[1])
    assert m.decode_images(drawn[0]).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="a latent image is a \\(16, 2, 2\\)"):
        m.pack([m.image_prompt(latents[0])])  # unpatched latents are named, not misread
    with pytest.raises(ValueError, match="divide latent_grid"):
        replace(config, patch_size=3)
    with pytest.raises(ValueError, match="needs image: latent"):
        OmniConfig(image="vq", latent_grid=GRID, patch_size=2)


# ---- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("image,layout", KINDS)
def test_cached_generation_equals_uncached(tokenizer, image, layout):
    m = make(tokenizer, image, layout).eval()
    prefixes = [m.text_prompt("a red circle in the"), m.image_prompt(an_image(image)),
                m.image_prompt(an_image(image, 1), "what colour is the circle?")]  # left-padded to one length
    cached = m.generate_text(prefixes, max_new_tokens=6)
    assert cached == m.generate_text(prefixes, max_new_tokens=6, use_cache=False)
    assert all(0 <= i < m.text_vocab for row in cached for i in row)
    nucleus = [m.generate_text(prefixes, method="nucleus", max_new_tokens=6, use_cache=use,
                               generator=torch.Generator().manual_seed(3)) for use in (True, False)]
    assert nucleus[0] == nucleus[1]
    beams = [m.generate_text(prefixes, method="beam", beams=3, max_new_tokens=6, use_cache=use) for use in (True, False)]
    assert beams[0] == beams[1] and len(beams[0]) == 3 and all(0 <= i < m.text_vocab for row in beams[0] for i in row)
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    images = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    if image == "vq":
        assert images[0].shape == (2, GRID, GRID) and images[0].dtype == torch.long
        assert torch.equal(images[0], images[1]) and 0 <= images[0].min() and images[0].max() < CODES
    else:
        assert images[0].shape == (2, CHANNELS, GRID, GRID) and torch.isfinite(images[0]).all()
        torch.testing.assert_close(images[0], images[1])


@pytest.mark.parametrize("layout", ["dense", "mot"])
def test_adaln_scales_image_tokens_by_their_timestep_and_leaves_text_alone(tokenizer, layout):
    plain = make(tokenizer, "latent", layout).eval()
    m = make(tokenizer, "latent", layout, time_conditioning="adaln").eval()
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("modulation" in name for name in missing)
    example = caption_first(tokenizer, an_image("latent"), "a red circle in the top left")
    seq = m.pack([example])
    image = seq.modality[0] == 1
    first = int(image.nonzero()[0])
    with torch.no_grad():
        torch.testing.assert_close(m(seq), plain(seq))  # the modulation starts at zero: the plain model
        for name, p in m.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.3)
        early, late = (m(seq.with_images(seq.clean, torch.tensor([t]))) for t in (50, 900))
        plain_late = plain(seq.with_images(seq.clean, torch.tensor([900])))
    torch.testing.assert_close(early[0, :first], late[0, :first])  # the prompt before the image: untouched
    torch.testing.assert_close(late[0, :first], plain_late[0, :first])
    assert not torch.allclose(late[0, image], plain_late[0, image])  # the image tokens: modulated
    assert not torch.allclose(early[0, image], late[0, image])  # and by their own timestep
    out = m.train().loss([example, caption_first(tokenizer, an_image("latent", 1))],
                         generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m.eval()  # cached sampling and decoding still equal the uncached
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    images = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    torch.testing.assert_close(images[0], images[1])
    prefixes = [m.image_prompt(an_image("latent")), m.image_prompt(an_image("latent", 1), "what colour is the circle?")]
    assert m.generate_text(prefixes, max_new_tokens=5) == m.generate_text(prefixes, max_new_tokens=5, use_cache=False)
    with pytest.raises(ValueError, match="time_conditioning"):
        OmniConfig(image="vq", time_conditioning="adaln")


@pytest.mark.parametrize("time_conditioning", ["input", "adaln"])
def test_text_condition_gives_each_image_the_mean_embedding_of_the_text_before_it(tokenizer, time_conditioning):
    m = make(tokenizer, "latent", "mot", time_conditioning=time_conditioning, text_condition=True).eval()
    for name, p in m.named_parameters():  # the modulation too, so adaln reads the condition from the start
        if "modulation" in name:
            torch.nn.init.normal_(p, 0, 0.3)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    image = an_image("latent")
    drawn = OmniExample([[bos, *words(tokenizer, "a red circle")], image, [eos, *words(tokenizer, "red")], image])
    read = OmniExample([[bos], image, [eos, *words(tokenizer, "blue")]])
    seq = m.pack([drawn, read])
    context = m.text_context(seq)  # three images: the first two of row 0, then row 1's
    table = m.token_embedding.weight
    before = torch.tensor([bos, *words(tokenizer, "a red circle"), tokenizer.boi_id])
    second = torch.cat([before, torch.tensor([tokenizer.eoi_id, eos, *words(tokenizer, "red"), tokenizer.boi_id])])
    torch.testing.assert_close(context, torch.stack([table[before].mean(0), table[second].mean(0),
                                                     table[[bos, tokenizer.boi_id]].mean(0)]))
    with torch.no_grad():  # another prompt changes the image tokens, not the text before them
        other = m.pack([OmniExample([[bos, *words(tokenizer, "a blue square")], image, [eos]])])
        same = m.pack([OmniExample([[bos, *words(tokenizer, "a red circle")], image, [eos]])])
        a, b = m(other)[other.modality == 1], m(same)[same.modality == 1]
    assert not torch.allclose(a, b)
    out = m.train().loss([drawn, read], generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert m.text_to_condition.weight.grad.abs().sum() > 0
    m.eval()  # cached sampling and decoding equal the uncached, the prompt's text kept in the cache
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    images = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    torch.testing.assert_close(images[0], images[1])
    interleaved = [m.generate_interleaved([m.text_prompt("a red")], max_new_tokens=4, steps=2, use_cache=use)
                   for use in (True, False)]
    assert len(interleaved[0][0]) == len(interleaved[1][0])
    with pytest.raises(ValueError, match="text_condition"):
        OmniConfig(image="vq", text_condition=True)


def test_latent_images_are_guided_and_seeded(tokenizer):
    m = make(tokenizer, "latent").eval()
    with torch.no_grad():  # a model whose noise prediction reads the text, so guidance matters
        m.latent_out.weight.normal_(0, 0.5)
    draw = [m.text_prompt("a red circle")]
    a = m.generate_image(draw, steps=4, seed=0)
    assert torch.equal(a, m.generate_image(draw, steps=4, seed=0))
    assert not torch.allclose(a, m.generate_image(draw, steps=4, seed=1))
    assert not torch.allclose(a, m.generate_image(draw, steps=4, seed=0, guidance=1.0))


def test_sampled_latents_stay_inside_the_range_of_the_training_latents(tokenizer):
    # epsilon prediction at the cosine schedule's last step divides by sqrt(alpha_bar) ~ 5e-5: an
    # unclamped clean-sample estimate turned a trained model's latents into values in the thousands
    m = make(tokenizer, "latent").eval()
    with torch.no_grad():  # a noise prediction a little off, as every trained one is
        m.latent_out.bias.fill_(0.05)
    draw = [m.text_prompt("a red circle")] * 2
    bound = m.diffusion.config.clip_sample_range
    latents = m.generate_image(draw, steps=10, seed=0)
    assert m.diffusion.config.clip_sample and 3 <= bound < 10  # latents have unit spread
    assert torch.isfinite(latents).all() and latents.abs().max() <= bound + 1e-4
    m.diffusion.config.clip_sample = False
    assert m.generate_image(draw, steps=10, seed=0).abs().max() > 100  # what the bound prevents


def test_interleaved_generation_draws_in_place_then_writes_again(tokenizer):
    m = make(tokenizer, "latent").eval()
    with torch.no_grad():  # a model that opens an image whenever it may: every hidden state points at <boi>
        direction = torch.zeros(m.config.width)
        direction[0] = 1.0
        m.norms[0].weight.zero_()
        m.norms[0].bias.copy_(direction)
        m.token_embedding.weight[tokenizer.boi_id] = 10 * direction
    out = m.generate([m.text_prompt("draw")], max_new_tokens=3, max_images=1, steps=2)[0]
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (CHANNELS, GRID, GRID)
    assert len(out) == 2 and isinstance(out[1], list) and len(out[1]) == 3  # then text (no second image)
    assert tokenizer.boi_id not in out[1]



def test_interleaved_generation_puts_the_users_turn_after_each_drawn_image(tokenizer):
    m = make(tokenizer, "latent").eval()
    with torch.no_grad():  # as above: the model opens an image whenever it may
        direction = torch.zeros(m.config.width)
        direction[0] = 1.0
        m.norms[0].weight.zero_()
        m.norms[0].bias.copy_(direction)
        m.token_embedding.weight[tokenizer.boi_id] = 10 * direction
    asked = [tokenizer.eos_id]  # <eos>: "say what you drew"
    seen = []
    decode = m._decode_text

    def spy(prefixes, *args):
        seen.append([list(s) if not isinstance(s, torch.Tensor) else "image" for s in prefixes[0]])
        return decode(prefixes, *args)

    m._decode_text = spy
    prompt = m.text_prompt("draw")
    assert len(prompt[0]) + 2 * (GRID * GRID + 3) <= 48 < len(prompt[0]) + 3 * (GRID * GRID + 3)  # room for two
    out = m.generate_interleaved([prompt], max_new_tokens=3, max_images=5, steps=2, after_image=asked)[0]
    kinds = ["image" if isinstance(s, torch.Tensor) else "text" for s in out]
    # two images, each followed by the user's turn; a third would not fit the context: text instead
    assert kinds == ["image", "text", "image", "text", "text"] and out[1] == asked and out[3] == asked
    assert seen[1][-2:] == ["image", asked]  # the model wrote on after the image and the user's turn
    assert tokenizer.boi_id not in out[4] and len(out[4]) == 3  # the turns are not counted in max_new_tokens
    with pytest.raises(ValueError, match="not a text token id"):
        m.generate_interleaved([m.text_prompt("draw")], max_new_tokens=2, steps=2, after_image=[tokenizer.boi_id])
    plain = make(tokenizer, "latent").eval()  # an untrained model: open_image draws first whatever it would write
    opened = plain.generate_interleaved([plain.text_prompt("draw")], max_new_tokens=2, steps=2, open_image=True,
                                        after_image=asked)[0]
    assert isinstance(opened[0], torch.Tensor) and opened[1] == asked

@pytest.mark.parametrize(("image", "closed"), [("vq", True), ("latent", True), ("latent", False)])
def test_caption_log_likelihood_sums_each_tokens_log_probability_after_the_image(tokenizer, image, closed):
    m = make(tokenizer, image).eval()
    images = torch.stack([an_image(image, 0), an_image(image, 1)])
    texts = ["a red circle", "two green stars in the top left"]
    got = m.caption_log_likelihood(images, texts, closed=closed)
    bias = torch.zeros(m.vocab)  # text decoding's vocabulary: no padding, <bos>, <eoi>, <boi> or codes
    bias[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eoi_id, tokenizer.boi_id]] = float("-inf")
    bias[m.text_vocab :] = float("-inf")
    with torch.no_grad():
        for i, text in enumerate(texts):  # token by token: each prefix run whole, its last position read
            ids, total = [*words(tokenizer, text), *[tokenizer.eos_id] * closed], 0.0  # open: no closing <eos>
            for k, token in enumerate(ids):
                seq = m.pack([[[tokenizer.bos_id], images[i], [tokenizer.eos_id, *ids[:k]]]])
                total += (m.logits(m.forward(seq))[0, -1] + bias).log_softmax(-1)[token].item()
            assert got[i].item() == pytest.approx(total, abs=1e-4)
    assert got[0] != m.caption_log_likelihood(images[1:], texts[:1], closed=closed)[0]  # the image is read
    with pytest.raises(ValueError, match="1 texts for 2 images"):
        m.caption_log_likelihood(images, texts[:1])
    logp, real = m.caption_token_log_probs(images, texts, closed=closed)  # each token's, as summed above
    assert real.sum(1).tolist() == [len(words(tokenizer, t)) + closed for t in texts]
    assert torch.allclose(logp.sum(1), got)
    floored = m.caption_log_likelihood(images, texts, closed=closed, floor=0.05)
    assert torch.allclose(floored, torch.where(real, (logp.exp() + 0.05).log(), 0.0).sum(1))
    assert (floored > got).all()  # a floor only raises each token's score
    with pytest.raises(ValueError, match="floor is a probability"):
        m.caption_log_likelihood(images, texts, floor=1.0)


def test_best_of_keeps_a_candidate_its_caption_shows_then_the_one_whose_caption_the_prompt_most_likely_is(tokenizer, monkeypatch):
    m = make(tokenizer, "latent").eval()
    m.autoencoder = None  # the chosen tokens themselves, not images: decode_images returns them
    monkeypatch.setattr(m, "decode_images", lambda tokens: tokens)
    prompts = ["a small red circle in the top left", "a blue square"]
    plain = m.draw(prompts, steps=2, seed=3)
    assert torch.equal(plain, m.draw(prompts, steps=2, seed=3, best_of=1))  # one candidate: the plain drawing
    candidates = m.draw([p for p in prompts for _ in range(3)], steps=2, seed=3)  # what best_of 3 draws
    scores = torch.tensor([0.0, 5.0, 1.0, 7.0, -1.0, 2.0])  # the model prefers candidate 1, then candidate 0
    seen = []

    def likelihood(tokens, texts, closed=True, floor=0.0):
        assert not closed and floor == CHOICE_FLOOR  # a prompt is read as what a caption says, not all it says
        seen.append(list(texts))
        assert torch.equal(tokens, candidates)
        return scores

    captions = ["a picture"] * 6  # captions that name no object cannot tell: the reading alone chooses
    captioned = []

    def write(prefixes, **options):
        captioned.append(torch.stack([prefix[1] for prefix in prefixes]))  # <bos>, the candidate, <eos>
        return [tokenizer.encode(c, add_special_tokens=False) for c in captions]

    monkeypatch.setattr(m, "caption_log_likelihood", likelihood)
    monkeypatch.setattr(m, "generate_text", write)
    encoded = []  # each picture is read as the model reads any image: encoded again from its pixels
    monkeypatch.setattr(m, "image_tokens", lambda images: encoded.append(images) or images)
    chosen = m.draw(prompts, steps=2, seed=3, best_of=3)
    assert seen[0] == [prompts[0]] * 3 + [prompts[1]] * 3  # each candidate read with its own prompt
    assert torch.equal(captioned[0], candidates) and torch.equal(encoded[0], candidates)  # each one read
    assert torch.equal(chosen, candidates[[1, 3]])
    # a candidate whose own caption shows the prompt comes first, then one whose caption cannot tell, then one
    # it contradicts, each group by the reading
    captions = ["a small red circle in the top left", "a small blue circle in the top left", "a picture",
                "a picture", "a large blue square at the bottom", "a small red square at the top"]
    assert torch.equal(m.draw(prompts, steps=2, seed=3, best_of=3), candidates[[0, 4]])
    captions = ["a small red circle in the top left and a small blue star on the right"] * 3 + ["a picture"] * 3
    assert torch.equal(m.draw(prompts, steps=2, seed=3, best_of=3)[:1], candidates[[1]])  # a prompt that places
    # every object it names is the whole picture: a caption with a star besides contradicts it
    with pytest.raises(ValueError, match="number of drawings to choose each image from"):
        m.draw(prompts, steps=2, best_of=0)


def test_draw_denoises_in_batches_of_draw_rows_with_one_stream_of_noise(tokenizer, monkeypatch):
    m = make(tokenizer, "latent").eval()
    m.autoencoder = None
    monkeypatch.setattr(m, "decode_images", lambda tokens: tokens)
    prompts = ["a red circle", "a blue square", "a green star", "a red circle"]
    whole = m.draw(prompts, steps=2, seed=3)
    batches, done = [], []
    generate = m.generate_image

    def counted(prefixes, **options):
        batches.append(len(prefixes))
        return generate(prefixes, **options)

    monkeypatch.setattr(m, "generate_image", counted)
    monkeypatch.setattr("polymodal.models.omni.generation.DRAW_ROWS", 3)
    split = m.draw(prompts, steps=2, seed=3, progress=done.append)
    assert batches == [3, 1] and split.shape == whole.shape
    assert torch.allclose(split[:3], whole[:3], atol=1e-5)  # the first batch: the same noise as drawn whole
    assert not torch.allclose(split[3], split[0])  # the same prompt, later in the stream: other noise
    assert done == sorted(done) and done[-1] == 2  # steps over both batches, ending at the last
    monkeypatch.setattr(m, "image_tokens", lambda images: images)  # the pictures read back as they were drawn
    assert len(m.draw(prompts[:2], steps=2, seed=3, best_of=2)) == 2  # 4 candidates in two batches, one kept a prompt


# ---- examples from data rows ----------------------------------------------------------------


def test_examples_from_rows_mixes_directions_questions_and_dropped_captions(tokenizer):
    config = OmniConfig(latent_grid=GRID, context_length=48, vqa_share=0.25)
    rows = [{"text": "a red circle", "qa": [{"question": "what colour is the circle?", "answer": "red"}]}] * 2000
    examples = examples_from_rows(rows, [torch.zeros(4, GRID, GRID)] * 2000, tokenizer, config, random.Random(0))
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    caption = words(tokenizer, "a red circle")
    kinds = {"vqa": 0, "image first": 0, "caption first": 0, "dropped": 0}
    for ex in examples:
        first, _, after = ex.segments
        if first == [bos] and after[0] != eos:
            kinds["vqa"] += 1
            assert after == [*words(tokenizer, "what colour is the circle?"), eos, *words(tokenizer, "red"), eos]
            assert ex.max_timestep == 500
        elif first == [bos]:
            kinds["image first" if after != [eos] else "dropped"] += 1
            assert after in ([eos, *caption, eos], [eos])
            assert ex.max_timestep == (500 if after != [eos] else None)
        else:
            kinds["caption first"] += 1
            assert first == [bos, *caption] and after == [eos] and ex.max_timestep is None
    assert kinds["vqa"] == pytest.approx(500, abs=80)
    pairs = 2000 - kinds["vqa"]
    assert kinds["image first"] == pytest.approx(0.2 * pairs, abs=80)
    assert kinds["dropped"] == pytest.approx(0.1 * 0.8 * pairs, abs=50)


def test_recaption_rewrites_drawn_captions_from_the_scene_graph_and_leaves_read_ones(tokenizer):
    from polymodal.data.scene import SceneObject, check_caption, parse_claims

    scene = [{"shape": "circle", "colour": "red", "size": "large", "row": 0, "col": 0},
             {"shape": "star", "colour": "blue", "size": "small", "row": 2, "col": 1}]
    objects = [SceneObject.from_dict(o) for o in scene]
    stored = "a large red circle in the top left and a small blue star at the bottom"
    rows = [{"text": stored, "objects": scene}] * 400 + [{"text": "a red circle"}] * 100  # the last: no scene graph
    images = [torch.zeros(4, GRID, GRID)] * 500
    config = OmniConfig(latent_grid=GRID, context_length=200, vqa_share=0.0, caption_dropout=0.0, recaption=0.5)
    examples = examples_from_rows(rows, images, tokenizer, config, random.Random(0))
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    rewritten, without_sizes, without_places = 0, 0, 0
    for ex, row in zip(examples, rows, strict=True):
        first, _, after = ex.segments
        if first == [bos]:  # read after the image: the stored caption, always
            assert after == [eos, *words(tokenizer, row["text"]), eos]
            continue
        text = tokenizer.decode(first[1:])
        if "objects" not in row:
            assert text == "a red circle"
            continue
        assert check_caption(text, objects) == [], text  # true of the scene, every object named
        mentions = parse_claims(text).mentions
        assert sum(m.count or 1 for m in mentions) == 2, text
        if text != stored:
            rewritten += 1
            without_sizes += all(m.size is None for m in mentions)
            without_places += all(m.cell is None for m in mentions)
    drawn = sum(ex.segments[0] != [bos] for ex in examples[:400])
    assert rewritten == pytest.approx(0.5 * drawn, abs=45)
    assert without_sizes == pytest.approx(0.5 * rewritten, abs=40)
    assert without_places > 0.4 * rewritten  # relation sentences give no places either
    # off (the default), the stored captions are drawn from
    plain = examples_from_rows(rows[:50], images[:50], tokenizer, replace(config, recaption=0.0), random.Random(0))
    assert all(ex.segments[0] in ([bos], [bos, *words(tokenizer, stored)]) for ex in plain)
    with pytest.raises(ValueError, match="recaption"):
        OmniConfig(recaption=1.5)
    with pytest.raises(ValueError, match="not a scene graph"):
        examples_from_rows([{"id": "r7", "text": stored, "objects": [{"shape": "circle"}]}] * 20, images[:20],
                           tokenizer, replace(config, recaption=1.0, image_first_share=0.0), random.Random(0))


def test_questions_per_sample_puts_several_questions_after_one_image(tokenizer):
    qa = [{"question": f"what colour is the {s}?", "answer": c}
          for s, c in (("circle", "red"), ("square", "blue"), ("star", "green"))]
    rows = [{"text": "a red circle", "qa": qa}] * 50
    config = OmniConfig(latent_grid=GRID, context_length=80, vqa_share=1.0, questions_per_sample=2)
    examples = examples_from_rows(rows, [torch.zeros(4, GRID, GRID)] * 50, tokenizer, config, random.Random(0))
    eos = tokenizer.eos_id
    pairs = {tuple([*words(tokenizer, q["question"]), eos, *words(tokenizer, q["answer"]), eos]) for q in qa}
    orders = set()
    for ex in examples:
        after = ex.segments[2]
        assert after.count(eos) == 4 and ex.max_timestep == 500
        cut = after.index(eos, after.index(eos) + 1) + 1
        first, second = tuple(after[:cut]), tuple(after[cut:])
        assert first in pairs and second in pairs and first != second
        orders.add((first, second))
    assert len(orders) > 3  # drawn at random, in a random order
    # no room for a second question: only the first is kept
    longest = max(map(len, pairs))
    tight = OmniConfig(latent_grid=GRID, context_length=GRID * GRID + 6 + longest, vqa_share=1.0, questions_per_sample=3)
    for ex in examples_from_rows(rows[:10], [torch.zeros(4, GRID, GRID)] * 10, tokenizer, tight, random.Random(0)):
        assert ex.segments[2].count(eos) == 2
    with pytest.raises(ValueError, match="questions_per_sample"):
        OmniConfig(questions_per_sample=0)


def test_sincos_image_positions_start_as_2d_codes(tokenizer):
    from polymodal.nn.dit import sincos_2d

    m = make(tokenizer, "latent", "mot", image_positions="sincos")
    assert torch.equal(m.image_position.detach(), sincos_2d(GRID, 32))
    assert m.image_position.requires_grad  # a starting point, still learned
    # a cell's code is closer to its right-hand neighbour's than to a far cell's
    codes = m.image_position.detach()
    assert (codes[0] - codes[1]).norm() < (codes[0] - codes[-1]).norm()
    assert make(tokenizer, "latent", "mot").image_position.abs().max() < 0.2  # learned: small random values
    with pytest.raises(ValueError, match="image_positions: unknown"):
        OmniConfig(image_positions="rope")


def test_2d_rotary_turns_image_cells_by_row_and_column_and_text_as_1d(tokenizer):
    from polymodal.models.omni.sequence import pair_positions
    from polymodal.nn.layers import rotary

    flat = make(tokenizer, "latent", "mot").eval()
    grid = make(tokenizer, "latent", "mot", rotary="2d").eval()
    grid.load_state_dict(flat.state_dict())  # no parameters of its own
    text = flat.pack([flat.text_prompt("a red circle in the top left")])
    torch.testing.assert_close(grid(text), flat(text))  # text alone: the same positions
    seq = flat.pack([caption_first(tokenizer, an_image("latent"))])
    assert not torch.allclose(grid(seq), flat(seq))
    places = (seq.key_mask.long().cumsum(1) - 1)
    pairs = pair_positions(places, seq, GRID, 32 // 2)[0]  # (T, D/2): width 32, 2 heads
    image = (seq.modality[0] == 1).nonzero().flatten()
    start = int(image[0])
    for cell, at in enumerate(image):
        r, c = divmod(cell, GRID)
        assert pairs[at, 0::3].eq(start).all()
        assert pairs[at, 1::3].eq(start + r).all() and pairs[at, 2::3].eq(start + c).all()
    assert torch.equal(pairs[0], places[0, 0].expand(pairs.shape[1]))  # <bos>: every pair at its place
    # one query and key on every cell: their score depends on the cells' offset on the grid
    v = torch.randn(1, 1, 1, 16).expand(1, 1, GRID * GRID, 16)
    cells = pairs[image][None]  # (1, cells, 8)

    def score(a, b, positions):
        q, k = rotary(v, positions), rotary(v, positions)
        return float(q[0, 0, a] @ k[0, 0, b])

    at = lambda r, c: r * GRID + c  # noqa: E731
    assert score(at(0, 0), at(1, 0), cells) == pytest.approx(score(at(2, 1), at(3, 1), cells), abs=1e-5)
    assert score(at(0, GRID - 1), at(1, 0), cells) != pytest.approx(score(at(0, 0), at(0, 1), cells), abs=1e-3)
    line = places[:, image]  # 1d: cell (0, last) and (1, 0) are neighbours in the raster line
    assert score(at(0, GRID - 1), at(1, 0), line) == pytest.approx(score(at(0, 0), at(0, 1), line), abs=1e-5)
    with pytest.raises(ValueError, match="rotary: unknown"):
        OmniConfig(rotary="3d")
    with pytest.raises(ValueError, match="head width of at least 6"):
        OmniConfig(width=16, heads=4, rotary="2d")


@pytest.mark.parametrize("image", ["vq", "latent"])
def test_2d_rotary_cached_generation_equals_uncached(tokenizer, image):
    m = make(tokenizer, image, "mot", rotary="2d").eval()
    prefixes = [m.image_prompt(an_image(image)), m.image_prompt(an_image(image, 1), "what colour is the circle?")]
    assert m.generate_text(prefixes, max_new_tokens=6) == m.generate_text(prefixes, max_new_tokens=6, use_cache=False)
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]
    images = [m.generate_image(draw, steps=3, seed=1, use_cache=use) for use in (True, False)]
    if image == "vq":
        assert torch.equal(images[0], images[1])
    else:
        torch.testing.assert_close(images[0], images[1])


def test_config_is_checked(tokenizer):
    with pytest.raises(ValueError, match="image: unknown"):
        OmniConfig(image="pixels")
    with pytest.raises(ValueError, match="patch: unknown"):
        OmniConfig(patch="unet")
    with pytest.raises(ValueError, match="caption_dropout"):
        OmniConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="context_length"):
        OmniConfig(context_length=40)  # 64 image tokens do not fit
    with pytest.raises(_Bad, match="unknown setting"):
        check_settings({"layers": 3}, OmniConfig)
    assert OmniConfig.from_spec({"preset": "tiny", "image": "vq"}).width == 32
    m = make(tokenizer, "vq")
    with pytest.raises(ValueError, match="integer codes"):
        m.pack([OmniExample([[tokenizer.bos_id], torch.zeros(3, 3, dtype=torch.long)])])
    with pytest.raises(ValueError, match="not a text token"):
        m.pack([OmniExample([[tokenizer.bos_id, tokenizer.boi_id]])])


# ---- saving ---------------------------------------------------------------------------------


def test_alignment_teaches_image_tokens_a_teachers_features_and_is_not_saved(tokenizer, tmp_path):
    from polymodal.models.detector import DetectorConfig, GridDetector

    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig(kind="kl", channels=(8, 8, 8), latent_channels=CHANNELS, image_size=16))
    teacher = GridDetector(DetectorConfig(image_size=16, widths=(4, 6), blocks=(1, 1), head_width=8, colour_width=4))
    config = OmniConfig(image="latent", layout="mot", width=32, depth=2, heads=2, latent_grid=GRID,
                        latent_channels=CHANNELS, context_length=48, autoencoder="somewhere/kl", image_size=16,
                        align_encoder="somewhere/judge", align_depth=1)
    m = OmniModel(config, tokenizer, autoencoder, teacher).train()
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    rows = [{"text": "a red circle", "qa": []}, {"text": "two green stars", "qa": []},
            {"text": "a blue square", "qa": [{"question": "what shape is it?", "answer": "square"}]}]
    targets = m.alignment_targets(images, rows)
    assert targets.shape == (3, GRID * GRID, 6)  # the teacher's 6 channels on each latent cell
    batch = {"image": images, "rows": rows}
    out = m.loss(batch, generator=torch.Generator().manual_seed(0))
    assert 0 <= out["align_loss"] <= 2  # 1 - cosine similarity
    unweighted = OmniModel(replace(config, align_weight=0.0), tokenizer, autoencoder, teacher).train()
    unweighted.load_state_dict(m.state_dict())
    plain = unweighted.loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["loss"] - plain["loss"], 0.5 * out["align_loss"], atol=1e-5)
    out["loss"].backward()
    assert m.aligner[0].weight.grad.abs().sum() > 0  # the predictor learns
    # examples given directly have no teacher's targets: the plain losses
    assert "align_loss" not in m.loss(m.examples(batch, random.Random(0)), generator=torch.Generator().manual_seed(0))

    m.eval().save_pretrained(tmp_path / "omni")
    loaded = OmniModel.from_pretrained(tmp_path / "omni")
    assert loaded.aligner is None and loaded.teacher is None
    seq = m.pack([m.image_prompt(m.image_tokens(images)[0])])
    assert torch.equal(m.logits(m(seq)), loaded.logits(loaded(seq)))
    with pytest.raises(ValueError, match="no image feature map"):
        OmniModel(config, tokenizer, autoencoder, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="align_encoder needs image: latent"):
        OmniConfig(image="vq", align_encoder="somewhere/judge")
    with pytest.raises(ValueError, match="align_depth"):
        OmniConfig(align_encoder="somewhere/judge", align_depth=7)
    assert OmniConfig(depth=1).align_depth == 2  # unused without an encoder


def test_save_and_load_round_trip_with_the_autoencoder(tokenizer, tmp_path):
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig(kind="vq", channels=(8, 8, 8), latent_channels=4,
                                                codebook_size=CODES, image_size=16))  # 16 px -> a 4x4 grid
    config = OmniConfig(image="vq", layout="mot", width=32, depth=2, heads=2, latent_grid=GRID, codebook_size=CODES,
                        context_length=48, autoencoder="somewhere/vq", image_size=16)
    with pytest.raises(ValueError, match="exactly when"):
        OmniModel(config, tokenizer)  # the config names an autoencoder that is not there
    m = OmniModel(config, tokenizer, autoencoder).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = {"image": images, "rows": [{"text": "a red circle", "qa": []}, {"text": "two green stars", "qa": []}]}
    assert torch.isfinite(m.loss(batch, generator=torch.Generator().manual_seed(0))["loss"])  # the trainer's batch
    codes = m.image_tokens(images)
    assert codes.shape == (2, GRID, GRID) and m.decode_images(codes).shape == (2, 3, 16, 16)

    m.save_pretrained(tmp_path / "omni")
    assert {p.name for p in (tmp_path / "omni").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                              "autoencoder"}
    loaded = OmniModel.from_pretrained(tmp_path / "omni")
    seq = m.pack([m.image_prompt(codes[0]), m.image_prompt(codes[1], "what colour is the circle?")])
    assert torch.equal(m.logits(m(seq)), loaded.logits(loaded(seq)))
    assert torch.equal(loaded.image_tokens(images), codes)
    assert loaded.generate_text([m.image_prompt(codes[0])], max_new_tokens=4) == \
        m.generate_text([m.image_prompt(codes[0])], max_new_tokens=4)

    config = (tmp_path / "omni" / "config.json").read_text()
    (tmp_path / "omni" / "config.json").write_text(config.replace('"codebook_size": 16', '"codebook_size": 32'))
    with pytest.raises(InputError, match="codebook_size"):
        OmniModel.from_pretrained(tmp_path / "omni")


def test_a_guidance_interval_guides_only_the_latent_steps_inside_it(tokenizer):
    m = make(tokenizer, "latent").eval()
    with torch.no_grad():  # a noise prediction that reads the text, so guidance matters
        m.latent_out.weight.normal_(0, 0.5)
    draw = [m.text_prompt("a red circle"), m.text_prompt("two")]  # 4 DDIM steps: timesteps 999, 749, 499, 249
    guided = m.generate_image(draw, steps=4, seed=0, guidance=3.0)
    assert torch.equal(m.generate_image(draw, steps=4, seed=0, guidance=3.0, guidance_interval=(0, 999)), guided)
    unguided = m.generate_image(draw, steps=4, seed=0, guidance=1.0)
    torch.testing.assert_close(m.generate_image(draw, steps=4, seed=0, guidance=3.0, guidance_interval=(800, 900)),
                               unguided, atol=1e-4, rtol=0)
    low = m.generate_image(draw, steps=4, seed=0, guidance=3.0, guidance_interval="0,500")
    assert not torch.allclose(low, guided, atol=1e-3) and not torch.allclose(low, unguided, atol=1e-3)
    outside = m.generate_image(draw, steps=4, seed=0, guidance=1.0, guidance_interval=(800, 900), guidance_outside=3.0)
    torch.testing.assert_close(outside, guided, atol=1e-4, rtol=0)  # 3 at every step but none
    with pytest.raises(ValueError, match="guidance interval"):
        m.generate_image(draw, steps=2, guidance_interval=(0, 1000))
    with pytest.raises(ValueError, match="latent images"):
        make(tokenizer, "vq").eval().generate_image(draw, guidance_interval=(0, 500))
