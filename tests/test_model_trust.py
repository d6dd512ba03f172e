"""A saved model folder is input from a stranger: every way of tampering with it (its config, its
nested encoder specs, its weights, its tokenizer, the folders of its parts, a Hugging Face CLIP
folder) ends in one line naming the file and the setting, through ``load_model`` and through the
command line, and none of them costs more memory than a tiny model does. Training checkpoints are
unpickled weights-only: a pickle that would run code is refused, not run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PEAK_BYTES
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.errors import InputError
from polymodal.modalities.text import TextTokenizer
from polymodal.models import load_model
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.captioner import Captioner, CaptionerConfig
from polymodal.models.clip import ContrastiveConfig, ContrastiveModel
from polymodal.models.family import MAX_PARAMS_ENV, RANGES, parameter_count
from polymodal.models.text_to_image import TextToImage, TextToImageConfig, clip_text_tower

TEXTS = ["a small red circle in the top left", "a large blue square in the center", "two green stars"] * 4
TINY_VIT = {"type": "vit", "preset": "tiny", "image_size": 16, "patch_size": 8}
TINY_TEXT = {"type": "text", "preset": "tiny", "context_length": 16}
TINY_UNET = {"type": "unet", "channels": [16, 32], "attention": [False, True], "heads": 2, "groups": 4}
MEMORY_LIMIT_MB = 1024  # a Python with torch and polymodal imported takes ~500 MB


# ---- a few tiny real models, saved once ----------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Saved folders of a contrastive model, a captioner, a text-to-image model with both parts
    in subfolders (a latent autoencoder and a contrastive model's text tower) and a Hugging Face
    CLIP folder."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    clip = ContrastiveModel(ContrastiveConfig(towers={"image": TINY_VIT, "text": TINY_TEXT}, embed_dim=16), tokenizer)
    clip.save_pretrained(root / "contrastive")
    Captioner(CaptionerConfig(encoders={"image": TINY_VIT}, width=32, depth=1, heads=2, context_length=16,
                              max_memory_tokens=16, vocab_size=tokenizer.vocab_size), tokenizer
              ).save_pretrained(root / "captioner")
    autoencoder = Autoencoder(AutoencoderConfig(channels=(8, 16), latent_channels=4, image_size=16))
    autoencoder.save_pretrained(root / "autoencoder")
    TextToImage(TextToImageConfig(denoiser=TINY_UNET, text={"type": "clip", "path": str(root / "contrastive")},
                                  image_size=16, autoencoder=str(root / "autoencoder"), latent_scale=0.5),
                None, autoencoder, clip_text_tower(str(root / "contrastive"))).save_pretrained(root / "text_to_image")
    hf_clip(root / "hf_clip")
    return {name: root / name for name in ("contrastive", "captioner", "text_to_image", "hf_clip")}


def hf_clip(folder: Path) -> None:
    """A tiny transformers ``CLIPModel`` folder with its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["a", "red", "circle", "blue", "square"]
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}, "<s>": 7, "</s>": 8}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=7, eos_token_id=8),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)


def test_the_saved_models_load(saved):
    """The corpus below starts from folders that load: each failure is the tampering's."""
    for name, folder in saved.items():
        model = load_model(folder)
        assert not model.training and parameter_count(model) < 10_000_000, name


# ---- tampering -----------------------------------------------------------------------------------


