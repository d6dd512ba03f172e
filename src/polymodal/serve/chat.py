"""Chat: a conversation's messages, decoded, and the reply that the served models make to it.

The seam: :class:`Responder` turns decoded messages (:class:`Turn`) and the wanted output
modalities into a :class:`Reply`. The server owns everything around it (parsing, limits,
streaming, speech out, storage); the responder only decides what to say or draw and which models
say it. :class:`ModelResponder` is today's responder, built on the served models alone:

- an explicit request for an image (``modalities`` with ``"image"``, or a text-to-image model
  named as ``model``) is drawn by a text-to-image model, the prompt taken from the request;
- a message with an image (or a question after one) goes to a captioner: a question is answered
  (VQA), anything else gets a caption;
- speech in a message is transcribed first, and the transcript is the request;
- anything else would need a language model, which this responder does not have: it says so,
  and what the served models can do instead.

The assistant pipeline (:mod:`polymodal.assistant.pipeline`: a router that infers the wanted
modality, a language model for open-ended chat) replaces it: ``polymodal serve`` passes it to
:func:`polymodal.serve.app.create_app` as ``make_responder``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from polymodal.modalities.audio import SAMPLE_RATE, log_mel_spectrogram
from polymodal.modalities.image import ImageTransform, to_pil
from polymodal.serve.errors import APIError
from polymodal.serve.media import decode_audio, decode_base64, decode_image, png_bytes, read_url
from polymodal.serve.registry import ASSISTANT, Registry, ServedModel
from polymodal.serve.schemas import ChatMessage, ImagePart, TextPart
from polymodal.serve.settings import Settings
from polymodal.serve.voice import Speech, Transcript, as_transcript


@dataclass
class Turn:
    """One message, decoded: its text parts joined, its images and its audio (mono, 16 kHz)."""

    role: str
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ReplyOptions:
    model: str = ASSISTANT  # the model the request named
    max_tokens: int = 64  # at most this many generated tokens
    temperature: float | None = None  # None or 0: greedy decoding; above 0: nucleus sampling
    top_p: float | None = None
    seed: int | None = None
    image_size: int | None = None  # side of drawn images (None: the model's own)
    modalities_named: bool = False  # the request named its output modalities (else the responder may choose)


@dataclass
class Reply:
    """What the responder says: text (in the pieces it streams in, a language model's tokens as
    they come), images (PNG files), which models made it, and what was heard in speech input.
    ``speak``: the responder chose a spoken reply (the server speaks it as if the request had
    asked for audio); ``route``: how the output modality was chosen, reported with the reply.
    ``finish_reason`` may be set while ``pieces`` is read (a language model knows it at the end)."""

    pieces: Iterable[str]
    images: list[bytes] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    heard: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    speak: bool = False
    route: dict | None = None
    _text: str | None = None

    @classmethod
    def of(cls, text: str, **kw) -> Reply:
        return cls(pieces=word_pieces(text), _text=text, **kw)

    def text(self) -> str:
        """The whole text (consumes ``pieces`` if it was not whole already)."""
        if self._text is None:
            self._text = "".join(self.pieces)
        return self._text


class Responder(Protocol):
    def __call__(self, turns: list[Turn], modalities: frozenset[str], options: ReplyOptions) -> Reply: ...


def word_pieces(text: str) -> Iterator[str]:
    """``text`` as the pieces a stream sends: each word with the space after it."""
    yield from re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def count_tokens(text: str) -> int:
    """Words and punctuation marks: the usage the server reports (its models have different
    tokenizers, so no one model's count would be right for a reply several models made)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# ---- reading messages ----


def read_turns(messages: list[ChatMessage], settings: Settings, *, stored: bool = False) -> list[Turn]:
    """Decode each message's parts: text joined, images and audio decoded within the limits.
    Errors name the part (``messages[1].content[0].image_url.url``). ``stored``: the messages
    of a stored conversation, accepted once already (the limit on media parts is a request's)."""
    limits = settings.limits
    turns, media = [], 0
    for i, message in enumerate(messages):
        turn = Turn(message.role)
        texts: list[str] = []
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for j, part in enumerate(parts or []):
            where = f"messages[{i}].content" + ("" if isinstance(message.content, str) else f"[{j}]")
            if part.type == "text":
                if len(part.text) > limits.max_text_chars:
                    raise APIError(400, f"{where}: text of {len(part.text):,} characters; the limit is "
                                   f"{limits.max_text_chars:,}", param=where, code="string_above_max_length")
                texts.append(part.text)
            elif part.type == "refusal":
                texts.append(part.refusal)
            elif part.type in ("image_url", "input_audio"):
                media += 1
                if media > limits.max_media_parts and not stored:
                    raise APIError(400, f"{where}: more than {limits.max_media_parts} images and audio clips in one "
                                   "request", param=where, code="too_many_media")
                if isinstance(part, ImagePart):
                    found = read_url(part.image_url.url, f"{where}.image_url.url", settings)
                    if not (found.mime.startswith("image/") or found.mime == "application/octet-stream"):
                        raise APIError(400, f"{where}.image_url.url: {found.mime} is not an image type",
                                       param=f"{where}.image_url.url", code="invalid_image_format")
                    turn.images.append(decode_image(found.data, f"{where}.image_url.url", settings))
                else:
                    data = decode_base64(part.input_audio.data, f"{where}.input_audio.data", limits.max_body_bytes)
                    turn.audio.append(decode_audio(data, f"{where}.input_audio.data", settings))
            else:
                raise APIError(400, f"{where}: {part.type} content parts are not supported; send images as "
                               "image_url and audio as input_audio", param=where, code="unsupported_content_part")
        turn.text = "\n".join(t for t in texts if t)
        turns.append(turn)
    return turns


# ---- today's responder: the served models, no language model ----

DESCRIBE = re.compile(r"^\s*$|\b(describe|caption|what('?s| is| do you see)\s+(in|on)\s+(this|the)\b|what do you see)",
                      re.IGNORECASE)
DRAW_VERBS = re.compile(r"^\s*(please\s+)?(can you\s+|could you\s+)?(draw|paint|sketch|generate|create|make|show)"
                        r"(\s+me)?(\s+(an?|the)\s+(image|picture|drawing|painting)\s+of)?\s+", re.IGNORECASE)


def drawing_prompt(text: str) -> str:
    """The description in a request to draw: "draw me a red circle" -> "a red circle"."""
    return DRAW_VERBS.sub("", text).strip().rstrip(".!") or text.strip()


class ModelResponder:
    """Replies from the served models alone (see the module doc)."""

    def __init__(self, registry: Registry, speech: Speech, settings: Settings):
        self.registry, self.speech, self.settings = registry, speech, settings

    def listen(self, turns: list[Turn]) -> tuple[list[Turn], list[str], list[str]]:
        """The user turns (an error when there is none), what was heard in the last one's audio
        clips, and the id of the model that heard each."""
        users = [t for t in turns if t.role == "user"]
        if not users:
            raise APIError(400, "the messages hold no user message to reply to", param="messages",
                           code="invalid_value")
        heard, hearers = [], []
        for clip in users[-1].audio:
            transcript, by = self.hear(clip)
            heard.append(transcript.text)
            hearers.append(by)
        return users, heard, hearers

    def __call__(self, turns: list[Turn], modalities: frozenset[str], options: ReplyOptions) -> Reply:
        users, heard, models = self.listen(turns)
        last = users[-1]
        request = "\n".join(t for t in [last.text, *heard] if t)
        named = None if options.model == ASSISTANT else self.registry.get(options.model)
        if named is not None and not (named.can("generate image") or named.can("caption") or named.can("answer")):
            raise APIError(400, f"the model {named.id!r} cannot chat: it can {', '.join(named.tasks)}",
                           param="model", code="model_not_supported")
        image = next((i for t in reversed(users) for i in reversed(t.images)), None)
        # a named model that draws, draws, unless it also reads images and was sent one (an omni model asked about it)
        reads = named is not None and bool(last.images) and (named.can("caption") or named.can("answer"))
        if "image" in modalities or (named is not None and named.can("generate image") and not reads):
            reply = self.draw(request, named, options)
        elif image is not None:
            reply = self.look(image, request, named, options)
        elif named is not None:
            raise APIError(400, f"the model {named.id!r} answers about images: send an image with the question",
                           param="messages", code="invalid_value")
        else:
            reply = Reply.of(self.no_language_model(heard))
        reply.models = list(dict.fromkeys(models + reply.models))
        reply.heard = heard
        return reply

    # ---- hearing ----

    def hear(self, waveform: torch.Tensor) -> tuple[Transcript, str]:
        """What was said, and the id of the model that heard it: the recogniser the settings
        name (a served model, or one polymodal.speech loads); else a served captioner that reads
        audio (a recogniser trained on the served models' own domain, as ``make demo`` trains);
        else polymodal.speech's general-purpose one."""
        wanted = self.settings.recogniser
        if wanted and wanted in self.registry.models:
            return transcribe_with(self.registry.get(wanted), waveform), wanted
        if wanted or not self.audio_captioners():
            return self.speech.transcribe(waveform), "recogniser"
        served = self.audio_captioners()[0]
        return transcribe_with(served, waveform), served.id

    def audio_captioners(self) -> list[ServedModel]:
        return [m for m in self.registry.with_task("caption") if "audio" in m.input_modalities()]

    # ---- drawing ----

    def draw(self, request: str, named: ServedModel | None, options: ReplyOptions) -> Reply:
        served = self.registry.for_task("generate image", named.id if named else None, "image output")
        if not request.strip():
            raise APIError(400, "nothing to draw: the last user message has no text", param="messages")
        prompt = drawing_prompt(request)
        images = served.call(draw_images, [prompt], options.seed or 0, self.settings, options.image_size)
        return Reply.of(f"Here is a picture of {prompt}.", images=images, models=[served.id])

    # ---- looking ----

    def look(self, image: Image.Image, request: str, named: ServedModel | None, options: ReplyOptions) -> Reply:
        describe = bool(DESCRIBE.search(request))
        task = "caption" if describe else "answer"
        served = self.registry.for_task(task, named.id if named else None, "questions about images",
                                        accept=lambda m: "image" in m.input_modalities())
        text, finish = served.call(generate_text, image, None if describe else request, options)
        return Reply(pieces=word_pieces(text), _text=text, models=[served.id], finish_reason=finish)

    # ---- the rest ----

    def no_language_model(self, heard: list[str]) -> str:
        can = []
        for m in self.registry.models.values():
            if (m.can("answer") or m.can("caption")) and "image" in m.input_modalities():
                can.append(f"describe an image you send, or answer a question about it ({m.id})")
            elif m.can("caption") and "audio" in m.input_modalities():
                can.append(f"transcribe speech ({m.id})")
            if m.can("generate image"):
                can.append(f'draw a picture from a description: ask with modalities ["image", "text"] ({m.id})')
            if m.can("embed"):
                can.append(f"embed text and images at /v1/embeddings ({m.id})")
        if self.speech.can_hear or self.audio_captioners():
            can.append("hear a spoken request (input_audio)")
        if self.speech.can_speak:
            can.append('answer in speech (modalities ["text", "audio"])')
        said = f'I heard: "{heard[0]}". ' if heard else ""
        listing = "; ".join(dict.fromkeys(can)) or "nothing yet: the models folder holds no servable model"
        return (f"{said}This server has no language model for open-ended chat, so I cannot answer that. "
                f"What I can do: {listing}.")


# ---- model calls (run under the model's lock, in a worker thread) ----


def image_field(model) -> str:
    """The batch field a model reads images from."""
    field_name = next((f for f, spec in model.fields().items() if spec.split(":")[0] == "image"), None)
    if field_name is None:
        raise APIError(400, "this model does not read images", param="model", code="model_not_supported")
    return field_name


def generate_text(model, image: Image.Image, prompt: str | None, options: ReplyOptions) -> tuple[str, str]:
    """A caption of ``image`` (no prompt) or the answer to ``prompt`` about it; and the finish
    reason (``length`` when the token budget ran out)."""
    pixels = ImageTransform(model.input_size())(image)[None]
    context = model.config.context_length
    prompt_tokens = len(model.prompt_ids([prompt])[0])
    if prompt_tokens + 1 >= context:
        raise APIError(400, f"the question is too long for this model ({prompt_tokens} tokens; it reads at most "
                       f"{context - 2})", param="messages", code="context_length_exceeded")
    budget = min(options.max_tokens, context - prompt_tokens)
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    sampled = bool(options.temperature)
    text = model.generate({image_field(model): pixels}, [prompt], method="nucleus" if sampled else "greedy",
                          temperature=options.temperature or 1.0, top_p=options.top_p or 0.9,
                          max_new_tokens=budget, generator=generator)[0]
    used = len(model.tokenizer.encode(text, add_special_tokens=False))
    return text, "length" if used >= budget else "stop"


def draw_images(model, prompts: list[str], seed: int, settings: Settings, side: int | None = None, *,
                guidance: float | None = None, steps: int | None = None, best_of: int | None = None) -> list[bytes]:
    """PNG files of ``prompts`` drawn by a text-to-image model, at ``side`` pixels if given. Each
    drawing setting is the one given (a request's), else the server's (``settings``), else the
    model's own (:func:`~polymodal.models.family.drawing_settings`), within the server's limits:
    an :class:`APIError` names the setting otherwise."""
    from polymodal.models.family import drawing_settings

    try:
        drawing = drawing_settings(model, guidance=settings.guidance if guidance is None else guidance,
                                   steps=steps or settings.image_steps, best_of=best_of)
    except ValueError as e:  # the settings the model was saved with are checked when it loads: a request's
        raise APIError(400, str(e), param="best_of", code="invalid_value") from None
    limits = settings.limits
    for name, most, param in (("steps", limits.max_diffusion_steps, "steps"), ("best_of", limits.max_best_of, "best_of")):
        if drawing.get(name, 1) > most:
            whose = "" if {"steps": steps or settings.image_steps, "best_of": best_of}[name] else \
                " (the model's own drawing setting)"
            raise APIError(400, f"'{param}' is {drawing[name]}{whose}; the limit is {most}", param=param,
                           code="integer_above_max_value")
    images = model.generate(prompts, seed=seed, **drawing)  # (B, 3, S, S) in [-1, 1]
    out = []
    for x in images:
        picture = to_pil(x * 0.5 + 0.5)
        if side and side != picture.size[0]:
            picture = picture.resize((side, side), Image.Resampling.NEAREST if side > picture.size[0]
                                     else Image.Resampling.LANCZOS)
        out.append(png_bytes(picture))
    return out


def transcribe_with(served: ServedModel, waveform: torch.Tensor) -> Transcript:
    """A served captioner that reads audio, captioning speech: its transcript."""
    def run(model) -> str:
        name = next(f for f, spec in model.fields().items() if spec.split(":")[0] == "audio")
        mel = log_mel_spectrogram(waveform)[None]  # (1, 80, T)
        return model.generate({name: mel, f"{name}_mask": torch.ones(1, mel.shape[-1], dtype=torch.bool)})[0]

    return as_transcript(served.call(run), waveform.shape[-1] / SAMPLE_RATE)
