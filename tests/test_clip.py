import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polymodal.modalities.text import TextTokenizer
from polymodal.models.clip import ContrastiveConfig, ContrastiveModel, contrastive_loss

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "two green stars", "a purple cross to the left of an orange triangle"] * 4
TINY = {"image": {"type": "cnn", "preset": "tiny"}, "text": {"type": "text", "preset": "tiny"},
        "audio": {"type": "audio", "preset": "tiny"}}


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def batch_of(n=4, frames=120):
    torch.manual_seed(1)
    return {"image": torch.randn(n, 3, 64, 64), "text": CAPTIONS[:n], "audio": torch.randn(n, 80, frames) - 8,
            "audio_mask": torch.ones(n, frames, dtype=torch.bool)}


@pytest.mark.parametrize("image", [{"type": "cnn", "preset": "tiny"}, {"type": "vit", "preset": "tiny"},
                                   {"type": "cnn", "preset": "tiny", "pool": "attention"}])
def test_forward_backward_and_loss(tokenizer, image):
    config = ContrastiveConfig(towers={**TINY, "image": image}, pairs=[("image", "text"), ("audio", "text")], embed_dim=16)
    model = ContrastiveModel(config, tokenizer)
    out = model.loss(batch_of())
    assert set(out) >= {"loss", "loss_image_text", "loss_audio_text", "logit_scale"}
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "a parameter got no gradient"
    emb = model.embed("image", batch_of())
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_logit_scale_starts_at_clip_temperature_and_is_clamped(tokenizer):
    model = ContrastiveModel(ContrastiveConfig(towers={k: TINY[k] for k in ("image", "text")}), tokenizer)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_loss_is_symmetric_infonce():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * a @ b.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(5))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(5))) / 2
    assert contrastive_loss(a, b, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    assert contrastive_loss(a, a, torch.tensor(100.0)).item() < 1e-3


def test_save_and_load_restore_exactly(tokenizer, tmp_path):
    config = ContrastiveConfig(towers=TINY, pairs=[("image", "text"), ("audio", "text")], embed_dim=16)
    model = ContrastiveModel(config, tokenizer).eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = ContrastiveModel.from_pretrained(tmp_path / "m")
    b = batch_of()
    for m in ("image", "text", "audio"):
        assert torch.equal(model.embed(m, b), loaded.embed(m, b))
    model.save_pretrained(tmp_path / "m")  # overwriting an existing folder works too
    assert json.loads((tmp_path / "m" / "config.json").read_text())["embed_dim"] == 16


def test_from_pretrained_names_the_problem(tmp_path):
    from polymodal.errors import InputError

    with pytest.raises(InputError, match="not a saved polymodal model"):
        ContrastiveModel.from_pretrained(tmp_path)


def test_unknown_settings_are_errors():
    from polymodal.nn.encoders import build_encoder

    with pytest.raises(ValueError, match="unknown settings"):
        build_encoder({"type": "cnn", "widht": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        build_encoder({"type": "vit", "preset": "huge"})
    with pytest.raises(ValueError, match="has no tower"):
        ContrastiveConfig(towers={"image": TINY["image"]}, pairs=[("image", "text")])


# ---- the gathered loss in two processes equals the single-process loss -----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, a, b, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = a.shape[0] // world
    la = a[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    lb = b[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss = contrastive_loss(la, lb, torch.tensor(7.0))
    loss.backward()
    results[rank] = (loss.item(), la.grad.clone(), lb.grad.clone())
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_single_process():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 6), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(8, 6), dim=-1)
    ga, gb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    single = contrastive_loss(ga, gb, torch.tensor(7.0))
    single.backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), a, b, results), nprocs=2, join=True)
        results = dict(results)
    mean_loss = sum(results[r][0] for r in range(2)) / 2
    assert mean_loss == pytest.approx(single.item(), rel=1e-5)
    # DDP averages gradients over processes: the average of each process's share is the global gradient
    grad_a = torch.cat([results[r][1] for r in range(2)]) / 2
    grad_b = torch.cat([results[r][2] for r in range(2)]) / 2
    assert torch.allclose(grad_a, ga.grad, atol=1e-6) and torch.allclose(grad_b, gb.grad, atol=1e-6)


def test_frozen_towers_do_not_train_and_locked_text_features_are_cached(tokenizer):
    config = ContrastiveConfig(towers=TINY, pairs=[("audio", "text")], embed_dim=16, frozen=["image", "text"])
    model = ContrastiveModel(config, tokenizer).train()
    assert not any(p.requires_grad for p in model.towers["text"].encoder.parameters())
    assert not any(p.requires_grad for p in model.towers["text"].projection.parameters())
    assert all(p.requires_grad for p in model.towers["audio"].encoder.parameters())
    assert not model.towers["text"].encoder.training  # fixed towers stay in eval mode
    model.loss(batch_of())["loss"].backward()
    assert len(model.towers["text"].cache) == 4
    locked = ContrastiveModel(ContrastiveConfig(towers=TINY, embed_dim=16, locked=["text"]), tokenizer)
    assert all(p.requires_grad for p in locked.towers["text"].projection.parameters())
    assert not any(p.requires_grad for p in locked.towers["text"].encoder.parameters())


def test_init_towers_from_copies_matching_towers(tokenizer):
    clip = ContrastiveModel(ContrastiveConfig(towers={k: TINY[k] for k in ("image", "text")}, embed_dim=16), tokenizer)
    bound = ContrastiveModel(ContrastiveConfig(towers=TINY, pairs=[("audio", "text")], embed_dim=16), tokenizer)
    assert bound.init_towers_from(clip) == ["image", "text"]
    b = batch_of()
    assert torch.equal(clip.embed("image", b), bound.embed("image", b))


def test_video_tower_embeds_frames_and_sound(tokenizer):
    config = ContrastiveConfig(towers={"video": {"type": "video", "preset": "tiny"}, "text": TINY["text"]},
                               pairs=[("video", "text")], embed_dim=16)
    model = ContrastiveModel(config, tokenizer)
    batch = {"video": torch.randn(4, 3, 3, 64, 64), "video_audio": torch.randn(4, 80, 50) - 8,
             "video_audio_mask": torch.ones(4, 50, dtype=torch.bool), "text": CAPTIONS[:4]}
    out = model.loss(batch)
    out["loss"].backward()
    silent = dict(batch, video_audio=torch.zeros(4, 80, 0), video_audio_mask=torch.zeros(4, 0, dtype=torch.bool))
    assert model.embed("video", silent).shape == (4, 16)  # a clip without sound still embeds
    assert not torch.allclose(model.embed("video", silent), model.embed("video", batch))