def config(file: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """Rewrite the JSON ``file`` of the folder through ``change(data)`` (in place, or returning new data)."""
    def tamper(folder: Path) -> None:
        path = folder / file
        data = json.loads(path.read_text())
        new = change(data)
        path.write_text(json.dumps(data if new is None else new, allow_nan=True))
    return tamper


def text(file: str, content: str | bytes) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        path = folder / file
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tamper


def remove(file: str) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        target = folder / file
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return tamper


def truncate(file: str, size: int | None = None, cut: int = 0) -> Callable[[Path], None]:
    """Cut ``file`` to ``size`` bytes (or ``cut`` bytes off its end); a size past the end makes a
    sparse file of that size, which costs no disk."""
    def tamper(folder: Path) -> None:
        path = folder / file
        with open(path, "r+b") as f:
            f.truncate(size if size is not None else path.stat().st_size - cut)
    return tamper


def weights(file: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        path = folder / file
        save_file(change(load_file(str(path))), str(path))
    return tamper


def renamed(state: dict) -> dict:
    key = sorted(state)[0]
    return {**{k: v for k, v in state.items() if k != key}, key + "_renamed": state[key]}


def wider(state: dict) -> dict:
    key = next(k for k, v in sorted(state.items()) if v.ndim >= 1 and v.is_floating_point())
    return {**state, key: torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)}


def as_integers(state: dict) -> dict:
    key = next(k for k, v in sorted(state.items()) if v.is_floating_point())
    return {**state, key: state[key].long()}


def huge_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def tokenizer_change(change: Callable[[dict], None], file: str = "tokenizer.json") -> Callable[[Path], None]:
    return config(file, change)


def add_token(data: dict) -> None:
    data["model"]["vocab"]["zzz"] = 2_000_000_000  # an id far past the vocabulary


def regex_pre_tokenizer(data: dict) -> None:
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}


def fixed_padding(data: dict) -> None:
    data["padding"] = {"strategy": {"Fixed": 1_000_000_000}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}


