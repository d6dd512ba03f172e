"""A corpus of malformed requests: each gets a 4xx in OpenAI's error envelope (never a 5xx, never
FastAPI's own body), and the server answers a good request right after it."""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import circle, fake_speech, png_data_url, save_models, tone

from polymodal.serve import Limits, Settings, create_app

LIMITS = Limits(max_body_bytes=300_000, max_audio_seconds=1.0, max_text_chars=2_000, max_n=4, max_tokens=64,
                max_messages=20, max_media_parts=3, max_inputs=8, max_speech_chars=500)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and that holds almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def noise_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_IMAGE = png_data_url(circle("red"))
TRUNCATED_PNG = "data:image/png;base64," + b64(noise_png()[:2000])
HUGE_PNG = "data:image/png;base64," + b64(png_header(6000, 6000))
NOT_AUDIO = b64(b"ID3 not really an mp3 " + bytes(range(256)) * 4)
LONG_AUDIO = b64(tone(2.0))
TRUNCATED_WAV = tone(0.5)[:3000]


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: str, format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": format}}


def chat(**fields) -> dict:
    body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], **fields}
    return {"json": {k: v for k, v in body.items() if v is not ...}}


def raw(body: bytes, content_type: str = "application/json") -> dict:
    return {"content": body, "headers": {"content-type": content_type}}


def transcription(data: bytes = tone(0.5), **fields) -> dict:
    return {"files": {"file": ("a.wav", data, "audio/wav")}, "data": {"model": "recogniser", **fields}}


QUESTION = {"type": "text", "text": "what colour is the circle?"}

