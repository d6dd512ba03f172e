"""The VQ autoencoder's codebook (polymodal.models.autoencoder): seeded from the first batch's
encoder vectors, and codes that fall out of use restart where the codebook represents worst."""

from __future__ import annotations

import pytest
import torch

from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig


def tiny(**settings) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(kind="vq", channels=(8, 8), latent_channels=4, codebook_size=16,
                                         image_size=8, **settings))


def vectors_of(model, images):
    z = model._encoder(images).detach()
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_the_first_batch_seeds_every_code_with_an_encoder_vector(tmp_path):
    model = tiny().train()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    model.loss({"image": images})
    flat = vectors_of(model, images)
    nearest = torch.cdist(model.codebook, flat).min(1).values
    assert bool(model.codebook_ready) and torch.all(nearest < 1e-3)
    model.save_pretrained(tmp_path / "vq")
    assert bool(Autoencoder.from_pretrained(tmp_path / "vq").codebook_ready)  # a resumed or loaded model keeps it


def test_unused_codes_restart_on_the_worst_represented_vectors():
    model = tiny(dead_code_threshold=0.5).train()
    far = 5.0 + torch.arange(16.0)[:, None].expand(16, 4)  # rare patterns far from the background
    flat = torch.cat([torch.zeros(48, 4), far])
    model.codebook_ready.fill_(True)
    model.codebook.copy_(torch.zeros(16, 4))
    model.code_sums.copy_(model.codebook)
    model.code_counts.fill_(0.1)  # all but code 0 out of use
    model.code_counts[0] = 1e6  # code 0: the background, held in place by its long use
    z = flat.T.reshape(1, 4, 8, 8)
    model._update_codebook(z, model._nearest(z))
    restarted = model.codebook[1:]
    # every restart drawn where the error is: the far-off patterns, not the background code 0 covers
    assert torch.all(restarted >= 5.0) and len(restarted.unique(dim=0)) == 15
    assert torch.all(model.code_counts[1:] == 1.0)


def test_evaluation_reports_how_much_of_the_codebook_images_use():
    from polymodal.eval.reconstruction import autoencoder_metrics

    model = tiny().eval()
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    codes = model.encode_codes(images).flatten()
    metrics = autoencoder_metrics(model, images, [{}] * 6)
    assert metrics["codebook usage"] == pytest.approx(len(codes.unique()) / 16)
    assert 1.0 <= metrics["codebook perplexity"] <= len(codes.unique()) + 1e-6
    model.codebook.copy_(model.codebook[:1].expand(16, 4))  # one code repeated: every vector picks the first
    one = autoencoder_metrics(model, images, [{}] * 6)
    assert one["codebook usage"] == pytest.approx(1 / 16) and one["codebook perplexity"] == pytest.approx(1.0)
