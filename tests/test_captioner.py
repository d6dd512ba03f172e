import json

import pytest
import torch

from polymodal.modalities.text import TextTokenizer
from polymodal.models.captioner import Captioner, CaptionerConfig

CAPTIONS = ["a red circle in the top left", "a blue square in the center", "two green stars",
            "what colour is the circle?", "red", "blue", "what shape is the blue thing?", "square"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def rows(n=4):
    return [{"id": f"{i:06d}", "text": CAPTIONS[i % 3],
             "qa": [{"type": "colour", "question": "what colour is the circle?", "answer": ["red", "blue"][i % 2]}]}
            for i in range(n)]


def make(tokenizer, **kw):
    torch.manual_seed(0)
    config = CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny"}}, width=32, depth=1, heads=2, **kw)
    return Captioner(config, tokenizer)


def batch(n=4):
    torch.manual_seed(1)
    return {"image": torch.randn(n, 3, 64, 64), "rows": rows(n)}


def test_it_learns_to_caption_a_small_batch(tokenizer):
    m = make(tokenizer)
    b = batch()
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    first = m.loss(b)["loss"].item()
    for _ in range(150):
        out = m.loss(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < first / 5
    m.eval()
    assert m.generate(b) == [r["text"] for r in b["rows"]]
    assert m.generate(b, method="beam", beams=3) == [r["text"] for r in b["rows"]]


def test_beam_of_one_is_greedy_and_nucleus_is_seeded(tokenizer):
    m = make(tokenizer).eval()
    b = batch(3)
    assert m.generate(b, method="beam", beams=1, max_new_tokens=6) == m.generate(b, max_new_tokens=6)
    a = m.generate(b, method="nucleus", top_p=0.9, generator=torch.Generator().manual_seed(3), max_new_tokens=6)
    c = m.generate(b, method="nucleus", top_p=0.9, generator=torch.Generator().manual_seed(3), max_new_tokens=6)
    assert a == c
    with pytest.raises(ValueError, match="unknown decoding"):
        m.generate(b, method="sideways")


def test_left_padded_prompts_give_what_each_prompt_gives_alone(tokenizer):
    m = make(tokenizer).eval()
    b = batch(2)
    prompts = ["what colour is the circle?", None]
    together = m.generate(b, prompts, max_new_tokens=5)
    alone = [m.generate({"image": b["image"][i : i + 1]}, [prompts[i]], max_new_tokens=5)[0] for i in range(2)]
    assert together == alone


def test_vqa_samples_score_only_the_answer(tokenizer):
    m = make(tokenizer, tasks={"vqa": 1.0})
    pairs = m.examples(rows(2))
    assert pairs == [("what colour is the circle?", "red"), ("what colour is the circle?", "blue")]
    assert torch.isfinite(m.loss(batch(2))["loss"])


def test_save_and_load_generate_the_same(tokenizer, tmp_path):
    m = make(tokenizer, tasks={"caption": 0.5, "vqa": 0.5}).eval()
    b = batch(2)
    m.save_pretrained(tmp_path / "cap")
    assert json.loads((tmp_path / "cap" / "config.json").read_text())["model_type"] == "captioner"
    loaded = Captioner.from_pretrained(tmp_path / "cap")
    assert loaded.generate(b, max_new_tokens=6) == m.generate(b, max_new_tokens=6)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown tasks"):
        CaptionerConfig(tasks={"dance": 1.0})
    with pytest.raises(ValueError, match="not an image or audio encoder"):
        CaptionerConfig(encoders={"t": {"type": "text"}})


def test_audio_captioner_reads_spectrograms(tokenizer):
    config = CaptionerConfig(encoders={"speech": {"type": "audio", "preset": "tiny"}}, width=32, depth=1, heads=2)
    m = Captioner(config, tokenizer)
    b = {"speech": torch.randn(2, 80, 50) - 8, "speech_mask": torch.ones(2, 50, dtype=torch.bool), "rows": rows(2)}
    out = m.loss(b)
    out["loss"].backward()
    assert m.towers["speech"].encoder.stem[0].weight.grad is not None
    assert len(m.eval().generate(b, max_new_tokens=3)) == 2


def test_every_task_per_sample_decodes_each_caption_and_question_of_an_image(tokenizer):
    m = make(tokenizer, tasks={"caption": 0.5, "vqa": 0.5}, every_task_per_sample=True)
    pairs, owner = m.every_example(rows(2))
    assert pairs == [(None, CAPTIONS[0]), ("what colour is the circle?", "red"),
                     (None, CAPTIONS[1]), ("what colour is the circle?", "blue")]
    assert owner == [0, 0, 1, 1]
    out = m.loss(batch(2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.towers["image"].encoder.stem[0].weight.grad is not None


def test_questions_per_sample_caps_the_questions_of_each_image(tokenizer):
    import random

    m = make(tokenizer, tasks={"caption": 0.5, "vqa": 0.5}, every_task_per_sample=True, questions_per_sample=1)
    many = [dict(r, qa=r["qa"] * 3) for r in rows(2)]
    pairs, owner = m.every_example(many, random.Random(0))
    assert owner == [0, 0, 1, 1] and pairs[0] == (None, CAPTIONS[0]) and pairs[1][0] is not None


def test_frozen_encoders_encode_each_image_once_and_give_the_same_memory(tokenizer):
    m = make(tokenizer, freeze_encoders=True)
    b = batch()
    for i, r in enumerate(b["rows"]):
        r["file_name"] = f"images/{i}.png"
    first, _ = m.memory(b)
    assert len(m.towers["image"].cache) > 0  # the features were kept, keyed by file
    cached, _ = m.memory({**b, "image": torch.zeros_like(b["image"])})  # same files: read from the cache
    assert torch.allclose(first, cached)
    assert all(not p.requires_grad for p in m.towers["image"].encoder.parameters())
