import pytest
import torch

from polymodal.models.fusion import FusionClassifier, FusionConfig

TOWERS = {"image": {"type": "cnn", "preset": "tiny"}, "question": {"type": "audio", "preset": "tiny"}}


def batch(n=4):
    torch.manual_seed(0)
    return {"image": torch.randn(n, 3, 64, 64), "question": torch.randn(n, 80, 60) - 8,
            "question_mask": torch.ones(n, 60, dtype=torch.bool),
            "rows": [{"fusion_label": "yes" if i % 2 else "no"} for i in range(n)]}


def model(strategy, **kw):
    towers = {"image": TOWERS["image"]} if strategy == "single" else TOWERS
    return FusionClassifier(FusionConfig(towers=towers, strategy=strategy, width=32, depth=1, heads=2, **kw))


@pytest.mark.parametrize("strategy", ["early", "late", "hybrid", "single"])
def test_forward_backward_and_loss(strategy):
    m = model(strategy)
    out = m.loss(batch())
    assert 0 <= out["accuracy"] <= 1
    out["loss"].backward()
    assert sum(p.grad.abs().sum() for p in m.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("strategy", ["early", "late", "hybrid"])
@pytest.mark.parametrize("missing", ["image", "question"])
def test_a_missing_modality_still_answers(strategy, missing):
    m = model(strategy).eval()
    b = batch()
    b.pop(missing)
    b.pop(f"{missing}_mask", None)
    logits = m(b)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_hybrid_gates_start_closed_so_it_starts_as_the_question_model():
    m = model("hybrid").eval()
    b = batch()
    other = dict(b, image=torch.randn(4, 3, 64, 64))
    assert torch.allclose(m(b), m(other))  # the image cannot matter until a gate opens
    with torch.no_grad():
        m.blocks[0].gate.fill_(1.0)
    assert not torch.allclose(m(b), m(other))


def test_modality_dropout_never_drops_everything():
    m = model("late", modality_dropout=0.99).train()
    masks = {"a": torch.ones(64, 3, dtype=torch.bool), "b": torch.ones(64, 5, dtype=torch.bool)}
    dropped = m._drop_modalities(masks)
    assert (dropped["a"].any(1) | dropped["b"].any(1)).all()
    assert not dropped["a"].any(1).all()  # but it does drop


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown strategy"):
        FusionConfig(towers=TOWERS, strategy="middle")
    with pytest.raises(ValueError, match="exactly one tower"):
        FusionConfig(towers=TOWERS, strategy="single")
    with pytest.raises(ValueError, match="fusion_label"):
        model("late").labels({"rows": [{"label": "yes"}]})


def test_save_and_load_restore_exactly(tmp_path):
    m = model("hybrid").eval()
    with torch.no_grad():
        m.blocks[0].gate.fill_(0.5)
    m.save_pretrained(tmp_path / "f")
    loaded = FusionClassifier.from_pretrained(tmp_path / "f")
    assert torch.equal(m(batch()), loaded(batch()))
    from polymodal.errors import InputError
    from polymodal.models.clip import ContrastiveModel

    with pytest.raises(InputError, match="not a 'contrastive' model"):
        ContrastiveModel.from_pretrained(tmp_path / "f")


def test_late_fusion_of_embeddings_answers_with_and_without_a_modality():
    m = model("late", late_merge="embedding")
    out = m.loss(batch())
    out["loss"].backward()
    b = batch()
    b.pop("image")
    assert m.eval()(b).shape == (4, 2)
    with pytest.raises(ValueError, match="exactly two towers"):
        FusionConfig(towers={**TOWERS, "third": TOWERS["image"]}, strategy="late", late_merge="embedding")
    # other strategies ignore the late merge, so one recipe serves every strategy of a bench
    assert not hasattr(model("early", late_merge="embedding"), "projections")


def test_frozen_encoders_stay_fixed():
    m = model("early", freeze_encoders=True).train()
    encoders = [p for t in m.towers.values() for p in t.encoder.parameters()]
    assert not any(p.requires_grad for p in encoders)
    assert not m.towers["image"].encoder.training and m.towers["image"].projection.training
    m.loss(batch())["loss"].backward()
    assert all(p.grad is None for p in encoders)


def test_frozen_encoder_states_are_remembered_per_file_and_change_nothing():
    m = model("early", freeze_encoders=True, fields={"image": "image", "question": "audio:fusion_audio_file"}).eval()
    b = batch()
    for i, r in enumerate(b["rows"]):
        r.update(file_name=f"images/{i}.png", fusion_audio_file=f"audio/{i}.wav")
    plain = m({k: v for k, v in b.items() if k != "rows"})
    first = m(b)
    assert sum(len(t.cache) for t in m.towers.values()) == 8 and torch.allclose(first, plain, atol=1e-5)
    b["image"] = torch.zeros_like(b["image"])  # the same files: the remembered states answer
    assert torch.allclose(m(b), first, atol=1e-5)


def test_multi_label_classification_learns_sets_of_labels():
    m = model("late", classes=["circle", "square", "star"], label_column="shapes", multi_label=True)
    b = batch()
    for i, r in enumerate(b["rows"]):
        r["shapes"] = [["circle"], ["square", "star"], ["circle", "star"], "square"][i]
    assert m.labels(b).tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 1, 0]]
    opt = torch.optim.AdamW(m.parameters(), 1e-2)
    for _ in range(60):
        out = m.loss(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.eval()
    assert m.hits(m(b), m.labels(b)).all()
    b["rows"][0]["shapes"] = ["hexagon"]
    with pytest.raises(ValueError, match="shapes"):
        m.labels(b)


@pytest.mark.parametrize("operator", ["concat", "sum", "gated", "attention", "cross_attention", "cross_transformer"])
def test_late_fusion_through_each_fusion_operator(operator):
    from polymodal.nn.fusion import FUSIONS

    m = model("late", late_merge=operator, modality_dropout=0.5).train()
    assert isinstance(m.merge, FUSIONS[operator]) and m.towers["image"].projection is None
    out = m.loss(batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None for p in m.merge.parameters())
    assert m.towers["image"].encoder.stem[0].weight.grad is not None  # the encoders train too
    m.eval()
    for missing in ("image", "question"):
        b = batch()
        b.pop(missing)
        b.pop(f"{missing}_mask", None)
        logits = m(b)
        assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_fusion_operators_read_frozen_features_from_the_cache():
    m = model("late", late_merge="attention", freeze_encoders=True,
              fields={"image": "image", "question": "audio:fusion_audio_file"}).eval()
    b = batch()
    for i, r in enumerate(b["rows"]):
        r.update(file_name=f"images/{i}.png", fusion_audio_file=f"audio/{i}.wav")
    first = m(b)
    assert sum(len(t.cache) for t in m.towers.values()) == 8
    b["image"] = torch.zeros_like(b["image"])
    assert torch.allclose(m(b), first, atol=1e-5)
    with pytest.raises(ValueError, match="exactly two towers"):
        FusionConfig(towers={**TOWERS, "third": TOWERS["image"]}, strategy="late", late_merge="cross_attention")
    with pytest.raises(ValueError, match="unknown late_merge"):
        FusionConfig(towers=TOWERS, strategy="late", late_merge="magic")
