import pytest
import torch

from polymodal.nn.fusion import FUSIONS, build_fusion

DIMS = {"image": 12, "audio": 8}


def inputs():
    torch.manual_seed(0)
    features = {"image": torch.randn(3, 5, 12), "audio": torch.randn(3, 7, 8)}
    masks = {"image": torch.ones(3, 5, dtype=torch.bool), "audio": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()}
    return features, masks


def make(kind):
    options = {"query": "audio", "context": "image"} if kind == "cross_attention" else {}
    return build_fusion(kind, DIMS, 16, **options)


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_fuses_to_one_vector_and_trains(kind):
    op = make(kind)
    features, masks = inputs()
    out = op(features, masks)
    assert out.shape == (3, 16)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in op.parameters())


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_masked_tokens_change_nothing(kind):
    op = make(kind).eval()
    features, masks = inputs()
    noisy = {**features, "audio": features["audio"].clone()}
    noisy["audio"][2, 2:] += 100.0  # only masked-out positions of sample 2 change
    assert torch.allclose(op(features, masks), op(noisy, masks), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(FUSIONS))
@pytest.mark.parametrize("missing", ["image", "audio"])
def test_a_missing_modality_still_fuses(kind, missing):
    op = make(kind)
    features, masks = inputs()
    features.pop(missing)
    masks.pop(missing)
    out = op(features, masks)
    assert out.shape == (3, 16) and torch.isfinite(out).all()


def test_pooled_features_work_too():
    op = make("gated")
    assert op({"image": torch.randn(2, 12), "audio": torch.randn(2, 8)}).shape == (2, 16)


def test_unknown_fusion_and_bad_cross_attention_are_errors():
    with pytest.raises(ValueError, match="unknown fusion"):
        build_fusion("magic", DIMS, 16)
    with pytest.raises(ValueError, match="needs"):
        build_fusion("cross_attention", DIMS, 16, query="text", context="image")
    with pytest.raises(ValueError, match="at least one"):
        make("sum")({})
