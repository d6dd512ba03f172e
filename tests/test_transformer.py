"""The one Transformer: masks, positions, QK-norm, the KV cache, the block's variants, decoding."""

import random

import pytest
import torch
import torch.nn.functional as F

from polymodal.modalities.text import TextTokenizer
from polymodal.models.captioner import Captioner, CaptionerConfig
from polymodal.nn import decoding
from polymodal.nn.dit import DiT, DiTConfig
from polymodal.nn.layers import (
    Attention,
    Block,
    KVCache,
    Transformer,
    attention_mask,
    modulate,
    rotary,
    segment_mask,
)
from polymodal.nn.unet import SpatialTransformer

TEXTS = ["a red circle in the top left", "a blue square in the center", "two green stars",
         "what colour is the circle?", "red", "blue", "what shape is the blue thing?", "square"] * 3
PROMPTS = ["what colour is the circle?", None, "what shape is the blue thing?", "red"]  # mixed lengths


@pytest.fixture(scope="module")
def captioner():
    """A tiny captioner trained for 80 steps on four images: far from done, so its beams
    disagree and its sequences end at different steps (an untrained one repeats one token)."""
    torch.manual_seed(0)
    random.seed(0)  # which rows are captions and which questions
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    config = CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny"}}, width=32, depth=2, heads=2,
                             tasks={"caption": 0.5, "vqa": 0.5})
    model = Captioner(config, tokenizer)
    rows = [{"id": str(i), "text": TEXTS[i % 3],
             "qa": [{"question": "what colour is the circle?", "answer": ["red", "blue"][i % 2]}]} for i in range(4)]
    batch = {"image": _images(4), "rows": rows}
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(80):
        loss = model.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _step_and_ids(model, n=4, beams=1):
    batch = {"image": _images(n)}
    memory, memory_mask = model.memory(batch)
    memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)
    pad = model.tokenizer.pad_id

    def step(ids, cache):
        return model.decode(ids, ids != pad, memory, memory_mask, cache)[:, -1]

    return step, model.prompt_ids(PROMPTS[:n])


# ---- decoding with and without the KV cache ----


@torch.no_grad()
def test_greedy_with_the_cache_gives_the_tokens_of_full_recompute(captioner):
    step, ids = _step_and_ids(captioner)
    tok = captioner.tokenizer
    assert (ids[:, 0] == tok.pad_id).any() and (ids[:, 0] != tok.pad_id).any()  # left padding in play
    full = decoding.greedy(step, ids, max_new=12, eos=tok.eos_id, pad=tok.pad_id)
    cached = decoding.greedy(step, ids, max_new=12, eos=tok.eos_id, pad=tok.pad_id, cache=captioner.decoder.new_cache())
    assert cached == full
    assert len({len(seq) for seq in full}) > 1  # rows end at different steps: the ended ones go on padded
    assert len({t for seq in full for t in seq}) > 3  # not one token over and over
    # ignoring eos, every row runs the full length, through the done-row padding too
    fixed = decoding.greedy(step, ids, max_new=12, eos=None, pad=tok.pad_id, cache=captioner.decoder.new_cache())
    assert all(len(s) == 12 for s in fixed)
    assert fixed == decoding.greedy(step, ids, max_new=12, eos=None, pad=tok.pad_id)


@torch.no_grad()
def test_cached_logits_match_full_recompute_at_every_step(captioner):
    step, ids = _step_and_ids(captioner)
    cache = captioner.decoder.new_cache()
    feed = ids
    for _ in range(5):
        cached = step(feed, cache)
        full = step(ids, None)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
        token = full.argmax(-1)
        ids, feed = torch.cat([ids, token[:, None]], 1), token[:, None]
    assert len(cache) == ids.shape[1] - 1
    assert torch.equal(cache.key_mask, (ids != captioner.tokenizer.pad_id)[:, :-1])  # pads stay masked


