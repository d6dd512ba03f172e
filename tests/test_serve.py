"""The OpenAI-compatible server on tiny models saved in a temporary folder, driven by FastAPI's
TestClient and by the official ``openai`` client (over the TestClient's transport, and against a
live uvicorn process for the ``kill -9`` test)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from polymodal.modalities.audio import wav_bytes
from polymodal.modalities.text import TextTokenizer
from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
from polymodal.models.captioner import Captioner, CaptionerConfig
from polymodal.models.clip import ContrastiveConfig, ContrastiveModel
from polymodal.models.text_to_image import TextToImage, TextToImageConfig
from polymodal.serve import Limits, Reply, Settings, create_app

openai = pytest.importorskip("openai")

QUESTION = "what colour is the circle?"
TEXTS = ["a red circle in the center", "a blue circle in the center", QUESTION, "red", "blue",
         "a small green star", "a large yellow square on the left"] * 4
HEARD = "what colour is the circle?"  # what the fake recogniser hears in any audio


def circle(colour: str, size: int = 32) -> Image.Image:
    """A shapes-world-like picture: one filled circle on a grey background."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return image


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tone(seconds: float = 0.5, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return wav_bytes((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def train_vqa(tokenizer: TextTokenizer, steps: int = 60) -> Captioner:
    """A tiny captioner that answers the circle's colour (red or blue) from the image."""
    from polymodal.modalities.image import ImageTransform

    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(encoders={"image": {"type": "cnn", "preset": "tiny", "image_size": 32}},
                                      tasks={"vqa": 1.0}, width=32, depth=1, heads=2, context_length=32), tokenizer)
    transform = ImageTransform(32)
    colours = ["red", "blue"] * 4
    batch = {"image": torch.stack([transform(circle(c)) for c in colours]),
             "rows": [{"text": f"a {c} circle in the center", "qa": [{"question": QUESTION, "answer": c}]}
                      for c in colours]}
    optimiser = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(steps):
        loss = model.loss(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def save_models(root: Path, answers: bool = True) -> Path:
    """A models folder as ``make demo`` leaves one: run folders with a ``model/`` each, a folder
    that is a model itself, and folders that are not models. ``answers``: the captioner is
    trained to tell a red circle from a blue one (else it is untrained)."""
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    tiny = {"type": "cnn", "preset": "tiny", "image_size": 32}
    clip = ContrastiveModel(ContrastiveConfig(
        towers={"image": tiny, "text": {"type": "text", "preset": "tiny"}, "audio": {"type": "audio", "preset": "tiny"}},
        pairs=[("image", "text"), ("audio", "text")], embed_dim=16), tokenizer)
    clip.save_pretrained(root / "clip" / "model")
    captioner = train_vqa(tokenizer, steps=60 if answers else 0)
    captioner.save_pretrained(root / "captions" / "model")
    TextToImage(TextToImageConfig(
        denoiser={"type": "unet", "channels": [16, 32], "attention": [False, True], "heads": 2, "groups": 4},
        text={"type": "text", "width": 24, "depth": 1, "heads": 2}, image_size=16), tokenizer
    ).save_pretrained(root / "drawing" / "model")
    Captioner(CaptionerConfig(encoders={"audio": {"type": "audio", "preset": "tiny"}}, width=32, depth=1, heads=2),
              tokenizer).save_pretrained(root / "hearing")
    Autoencoder(AutoencoderConfig(kind="kl", channels=(8, 16), latent_channels=4, image_size=16)).save_pretrained(
        root / "autoencoder" / "model")
    (root / "index").mkdir()
    (root / "index" / "index.json").write_text("{}")
    (root / "broken" / "model").mkdir(parents=True)
    (root / "broken" / "model" / "config.json").write_text('{"model_type": "nonsense"}')
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return save_models(tmp_path_factory.mktemp("models"))


class FakeRecogniser:
    def transcribe(self, waveform, sample_rate):
        assert sample_rate == 16_000 and waveform.ndim == 1
        return {"text": HEARD, "segments": [{"start": 0.0, "end": 0.25, "text": "what colour"},
                                            {"start": 0.25, "end": len(waveform) / sample_rate, "text": "is the circle?"}]}


def fake_speech(calls: list | None = None) -> types.ModuleType:
    """A stand-in for polymodal.speech: speech is a tone as long as the text, in WAV behind a
    prefix naming the format; the recogniser always hears :data:`HEARD`."""
    def synthesise(text, voice, speed, format):
        if calls is not None:
            calls.append((text, voice, speed, format))
        if voice == "nobody":
            raise ValueError(f"unknown voice {voice!r}")
        return b"FMT:" + format.encode() + b":" + tone(0.05 * len(text.split()) / speed)

    module = types.ModuleType("polymodal.speech")
    module.synthesise = synthesise
    module.load_recogniser = lambda *args: FakeRecogniser()
    return module


@pytest.fixture
def speech(monkeypatch):
    """polymodal.speech replaced by :func:`fake_speech`; the calls it got."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "polymodal.speech", fake_speech(calls))
    return calls


@pytest.fixture
def no_speech(monkeypatch):
    monkeypatch.setitem(sys.modules, "polymodal.speech", None)  # import fails


def make_client(models_dir: Path, tmp_path: Path, **settings) -> TestClient:
    settings.setdefault("store", tmp_path / "store.sqlite")
    settings.setdefault("image_steps", 4)
    return TestClient(create_app(models_dir, Settings(**settings)))


@pytest.fixture
def client(models_dir, tmp_path, speech):
    with make_client(models_dir, tmp_path) as c:
        yield c


def openai_client(client: TestClient, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key=key, http_client=client, max_retries=0)


# ---- models ----


def test_models_are_listed_with_their_modalities_and_capabilities(client):
    listing = openai_client(client).models.list()
    by_id = {m.id: m for m in listing.data}
    assert set(by_id) == {"clip", "captions", "drawing", "hearing", "autoencoder", "assistant", "speech", "recogniser"}
    clip = by_id["clip"].model_dump()
    assert clip["object"] == "model" and clip["owned_by"] == "polymodal"
    assert clip["input_modalities"] == ["text", "image", "audio"]
    assert clip["output_modalities"] == ["embedding"] and clip["capabilities"] == ["embeddings"]
    assert clip["dimensions"] == 16
    captions = by_id["captions"].model_dump()
    assert captions["input_modalities"] == ["text", "image"] and captions["capabilities"] == ["chat.completions"]
    assert by_id["drawing"].model_dump()["capabilities"] == ["chat.completions", "images.generations"]
    assert "audio.transcriptions" in by_id["hearing"].model_dump()["capabilities"]
    assert by_id["autoencoder"].model_dump()["capabilities"] == []
    assert openai_client(client).models.retrieve("captions").id == "captions"
    with pytest.raises(openai.NotFoundError, match="served models: autoencoder, captions"):
        openai_client(client).models.retrieve("gpt-4o")


def test_a_models_folder_that_is_not_a_folder_is_an_error(tmp_path):
    from polymodal.errors import InputError

    with pytest.raises(InputError, match="not a folder"):
        create_app(tmp_path / "missing", Settings(store=tmp_path / "s.sqlite"))


# ---- embeddings ----


def test_embeddings_of_text_in_both_encodings_match_the_model(client, models_dir):
    from polymodal.models import load_model

    oa = openai_client(client)
    default = oa.embeddings.create(model="clip", input=["a red circle", "a blue circle"])  # asks for base64
    floats = oa.embeddings.create(model="clip", input=["a red circle", "a blue circle"], encoding_format="float")
    raw = client.post("/v1/embeddings", json={"model": "clip", "input": "a red circle", "encoding_format": "base64"})
    assert isinstance(raw.json()["data"][0]["embedding"], str)
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    direct = load_model(models_dir / "clip" / "model").embed_text(["a red circle", "a blue circle"]).numpy()
    assert np.allclose(vector, direct[0], atol=1e-5)
    assert np.allclose([d.embedding for d in default.data], direct, atol=1e-5)
    assert np.allclose([d.embedding for d in floats.data], direct, atol=1e-5)
    assert [d.index for d in floats.data] == [0, 1] and floats.model == "clip"
    assert floats.usage.prompt_tokens == 6


def test_embeddings_of_an_image_and_audio(client, models_dir):
    from polymodal.index.build import embed_query
    from polymodal.models import load_model

    image = circle("red")
    out = openai_client(client).embeddings.create(
        model="clip", encoding_format="float",
        input=[png_data_url(image), "data:audio/wav;base64," + base64.b64encode(tone()).decode()])
    path = models_dir / "image.png"
    image.save(path)
    expected = embed_query(load_model(models_dir / "clip" / "model"), image=str(path))[0]
    assert np.allclose(out.data[0].embedding, expected, atol=1e-5)
    assert len(out.data[1].embedding) == 16 and abs(np.linalg.norm(out.data[1].embedding) - 1) < 1e-4


def test_concurrent_embedding_requests_share_forward_passes(models_dir, tmp_path, speech):
    """Requests that arrive within the batching window are embedded in one forward pass, and each
    gets its own rows back."""
    with make_client(models_dir, tmp_path, embedding_batch_window_ms=300) as c:
        texts = [f"a red circle number {i}" for i in range(6)]
        results: dict[int, list] = {}

        def ask(i):
            r = c.post("/v1/embeddings", json={"model": "clip", "input": texts[i], "encoding_format": "float"})
            results[i] = r.json()["data"][0]["embedding"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = c.get("/health").json()["embedding"]
        assert stats["requests"] == 6 and stats["inputs"] == 6
        assert stats["forwards"] < 6  # at least two requests shared a pass
        alone = c.post("/v1/embeddings", json={"model": "clip", "input": texts, "encoding_format": "float"}).json()
        for i in range(len(texts)):
            assert np.allclose(results[i], alone["data"][i]["embedding"], atol=1e-5)


# ---- chat ----


def test_a_question_about_an_image_is_answered_by_the_captioner(client):
    oa = openai_client(client)
    for colour in ("red", "blue"):
        reply = oa.chat.completions.create(model="assistant", messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": png_data_url(circle(colour))}}]}])
        assert reply.choices[0].message.content == colour
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model_dump()["polymodal"]["models"] == ["captions"]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_follow_up_question_uses_the_earlier_image(client):
    reply = openai_client(client).chat.completions.create(model="captions", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(circle("blue"))}}]},
        {"role": "assistant", "content": "a blue circle"},
        {"role": "user", "content": QUESTION}])
    assert reply.choices[0].message.content == "blue"


def test_spoken_question_is_transcribed_then_answered(models_dir, tmp_path, speech):
    with make_client(models_dir, tmp_path, recogniser="pocketsphinx") as client:  # the named recogniser hears
        reply = openai_client(client).chat.completions.create(model="assistant", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone()).decode(), "format": "wav"}},
            {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}]}])
    assert reply.choices[0].message.content == "red"
    extra = reply.model_dump()["polymodal"]
    assert extra["heard"] == [HEARD] and extra["models"] == ["recogniser", "captions"]


def test_a_served_recogniser_hears_chat_audio_when_none_is_named(client):
    """Without --recogniser, a served model that transcribes (the in-domain recogniser `make demo`
    trains) hears spoken chat before the general-purpose one."""
    reply = openai_client(client).chat.completions.create(model="assistant", messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone()).decode(), "format": "wav"}}]}])
    extra = reply.model_dump()["polymodal"]
    assert extra["models"][0] == "hearing" and len(extra["heard"]) == 1


def test_plain_text_without_a_language_model_says_what_the_server_can_do(client):
    reply = openai_client(client).chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "tell me a joke"}])
    text = reply.choices[0].message.content
    assert "no language model" in text and "(captions)" in text and "(drawing)" in text and "(clip)" in text
    assert "transcribe speech (hearing)" in text and "about it (hearing)" not in text


def test_an_image_is_drawn_when_asked_for(client):
    reply = openai_client(client).chat.completions.create(
        model="assistant", modalities=["image", "text"], messages=[{"role": "user", "content": "draw a red circle"}])
    message = reply.choices[0].message.model_dump()
    assert message["content"] == "Here is a picture of a red circle."
    url = message["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (16, 16)
    assert reply.model_dump()["polymodal"]["models"] == ["drawing"]


def test_audio_out_through_chat(client, speech):
    reply = openai_client(client).chat.completions.create(
        model="assistant", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                               {"type": "image_url", "image_url": {"url": png_data_url(circle("red"))}}]}])
    message = reply.choices[0].message
    assert message.content is None
    assert message.audio.transcript == "red" and message.audio.id.startswith("audio_")
    assert message.audio.expires_at > time.time()
    assert base64.b64decode(message.audio.data).startswith(b"FMT:wav:RIFF")
    assert speech[-1] == ("red", "alloy", 1.0, "wav")


def test_audio_out_without_speech_is_a_clear_501(models_dir, tmp_path, no_speech):
    with make_client(models_dir, tmp_path) as c:
        r = c.post("/v1/chat/completions", json={"model": "assistant", "modalities": ["text", "audio"],
                                                 "audio": {"voice": "alloy", "format": "mp3"},
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 501 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["code"] == "speech_unavailable"
        assert "polymodal.speech" in r.json()["error"]["message"]
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "speech" not in ids and "assistant" in ids


def test_streaming_as_the_client_expects(client):
    oa = openai_client(client)
    messages = [{"role": "user", "content": "tell me a joke"}]
    chunks = list(oa.chat.completions.create(model="assistant", messages=messages, stream=True,
                                             stream_options={"include_usage": True}))
    whole = oa.chat.completions.create(model="assistant", messages=messages)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 5
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    raw = client.post("/v1/chat/completions", json={"model": "assistant", "messages": messages, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # not asked for


def test_a_streamed_image_and_streamed_audio(client):
    oa = openai_client(client)
    chunks = list(oa.chat.completions.create(model="drawing", stream=True,
                                             messages=[{"role": "user", "content": "a blue circle"}]))
    images = [c.choices[0].delta.model_dump().get("images") for c in chunks if c.choices]
    assert any(images)
    spoken = list(oa.chat.completions.create(
        model="assistant", modalities=["text", "audio"], audio={"voice": "alloy", "format": "mp3"}, stream=True,
        messages=[{"role": "user", "content": "hello"}]))
    audio = [c.choices[0].delta.audio for c in spoken if c.choices and c.choices[0].delta.audio]
    assert audio[0].data and audio[0].transcript and audio[-1].expires_at


def test_an_error_after_the_stream_started_still_ends_with_done(models_dir, tmp_path, speech):
    def failing(turns, modalities, options):
        def pieces():
            yield "one "
            raise RuntimeError("the model fell over")

        return Reply(pieces=pieces())

    app = create_app(models_dir, Settings(store=tmp_path / "s.sqlite"), responder=failing)
    with TestClient(app, raise_server_exceptions=False) as c:
        raw = c.post("/v1/chat/completions", json={"model": "assistant", "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
        events = [e for e in raw.text.split("\n\n") if e]
        assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == "one "
        assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
        assert events[-1] == "data: [DONE]"
        with pytest.raises(openai.APIError, match="the server failed"):
            list(openai_client(c).chat.completions.create(model="assistant", stream=True,
                                                          messages=[{"role": "user", "content": "hi"}]))


def test_a_custom_responder_plugs_in(models_dir, tmp_path, speech):
    seen = {}

    def responder(turns, modalities, options):
        seen.update(turns=turns, modalities=modalities, options=options)
        return Reply.of("hello from the pipeline", models=["my-lm"])

    app = create_app(models_dir, Settings(store=tmp_path / "s.sqlite"), responder=responder)
    with TestClient(app) as c:
        reply = openai_client(c).chat.completions.create(
            model="assistant", max_tokens=7, messages=[{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": [
                                                           {"type": "text", "text": "hi"},
                                                           {"type": "image_url",
                                                            "image_url": {"url": png_data_url(circle("red"))}}]}])
    assert reply.choices[0].message.content == "hello from the pipeline"
    assert reply.model_dump()["polymodal"]["models"] == ["my-lm"]
    assert [t.role for t in seen["turns"]] == ["system", "user"] and seen["turns"][1].text == "hi"
    assert seen["turns"][1].images[0].size == (32, 32)
    assert seen["modalities"] == {"text"} and seen["options"].max_tokens == 7


# ---- audio ----


def test_transcription_in_every_format(client):
    oa = openai_client(client)
    audio = ("speech.wav", tone(1.0), "audio/wav")
    assert oa.audio.transcriptions.create(model="recogniser", file=audio).text == HEARD
    assert oa.audio.transcriptions.create(model="recogniser", file=audio, response_format="text").strip() == HEARD
    verbose = oa.audio.transcriptions.create(model="recogniser", file=audio, response_format="verbose_json")
    assert verbose.duration == pytest.approx(1.0) and [s.text for s in verbose.segments] == ["what colour",
                                                                                             "is the circle?"]
    srt = oa.audio.transcriptions.create(model="recogniser", file=audio, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,250\nwhat colour\n\n2\n00:00:00,250 --> 00:00:01,000")
    vtt = oa.audio.transcriptions.create(model="recogniser", file=audio, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.250\nwhat colour\n")


def test_a_served_audio_captioner_transcribes(client):
    out = openai_client(client).audio.transcriptions.create(model="hearing", file=("a.wav", tone(), "audio/wav"))
    assert isinstance(out.text, str)  # an untrained model: any text, but through the model
    with pytest.raises(openai.BadRequestError, match="cannot transcribe"):
        openai_client(client).audio.transcriptions.create(model="captions", file=("a.wav", tone(), "audio/wav"))


@pytest.mark.parametrize("fmt", ["mp3", "wav", "opus", "flac", "aac", "pcm"])
def test_speech_in_each_format(client, speech, fmt):
    response = openai_client(client).audio.speech.create(model="speech", voice="alloy", input="hello there",
                                                         response_format=fmt, speed=1.5)
    assert response.content.startswith(f"FMT:{fmt}:".encode())
    assert response.response.headers["content-type"].startswith("audio/")
    assert speech[-1] == ("hello there", "alloy", 1.5, fmt)


def test_speech_is_mp3_by_default_and_bad_voices_are_400(client, speech):
    assert openai_client(client).audio.speech.create(model="speech", voice="alloy", input="hi").content.startswith(
        b"FMT:mp3:")
    with pytest.raises(openai.BadRequestError, match="unknown voice"):
        openai_client(client).audio.speech.create(model="speech", voice="nobody", input="hi")


# ---- images ----


def test_image_generation_b64_n_and_size(client):
    out = openai_client(client).images.generate(model="drawing", prompt="a red circle", n=2, size="32x32")
    assert len(out.data) == 2
    pictures = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert all(p.size == (32, 32) and p.format == "PNG" for p in pictures)
    again = openai_client(client).images.generate(model="drawing", prompt="a red circle", n=1, size="32x32")
    assert again.data[0].b64_json == out.data[0].b64_json  # the same seed draws the same image
    native = openai_client(client).images.generate(prompt="a red circle", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(native.data[0].b64_json))).size == (16, 16)


# ---- keeping things ----


def test_stored_completions_are_read_back_by_the_client(client):
    oa = openai_client(client)
    image = png_data_url(circle("red"))
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    reply = oa.chat.completions.create(model="assistant", messages=messages, store=True, metadata={"topic": "shapes"})
    kept = oa.chat.completions.retrieve(reply.id)
    assert kept.choices[0].message.content == "red" and kept.metadata == {"topic": "shapes"}
    listed = list(oa.chat.completions.messages.list(reply.id))
    assert listed[0].model_dump()["role"] == "user" and listed[0].content == QUESTION
    assert listed[0].model_dump()["content_parts"][1]["image_url"]["url"] == image  # the image as it was sent
    assert [c.id for c in oa.chat.completions.list(metadata={"topic": "shapes"})] == [reply.id]
    assert list(oa.chat.completions.list(metadata={"topic": "other"})) == []
    not_stored = oa.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.retrieve(not_stored.id)
    assert oa.chat.completions.delete(reply.id).deleted
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.retrieve(reply.id)


def test_conversations_keep_every_turn_and_its_media(client):
    conversation = client.post("/v1/conversations", json={"metadata": {"page": "yes"}}).json()
    noise = np.random.default_rng(0).integers(-4, 5, (128, 128, 3))
    picture = Image.fromarray((np.asarray(circle("blue", 128), np.int64) + noise).clip(0, 255).astype(np.uint8))
    image = png_data_url(picture)  # noisy: large enough to be kept apart from its message
    first = client.post("/v1/chat/completions", json={
        "model": "assistant", "conversation": conversation["id"],
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": QUESTION}]}]}).json()
    assert first["choices"][0]["message"]["content"] == "blue"
    second = client.post("/v1/chat/completions", json={  # the image is in the stored history only
        "model": "assistant", "conversation": conversation["id"], "stream": True,
        "messages": [{"role": "user", "content": QUESTION}]})
    assert second.text.endswith("data: [DONE]\n\n")
    failed = client.post("/v1/chat/completions", json={  # kept only if answered
        "model": "clip", "conversation": conversation["id"], "messages": [{"role": "user", "content": "hi"}]})
    assert failed.status_code == 400
    messages = client.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0]["image_url"]["url"] == image
    assert messages[1]["content"] == "blue" and messages[3]["content"] == "blue"
    assert messages[1]["models"] == ["captions"]
    listed = client.get("/v1/conversations").json()["data"]
    assert listed[0]["id"] == conversation["id"] and listed[0]["title"] == QUESTION
    media = client.get("/v1/media/media_" + __import__("hashlib").sha256(
        base64.b64decode(image.split(",")[1])).hexdigest())
    assert media.status_code == 200 and media.headers["content-type"] == "image/png"
    assert client.delete(f"/v1/conversations/{conversation['id']}").json()["deleted"]
    assert client.get(f"/v1/conversations/{conversation['id']}").status_code == 404


# ---- safety ----


def every_v1_route(app) -> list[tuple[str, str]]:
    routes = []
    for route in app.routes:
        if getattr(route, "path", "").startswith("/v1"):
            for method in route.methods - {"HEAD"}:
                routes.append((method, route.path.replace("{model_id:path}", "clip").replace("{", "x").replace("}", "")))
    return routes


def test_every_v1_route_needs_the_api_key_when_one_is_set(models_dir, tmp_path, speech, monkeypatch):
    monkeypatch.setenv("POLYMODAL_API_KEY", "sesame")
    app = create_app(models_dir, Settings.from_env(store=tmp_path / "s.sqlite"))
    routes = every_v1_route(app)
    assert len(routes) >= 17
    with TestClient(app) as c:
        for method, path in routes + [("GET", "/v1/no-such-route"), ("GET", "/v1")]:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai_client(c, key="wrong").models.list()
        assert len(openai_client(c, key="sesame").models.list().data) == 8
        assert c.get("/openapi.json").status_code == 200  # outside /v1
        assert c.get("/health").json()["status"] == "ok"


def test_remote_image_urls_are_fetched_only_when_allowed(models_dir, tmp_path, speech, monkeypatch):
    """With --allow-remote-urls an http image URL is fetched (here from a server on loopback)."""
    import http.server

    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # loopback is reached directly

    (tmp_path / "www").mkdir()
    circle("blue").save(tmp_path / "www" / "circle.png")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/circle.png"
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    try:
        with make_client(models_dir, tmp_path) as c:
            with pytest.raises(openai.BadRequestError, match="remote URLs are not fetched"):
                openai_client(c).chat.completions.create(model="assistant", messages=messages)
        with make_client(models_dir, tmp_path, allow_remote_urls=True) as c:
            reply = openai_client(c).chat.completions.create(model="assistant", messages=messages)
            assert reply.choices[0].message.content == "blue"
            messages[0]["content"][1]["image_url"]["url"] = url.replace("circle.png", "missing.png")
            with pytest.raises(openai.BadRequestError, match="could not fetch"):
                openai_client(c).chat.completions.create(model="assistant", messages=messages)
    finally:
        server.shutdown()


def test_openapi_describes_the_routes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/embeddings", "/v1/chat/completions", "/v1/audio/transcriptions",
                 "/v1/audio/speech", "/v1/images/generations", "/v1/chat/completions/{completion_id}/messages"):
        assert path in spec["paths"]


def test_limits_are_configurable(models_dir, tmp_path, speech):
    limits = Limits(max_n=1, max_tokens=8, max_inputs=2, max_body_bytes=50_000)
    with make_client(models_dir, tmp_path, limits=limits) as c:
        assert c.post("/v1/images/generations", json={"model": "drawing", "prompt": "x", "n": 2}).status_code == 400
        assert c.post("/v1/embeddings", json={"model": "clip", "input": ["a", "b", "c"]}).status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "assistant", "max_tokens": 9,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = c.post("/v1/embeddings", json={"model": "clip", "input": "x" * 60_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert Limits().with_overrides(["max_audio_seconds=2.5", "max_n=3"]) == Limits(max_audio_seconds=2.5, max_n=3)
    with pytest.raises(ValueError, match="max_body_bytes"):
        Limits().with_overrides(["max_bananas=3"])


def test_a_chunked_body_over_the_limit_is_refused(models_dir, tmp_path, speech):
    with make_client(models_dir, tmp_path, limits=Limits(max_body_bytes=10_000)) as c:
        def body(n):
            yield b'{"model": "clip", "input": "'
            for _ in range(n):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/v1/embeddings", content=body(20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/embeddings", content=body(2), headers={"content-type": "application/json"})
        assert r.status_code == 200


# ---- a live server, killed ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, store: Path, port: int, *options: str, env: dict | None = None) -> subprocess.Popen:
    """``polymodal serve`` on ``port`` without a language model, with ``options`` and ``env``
    added; returns once it accepts connections."""
    command = [sys.executable, "-m", "polymodal.cli", "serve", "--models", str(models), "--lm", "none",
               "--port", str(port), "--store", str(store), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start")


@pytest.mark.slow  # two server starts: about 10 s on a quiet machine, 40 s on a busy one
def test_a_stored_completion_survives_kill_9(tmp_path):
    """Acknowledged means on disk: every stored completion and conversation message the server
    answered for is there after ``kill -9`` and a restart."""
    import httpx2

    models = tmp_path / "models"
    models.mkdir()
    store, port = tmp_path / "store.sqlite", free_port()
    process = start_server(models, store, port)
    ids, conversation = [], None
    try:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        conversation = httpx2.post(f"http://127.0.0.1:{port}/v1/conversations", json={}).json()["id"]
        for i in range(5):
            reply = oa.chat.completions.create(model="assistant", store=True, metadata={"i": str(i)},
                                               messages=[{"role": "user", "content": f"message {i}"}])
            ids.append(reply.id)
            httpx2.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                "model": "assistant", "conversation": conversation,
                "messages": [{"role": "user", "content": f"turn {i}"}]}).raise_for_status()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert (tmp_path / "store.sqlite-wal").exists()  # the commits were in the log, not yet in the file
    process = start_server(models, store, port)
    try:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for i, id in enumerate(ids):
            kept = oa.chat.completions.retrieve(id)
            assert kept.metadata == {"i": str(i)} and "no language model" in kept.choices[0].message.content
            assert list(oa.chat.completions.messages.list(id))[0].content == f"message {i}"
        messages = httpx2.get(f"http://127.0.0.1:{port}/v1/conversations/{conversation}/messages").json()["data"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [f"turn {i}" for i in range(5)]
        assert len(messages) == 10
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_serve_command_refuses_bad_settings_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--models", str(tmp_path / "missing")])
    assert missing.exit_code == 2 and "not a folder of saved models" in missing.output
    assert "Traceback" not in missing.output
    bad_limit = runner.invoke(app, ["serve", "--models", str(tmp_path), "--limit", "max_n=lots"])
    assert bad_limit.exit_code == 2 and "'lots' is not a number" in bad_limit.output