def no_eos(data: dict) -> None:
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<eos>"]
    data["model"]["vocab"].pop("<eos>")


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# (base folder, tampering, what the one-line error names)
CASES: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    # the config: JSON itself
    "invalid JSON": ("captioner", text("config.json", '{"model_type": "captioner", "width": '), ("config.json", "JSON")),
    "empty config": ("captioner", text("config.json", ""), ("config.json", "JSON")),
    "not UTF-8": ("captioner", text("config.json", b'{"model_type": "\xff"}'), ("config.json", "JSON")),
    "NaN": ("captioner", text("config.json", '{"model_type": "captioner", "width": NaN}'), ("config.json", "NaN")),
    "Infinity": ("contrastive", text("config.json", '{"model_type": "contrastive", "init_temperature": -Infinity}'),
                 ("config.json", "Infinity")),
    "1e999": ("contrastive", text("config.json", '{"model_type": "contrastive", "max_logit_scale": 1e999}'),
              ("config.json", "max_logit_scale", "finite")),
    "nested 100,000 deep": ("captioner", text("config.json", deep_json()), ("config.json", "JSON")),
    "a 5,000-digit integer": ("captioner", text("config.json", '{"model_type": "captioner", "depth": 1'
                                                               + "0" * 5000 + "}"), ("config.json",)),
    "a list, not an object": ("captioner", text("config.json", "[1, 2]"), ("config.json", "JSON object")),
    "a 17 MB config": ("captioner", truncate("config.json", 17 << 20), ("config.json", "bytes")),
    "no config": ("captioner", remove("config.json"), ("config.json",)),
    "config is a folder": ("captioner", lambda f: (f / "config.json").unlink() or (f / "config.json").mkdir(),
                           ("config.json",)),
    "another model type": ("captioner", config("config.json", lambda d: d.update(model_type="autoencoder")),
                           ("config.json", "encoders", "unknown")),
    "a part of another type": ("text_to_image", config("autoencoder/config.json",
                                                       lambda d: d.update(model_type="detector")),
                               ("autoencoder/config.json", "'detector' model")),
    "no model type": ("captioner", config("config.json", lambda d: d.pop("model_type") and None),
                      ("config.json", "None")),
    # the config: settings
    "unknown key": ("captioner", config("config.json", lambda d: d.update(colour="red")),
                    ("config.json", "colour", "unknown")),
    "unknown nested key": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(depht=2)),
                           ("config.json", "towers.image.depht", "unknown")),
    "depth 10^6": ("captioner", config("config.json", lambda d: d.update(depth=10**6)), ("config.json", "depth")),
    "nested depth 10^6": ("contrastive", config("config.json", lambda d: d["towers"]["text"].update(depth=10**6)),
                          ("config.json", "towers.text.depth")),
    "width 10^7": ("captioner", config("config.json", lambda d: d.update(width=10**7)), ("config.json", "width")),
    "width 10^5 nested": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(width=10**5)),
                          ("config.json", "towers.image.width")),
    "negative size": ("contrastive", config("config.json", lambda d: d.update(embed_dim=-16)),
                      ("config.json", "embed_dim")),
    "zero heads": ("captioner", config("config.json", lambda d: d.update(heads=0)), ("config.json", "heads")),
    "heads that do not divide the width": ("contrastive", config("config.json",
                                                                 lambda d: d["towers"]["text"].update(width=33)),
                                           ("config.json", "towers.text.heads")),
    "string for an int": ("captioner", config("config.json", lambda d: d.update(width="32")),
                          ("config.json", "width", "string")),
    "boolean for an int": ("captioner", config("config.json", lambda d: d.update(depth=True)),
                           ("config.json", "depth", "boolean")),
    "float for an int": ("captioner", config("config.json", lambda d: d.update(context_length=16.5)),
                         ("config.json", "context_length")),
    "1e308 for a float": ("contrastive", config("config.json",
                                                lambda d: d["towers"]["text"].update(mlp_ratio=1e308)),
                          ("config.json", "towers.text.mlp_ratio")),
    "null for an int": ("captioner", config("config.json", lambda d: d.update(width=None)), ("config.json", "width")),
    "list for a dict": ("contrastive", config("config.json", lambda d: d.update(towers=[TINY_VIT, TINY_TEXT])),
                        ("config.json", "towers")),
    "list for an encoder spec": ("contrastive", config("config.json", lambda d: d["towers"].update(image=[1, 2])),
                                 ("config.json", "towers.image")),
    "dict for a list": ("contrastive", config("config.json", lambda d: d.update(pairs={"image": "text"})),
                        ("config.json", "pairs")),
    "a pair of three": ("contrastive", config("config.json", lambda d: d.update(pairs=[["image", "text", "x"]])),
                        ("config.json", "pairs[0]")),
    "unknown encoder type": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(type="rnn")),
                             ("config.json", "towers.image.type")),
    "unknown preset": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(preset="huge")),
                       ("config.json", "towers.image.preset")),
    "a thousand towers": ("contrastive", config("config.json", lambda d: d["towers"].update(
        {f"t{i}": TINY_VIT for i in range(1000)})), ("config.json", "towers")),
    "a video inside a video": ("contrastive", config("config.json", lambda d: d["towers"].update(
        image={"type": "video", "frames": {"type": "video", "frames": {"type": "vit"}}})),
                               ("config.json", "towers.image.frames.type")),
    "a video's audio too deep": ("contrastive", config("config.json", lambda d: d["towers"].update(
        image={"type": "video", "audio": {"type": "audio", "depth": 10**6}})),
                                 ("config.json", "towers.image.audio.depth", "1,000,000")),
    "a MiniLM at a path": ("contrastive", config("config.json", lambda d: d["towers"].update(
        text={"type": "minilm", "path": "/etc"})), ("config.json", "towers.text.path")),
    "a key with a line break": ("captioner", config("config.json", lambda d: d.update({"x\ny": 1})),
                                ("config.json", "unknown", "'x\\ny'")),
    "a preset that is a list": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(
        preset=["tiny"])), ("config.json", "towers.image.preset")),
    "a string of 100,000 characters": ("captioner", config("config.json", lambda d: d.update(
        caption_column="x" * 100_000)), ("config.json", "caption_column", "100,000")),
    "a locked tower that is not there": ("contrastive", config("config.json", lambda d: d.update(locked=["audio"])),
                                         ("config.json", "audio")),
    "a tokenizer of another size": ("captioner", config("config.json", lambda d: d.update(vocab_size=301)),
                                    ("config.json", "vocab_size")),
    "tasks that do not exist": ("captioner", config("config.json", lambda d: d.update(tasks={"dance": 1.0})),
                                ("config.json", "dance")),
    "parameters past the limit": ("captioner", config("config.json", lambda d: d.update(
        width=16_384, depth=256, heads=16)), ("config.json", "parameters", "limit")),
    "a position table past the limit": ("contrastive", config("config.json", lambda d: d["towers"]["image"].update(
        image_size=4096, patch_size=1, width=64)), ("config.json", "parameters", "limit")),
    # the weights
    "no weights": ("captioner", remove("model.safetensors"), ("model.safetensors", "missing")),
    "truncated weights": ("captioner", truncate("model.safetensors", cut=100), ("model.safetensors",)),
    "weights cut to 20 bytes": ("contrastive", truncate("model.safetensors", 20), ("model.safetensors",)),
    "empty weights": ("contrastive", truncate("model.safetensors", 0), ("model.safetensors",)),
    "a header of 2^40 bytes": ("contrastive", huge_header, ("model.safetensors",)),
    "garbage weights": ("captioner", text("model.safetensors", b"\x80" * 4096), ("model.safetensors",)),
    "a shape mismatch": ("captioner", weights("model.safetensors", wider), ("model.safetensors", "shape")),
    "a renamed tensor": ("contrastive", weights("model.safetensors", renamed),
                         ("model.safetensors", "missing", "unexpected")),
    "an extra tensor": ("captioner", weights("model.safetensors", lambda s: {**s, "extra": torch.zeros(3)}),
                        ("model.safetensors", "extra")),
    "integers for floats": ("captioner", weights("model.safetensors", as_integers), ("model.safetensors", "I64")),
    "weights that fit another config": ("contrastive", config("config.json", lambda d: d.update(embed_dim=24)),
                                        ("model.safetensors", "shape")),
    # the tokenizer
    "invalid tokenizer JSON": ("captioner", text("tokenizer.json", "{not json"), ("tokenizer.json", "JSON")),
    "no tokenizer": ("captioner", remove("tokenizer.json"), ("tokenizer.json",)),
    "a token id past the vocabulary": ("captioner", tokenizer_change(add_token), ("tokenizer.json", "2000000000")),
    "a regular expression": ("contrastive", tokenizer_change(regex_pre_tokenizer),
                             ("tokenizer.json", "regular expression")),
    "padding to 10^9": ("captioner", tokenizer_change(fixed_padding), ("tokenizer.json", "pad")),
    "a 65 MB tokenizer": ("captioner", truncate("tokenizer.json", 65 << 20), ("tokenizer.json", "bytes")),
    "no end-of-text token": ("captioner", tokenizer_change(no_eos), ("tokenizer.json", "<eos>")),
    # the parts of a text-to-image model, and its own nested specs
    "denoiser depth": ("text_to_image", config("config.json", lambda d: d["denoiser"].update(blocks=10**6)),
                       ("config.json", "denoiser.blocks")),
    "denoiser levels": ("text_to_image", config("config.json", lambda d: d["denoiser"].update(
        channels=[16] * 5000, attention=[False] * 5000)), ("config.json", "denoiser.channels")),
    "diffusion steps": ("text_to_image", config("config.json", lambda d: d["diffusion"].update(
        train_steps=10**9)), ("config.json", "diffusion.train_steps")),
    "unknown diffusion key": ("text_to_image", config("config.json", lambda d: d["diffusion"].update(steps=5)),
                              ("config.json", "diffusion.steps")),
    "text spec as a list": ("text_to_image", config("config.json", lambda d: d.update(text=["clip"])),
                            ("config.json", "text")),
    "NaN dropout": ("text_to_image", config("config.json", lambda d: d.update(condition_dropout=float("nan"))),
                    ("config.json", "NaN")),
    "autoencoder config": ("text_to_image", config("autoencoder/config.json", lambda d: d.update(
        channels=[8, 10**6])), ("autoencoder/config.json", "channels[1]")),
    "autoencoder weights truncated": ("text_to_image", truncate("autoencoder/model.safetensors", cut=64),
                                      ("autoencoder/model.safetensors",)),
    "autoencoder weights of another shape": ("text_to_image", weights("autoencoder/model.safetensors", wider),
                                             ("autoencoder/model.safetensors", "shape")),
    "no autoencoder": ("text_to_image", remove("autoencoder"), ("autoencoder",)),
    "text encoder depth": ("text_to_image", config("text_encoder/config.json", lambda d: d.update(depth=10**6)),
                           ("text_encoder/config.json", "depth")),
    "text encoder unknown key": ("text_to_image", config("text_encoder/config.json", lambda d: d.update(x=1)),
                                 ("text_encoder/config.json", "x")),
    "text encoder tokenizer": ("text_to_image", text("text_encoder/tokenizer.json", "[]"),
                               ("text_encoder/tokenizer.json",)),
    "text encoder vocabulary": ("text_to_image", config("text_encoder/config.json", lambda d: d.update(
        vocab_size=5000)), ("text_encoder/config.json", "5000")),
    "text encoder weights": ("text_to_image", remove("text_encoder/model.safetensors"),
                             ("text_encoder", "model.safetensors")),
    # a Hugging Face CLIP folder
    "CLIP depth 10^6": ("hf_clip", config("config.json", lambda d: d["vision_config"].update(
        num_hidden_layers=10**6)), ("config.json", "vision_config.num_hidden_layers")),
    "CLIP width as a string": ("hf_clip", config("config.json", lambda d: d["text_config"].update(
        hidden_size="16")), ("config.json", "hidden_size")),
    "CLIP past the limit": ("hf_clip", config("config.json", lambda d: d["vision_config"].update(
        hidden_size=8192, intermediate_size=32_768, num_hidden_layers=200)), ("config.json", "parameters", "limit")),
    "CLIP weights as a pickle": ("hf_clip", lambda f: os.replace(f / "model.safetensors", f / "pytorch_model.bin"),
                                 ("model.safetensors", "pickle")),
    "CLIP weights truncated": ("hf_clip", truncate("model.safetensors", cut=10), ("model.safetensors",)),
    "CLIP weights of another shape": ("hf_clip", weights("model.safetensors", wider), ("model.safetensors", "shape")),
    "CLIP activation": ("hf_clip", config("config.json", lambda d: d["vision_config"].update(hidden_act="os.system")),
                        ("config.json", "hidden_act")),
}


