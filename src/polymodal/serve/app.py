"""The HTTP server: OpenAI's API over the saved models of a folder (FastAPI).

:func:`create_app` builds it; ``polymodal serve`` runs it with uvicorn. The routes speak the
shapes of OpenAI's API as its Python client reads them (``openai/types``), plus a few fields of
polymodal's own: ``GET /v1/models`` says what each model reads, writes and answers; a chat
completion says which models made it (``polymodal.models``); ``/v1/conversations`` keeps a chat
for the web page, which ``/`` serves (``static/``: plain HTML, CSS and JavaScript, no CDN).

Around every route: the API key (when set, every ``/v1`` route answers 401 without it, before
the body is read) and the body limit (413 before the body is read when its length is declared,
as soon as it passes the limit when it is not). Model calls and the store run in worker threads,
never on the event loop.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from polymodal.modalities.audio import log_mel_spectrogram
from polymodal.modalities.image import ImageTransform
from polymodal.serve.chat import (
    ModelResponder,
    Reply,
    ReplyOptions,
    Responder,
    count_tokens,
    draw_images,
    read_turns,
    transcribe_with,
)
from polymodal.serve.errors import APIError, bad_request, envelope, install_handlers
from polymodal.serve.media import data_url, decode_audio, decode_image, parse_data_url, png_bytes
from polymodal.serve.registry import (
    ASSISTANT,
    RECOGNISER,
    SPEECH,
    EmbedInput,
    Registry,
    ServedModel,
    timestamp,
)
from polymodal.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ConversationRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
    SpeechRequest,
)
from polymodal.serve.settings import Settings
from polymodal.serve.store import Store, new_id
from polymodal.serve.voice import CONTENT_TYPES, Speech, Transcript

STORE_FILE = "serve.sqlite"
SPOKEN_REPLY = ("alloy", "wav")  # voice and format of a spoken reply the request did not ask for in its 'audio'
PAGE = Path(__file__).parent / "static"  # the web page: package data, served at /
# The page loads only its own files; what the server sends (replies, images, audio) is data, never code.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
Limit = Annotated[int, Query(ge=1, le=100)]  # items in a page of a listing
Order = Annotated[Literal["asc", "desc"], Query()]
log = logging.getLogger("polymodal.serve")


# ---- around every request: the API key and the body limit ----


class Guard:
    """ASGI middleware: the API key on ``/v1`` routes, then the body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key and (path == "/v1" or path.startswith("/v1/")) and not self.authorised(headers):
            error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"www-authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than the limit of {limit:,} bytes",
                             code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await bad_request("invalid Content-Length header", code="invalid_header").response()(
                    scope, receive, send)
            if int(declared) > limit:
                return await too_large.response()(scope, receive, send)
            return await self.app(scope, receive, send)
        if "chunked" not in headers.get("transfer-encoding", ""):
            return await self.app(scope, receive, send)
        body = bytearray()  # no declared length: read it here, counting, before the route sees it
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())


# ---- the app ----