@torch.no_grad()
def test_beam_and_nucleus_agree_with_and_without_the_cache(captioner):
    tok = captioner.tokenizer
    step, ids = _step_and_ids(captioner, beams=3)
    kw = dict(beams=3, max_new=10, eos=tok.eos_id, pad=tok.pad_id)
    full = decoding.beam(step, ids, **kw)
    assert decoding.beam(step, ids, **kw, cache=captioner.decoder.new_cache()) == full
    step, ids = _step_and_ids(captioner)
    assert full != decoding.greedy(step, ids, max_new=10, eos=tok.eos_id, pad=tok.pad_id)  # the search searched
    kw = dict(max_new=10, eos=tok.eos_id, pad=tok.pad_id, top_p=0.8, temperature=1.5)
    full = decoding.nucleus(step, ids, **kw, generator=torch.Generator().manual_seed(3))
    cached = decoding.nucleus(step, ids, **kw, generator=torch.Generator().manual_seed(3),
                              cache=captioner.decoder.new_cache())
    assert cached == full
    assert full != decoding.nucleus(step, ids, **kw, generator=torch.Generator().manual_seed(4))


def test_generate_switches_the_cache_off_for_the_same_text(captioner):
    batch = {"image": torch.randn(4, 3, 64, 64)}
    for method in ("greedy", "beam"):
        on = captioner.generate(batch, PROMPTS, method=method, beams=2, max_new_tokens=8)
        assert captioner.generate(batch, PROMPTS, method=method, beams=2, max_new_tokens=8, use_cache=False) == on


def test_beam_reorders_the_cache_by_parent():
    cache = KVCache(1)
    keys = torch.arange(4.0).view(4, 1, 1, 1)
    cache.blocks[0].self_attn.append(keys, keys)
    cache.extend(torch.tensor([[True], [False], [True], [True]]))
    cache.reorder(torch.tensor([2, 2, 0, 1]))
    assert cache.blocks[0].self_attn.k.flatten().tolist() == [2.0, 2.0, 0.0, 1.0]
    assert cache.key_mask.flatten().tolist() == [True, True, True, False]


# ---- masks ----


def test_segment_mask_is_causal_across_and_bidirectional_inside_an_image_block():
    #            text text img1 img1 img1 text img2 img2 text
    ids = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 2, 0]])
    m = segment_mask(ids)[0, 0]  # (T, T)
    assert m.shape == (9, 9)
    assert m[2, 4] and m[4, 2] and m[3, 4]  # an image token sees later tokens of its own block
    assert not m[4, 5] and not m[2, 5]  # but not the later text
    assert not m[3, 6] and m[6, 3]  # nor a later block; the later block sees the earlier one
    assert m[6, 7] and not m[7, 8]
    assert not m[0, 1] and m[1, 0] and m[5, 2]  # text is causal
    assert torch.equal(segment_mask(torch.zeros(1, 5, dtype=torch.long))[0, 0], torch.ones(5, 5).tril().bool())
    assert segment_mask(ids, causal=False).all()
    # a cached step: the last queries' rows of the full mask
    assert torch.equal(segment_mask(ids, query_len=3), segment_mask(ids)[:, :, -3:])
    # padding is hidden from every query, except from itself
    key_mask = torch.tensor([[False, True, True, True, True, True, True, True, True]])
    padded = segment_mask(ids, key_mask=key_mask)[0, 0]
    assert not padded[1:, 0].any() and padded[0, 0] and padded[4, 2]


def test_attention_mask_with_a_cache_and_left_padding():
    key_mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    full = attention_mask(key_mask, 5, causal=True)
    assert torch.equal(attention_mask(key_mask, 2, causal=True), full[:, :, -2:])
    assert full.any(-1).all()  # no empty row, pads included
    assert not full[0, 0, 4, :2].any() and full[0, 0, 4, 2:].all()  # real tokens never see pads
    assert not full[1, 0, 1, 2:].any()  # nor the future


# ---- positions and QK-norm ----


