"""The Tower: one reader of batch fields for every kind of input, projections on top, and a
bounded cache of a frozen encoder's features that changes no number."""

import pytest
import torch

from polymodal.modalities.text import TextTokenizer
from polymodal.nn.tower import FeatureCache, Tower, copy_matching_encoders

TEXTS = ["a small red circle", "two green stars in the top left", "a large blue square"]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(TEXTS * 4, vocab_size=200)


def batch(n=3):
    torch.manual_seed(0)
    mask = torch.ones(n, 40, dtype=torch.bool)
    mask[1, 24:] = False
    return {"image": torch.randn(n, 3, 64, 64), "speech": torch.randn(n, 80, 40) - 8, "speech_mask": mask,
            "clip": torch.randn(n, 2, 3, 64, 64), "clip_audio": torch.randn(n, 80, 40) - 8, "clip_audio_mask": mask,
            "caption": TEXTS[:n]}


def test_the_cache_holds_at_most_its_bound_and_drops_the_least_recently_used():
    row = torch.zeros(16)  # 64 bytes
    cache = FeatureCache(max_bytes=10 * 64)
    for i in range(25):
        cache.put(i, row + i)
        if i == 12:
            assert torch.equal(cache.get(5), row + 5)  # used again: it outlives the keys put after it
        if i == 20:
            assert 5 in cache and 6 not in cache
        assert cache.bytes <= cache.max_bytes and len(cache) <= 10
    assert len(cache) == 10 and cache.bytes == 10 * 64
    assert set(cache.keys()) == set(range(15, 25))
    cache.put("big", torch.zeros(1000))  # larger than the whole bound: not kept, nothing dropped
    assert "big" not in cache and len(cache) == 10
    off = FeatureCache(max_bytes=0)
    off.put(0, row)
    assert len(off) == 0
    with pytest.raises(ValueError, match="at least 0"):
        FeatureCache(-1)


@pytest.mark.parametrize("name,spec", [("image", {"type": "cnn", "preset": "tiny"}),
                                       ("speech", {"type": "audio", "preset": "tiny"}),
                                       ("clip", {"type": "video", "preset": "tiny"})])
def test_a_frozen_tower_returns_from_its_cache_what_it_computes(name, spec):
    torch.manual_seed(0)
    tower = Tower(name, spec, out_dim=16, modality_embedding=True, frozen=True)
    b, keys = batch(), [f"{name}/{i}" for i in range(3)]
    with torch.no_grad():
        plain_tokens, plain_mask = tower.tokens(b)  # no keys: nothing cached
        plain_pooled = tower.pooled(b)
        assert len(tower.cache) == 0
        tokens, mask = tower.tokens(b, keys)
        pooled = tower.pooled(b, keys)
        assert len(tower.cache) == 6  # tokens and pooled features of three inputs
        assert torch.equal(mask, plain_mask)
        assert torch.allclose(tokens[mask], plain_tokens[plain_mask], atol=1e-5)
        assert torch.allclose(pooled, plain_pooled, atol=1e-5)
        # the same keys come back from the cache, whatever the batch holds now
        scrambled = {k: torch.randn_like(v) if torch.is_tensor(v) and v.dtype != torch.bool else v
                     for k, v in b.items()}
        again, again_mask = tower.tokens(scrambled, keys[::-1])
        assert torch.allclose(again[again_mask], tokens.flip(0)[mask.flip(0)])
        assert torch.equal(tower.pooled(scrambled, keys[::-1]), pooled.flip(0))


def test_a_small_cache_bound_still_gives_every_feature(tokenizer):
    torch.manual_seed(0)
    tower = Tower("speech", {"type": "audio", "preset": "tiny"}, frozen=True, cache_bytes=2 * 32 * 4)
    b = batch()
    with torch.no_grad():
        full = tower.pooled(b)
        cached = tower.pooled(b, ["a", "b", "c"])
    assert torch.allclose(full, cached, atol=1e-5) and len(tower.cache) == 2


def test_a_frozen_text_tower_keys_raw_texts_by_themselves(tokenizer):
    torch.manual_seed(0)
    tower = Tower("caption", {"type": "text", "preset": "tiny"}, tokenizer=tokenizer, out_dim=8,
                  project="pooled", bias=False, frozen=True)
    with torch.no_grad():
        first = tower.pooled({"caption": TEXTS + TEXTS[:1]})  # a repeated text is encoded once
        assert sorted(k for _, k in tower.cache.keys()) == sorted(TEXTS)
        ids, mask = tokenizer.batch(TEXTS, max_length=64)
        direct = tower.pooled({"caption": TEXTS, "caption_ids": ids, "caption_mask": mask})  # tokenised: no cache
    assert torch.allclose(first[:3], direct, atol=1e-5) and torch.equal(first[3], first[0])
    assert first.shape == (4, 8) == (4, tower.width)


def test_a_trained_tower_is_not_cached_and_gets_gradients(tokenizer):
    tower = Tower("image", {"type": "cnn", "preset": "tiny"}, out_dim=16, positions=256).train()
    x, mask = tower.tokens(batch(), keys=["a", "b", "c"])
    x.sum().backward()
    assert len(tower.cache) == 0 and tower.encoder.stem[0].weight.grad is not None
    assert tower.position.grad is not None and x.shape[-1] == tower.token_width == 16
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Tower("caption", {"type": "text", "preset": "tiny"})
    with pytest.raises(ValueError, match="unknown encoder type"):
        Tower("x", {"type": "hologram"})


def test_a_frozen_tower_stays_in_eval_mode():
    tower = Tower("image", {"type": "cnn", "preset": "tiny"}, out_dim=8, frozen=True).train()
    assert not tower.encoder.training and tower.projection.training
    assert not any(p.requires_grad for p in tower.encoder.parameters())


def test_encoders_are_copied_between_towers_with_the_same_spec():
    spec = {"type": "cnn", "preset": "tiny"}
    mine = torch.nn.ModuleDict({"photo": Tower("photo", spec), "speech": Tower("speech", {"type": "audio", "preset": "tiny"})})
    theirs = torch.nn.ModuleDict({"image": Tower("image", spec, out_dim=8)})
    assert copy_matching_encoders(mine, theirs) == [("photo", "image")]
    b = {"photo": batch()["image"], "image": batch()["image"]}
    mine.eval(), theirs.eval()
    assert torch.equal(mine["photo"].encoder_pooled(b), theirs["image"].encoder_pooled(b))