# (name, method, path, arguments of TestClient.request)
CASES = [
    # the body itself
    ("invalid JSON", "POST", "/v1/chat/completions", raw(b'{"model": "assistant", "messages": [')),
    ("a JSON array, not an object", "POST", "/v1/chat/completions", raw(b"[1, 2, 3]")),
    ("an empty body", "POST", "/v1/chat/completions", raw(b"")),
    ("text/plain, not JSON", "POST", "/v1/chat/completions", raw(b'{"model": "assistant"}', "text/plain")),
    ("bytes that are not UTF-8", "POST", "/v1/embeddings", raw(b'{"model": "\xff\xfe", "input": "x"}')),
    ("JSON nested too deeply", "POST", "/v1/chat/completions", raw(b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000
                                                                    + b"}")),
    ("a body over the size limit", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": "x" * 400_000}}),
    ("a number too long to read", "POST", "/v1/chat/completions", raw(
        b'{"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}")),
    # chat: fields missing or of the wrong type
    ("chat without a model", "POST", "/v1/chat/completions", chat(model=...)),
    ("chat without messages", "POST", "/v1/chat/completions", chat(messages=...)),
    ("chat with no messages", "POST", "/v1/chat/completions", chat(messages=[])),
    ("messages as a string", "POST", "/v1/chat/completions", chat(messages="hello")),
    ("an unknown role", "POST", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}])),
    ("content as a number", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 42}])),
    ("a user message without content", "POST", "/v1/chat/completions", chat(messages=[{"role": "user"}])),
    ("an unknown content part", "POST", "/v1/chat/completions", chat(messages=user({"type": "hologram"}))),
    ("a file content part", "POST", "/v1/chat/completions", chat(messages=user({"type": "file", "file": {}}))),
    ("stream as a string", "POST", "/v1/chat/completions", chat(stream="yes")),
    ("n as a string", "POST", "/v1/chat/completions", chat(n="2")),
    ("n of two choices", "POST", "/v1/chat/completions", chat(n=2)),
    ("max_tokens over the limit", "POST", "/v1/chat/completions", chat(max_tokens=1_000_000)),
    ("max_tokens negative", "POST", "/v1/chat/completions", chat(max_tokens=-5)),
    ("temperature out of range", "POST", "/v1/chat/completions", chat(temperature=7.5)),
    ("temperature NaN", "POST", "/v1/chat/completions", raw(
        b'{"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')),
    ("an unknown output modality", "POST", "/v1/chat/completions", chat(modalities=["video"])),
    ("audio out without the audio parameter", "POST", "/v1/chat/completions", chat(modalities=["text", "audio"])),
    ("an unknown audio format", "POST", "/v1/chat/completions",
     chat(modalities=["text", "audio"], audio={"voice": "alloy", "format": "midi"})),
    ("a seed beyond 64 bits", "POST", "/v1/chat/completions", chat(seed=2**70)),
    ("metadata of too many pairs", "POST", "/v1/chat/completions", chat(store=True,
                                                                        metadata={str(i): "x" for i in range(17)})),
    ("metadata that is not text", "POST", "/v1/chat/completions", chat(store=True, metadata={"a": 1})),
    ("tools", "POST", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}])),
    ("a JSON response format", "POST", "/v1/chat/completions", chat(response_format={"type": "json_object"})),
    ("an unknown model", "POST", "/v1/chat/completions", chat(model="gpt-9")),
    ("a model that cannot chat", "POST", "/v1/chat/completions", chat(model="clip")),
    ("too many messages", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi"}] * 21)),
    ("a text over the limit", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 2001}])),
    ("a question too long for the captioner", "POST", "/v1/chat/completions", chat(
        messages=user({"type": "text", "text": "what colour is " * 40}, image_part(GOOD_IMAGE)))),
    ("an unknown conversation", "POST", "/v1/chat/completions", chat(conversation="conv_nothing")),
    # chat: images
    ("bad base64 in an image", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        "data:image/png;base64,iVBORw0KGgo!!!not-base64***")))),
    ("a truncated PNG", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(TRUNCATED_PNG)))),
    ("an image of too many pixels", "POST", "/v1/chat/completions", chat(messages=user(QUESTION,
                                                                                      image_part(HUGE_PNG)))),
    ("text sent as an image", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        "data:text/plain;base64," + b64(b"hello there"))))),
    ("an image data URL not in base64", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        "data:image/png,%89PNG%0D%0A")))),
    ("an empty data URL", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        "data:image/png;base64,")))),
    ("a remote image URL", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        "http://127.0.0.1:9/picture.png")))),
    ("a file: URL", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part("file:///etc/passwd")))),
    ("too many images", "POST", "/v1/chat/completions", chat(messages=user(*[image_part(GOOD_IMAGE)] * 4))),
    ("an image 4000 pixels wide and 1 high", "POST", "/v1/chat/completions", chat(messages=user(QUESTION, image_part(
        png_data_url(Image.new("RGB", (4000, 1))))))),
    # chat: audio
    ("audio that is not audio", "POST", "/v1/chat/completions", chat(messages=user(audio_part(NOT_AUDIO)))),
    ("bad base64 in audio", "POST", "/v1/chat/completions", chat(messages=user(audio_part("UklGR===x")))),
    ("audio as a data URL", "POST", "/v1/chat/completions", chat(messages=user(audio_part(
        "data:audio/wav;base64," + b64(tone(0.2)))))),
    ("an unknown audio input format", "POST", "/v1/chat/completions", chat(messages=user(audio_part(b64(tone(0.2)),
                                                                                                   "aiff")))),
    ("audio over the length limit", "POST", "/v1/chat/completions", chat(messages=user(audio_part(LONG_AUDIO)))),
    # embeddings
    ("embeddings without input", "POST", "/v1/embeddings", {"json": {"model": "clip"}}),
    ("an empty string to embed", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": ""}}),
    ("an empty list to embed", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": []}}),
    ("token ids to embed", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": [1, 2, 3]}}),
    ("a number to embed", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": 3.5}}),
    ("too many inputs", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": ["a"] * 9}}),
    ("a truncated PNG to embed", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": TRUNCATED_PNG}}),
    ("audio that is not audio to embed", "POST", "/v1/embeddings", {"json": {
        "model": "clip", "input": "data:audio/wav;base64," + NOT_AUDIO}}),
    ("a PDF to embed", "POST", "/v1/embeddings", {"json": {"model": "clip",
                                                          "input": "data:application/pdf;base64," + b64(b"%PDF-1.4")}}),
    ("an unknown encoding format", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": "a",
                                                                      "encoding_format": "hex"}}),
    ("dimensions the model lacks", "POST", "/v1/embeddings", {"json": {"model": "clip", "input": "a",
                                                                      "dimensions": 3}}),
    ("a model that cannot embed", "POST", "/v1/embeddings", {"json": {"model": "captions", "input": "a"}}),
    ("an unknown embedding model", "POST", "/v1/embeddings", {"json": {"model": "text-embedding-3-small",
                                                                      "input": "a"}}),
    # images
    ("a huge n", "POST", "/v1/images/generations", {"json": {"prompt": "a red circle", "n": 1_000_000}}),
    ("n of zero", "POST", "/v1/images/generations", {"json": {"prompt": "a red circle", "n": 0}}),
    ("an empty prompt", "POST", "/v1/images/generations", {"json": {"prompt": "   "}}),
    ("a prompt that is not text", "POST", "/v1/images/generations", {"json": {"prompt": ["a", "b"]}}),
    ("a size that is not a size", "POST", "/v1/images/generations", {"json": {"prompt": "a", "size": "big"}}),
    ("a size that is not square", "POST", "/v1/images/generations", {"json": {"prompt": "a", "size": "32x64"}}),
    ("a size over the limit", "POST", "/v1/images/generations", {"json": {"prompt": "a", "size": "99999x99999"}}),
    ("images as URLs", "POST", "/v1/images/generations", {"json": {"prompt": "a", "response_format": "url"}}),
    ("too many denoising steps", "POST", "/v1/images/generations", {"json": {"prompt": "a", "steps": 10_000}}),
    ("a model that cannot draw", "POST", "/v1/images/generations", {"json": {"prompt": "a", "model": "clip"}}),
    # speech
    ("speech without a voice", "POST", "/v1/audio/speech", {"json": {"model": "speech", "input": "hi"}}),
    ("speech in an unknown format", "POST", "/v1/audio/speech", {"json": {
        "model": "speech", "input": "hi", "voice": "alloy", "response_format": "ogg"}}),
    ("speech too fast", "POST", "/v1/audio/speech", {"json": {"model": "speech", "input": "hi", "voice": "alloy",
                                                             "speed": 10}}),
    ("speech of nothing", "POST", "/v1/audio/speech", {"json": {"model": "speech", "input": "", "voice": "alloy"}}),
    ("speech over the length limit", "POST", "/v1/audio/speech", {"json": {"model": "speech", "input": "word " * 200,
                                                                          "voice": "alloy"}}),
    ("speech by an unknown model", "POST", "/v1/audio/speech", {"json": {"model": "tts-1", "input": "hi",
                                                                        "voice": "alloy"}}),
    ("speech in an unknown voice", "POST", "/v1/audio/speech", {"json": {"model": "speech", "input": "hi",
                                                                        "voice": "nobody"}}),
    # transcription
    ("a transcription sent as JSON", "POST", "/v1/audio/transcriptions", {"json": {"model": "recogniser"}}),
    ("a transcription without a file", "POST", "/v1/audio/transcriptions", {"data": {"model": "recogniser"},
                                                                           "files": {"other": ("x", b"x")}}),
    ("a transcription of a file that is not audio", "POST", "/v1/audio/transcriptions", transcription(
        b"this is not audio at all")),
    ("a transcription of a truncated WAV", "POST", "/v1/audio/transcriptions", transcription(TRUNCATED_WAV)),
    ("a transcription of an empty file", "POST", "/v1/audio/transcriptions", transcription(b"")),
    ("a transcription in an unknown format", "POST", "/v1/audio/transcriptions", transcription(
        response_format="docx")),
    ("a transcription by an unknown model", "POST", "/v1/audio/transcriptions", transcription(model="whisper-1")),
    ("malformed multipart", "POST", "/v1/audio/transcriptions", raw(b"--x\r\nnonsense", "multipart/form-data; boundary=x")),
    # routes and stored things
    ("an unknown route", "GET", "/v1/nothing-here", {}),
    ("a wrong method", "GET", "/v1/embeddings", {}),
    ("an unknown model by id", "GET", "/v1/models/gpt-9", {}),
    ("an unknown stored completion", "GET", "/v1/chat/completions/chatcmpl-nothing", {}),
    ("messages of an unknown stored completion", "GET", "/v1/chat/completions/chatcmpl-nothing/messages", {}),
    ("a listing of zero items", "GET", "/v1/chat/completions?limit=0", {}),
    ("a listing in an unknown order", "GET", "/v1/chat/completions?order=sideways", {}),
    ("a listing after an unknown item", "GET", "/v1/conversations?after=conv_nothing", {}),
    ("an unknown conversation by id", "GET", "/v1/conversations/conv_nothing/messages", {}),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    models = save_models(root / "models", answers=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "polymodal.speech", fake_speech())
        app = create_app(models, Settings(store=root / "store.sqlite", limits=LIMITS, image_steps=2))
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "method", "path", "arguments"), CASES, ids=[c[0] for c in CASES])
def test_a_malformed_request_gets_a_4xx_in_the_envelope(client, name, method, path, arguments):
    response = client.request(method, path, **arguments)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and len(error["message"]) > 10 and "Traceback" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-should-retry"] == "false"
    # the server still answers a good request
    good = client.post("/v1/embeddings", json={"model": "clip", "input": "a red circle", "encoding_format": "float"})
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 16


def test_errors_name_the_field_and_the_problem(client):
    def error(arguments, path="/v1/chat/completions"):
        return client.post(path, **arguments).json()["error"]

    bad = error(chat(messages=user(QUESTION, image_part(TRUNCATED_PNG))))
    assert bad["param"] == "messages[0].content[1].image_url.url" and "truncated" in bad["message"]
    bad = error(chat(messages=user(audio_part(NOT_AUDIO))))
    assert bad["param"] == "messages[0].content[0].input_audio.data" and "cannot decode audio" in bad["message"]
    bad = error(chat(messages=user(QUESTION, image_part(HUGE_PNG))))
    assert "6000x6000 pixels exceeds the limit" in bad["message"]
    assert error(chat(messages=[{"role": "user", "content": 42}]))["param"] == "messages[0].content"
    bad = error(chat(messages=user(audio_part(b64(tone(0.2)), "aiff"))))
    assert bad["param"] == "messages[0].content[0].input_audio.format" and "'wav'" in bad["message"]
    bad = error(chat(messages=user({"type": "hologram"})))
    assert bad["param"] == "messages[0].content[0]" and "'hologram'" in bad["message"]
    assert error(chat(model=...))["code"] == "missing_required_parameter"
    assert error(chat(model="gpt-9"))["code"] == "model_not_found"
    assert error(chat(messages=user(image_part("http://127.0.0.1:9/x.png"))))["code"] == "remote_url_not_allowed"
    assert error(raw(b'{"model": '))["code"] == "invalid_json"
    bad = client.post("/v1/images/generations", json={"prompt": "a", "n": 1_000_000}).json()["error"]
    assert bad["param"] == "n" and "at most 4" in bad["message"]


def test_a_malformed_stream_request_is_an_error_not_a_stream(client):
    response = client.post("/v1/chat/completions", **chat(stream=True, messages=user(image_part(TRUNCATED_PNG))))
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert json.loads(response.text)["error"]["param"] == "messages[0].content[0].image_url.url"