def test_rotary_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rotary(q, torch.tensor([m])) * rotary(k, torch.tensor([n]))).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5) == pytest.approx(score(40, 38), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert torch.allclose(rotary(q, torch.tensor([0])), q)  # position 0 is not turned


def test_rotary_attention_with_a_cache_matches_the_whole_sequence():
    torch.manual_seed(0)
    attn = Attention(16, 2, rotary=True)
    x = torch.randn(2, 6, 16)
    mask = attention_mask(None, 6, causal=True)
    full = attn(x, mask=mask)
    cache = Transformer(16, 1, 2).new_cache().blocks[0].self_attn
    first = attn(x[:, :4], mask=attention_mask(None, 4, causal=True), cache=cache)
    rest = [attn(x[:, i : i + 1], cache=cache) for i in (4, 5)]  # one query sees every cached key
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)
    # only offsets matter: shifting every position changes nothing, reordering them does
    torch.testing.assert_close(attn(x, positions=torch.arange(6) + 7), attn(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn(x, positions=torch.arange(6).flip(0)), attn(x), atol=1e-3)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for qk_norm, blind in ((kind, True), (None, False)):
        attn = Attention(16, 2, qk_norm=qk_norm)
        before = attn(x)
        with torch.no_grad():
            attn.q.weight.mul_(10)
            attn.q.bias.mul_(10)
        assert torch.allclose(attn(x), before, atol=1e-4) == blind
    block = Block(16, 2, qk_norm=kind, rotary=True, cross_attention=True)
    out = block(x, attention_mask(None, 5, True), context=torch.randn(2, 3, 16))
    out.sum().backward()
    assert torch.isfinite(out).all() and block.attn.q_norm.weight.grad is not None


# ---- the block's variants: the math of the blocks it replaced ----


def test_cross_attention_gate_at_init_leaves_x_unchanged():
    torch.manual_seed(0)
    block = Block(16, 2, self_attention=False, cross_attention=True, cross_gate=True)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    mlp_only = x + block.mlp(block.norm2(x))
    assert torch.equal(block(x, context=context), mlp_only)
    with torch.no_grad():
        block.gate.fill_(1.0)
    assert not torch.allclose(block(x, context=context), mlp_only)
    none = torch.tensor([[True, True, True], [False, False, False]])  # the second sample has no context
    assert torch.equal(block(x, context=context, context_mask=none)[1], mlp_only[1])


def test_decoder_block_is_self_then_cross_then_mlp_each_pre_norm_and_residual():
    """The captioner's decoder block (and fusion's, with its gate open)."""
    torch.manual_seed(0)
    block = Block(16, 2, cross_attention=True)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    memory_mask = torch.tensor([[True, True, True], [True, True, False]])
    mask = attention_mask(None, 5, causal=True)
    h = x + block.attn(block.norm1(x), mask=mask)
    h = h + block.cross_attn(block.norm_cross(h), context=context, mask=memory_mask[:, None, None, :])
    h = h + block.mlp(block.norm2(h))
    assert torch.equal(block(x, mask, context=context, context_mask=memory_mask), h)


def test_dit_blocks_start_as_the_identity_and_modulate_like_adaln_zero():
    torch.manual_seed(0)
    dit = DiT(DiTConfig(width=32, depth=2, heads=2, context_dim=24))
    x, cond, context = torch.randn(2, 9, 32), torch.randn(2, 32), torch.randn(2, 4, 24)
    for block, ada in zip(dit.blocks, dit.ada, strict=True):
        modulation = ada(F.silu(cond)).view(2, 6, 32)
        assert torch.equal(block(x, context=context, modulation=modulation), x)  # zero gates, zero cross output
    block = dit.blocks[0]
    assert not any(p.requires_grad for p in block.norm1.parameters())  # the modulation is the affine
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m = torch.randn(2, 6, 32)
    shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(1)
    h = x + gate1[:, None] * block.attn(modulate(block.norm1(x), shift1, scale1))
    h = h + block.cross_attn(block.norm_cross(h), context=context)
    h = h + gate2[:, None] * block.mlp(modulate(block.norm2(h), shift2, scale2))
    assert torch.equal(block(x, context=context, modulation=m), h)
    with pytest.raises(ValueError, match="modulation"):
        block(x, context=context)


def test_unet_cross_only_levels_have_no_self_attention():
    torch.manual_seed(0)
    st = SpatialTransformer(16, 2, context_dim=24, groups=4, self_attention=False)
    assert st.block.attn is None and st.block.norm1 is None
    x, context = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 24)
    assert torch.equal(st(x, context, None), x)  # the output projection starts at zero
    y = torch.randn(1, 16, 16)
    b = st.block
    h = y + b.cross_attn(b.norm_cross(y), context=context)
    assert torch.equal(b(y, context=context), h + b.mlp(b.norm2(h)))
