"""The request bodies the server reads, in the shapes of OpenAI's API (as its Python client sends
them: ``openai/types/*_params.py``).

Validation is strict (``"n": "2"`` is a wrong type, not a 2): a client that sends the wrong
type has a bug it should hear about. Parameters of OpenAI's API that change nothing here
(``user``, ``frequency_penalty``, ...) are accepted and ignored; those whose meaning the server
cannot honour (``tools``, a JSON ``response_format``, ``logprobs``) are refused by the routes
with a message saying so, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAT_AUDIO_FORMATS = ("wav", "aac", "mp3", "flac", "opus", "pcm16")
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # a 64-bit integer, as OpenAI's


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- chat ----


class TextPart(Request):
    type: Literal["text"]
    text: str


class ImageURL(Request):
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None


class ImagePart(Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Request):
    data: str  # base64
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class RefusalPart(Request):
    type: Literal["refusal"]
    refusal: str


class FilePart(Request):
    type: Literal["file"]
    file: dict  # refused by the routes: the server reads no files but images and audio


ContentPart = Annotated[TextPart | ImagePart | AudioPart | RefusalPart | FilePart, Field(discriminator="type")]


class AudioReference(Request):
    id: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    audio: AudioReference | None = None  # an earlier spoken reply of the assistant, by id
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def needs_content(self):
        if self.content is None and self.role in ("system", "developer", "user", "tool"):
            raise ValueError(f"a {self.role} message needs content")
        return self


class VoiceId(Request):
    id: str


class AudioOutput(Request):
    voice: str | VoiceId
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class StreamOptions(Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(Request):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio", "image"]] | None = None
    audio: AudioOutput | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    tools: list[dict] | None = None
    functions: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    conversation: str | None = None  # polymodal: keep this turn in a stored conversation (its id)

    @field_validator("metadata")
    @classmethod
    def metadata_within_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


# ---- embeddings ----


class EmbeddingRequest(Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# ---- images ----


class ImageGenerationRequest(Request):
    prompt: str
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None  # "auto" or "WxH"
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    seed: Seed | None = None  # polymodal: the same seed draws the same images
    steps: int | None = Field(None, ge=1)  # polymodal: denoising steps
    guidance: float | None = Field(None, ge=0, le=50)  # polymodal: classifier-free guidance
    best_of: int | None = Field(None, ge=1)  # polymodal: drawings to choose each image from (omni models)
    user: str | None = None


# ---- speech ----


class SpeechRequest(Request):
    model: str
    input: str
    voice: str | VoiceId
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] | None = None
    speed: float | None = Field(None, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] | None = None


# ---- conversations (polymodal's own: the web page keeps its chats here) ----


class ConversationRequest(Request):
    title: str | None = Field(None, max_length=200)
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def metadata_within_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's limits on ``metadata``: at most 16 pairs, keys of at most 64 characters, values
    of at most 512."""
    if value is not None:
        if len(value) > 16:
            raise ValueError(f"{len(value)} pairs; at most 16 are kept")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError(f"key {key[:70]!r}: keys have at most 64 characters and values at most 512")
    return value
