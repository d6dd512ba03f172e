"""The assistant pipeline behind the server: routing, facts about images from polymodal's models,
speech in and out, and the language model (a tiny random Llama saved here, or an OpenAI-compatible
upstream that is itself a polymodal server run by a TestClient)."""

from __future__ import annotations

import base64
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_serve import QUESTION, circle, png_data_url, save_models, tone

from polymodal.assistant.pipeline import (
    SYSTEM_PROMPT,
    Assistant,
    LocalLanguageModel,
    UpstreamLanguageModel,
    image_prompt,
    language_model,
    words_to_say,
)
from polymodal.errors import InputError
from polymodal.serve import Reply, ReplyOptions, Settings, create_app

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---- fixtures: models, a tiny language model, speech ----


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """test_serve's models: a CLIP, a captioner that tells a red circle from a blue one, a
    text-to-image model, an audio captioner and an autoencoder."""
    return save_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A Hugging Face folder: a random two-layer Llama and a word-level tokenizer with a chat
    template, both tiny (the real default, SmolLM2, takes about 40 s to load here). Each token is
    a word, so what the model writes streams in several pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    words = "the sea is calm at dawn a quiet beach with soft light hello there how are you user assistant system"
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *dict.fromkeys(words.split())])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens(["<unk>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


class FakeRecogniser:
    def __init__(self, heard: list[str]):
        self.heard = heard

    def transcribe(self, waveform, sample_rate):
        return {"text": self.heard[0]}


@pytest.fixture
def speech(monkeypatch):
    """polymodal.speech replaced: speech out is a WAV tone behind a prefix naming the format, and
    the recogniser hears ``speech.heard[0]``; ``speech.calls`` holds what was synthesised."""
    module = types.ModuleType("polymodal.speech")
    module.calls, module.heard = [], ["draw a red star in the top left"]

    def synthesise(text, voice, speed, format):
        module.calls.append((text, voice, speed, format))
        return b"FMT:" + format.encode() + b":" + text.encode()

    module.synthesise = synthesise
    module.load_recogniser = lambda *args: FakeRecogniser(module.heard)
    monkeypatch.setitem(sys.modules, "polymodal.speech", module)
    return module


class KeywordRouter:
    """A stand-in for the router (which needs MiniLM): image for "draw", speech for "aloud"."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, request: str) -> tuple[str, float]:
        self.asked.append(request)
        if request.lower().startswith("draw"):
            return "image", 0.9
        return ("speech", 0.8) if "aloud" in request else ("text", 0.7)


class SpyLM:
    """A language model that says what it was given, and remembers it."""

    name = "spy-lm"

    def __init__(self):
        self.calls: list[list[dict]] = []

    def reply(self, messages, options):
        self.calls.append(messages)
        return Reply.of(f"the model says: {messages[-1]['content']}", models=[self.name])


def assistant_client(models_dir: Path, tmp_path: Path, lm=None, router=None, **settings) -> TestClient:
    settings.setdefault("store", tmp_path / "store.sqlite")
    settings.setdefault("image_steps", 2)
    make = partial(Assistant, lm=lm, **({"router": router} if router else {}))
    return TestClient(create_app(models_dir, Settings(**settings), make_responder=make))


def openai_client(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client, max_retries=0)


def ask(client: TestClient, content, **kw):
    return openai_client(client).chat.completions.create(model="assistant", messages=[
        {"role": "user", "content": content}], **kw)


def extra(reply) -> dict:
    return reply.model_dump()["polymodal"]


# ---- reading requests ----


@pytest.mark.parametrize("request_, prompt", [
    ("draw a red star in the top left", "a red star in the top left"),
    ("Could you please draw me a picture of a blue circle?", "a blue circle"),
    ("I'd like an image of a green square, please.", "a green square"),
    ("Please generate a picture showing two red triangles", "two red triangles"),
    ("show me what a yellow star looks like", "a yellow star"),
    ("make a drawing of a purple circle on the right for me", "a purple circle on the right"),
    ("hey, paint a large blue square in the center!", "a large blue square in the center"),
    ("Draw: a red star", "a red star"),
    ("a red star", "a red star"),
])
def test_the_drawing_prompt_is_the_description_alone(request_, prompt):
    assert image_prompt(request_) == prompt


@pytest.mark.parametrize("request_, words", [
    ("say it out loud: hello", "hello"),
    ('Say "good night"', "good night"),
    ("please repeat after me: the cat sat", "the cat sat"),
    ("say it out loud", None),
    ("tell me a joke out loud", None),
])
def test_words_to_say_are_taken_only_when_given(request_, words):
    assert words_to_say(request_) == words


# ---- routing through the pipeline (the real router) ----


def test_idioms_are_routed_to_the_modality_they_mean(models_dir, tmp_path, speech):
    from polymodal.assistant.router import HEAD

    if not HEAD.is_file():
        pytest.skip("the router head (router.safetensors) has not been trained yet")
    spy = SpyLM()
    with assistant_client(models_dir, tmp_path, lm=spy) as client:  # the real router
        words = ask(client, "paint me a picture with words")
        assert words.choices[0].message.content == "the model says: paint me a picture with words"
        assert extra(words)["models"] == ["spy-lm"] and extra(words)["route"]["modality"] == "text"
        assert not words.model_dump()["choices"][0]["message"].get("images")

        star = ask(client, "draw a red star")
        message = star.choices[0].message.model_dump()
        assert message["content"] == "Here is a picture of a red star." and len(message["images"]) == 1
        assert extra(star)["models"] == ["drawing"] and extra(star)["route"]["by"] == "router"

        spoken = ask(client, "say it out loud: hello")
        assert spoken.choices[0].message.audio.transcript == "hello"
        assert base64.b64decode(spoken.choices[0].message.audio.data) == b"FMT:wav:hello"
        assert spoken.choices[0].message.content == "hello"  # audio it did not ask for in 'modalities'
        assert extra(spoken)["models"] == ["speech"] and extra(spoken)["route"]["modality"] == "speech"
    assert speech.calls == [("hello", "alloy", 1.0, "wav")]
    assert len(spy.calls) == 1


# ---- routing with a stand-in router ----


def test_explicit_modalities_win_over_the_router(models_dir, tmp_path, speech):
    router, spy = KeywordRouter(), SpyLM()
    with assistant_client(models_dir, tmp_path, lm=spy, router=router) as client:
        text = ask(client, "draw a red star", modalities=["text"])
        assert text.choices[0].message.content == "the model says: draw a red star"
        drawn = ask(client, "a blue circle on the left", modalities=["image", "text"])
        assert drawn.choices[0].message.content == "Here is a picture of a blue circle on the left."
        assert extra(drawn)["route"] == {"modality": "image", "confidence": 1.0, "by": "request"}
    assert router.asked == []


def test_spoken_input_is_transcribed_then_routed(models_dir, tmp_path, speech):
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone()).decode(), "format": "wav"}}
    # the named recogniser hears (without one, the served model that transcribes would)
    with assistant_client(models_dir, tmp_path, router=KeywordRouter(), recogniser="pocketsphinx") as client:
        reply = ask(client, [audio])
        message = reply.choices[0].message.model_dump()
        assert message["content"] == "Here is a picture of a red star in the top left."
        assert message["images"] and extra(reply)["heard"] == ["draw a red star in the top left"]
        assert extra(reply)["models"] == ["recogniser", "drawing"]

        speech.heard[0] = "read this aloud: good morning"
        spoken = ask(client, [audio])
        assert spoken.choices[0].message.audio.transcript == "good morning"
        assert extra(spoken)["models"] == ["recogniser", "speech"]


def test_a_routed_spoken_reply_streams_its_text_then_its_audio(models_dir, tmp_path, speech):
    with assistant_client(models_dir, tmp_path, lm=SpyLM(), router=KeywordRouter()) as client:
        chunks = list(ask(client, "tell me about the sea aloud", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert text == "the model says: tell me about the sea aloud"
    assert audio[0].transcript == text and base64.b64decode(audio[0].data).startswith(b"FMT:wav:")


def test_speech_is_not_chosen_where_the_server_cannot_speak(models_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "polymodal.speech", None)
    with assistant_client(models_dir, tmp_path, lm=SpyLM(), router=KeywordRouter()) as client:
        reply = ask(client, "tell me about the sea aloud")
    assert reply.choices[0].message.content == "the model says: tell me about the sea aloud"
    assert reply.choices[0].message.audio is None and extra(reply)["route"]["modality"] == "text"


def test_without_a_router_head_the_reply_is_text(models_dir, tmp_path, speech):
    def missing(request):
        raise InputError("router.safetensors", "no router head here")

    with assistant_client(models_dir, tmp_path, lm=SpyLM(), router=missing) as client:
        reply = ask(client, "draw a red star")
    assert reply.choices[0].message.content == "the model says: draw a red star"
    assert extra(reply)["route"] == {"modality": "text", "confidence": 0.0, "by": "fallback"}


# ---- facts about images come from polymodal's models ----


def test_an_image_question_is_answered_by_the_captioner_not_the_lm(models_dir, tmp_path, speech):
    spy = SpyLM()
    with assistant_client(models_dir, tmp_path, lm=spy, router=KeywordRouter()) as client:
        for colour in ("red", "blue"):
            reply = ask(client, [{"type": "text", "text": QUESTION},
                                 {"type": "image_url", "image_url": {"url": png_data_url(circle(colour))}}])
            assert reply.choices[0].message.content == colour
            assert extra(reply)["models"] == ["captions"]
        follow_up = openai_client(client).chat.completions.create(model="assistant", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(circle("blue"))}}]},
            {"role": "assistant", "content": "a blue circle"},
            {"role": "user", "content": QUESTION}])
        assert follow_up.choices[0].message.content == "blue"
        other = openai_client(client).chat.completions.create(model="assistant", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(circle("blue"))}}]},
            {"role": "assistant", "content": "a blue circle"},
            {"role": "user", "content": "thanks! now write me a haiku about autumn"}])
        assert extra(other)["models"] == ["spy-lm"]
    assert [m["content"] for m in spy.calls[0][1:]] == ["a blue circle", "thanks! now write me a haiku about autumn"]


def test_a_description_lists_what_a_served_detector_finds(tmp_path, speech):
    from polymodal.models.detector import DetectorConfig, GridDetector

    torch.manual_seed(0)
    detector = GridDetector(DetectorConfig(widths=(8, 16, 16), head_width=16))
    with torch.no_grad():
        detector.occupied_head.bias.fill_(20.0)  # every cell holds an object
    detector.save_pretrained(tmp_path / "models" / "judge" / "model")
    with assistant_client(tmp_path / "models", tmp_path, lm=SpyLM(), router=KeywordRouter()) as client:
        reply = ask(client, [{"type": "text", "text": "describe this picture"},
                             {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}])
    text = reply.choices[0].message.content
    assert text.startswith("Objects found: a ") and text.count(" at the ") == 9 and "top left" in text
    assert extra(reply)["models"] == ["judge"]


# ---- the language model ----


def test_the_local_lm_streams_what_it_generates(models_dir, tmp_path, speech, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = language_model(str(tiny_lm))
    assert isinstance(lm, LocalLanguageModel) and lm.name == tiny_lm.name
    with assistant_client(models_dir, tmp_path, lm=lm, router=KeywordRouter()) as client:
        oa = openai_client(client)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
        whole = oa.chat.completions.create(model="assistant", messages=messages, max_tokens=12)
        chunks = list(oa.chat.completions.create(model="assistant", messages=messages, max_tokens=12, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 1
    assert extra(whole)["models"] == [tiny_lm.name]

    # the same greedy continuation, straight from transformers
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    prompt = [{"role": "system", "content": SYSTEM_PROMPT + "\nbe brief"},
              {"role": "user", "content": "hello there"}]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    assert whole.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
    ended = int(new[-1]) == tokenizer.eos_token_id
    assert whole.choices[0].finish_reason == ("length" if len(new) == 12 and not ended else "stop")


def test_an_upstream_openai_compatible_server_answers_open_chat(models_dir, tmp_path, speech):
    seen = []

    def upstream_responder(turns, modalities, options):
        seen.append([(t.role, t.text) for t in turns])
        return Reply.of(f"upstream says hi to: {turns[-1].text}", models=["echo"])

    upstream_app = create_app(models_dir, Settings(store=tmp_path / "upstream.sqlite"), responder=upstream_responder)
    with TestClient(upstream_app) as upstream:
        lm = UpstreamLanguageModel(str(upstream.base_url) + "/v1", "assistant", http_client=upstream)
        with assistant_client(models_dir, tmp_path, lm=lm, router=KeywordRouter()) as client:
            reply = ask(client, "tell me a joke")
            chunks = list(ask(client, "tell me a joke", stream=True))
            assert reply.choices[0].message.content == "upstream says hi to: tell me a joke"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                reply.choices[0].message.content
            assert extra(reply)["models"] == ["assistant (http://testserver/v1)"]
            assert seen[0][0][0] == "system" and "polymodal's assistant" in seen[0][0][1]

            lm.model = "no-such-model"
            r = client.post("/v1/chat/completions", json={"model": "assistant",
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            assert "no-such-model" in r.json()["error"]["message"]


def test_without_a_language_model_open_chat_says_what_the_server_can_do(models_dir, tmp_path, speech):
    with assistant_client(models_dir, tmp_path, lm=None, router=KeywordRouter()) as client:
        reply = ask(client, "tell me a joke")
    assert "no language model" in reply.choices[0].message.content


def test_a_named_model_answers_as_before(models_dir, tmp_path, speech):
    spy = SpyLM()
    with assistant_client(models_dir, tmp_path, lm=spy, router=KeywordRouter()) as client:
        reply = openai_client(client).chat.completions.create(model="captions", messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}]}])
    assert reply.choices[0].message.content == "red" and spy.calls == []


def test_language_model_specs(tmp_path, tiny_lm):
    assert language_model("none") is None
    with pytest.raises(InputError, match="not a folder"):
        language_model(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no config.json"):
        language_model(str(tmp_path))
    with pytest.raises(InputError, match="not an http"):
        language_model(url="ftp://example.org")
    assert isinstance(language_model(url="http://127.0.0.1:9/v1", model="m"), UpstreamLanguageModel)
    options = ReplyOptions(max_tokens=3)
    reply = LocalLanguageModel(tiny_lm).reply([{"role": "user", "content": "hello"}], options)
    assert isinstance(reply.text(), str) and reply.finish_reason in ("stop", "length")


def test_the_serve_command_refuses_a_missing_lm_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app

    result = CliRunner().invoke(app, ["serve", "--models", str(tmp_path), "--lm", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a folder" in result.output and "Traceback" not in result.output


@pytest.mark.slow  # loads SmolLM2-135M-Instruct from its GGUF: about 40 s on a busy machine
def test_the_default_lm_is_smollm2_and_it_answers():
    lm = language_model()
    reply = lm.reply([{"role": "user", "content": "Say hello in one word."}], ReplyOptions(max_tokens=8))
    assert lm.name == "SmolLM2-135M-Instruct" and reply.text().strip()