def create_app(models_dir: str | Path, settings: Settings | None = None, responder: Responder | None = None, *,
               make_responder: Callable[[Registry, Speech, Settings], Responder] | None = None) -> FastAPI:
    """The server over the saved models in ``models_dir`` (see :class:`Registry`), keeping
    conversations and stored completions in ``settings.store`` (default: ``serve.sqlite`` in
    ``models_dir``). ``responder`` makes chat replies (default :class:`ModelResponder`);
    ``make_responder`` builds one from the server's models, speech and settings (the assistant
    pipeline, which ``polymodal serve`` uses, is built so)."""
    from polymodal import __version__

    settings = settings or Settings.from_env()
    registry = Registry(models_dir, settings)
    store = Store(settings.store or Path(models_dir) / STORE_FILE)
    speech = Speech(None if settings.recogniser in registry.models else settings.recogniser)
    responder = responder or (make_responder or ModelResponder)(registry, speech, settings)
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        store.close()

    app = FastAPI(title="polymodal", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over polymodal's saved models.")
    app.state.registry, app.state.store, app.state.speech, app.state.settings = registry, store, speech, settings
    install_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=limits.max_body_bytes)

    # ---- models ----

    def virtual_models() -> list[dict]:
        now = timestamp()
        hears = speech.can_hear or any("audio.transcriptions" in m.capabilities() for m in registry.models.values())
        out = [{"id": ASSISTANT, "object": "model", "created": now, "owned_by": "polymodal", "family": "pipeline",
                "tasks": ["chat"], "input_modalities": ["text", "image"] + (["audio"] if hears else []),
                "output_modalities": ["text"] + (["image"] if registry.with_task("generate image") else [])
                + (["audio"] if speech.can_speak else []),
                "capabilities": ["chat.completions"], "models": sorted(registry.models)}]
        if speech.can_speak:
            out.append({"id": SPEECH, "object": "model", "created": now, "owned_by": "polymodal", "family": "speech",
                        "tasks": ["speak"], "input_modalities": ["text"], "output_modalities": ["audio"],
                        "capabilities": ["audio.speech"]})
        if speech.can_hear:
            out.append({"id": RECOGNISER, "object": "model", "created": now, "owned_by": "polymodal",
                        "family": "speech", "tasks": ["transcribe"], "input_modalities": ["audio"],
                        "output_modalities": ["text"], "capabilities": ["audio.transcriptions"]})
        return [m for m in out if m["id"] not in registry.models]

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict:
        served = await run_in_threadpool(lambda: [m.describe() for m in registry.models.values()])
        return {"object": "list", "data": served + virtual_models()}

    @app.get("/v1/models/{model_id:path}", tags=["models"])
    async def get_model(model_id: str) -> dict:
        for virtual in virtual_models():
            if virtual["id"] == model_id:
                return virtual
        return await run_in_threadpool(registry.get(model_id, param=None).describe)

    # ---- embeddings ----

    def embedding_inputs(served: ServedModel, body: EmbeddingRequest) -> list[EmbedInput]:
        given = body.input
        if isinstance(given, str):
            given = [given]
        if not given:
            raise bad_request("'input' is empty: give a string or a non-empty list of strings", "input")
        if not all(isinstance(x, str) for x in given):
            raise bad_request("token ids are not accepted: send text (strings), or images and audio as data: URLs",
                              "input", code="invalid_type")
        if len(given) > limits.max_inputs:
            raise bad_request(f"{len(given):,} inputs; the limit is {limits.max_inputs:,} per request", "input",
                              code="array_above_max_length")
        model = served.get()
        dimensions = getattr(model.config, "embed_dim", None)
        if body.dimensions is not None and body.dimensions != dimensions:
            raise bad_request(f"the model {served.id!r} gives {dimensions}-dimensional embeddings; 'dimensions' "
                              f"must be {dimensions} or left out", "dimensions")
        towers = {kind: model.tower_reading(kind) for kind in ("text", "image", "audio")}
        reads = ", ".join(k for k, t in towers.items() if t) or "nothing"
        out = []
        for i, item in enumerate(given):
            param = "input" if isinstance(body.input, str) else f"input[{i}]"
            if not item.strip():
                raise bad_request(f"'{param}' is empty: give text, or an image or audio as a data: URL", param)
            if len(item) > limits.max_text_chars and not item.startswith("data:"):
                raise bad_request(f"{param}: text of {len(item):,} characters; the limit is {limits.max_text_chars:,}",
                                  param, code="string_above_max_length")
            if item.startswith("data:"):
                media = parse_data_url(item, param, limits.max_body_bytes)
                kind = media.mime.split("/")[0]
                if kind not in ("image", "audio"):
                    raise bad_request(f"{param}: {media.mime} cannot be embedded; send text, image/* or audio/*", param)
            else:
                media, kind = None, "text"
            tower = towers[kind]
            if tower is None:
                raise bad_request(f"{param}: the model {served.id!r} cannot embed {kind}; it embeds: {reads}", param,
                                  code="model_not_supported")
            if kind == "text":
                value = item
            elif kind == "image":
                value = ImageTransform(model.image_size)(decode_image(media.data, param, settings))
            else:
                value = log_mel_spectrogram(decode_audio(media.data, param, settings))
            out.append(EmbedInput(tower, kind, value))
        return out

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def embeddings(body: EmbeddingRequest) -> dict:
        served = registry.for_task("embed", body.model, "/v1/embeddings")
        inputs = await run_in_threadpool(embedding_inputs, served, body)
        assert served.batcher is not None
        vectors = await served.batcher.embed(inputs)
        as_base64 = body.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        tokens = sum(count_tokens(x.value) if x.kind == "text" else 1 for x in inputs)
        return {"object": "list", "data": data, "model": served.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- chat ----

    def check_chat(body: ChatCompletionRequest) -> tuple[frozenset[str], int]:
        """The wanted output modalities and token budget; a 400 for what cannot be honoured."""
        if body.model in (SPEECH, RECOGNISER) and body.model not in registry.models:
            raise APIError(400, f"the model {body.model!r} cannot chat; use {ASSISTANT!r}", param="model",
                           code="model_not_supported")
        if body.model != ASSISTANT:
            registry.get(body.model)
        if body.tools or body.functions:
            raise APIError(400, "tools and functions are not supported by this server", param="tools",
                           code="unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only text responses are supported ('response_format' type 'text')",
                           param="response_format", code="unsupported_parameter")
        if body.logprobs:
            raise APIError(400, "log probabilities are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        if (body.n or 1) != 1:
            raise APIError(400, "'n' must be 1: one choice per request", param="n", code="unsupported_parameter")
        if len(body.messages) > limits.max_messages:
            raise bad_request(f"{len(body.messages)} messages; the limit is {limits.max_messages}", "messages",
                              code="array_above_max_length")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > limits.max_tokens:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise bad_request(f"'{param}' is {wanted}; this server generates at most {limits.max_tokens} tokens", param,
                              code="integer_above_max_value")
        modalities = frozenset(body.modalities or ["text"])
        if "audio" in modalities:
            if body.audio is None:
                raise bad_request("'audio' ({voice, format}) is required when 'modalities' includes \"audio\"", "audio",
                                  code="missing_required_parameter")
            speech.function("synthesise")  # a 501 now, not halfway through the reply
        return modalities, wanted or min(64, limits.max_tokens)

    async def conversation_history(id: str) -> list[ChatMessage]:
        if await run_in_threadpool(store.conversation, id) is None:
            raise APIError(404, f"no conversation {id!r}", param="conversation", code="conversation_not_found")
        out = []
        for message in await run_in_threadpool(store.messages, id):
            if message.get("content") is None and isinstance(message.get("audio"), dict):  # a spoken reply
                message = {**message, "content": message["audio"].get("transcript", "")}
            out.append(ChatMessage.model_validate({k: v for k, v in message.items() if k in ChatMessage.model_fields}))
        return out

    def speak(text: str, body: ChatCompletionRequest) -> dict:
        """``message.audio`` of ``text``, in the request's voice and format, or (a spoken reply
        the responder chose) in :data:`SPOKEN_REPLY`'s."""
        voice, fmt = SPOKEN_REPLY
        if body.audio is not None:
            voice = body.audio.voice if isinstance(body.audio.voice, str) else body.audio.voice.id
            fmt = "pcm" if body.audio.format == "pcm16" else body.audio.format
        if not text.strip():
            text = "I have nothing to say to that."
        audio = speech.synthesise(text, voice, 1.0, fmt)
        return {"id": new_id("audio_"), "data": base64.b64encode(audio).decode(), "transcript": text,
                "expires_at": timestamp() + settings.audio_expires_s}

    def completion_of(id: str, created: int, body: ChatCompletionRequest, reply: Reply, text: str,
                      audio: dict | None, prompt_tokens: int) -> dict:
        asked = "audio" in (body.modalities or [])  # a spoken reply nobody asked for keeps its text as content
        message: dict = {"role": "assistant", "content": None if audio and asked else text, "refusal": None,
                         "annotations": []}
        if audio:
            message["audio"] = audio
        if reply.images:
            message["images"] = [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}}
                                 for png in reply.images]
        completion_tokens = count_tokens(text)
        return {"id": id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "service_tier": "default", "system_fingerprint": None,
                "polymodal": {"models": reply.models, "heard": reply.heard, "route": reply.route}}

    def keep(completion: dict, body: ChatCompletionRequest, sent: list[dict]) -> None:
        """Store what must be kept before the client is answered: the completion (``store``), the
        turn (``conversation``: the user's messages and the reply, together or not at all)."""
        if body.store:
            store.save_completion(completion, sent, body.metadata)
        if body.conversation:
            message = {k: v for k, v in completion["choices"][0]["message"].items() if v is not None}
            message["models"] = completion["polymodal"]["models"]
            if completion["polymodal"]["heard"]:  # what speech in the turn was heard as, for the page
                message["heard"] = completion["polymodal"]["heard"]
            title = next((m["content"] if isinstance(m["content"], str) else
                          " ".join(p["text"] for p in m["content"] if p["type"] == "text")
                          for m in sent if m["role"] == "user" and m.get("content")), None)
            store.append_messages(body.conversation, [*sent, message], (title or "").strip()[:80] or None)

    @app.post("/v1/chat/completions", tags=["chat"])
    async def chat_completions(body: ChatCompletionRequest):
        modalities, budget = check_chat(body)
        earlier = await conversation_history(body.conversation) if body.conversation else []
        turns = (await run_in_threadpool(partial(read_turns, earlier, settings, stored=True))
                 + await run_in_threadpool(read_turns, body.messages, settings))
        sent = [m.model_dump(exclude_none=True) for m in body.messages]
        options = ReplyOptions(model=body.model, max_tokens=budget, temperature=body.temperature, top_p=body.top_p,
                               seed=body.seed, modalities_named=body.modalities is not None)
        reply = await run_in_threadpool(responder, turns, modalities, options)
        prompt_tokens = sum(count_tokens(t.text) for t in turns)
        id, created = new_id("chatcmpl-"), timestamp()
        if not body.stream:
            text = await run_in_threadpool(reply.text)
            spoken = "audio" in modalities or reply.speak
            audio = await run_in_threadpool(speak, text, body) if spoken else None
            completion = completion_of(id, created, body, reply, text, audio, prompt_tokens)
            await run_in_threadpool(keep, completion, body, sent)
            return completion
        return StreamingResponse(stream(id, created, body, modalities, reply, prompt_tokens, sent),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def stream(id: str, created: int, body: ChatCompletionRequest, modalities: frozenset[str], reply: Reply,
                     prompt_tokens: int, sent: list[dict]) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: a role delta, content deltas, a chunk with the
        finish reason, the usage chunk when asked, and ``[DONE]`` always, after an error too."""
        usage = bool(body.stream_options and body.stream_options.include_usage)

        def event(choices: list[dict], **extra) -> str:
            chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                     "service_tier": "default", "system_fingerprint": None, "choices": choices, **extra}
            if usage and "usage" not in chunk:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        def delta(content: dict, finish: str | None = None) -> str:
            return event([{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}])

        try:
            yield delta({"role": "assistant", "content": "", "refusal": None})
            pieces: list[str] = []
            if "audio" in modalities:  # asked for audio: the text comes as its transcript
                text = await run_in_threadpool(reply.text)
            else:
                async for piece in iterate_in_threadpool(iter(reply.pieces)):
                    pieces.append(piece)
                    yield delta({"content": piece})
                text = reply._text if reply._text is not None else "".join(pieces)
            audio = None
            if "audio" in modalities or reply.speak:
                audio = await run_in_threadpool(speak, text, body)
                yield delta({"audio": {"id": audio["id"], "transcript": audio["transcript"], "data": audio["data"]}})
                yield delta({"audio": {"expires_at": audio["expires_at"]}})
            if reply.images:
                yield delta({"images": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}}
                                        for png in reply.images]})
            completion = completion_of(id, created, body, reply, text, audio, prompt_tokens)
            await run_in_threadpool(keep, completion, body, sent)
            yield event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason}],
                        polymodal=completion["polymodal"])  # which models made it, what was heard
            if usage:
                yield event([], usage=completion["usage"])
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # the status line went out already: the error travels in the stream
            log.exception("error while streaming %s", id)
            yield f"data: {json.dumps(envelope(f'the server failed: {type(e).__name__}', 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    # ---- stored completions ----

    def page(items: list[dict], after: str | None, limit: int, order: str) -> dict:
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise bad_request(f"'after': no item {after!r}", "after")
            items = items[ids.index(after) + 1:]
        data = items[:limit]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}

    async def stored(id: str) -> dict:
        found = await run_in_threadpool(store.completion, id)
        if found is None:
            raise APIError(404, f"no stored chat completion {id!r} (completions are kept with 'store': true)",
                           param="completion_id", code="not_found")
        return found

    @app.get("/v1/chat/completions", tags=["chat"])
    async def list_completions(request: Request, model: str | None = None, after: str | None = None,
                               limit: Limit = 20, order: Order = "asc") -> dict:
        metadata = {m[1]: v for k, v in request.query_params.items() if (m := re.fullmatch(r"metadata\[(.+)\]", k))}
        items = await run_in_threadpool(store.completions, model, metadata)
        return page(items, after, limit, order)

    @app.get("/v1/chat/completions/{completion_id}", tags=["chat"])
    async def get_completion(completion_id: str) -> dict:
        return await stored(completion_id)

    @app.get("/v1/chat/completions/{completion_id}/messages", tags=["chat"])
    async def completion_messages(completion_id: str, after: str | None = None, limit: Limit = 20,
                                  order: Order = "asc") -> dict:
        await stored(completion_id)
        messages = await run_in_threadpool(store.completion_messages, completion_id)
        return page([store_message(m) for m in messages or []], after, limit, order)

    @app.delete("/v1/chat/completions/{completion_id}", tags=["chat"])
    async def delete_completion(completion_id: str) -> dict:
        await stored(completion_id)
        await run_in_threadpool(store.delete_completion, completion_id)
        return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}

    # ---- conversations (polymodal's own) ----

    async def conversation(id: str) -> dict:
        found = await run_in_threadpool(store.conversation, id)
        if found is None:
            raise APIError(404, f"no conversation {id!r}", param="conversation_id", code="conversation_not_found")
        return found

    @app.post("/v1/conversations", tags=["conversations"])
    async def create_conversation(body: ConversationRequest | None = None) -> dict:
        body = body or ConversationRequest()
        return await run_in_threadpool(store.create_conversation, body.title, body.metadata)

    @app.get("/v1/conversations", tags=["conversations"])
    async def list_conversations(after: str | None = None, limit: Limit = 20) -> dict:
        return page(await run_in_threadpool(store.conversations), after, limit, "asc")

    @app.get("/v1/conversations/{conversation_id}", tags=["conversations"])
    async def get_conversation(conversation_id: str) -> dict:
        return await conversation(conversation_id)

    @app.get("/v1/conversations/{conversation_id}/messages", tags=["conversations"])
    async def conversation_messages(conversation_id: str, after: str | None = None,
                                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        await conversation(conversation_id)
        return page(await run_in_threadpool(store.messages, conversation_id), after, limit, "asc")

    @app.delete("/v1/conversations/{conversation_id}", tags=["conversations"])
    async def delete_conversation(conversation_id: str) -> dict:
        await conversation(conversation_id)
        await run_in_threadpool(store.delete_conversation, conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/media/{media_id}", tags=["conversations"])
    async def get_media(media_id: str) -> Response:
        found = await run_in_threadpool(store.media, media_id)
        if found is None:
            raise APIError(404, f"no media {media_id!r}", param="media_id", code="not_found")
        return Response(found[1], media_type=found[0])

    # ---- audio ----

    def transcriber(model: str):
        """A function waveform -> Transcript for the model the request named."""
        if model in registry.models:
            served = registry.get(model)
            if not (served.can("caption") and "audio" in served.input_modalities()):
                raise APIError(400, f"the model {model!r} cannot transcribe: it does not caption audio", param="model",
                               code="model_not_supported")
            return lambda waveform: transcribe_with(served, waveform)
        if model == RECOGNISER:
            return speech.transcribe
        known = sorted({*registry.models, RECOGNISER})
        raise APIError(404, f"the model {model!r} does not exist; transcription models: {', '.join(known)}",
                       param="model", code="model_not_found")

    @app.post("/v1/audio/transcriptions", tags=["audio"])
    async def transcriptions(
        file: Annotated[UploadFile, File(description="The audio: wav, mp3, flac or ogg.")],
        model: Annotated[str, Form()],
        language: Annotated[str | None, Form()] = None,
        prompt: Annotated[str | None, Form()] = None,
        response_format: Annotated[Literal["json", "text", "srt", "verbose_json", "vtt"], Form()] = "json",
        temperature: Annotated[float | None, Form(ge=0, le=1)] = None,
        timestamp_granularities: Annotated[list[Literal["word", "segment"]] | None,
                                           Form(alias="timestamp_granularities[]")] = None,
    ):
        transcribe = transcriber(model)
        if timestamp_granularities and "word" in timestamp_granularities:
            raise bad_request("word timestamps are not available; ask for 'segment'", "timestamp_granularities[]",
                              code="unsupported_parameter")
        data = await file.read()
        waveform = await run_in_threadpool(decode_audio, data, "file", settings)
        transcript: Transcript = await run_in_threadpool(transcribe, waveform)
        duration = round(waveform.shape[-1] / 16_000, 3)
        if response_format == "text":
            return PlainTextResponse(transcript.text + "\n")
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(subtitles(transcript, response_format),
                                     media_type="text/vtt" if response_format == "vtt" else "application/x-subrip")
        if response_format == "json":
            return {"text": transcript.text, "usage": {"type": "duration", "seconds": duration}}
        segments = [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
                     "temperature": temperature or 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0,
                     "no_speech_prob": 0.0} for i, s in enumerate(transcript.segments)]
        return {"task": "transcribe", "language": language or transcript.language, "duration": duration,
                "text": transcript.text, "segments": segments, "usage": {"type": "duration", "seconds": duration}}

    @app.post("/v1/audio/speech", tags=["audio"], response_class=Response)
    async def audio_speech(body: SpeechRequest) -> Response:
        if body.model != SPEECH:
            if body.model in registry.models:
                raise APIError(400, f"the model {body.model!r} cannot speak; use {SPEECH!r}", param="model",
                               code="model_not_supported")
            raise APIError(404, f"the model {body.model!r} does not exist; speech is made by {SPEECH!r}",
                           param="model", code="model_not_found")
        if not body.input.strip():
            raise bad_request("'input' is empty: give the text to speak", "input")
        if len(body.input) > limits.max_speech_chars:
            raise bad_request(f"'input' has {len(body.input):,} characters; the limit is {limits.max_speech_chars:,}",
                              "input", code="string_above_max_length")
        if body.stream_format == "sse":
            raise bad_request("'stream_format' \"sse\" is not supported; the audio comes whole", "stream_format",
                              code="unsupported_parameter")
        fmt = body.response_format or "mp3"
        voice = body.voice if isinstance(body.voice, str) else body.voice.id
        audio = await run_in_threadpool(speech.synthesise, body.input, voice, body.speed or 1.0, fmt)
        return Response(audio, media_type=CONTENT_TYPES[fmt])

    # ---- images ----

    @app.post("/v1/images/generations", tags=["images"])
    async def image_generations(body: ImageGenerationRequest) -> dict:
        served = registry.for_task("generate image", body.model, "/v1/images/generations")
        prompt = body.prompt.strip()
        if not prompt:
            raise bad_request("'prompt' is empty: describe the image", "prompt")
        if len(prompt) > limits.max_text_chars:
            raise bad_request(f"'prompt' has {len(prompt):,} characters; the limit is {limits.max_text_chars:,}",
                              "prompt", code="string_above_max_length")
        n = body.n or 1
        if n > limits.max_n:
            raise bad_request(f"'n' is {n}; this server draws at most {limits.max_n} images a request", "n",
                              code="integer_above_max_value")
        if body.response_format == "url":
            raise bad_request("'response_format' \"url\" is not supported: images come as b64_json", "response_format",
                              code="unsupported_parameter")
        for param, most in (("steps", limits.max_diffusion_steps), ("best_of", limits.max_best_of)):
            if (getattr(body, param) or 0) > most:  # before the model loads (draw_images checks the model's own)
                raise bad_request(f"'{param}' is {getattr(body, param)}; the limit is {most}", param,
                                  code="integer_above_max_value")
        native = await run_in_threadpool(lambda: served.get().config.image_size)
        side = native
        if body.size not in (None, "auto"):
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
            if not match:
                raise bad_request(f"'size' {body.size!r} is not 'auto' or WIDTHxHEIGHT", "size")
            width, height = int(match[1]), int(match[2])
            if width != height or not 0 < width <= limits.max_image_side:
                raise bad_request(f"'size' {body.size!r}: this model draws square images of at most "
                                  f"{limits.max_image_side} pixels a side (it draws {native}x{native})", "size")
            side = width
        fmt = body.output_format or "png"
        pngs = await served.run(partial(draw_images, guidance=body.guidance, steps=body.steps, best_of=body.best_of),
                                [prompt] * n, body.seed or 0, settings, side)
        if fmt != "png":
            pngs = [await run_in_threadpool(convert_image, p, fmt) for p in pngs]
        return {"created": timestamp(), "data": [{"b64_json": base64.b64encode(p).decode(), "revised_prompt": None}
                                                 for p in pngs],
                "output_format": fmt, "size": f"{side}x{side}", "model": served.id}

    # ---- outside /v1 ----

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers={"content-security-policy": PAGE_POLICY,
                                                           "cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/health", tags=["server"])
    async def health() -> dict:
        batchers = [m.batcher for m in registry.models.values() if m.batcher is not None]
        return {"status": "ok", "models": sorted(registry.models),
                "embedding": {"requests": sum(b.requests for b in batchers),
                              "inputs": sum(b.inputs for b in batchers),
                              "forwards": sum(b.forwards for b in batchers)}}

    return app


# ---- shapes ----


def store_message(message: dict) -> dict:
    """A request message as ``messages.list`` gives it (ChatCompletionStoreMessage): ``content``
    its text, ``content_parts`` its parts when it had several."""
    parts = message.get("content")
    out = {k: v for k, v in message.items() if k != "content"}
    if isinstance(parts, list):
        out["content"] = "\n".join(p["text"] for p in parts if p.get("type") == "text") or None
        out["content_parts"] = parts
    else:
        out["content"], out["content_parts"] = parts, None
    return out


def subtitles(transcript: Transcript, kind: str) -> str:
    """SRT or WebVTT of a transcript's segments."""
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        h, ms = divmod(ms, 3_600_000)
        m, ms = divmod(ms, 60_000)
        s, ms = divmod(ms, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{',' if kind == 'srt' else '.'}{ms:03d}"

    blocks = [f"{stamp(s.start)} --> {stamp(s.end)}\n{s.text.strip()}\n" for s in transcript.segments]
    if kind == "srt":
        return "\n".join(f"{i}\n{b}" for i, b in enumerate(blocks, 1))
    return "WEBVTT\n\n" + "\n".join(blocks)


def convert_image(png: bytes, fmt: str) -> bytes:
    """A PNG re-encoded as JPEG or WebP."""
    return png_bytes(Image.open(io.BytesIO(png)).convert("RGB"), fmt)