@pytest.fixture(scope="module")
def corpus(saved, tmp_path_factory) -> dict[str, Path]:
    """Every tampered folder, each a copy of its base folder."""
    root = tmp_path_factory.mktemp("tampered")
    folders = {}
    for i, (name, (base, tamper, _)) in enumerate(CASES.items()):
        folder = root / f"{i:02d}-{base}"
        shutil.copytree(saved[base], folder)
        tamper(folder)
        folders[name] = folder
    return folders


def check_message(message: str, name: str, folder: Path) -> None:
    """One line that names the file (or folder) and the setting or problem of case ``name``."""
    assert "\n" not in message.strip() and len(message) < 600, f"{name}: {message!r}"
    assert str(folder) in message, f"{name}: the folder is not named: {message}"
    for needle in CASES[name][2]:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_load_model_gives_one_line_naming_the_file_and_field(corpus, name):
    with pytest.raises(InputError) as caught:
        load_model(corpus[name])
    check_message(str(caught.value), name, corpus[name])


CLI_CASES = ["depth 10^6", "unknown nested key", "negative size", "string for an int", "a shape mismatch",
             "truncated weights", "invalid JSON", "a token id past the vocabulary", "parameters past the limit"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A data set of two images with captions, in a split ``val``: the model is what fails."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {colour} square", "split": "val"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("name", CLI_CASES)
def test_eval_exits_2_with_one_line(corpus, data, name):
    result = CliRunner().invoke(app, ["eval", str(corpus[name]), "--data", str(data), "--split", "val"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    check_message(lines[0].removeprefix("error:").strip(), name, corpus[name])


@pytest.mark.parametrize("name", ["denoiser depth", "autoencoder config", "text encoder weights"])
def test_generate_image_exits_2_with_one_line(corpus, tmp_path, name):
    result = CliRunner().invoke(app, ["generate", "image", str(corpus[name]), "a red circle", "--out",
                                      str(tmp_path / "x.png")], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    check_message(lines[0].removeprefix("error:").strip(), name, corpus[name])
    assert not (tmp_path / "x.png").exists()


LOAD_ALL = PEAK_BYTES + """
import json, sys
from polymodal.errors import InputError
from polymodal.models import load_model
errors = {}
for name, folder in json.loads(sys.argv[1]).items():
    try:
        load_model(folder)
        errors[name] = None
    except InputError as e:
        errors[name] = str(e)
print(json.dumps({"errors": errors, "peak_mb": peak_bytes() / 2**20}))
"""


@pytest.mark.slow  # a fresh Python with torch: 10-45 s on a busy 2-core machine
def test_the_whole_corpus_loads_in_one_process_within_a_gigabyte(corpus):
    """The process's peak resident memory (VmHWM): had any case allocated what it asked for (a depth of a
    million blocks, a 16384-pixel position table), the peak would show it."""
    out = subprocess.run([sys.executable, "-c", LOAD_ALL, json.dumps({k: str(v) for k, v in corpus.items()})],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name, message in report["errors"].items():
        assert message is not None, f"{name} loaded"
        check_message(message, name, corpus[name])
    assert report["peak_mb"] < MEMORY_LIMIT_MB, report["peak_mb"]


@pytest.mark.slow  # a fresh Python with torch: 10-45 s on a busy 2-core machine
def test_the_command_line_process_exits_2_with_one_line_on_stderr(corpus, data):
    """The real command, in its own process: exit status 2 and one line on stderr."""
    polymodal = Path(sys.executable).parent / "polymodal"
    out = subprocess.run([str(polymodal), "eval", str(corpus["nested depth 10^6"]), "--data", str(data),
                          "--split", "val"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    check_message(lines[0].removeprefix("error:").strip(), "nested depth 10^6", corpus["nested depth 10^6"])


# ---- the limit -----------------------------------------------------------------------------------


def test_the_limit_is_set_by_argument_and_environment(saved, monkeypatch):
    folder = saved["captioner"]
    size = parameter_count(load_model(folder))
    with pytest.raises(InputError, match=f"{size:,} parameters, more than the limit of {size - 1:,}"):
        load_model(folder, max_params=size - 1)
    assert parameter_count(load_model(folder, max_params=size)) == size
    monkeypatch.setenv(MAX_PARAMS_ENV, str(size - 1))
    with pytest.raises(InputError, match=MAX_PARAMS_ENV):
        load_model(folder)
    assert parameter_count(load_model(folder, max_params=size)) == size  # the argument wins
    assert parameter_count(load_model(folder, max_params=2e9)) == size
    monkeypatch.setenv(MAX_PARAMS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_PARAMS_ENV):
        load_model(folder)


def test_a_locked_minilm_is_counted_without_building_it(tmp_path):
    """A pretrained encoder cannot be built on the meta device: it is counted from its config,
    and the rest of the model still is built there."""
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    model = ContrastiveModel(ContrastiveConfig(towers={"image": TINY_VIT, "text": {"type": "minilm"}},
                                               embed_dim=16, locked=["text"]), tokenizer)
    model.save_pretrained(tmp_path / "lit")
    size = parameter_count(model)
    assert parameter_count(load_model(tmp_path / "lit")) == size
    with pytest.raises(InputError, match="more than the limit"):
        load_model(tmp_path / "lit", max_params=size - 30_000)  # the estimate is within a few thousand

    t2i = TextToImage(TextToImageConfig(denoiser=TINY_UNET, text={"type": "minilm"}, image_size=16))
    t2i.save_pretrained(tmp_path / "t2i")
    assert parameter_count(load_model(tmp_path / "t2i")) == parameter_count(t2i)


def test_ranges_cover_every_numeric_setting_of_every_config():
    """Each int or float setting of every config dataclass has a range chosen for it, not the
    fallback, unless the fallback fits (a new setting gets a thought)."""
    import dataclasses
    import typing

    from polymodal.models.autoencoder import AutoencoderConfig as A
    from polymodal.models.detector import DetectorConfig
    from polymodal.models.fusion import FusionConfig
    from polymodal.nn.diffusion import DiffusionConfig
    from polymodal.nn.dit import DiTConfig
    from polymodal.nn.encoders import ENCODERS
    from polymodal.nn.unet import UNetConfig

    fallback_ok = {"mel_mean"}  # a standardising constant: any moderate number
    classes = [ContrastiveConfig, CaptionerConfig, FusionConfig, DetectorConfig, A, TextToImageConfig, UNetConfig,
               DiTConfig, DiffusionConfig, *(c for c, _ in ENCODERS.values())]
    uncovered = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = str(hints[f.name])
            numeric = hints[f.name] in (int, float) or any(t in text for t in ("int", "float"))
            if numeric and f.name not in RANGES and f.name not in fallback_ok:
                uncovered.append(f"{cls.__name__}.{f.name}")
    assert not uncovered, uncovered


# ---- checkpoints ---------------------------------------------------------------------------------


class RunsCode:
    """A pickle that, unpickled without restrictions, would create a file (any code could run)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_checkpoints_load_weights_only_and_refuse_code(tmp_path):
    from polymodal.train.run import atomic_checkpoint_io, load_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "loops": {"fit": [1.5, "x", None]}}, good)
    assert load_checkpoint(good)["global_step"] == 3
    io = atomic_checkpoint_io()
    assert torch.equal(io.load_checkpoint(good)["state_dict"]["w"], torch.ones(2))

    sentinel = tmp_path / "ran"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "callbacks": RunsCode(sentinel)}, bad)
    for load in (lambda: load_checkpoint(bad), lambda: io.load_checkpoint(bad, weights_only=False)):
        with pytest.raises(InputError, match="not a weights-only") as caught:
            load()
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    assert not sentinel.exists()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated.ckpt"):
        load_checkpoint(truncated)


class Line(torch.nn.Module):
    """The smallest model the trainer takes: ``loss(batch)`` of a linear fit."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": (self.linear(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()}


def test_resume_through_lightning_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """``polymodal train --resume`` hands Lightning the checkpoint; Lightning reads it through
    the trainer's checkpoint I/O, which is weights-only: a real checkpoint resumes, a crafted one
    stops the run naming the file, and runs nothing."""
    from polymodal.train.module import TrainModule
    from polymodal.train.recipe import TrainerSettings
    from polymodal.train.run import build_trainer

    def fit(steps: int, resume: Path | None = None):
        t = TrainerSettings(max_steps=steps, max_minutes=None, lr=0.01, warmup=0.0, accelerator="cpu",
                            val_every_minutes=0, log_every_steps=1)
        module = TrainModule(Line(), lr=t.lr, weight_decay=0.0, betas=t.betas, warmup=t.warmup,
                             max_steps=t.max_steps, max_minutes=None)
        trainer = build_trainer(t, tmp_path / "run", progress=False)
        data = [{"x": torch.randn(2), "y": torch.randn(())} for _ in range(8)]
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=resume)
        return trainer

    first = fit(2)
    first.save_checkpoint(tmp_path / "last.ckpt")
    assert fit(4, tmp_path / "last.ckpt").global_step == 4  # resumed at step 2, went on to 4

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    sentinel = tmp_path / "ran"
    checkpoint["callbacks"] = RunsCode(sentinel)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(InputError, match="crafted.ckpt: not a weights-only"):
        fit(4, tmp_path / "crafted.ckpt")
    assert not sentinel.exists()


def test_pyproject_asks_for_the_torch_whose_weights_only_loader_is_safe():
    """torch < 2.6 could run code from a crafted file even with weights_only=True (CVE-2025-32434)."""
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text


def test_the_readme_says_what_is_safe_to_load():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "What is safe to load from strangers" in readme and "weights_only" in readme
