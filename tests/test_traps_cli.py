"""The traps a new user fell into on the command line (issue 13), each closed: unknown splits,
``search -k 0``, a subset of demo steps, search hits named by file, a Hugging Face CLIP's own
preprocessing, ``--version``, ``generate text`` for a file of one's own, and integer labels."""

import json
import logging
import shutil
from importlib.metadata import version
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app

WORDS = ["zero", "one", "two", "three"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def one_line_error(result, *words):
    """A clear refusal: exit status 2, no traceback, every word in the message."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError | KeyError)
    assert "error:" in result.output, result.output
    for word in words:
        assert word in result.output, (word, result.output)


def write_digits(folder, n=12, size=(31, 23), split="test", ids=False):
    """A user's folder: images, captions that say the class in words, integer labels, no ids."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            name = f"images/{i}.png"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
            row = {"file_name": name, "text": f"a digit {WORDS[i % 4]}", "label": i % 4, "split": split}
            f.write(json.dumps({"id": f"d{i}", **row} if ids else row) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.clip import ContrastiveConfig, ContrastiveModel

    tokenizer = TextTokenizer.train([f"a digit {w}" for w in WORDS] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = ContrastiveModel(ContrastiveConfig(towers={"image": {"type": "cnn", "preset": "tiny"},
                                                       "text": {"type": "text", "preset": "tiny"}}, embed_dim=16),
                             tokenizer)
    return model.save_pretrained(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"))


# ---- --version ----


def test_version_prints_the_installed_version():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"polymodal {version('polymodal')}"


# ---- unknown splits ----


def test_eval_of_an_unknown_split_lists_the_splits_present(tiny_clip, digits):
    one_line_error(invoke("eval", tiny_clip, "--data", digits, "--split", "tset"), "'tset'", "test 12")


def test_eval_when_no_default_split_is_present_says_which_exist(tiny_clip, tmp_path):
    data = write_digits(tmp_path / "d", split="train")
    one_line_error(invoke("eval", tiny_clip, "--data", data), "val, test, test_novel", "train 12", "--split")


def test_index_build_of_an_unknown_split_is_an_error(tiny_clip, digits, tmp_path):
    one_line_error(invoke("index", "build", tiny_clip, digits, tmp_path / "idx", "--split", "tset"), "test 12")


# ---- search ----


@pytest.fixture(scope="module")
def digits_index(tiny_clip, digits, tmp_path_factory):
    index = tmp_path_factory.mktemp("index") / "idx"
    result = invoke("index", "build", tiny_clip, digits, index)
    assert result.exit_code == 0, result.output
    return index


def test_search_with_k_zero_is_a_one_line_error(digits_index, tmp_path):
    one_line_error(invoke("search", digits_index, "a digit one", "-k", "0", "--sheet", tmp_path / "s.png"),
                   "-k must be at least 1")


def test_vector_index_refuses_k_below_one(digits_index):
    from polymodal.index.vectors import VectorIndex

    index = VectorIndex.open(digits_index)
    with pytest.raises(ValueError, match="at least 1"):
        index.search(np.zeros((1, index.index.d), dtype=np.float32), 0)


def test_search_hits_of_a_folder_without_ids_show_their_files(digits_index, tmp_path):
    result = invoke("search", digits_index, "a digit one", "-k", "12", "--sheet", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    assert "None" not in result.output
    shown = {f"images/{i}.png" for i in range(12) if f"images/{i}.png " in result.output}
    assert len(shown) == 12, result.output


def test_search_hits_show_the_id_when_rows_have_one(tiny_clip, tmp_path):
    data = write_digits(tmp_path / "d", ids=True)
    assert invoke("index", "build", tiny_clip, data, tmp_path / "idx").exit_code == 0
    result = invoke("search", tmp_path / "idx", "a digit one", "-k", "3", "--sheet", tmp_path / "s.png")
    assert result.exit_code == 0 and result.output.count(" d") >= 3, result.output


# ---- a subset of the demo's steps ----


def test_demo_step_without_what_it_needs_says_which_steps_to_add(tmp_path):
    one_line_error(invoke("demo", "--out", tmp_path, "--steps", "understand"), "--steps world,clip,understand")


def test_demo_step_reuses_the_earlier_runs_world_and_model(small_world, tiny_clip, tmp_path):
    shutil.copytree(small_world, tmp_path / "shapes")
    shutil.copytree(tiny_clip, tmp_path / "clip" / "model")
    result = invoke("demo", "--out", tmp_path, "--steps", "eval")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1), result.output  # 1: an untrained CLIP is below its floor
    assert "reusing" in result.output and str(tmp_path / "clip" / "model") in result.output.replace("\n", "")
    metrics = json.loads((tmp_path / "clip" / "metrics.json").read_text())
    assert "text->image R@5" in metrics["test"]


# ---- a Hugging Face CLIP's own preprocessing ----

MEAN, STD = [0.1, 0.2, 0.3], [0.2, 0.3, 0.4]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf-clip")
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(["a", "digit", *WORDS])}}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, pad_token_id=0,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 16},
        "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD, "resample": 3}))
    return folder, model


def hf_pixels(folder, paths):
    """What transformers feeds its CLIP for these image files."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(str(folder))
    return processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]


def hf_image_embeddings(model, pixels):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


def test_hf_clip_search_and_index_use_the_folders_own_preprocessing(hf_clip, digits, tmp_path):
    from polymodal.index.build import embed_query
    from polymodal.index.vectors import VectorIndex
    from polymodal.models import load_model

    folder, hf = hf_clip
    files = [digits / "images" / f"{i}.png" for i in range(12)]
    expected = hf_image_embeddings(hf, hf_pixels(folder, files))
    model = load_model(folder, task="embed")
    query = embed_query(model, image=str(files[3]))  # what `search --image` embeds
    assert np.allclose(query[0], expected[3].numpy(), atol=1e-5)

    result = invoke("index", "build", folder, digits, tmp_path / "idx")
    assert result.exit_code == 0, result.output
    index = VectorIndex.open(tmp_path / "idx", mmap=False)
    stored = {item["file"]: index.index.reconstruct(i) for i, item in enumerate(index.items)}
    for i, f in enumerate(files):
        assert np.allclose(stored[str(f.resolve())], expected[i].numpy(), atol=1e-5), f


def test_hf_clip_eval_feeds_the_folders_own_preprocessing(hf_clip, digits, monkeypatch):
    import polymodal.eval.contrastive as contrastive

    folder, _ = hf_clip
    seen = {}
    real = contrastive.embed_items

    def spy(model, items, fields, modalities):
        seen["images"] = torch.stack([item["image"] for item in items])
        seen["files"] = [digits / item["row"]["file_name"] for item in items]
        return real(model, items, fields, modalities)

    monkeypatch.setattr(contrastive, "embed_items", spy)
    result = invoke("eval", folder, "--data", digits, "--split", "test", "--classes", ",".join(WORDS))
    assert result.exit_code == 0, result.output
    assert torch.allclose(seen["images"], hf_pixels(folder, seen["files"]), atol=1e-5)


def test_hf_clip_preprocessor_that_does_not_fit_the_model_is_named(hf_clip, tmp_path):
    folder, _ = hf_clip
    copy = tmp_path / "clip"
    shutil.copytree(folder, copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224, "image_mean": MEAN, "image_std": STD}))
    from polymodal.errors import InputError
    from polymodal.models import load_model

    with pytest.raises(InputError, match="preprocessor_config.json.*224x224"):
        load_model(copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.2, 0.0, 0.4]}))
    with pytest.raises(InputError, match="image_std"):
        load_model(copy)


# ---- generate text for a file of one's own ----


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    import soundfile

    from polymodal.modalities.text import TextTokenizer
    from polymodal.models.captioner import Captioner, CaptionerConfig

    root = tmp_path_factory.mktemp("captioners")
    tokenizer = TextTokenizer.train(["a red circle", "a blue square", "what colour is it", "red", "blue"] * 5,
                                    vocab_size=300)
    torch.manual_seed(0)
    for name, encoders in (("image", {"image": {"type": "cnn", "preset": "tiny"}}),
                           ("audio", {"audio": {"type": "audio", "preset": "tiny"}})):
        config = CaptionerConfig(encoders=encoders, width=32, depth=1, heads=2, context_length=24,
                                 vocab_size=tokenizer.vocab_size)
        Captioner(config, tokenizer).save_pretrained(root / name)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "photo.png")
    soundfile.write(root / "speech.wav", (np.random.default_rng(2).standard_normal(8000) * 0.1).astype("float32"),
                    16000)
    return root


def printed(text):
    """Text as a terminal shows it (an untrained model writes control characters too)."""
    return "".join(c for c in text if c.isprintable()).strip()


def expected_text(folder, field, value, question=None):
    from polymodal.models import load_model

    model = load_model(folder)
    mask = {f"{field}_mask": torch.ones(1, value.shape[-1], dtype=torch.bool)} if field == "audio" else {}
    return printed(model.generate({field: value[None], **mask}, [question] if question else None)[0])


def test_generate_text_captions_and_answers_about_an_image(captioners):
    from polymodal.modalities.image import ImageTransform, load_image

    pixels = ImageTransform(64)(load_image(captioners / "photo.png"))
    result = invoke("generate", "text", captioners / "image", "--image", captioners / "photo.png")
    assert result.exit_code == 0, result.output
    assert printed(result.output) == expected_text(captioners / "image", "image", pixels)
    result = invoke("generate", "text", captioners / "image", "--image", captioners / "photo.png",
                    "--question", "what colour is it")
    assert result.exit_code == 0, result.output
    assert printed(result.output) == expected_text(captioners / "image", "image", pixels, "what colour is it")


def test_generate_text_from_audio(captioners):
    from polymodal.modalities.audio import load_audio, log_mel_spectrogram

    mel = log_mel_spectrogram(load_audio(captioners / "speech.wav"))
    result = invoke("generate", "text", captioners / "audio", "--audio", captioners / "speech.wav")
    assert result.exit_code == 0, result.output
    assert printed(result.output) == expected_text(captioners / "audio", "audio", mel)


def test_generate_text_refusals_are_one_line(captioners, tiny_clip, tmp_path):
    photo, speech = captioners / "photo.png", captioners / "speech.wav"
    one_line_error(invoke("generate", "text", tiny_clip, "--image", photo), "cannot caption", "it can: embed")
    one_line_error(invoke("generate", "text", tiny_clip, "--image", photo, "--question", "what?"), "cannot answer")
    one_line_error(invoke("generate", "text", captioners / "image", "--audio", speech), "reads image", "--image")
    one_line_error(invoke("generate", "text", captioners / "audio", "--image", photo), "reads audio", "--audio")
    one_line_error(invoke("generate", "text", captioners / "image", "--image", tmp_path / "nope.png"),
                   "nope.png", "not found")
    one_line_error(invoke("generate", "text", captioners / "image", "--image", speech), "speech.wav")
    one_line_error(invoke("generate", "text", captioners / "image"), "--image FILE or --audio FILE")


# ---- integer labels ----


class WordModel(torch.nn.Module):
    """A contrastive model that knows the classes in words only: image i sits on axis label(i);
    a text on the axis of the class word it contains, or on a spare axis when it has none."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(towers={"image": {}, "text": {}}, pairs=[("image", "text")])

    def tower_reading(self, kind):
        return kind if kind in ("image", "text") else None

    def embed_text(self, texts, modality="text"):
        out = torch.zeros(len(texts), len(WORDS) + 1)
        for i, t in enumerate(texts):
            hit = [j for j, w in enumerate(WORDS) if w in t.split() or f"{w}." in t.split()]
            out[i, hit[0] if hit else len(WORDS)] = 1.0
        return out

    def embed(self, modality, batch):
        if modality == "text":
            return self.embed_text(batch["text"])
        return torch.nn.functional.one_hot(batch["image"][:, 0, 0, 0].long(), len(WORDS) + 1).float()


def label_items(labels):
    return [{"image": torch.full((3, 4, 4), float(label)), "text": f"a digit {WORDS[label]}",
             "row": {"label": label}} for label in labels]


def test_integer_labels_are_named_by_index(caplog):
    from polymodal.eval.contrastive import contrastive_metrics

    items = label_items([0, 1, 2, 3, 2, 1])
    named = contrastive_metrics(WordModel(), items, {"image": "image", "text": "text"}, class_names=WORDS)
    assert named["zero-shot label"] == 1.0
    with caplog.at_level(logging.WARNING, logger="polymodal.eval"):
        bare = contrastive_metrics(WordModel(), items, {"image": "image", "text": "text"})
    assert bare["zero-shot label"] < 0.5  # prompted "0".."3": the model cannot tell them apart
    assert "integers" in caplog.text and "--classes" in caplog.text and "classes.txt" in caplog.text


def test_label_names_out_of_range_or_unknown_are_errors():
    from polymodal.eval.zeroshot import label_classes

    assert label_classes([0, "2", 1], ["zero", "one", "two"]) == (["zero", "two", "one"], ["zero", "one", "two"])
    with pytest.raises(ValueError, match="label 3 has no name"):
        label_classes([0, 3], ["zero", "one"])
    with pytest.raises(ValueError, match="'four'"):
        label_classes(["one", "four"], ["zero", "one"])


def test_eval_names_integer_labels_from_classes_or_the_folders_names_file(tiny_clip, tmp_path, caplog):
    data = write_digits(tmp_path / "d")

    def run(*extra):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="polymodal.eval"):
            result = invoke("eval", tiny_clip, "--data", data, "--split", "test", *extra)
        assert result.exit_code == 0, result.output
        return result, "holds integers" in caplog.text

    assert run()[1]  # no names: warned
    assert not run("--classes", ",".join(WORDS))[1]
    one_line_error(invoke("eval", tiny_clip, "--data", data, "--split", "test", "--classes", "zero,one"),
                   "label 2 has no name")
    (data / "classes.txt").write_text("\n".join(WORDS) + "\n")
    found, warned = run()
    assert not warned and "classes.txt" in found.output.replace("\n", "")
