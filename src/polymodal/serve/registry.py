"""The models a server serves: every saved model found in its models folder, under an id.

``polymodal serve --models outputs/demo`` serves each run folder's ``model/`` under the run's
name (``clip``, ``captions``, ``drawing``, ...); a folder that is itself a saved model is served
under its own name. What a model can do comes from its family's ``tasks`` (the server never asks
for a family by name): ``embed`` answers ``/v1/embeddings``, ``caption`` and ``answer`` chat about
images (and transcribe, when the encoder reads audio), ``generate image`` draws.

Model calls run in worker threads (never on the event loop) one at a time per model, under the
model's lock: a PyTorch module is not safe to call from two threads at once, and one call already
uses every core. Concurrent embedding requests are batched (:class:`EmbeddingBatcher`): the
first request of a burst waits a few milliseconds, then every request that arrived meanwhile is
embedded in one forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import numpy as np
import torch
from starlette.concurrency import run_in_threadpool
from torch import nn

from polymodal.data.dataset import pad_spectrograms
from polymodal.errors import InputError
from polymodal.models import FAMILIES, load_model, model_type
from polymodal.models.folder import CONFIG_FILE
from polymodal.serve.errors import APIError
from polymodal.serve.settings import Settings

log = logging.getLogger("polymodal.serve")
T = TypeVar("T")

ASSISTANT = "assistant"  # the chat model that routes a request to the served models
SPEECH = "speech"  # text to speech (polymodal.speech)
RECOGNISER = "recogniser"  # speech to text (polymodal.speech)
MODALITIES = ("text", "image", "audio", "video")
TASK_OUTPUT = {"embed": "embedding", "caption": "text", "answer": "text", "generate image": "image",
               "detect": "text", "classify": "text", "reconstruct": "image"}


def find_models(models_dir: str | Path) -> list[tuple[str, Path]]:
    """``(id, folder)`` of every saved model in ``models_dir``: the folder itself if it is one,
    each subfolder that is one, and each subfolder's ``model/`` (a training run's output)."""
    root = Path(models_dir)
    if not root.is_dir():
        raise InputError(root, "not a folder of saved models")
    found = [(root.resolve().name, root)] if (root / CONFIG_FILE).is_file() else []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if (child / "model" / CONFIG_FILE).is_file():
            found.append((child.name, child / "model"))
        elif (child / CONFIG_FILE).is_file():
            found.append((child.name, child))
    return found


class ServedModel:
    """One saved model: loaded on first use (or at start), called under its lock in a worker thread."""

    def __init__(self, id: str, path: Path, family: str):
        self.id, self.path, self.family = id, path, family
        self.tasks: tuple[str, ...] = tuple(FAMILIES[family].tasks)
        self.created = int((path / CONFIG_FILE).stat().st_mtime)
        self.lock = threading.Lock()  # one call at a time
        self._load_lock = threading.Lock()
        self._model: nn.Module | None = None
        self.batcher: EmbeddingBatcher | None = None

    def can(self, task: str) -> bool:
        return task in self.tasks

    def get(self) -> nn.Module:
        """The loaded model (loaded now if it was not)."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    try:
                        self._model = load_model(self.path)
                    except (InputError, ValueError, RuntimeError, OSError) as e:
                        raise APIError(500, f"model {self.id!r} could not be loaded from {self.path}: {e}",
                                       type="server_error", code="model_unavailable") from e
                    log.info("loaded %s (%s) from %s", self.id, self.family, self.path)
        return self._model

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(model, *args)`` under the model's lock, without gradients (in this thread)."""
        model = self.get()
        with self.lock, torch.inference_mode():
            return fn(model, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(model, *args)`` in a worker thread under the model's lock."""
        return await run_in_threadpool(self.call, fn, *args)

    # ---- what it reads and writes ----

    def input_modalities(self) -> list[str]:
        """A drawing model reads prompts (its fields are the images it trained on); a model that
        does more (one that also captions and answers) reads its fields too."""
        kinds = {"text"} if self.can("generate image") else set()
        if set(self.tasks) - {"generate image"}:
            kinds |= {spec.split(":")[0] for spec in self.get().fields().values()}
        if self.can("answer"):
            kinds.add("text")
        return [m for m in MODALITIES if m in kinds]

    def output_modalities(self) -> list[str]:
        return list(dict.fromkeys(TASK_OUTPUT[t] for t in self.tasks if t in TASK_OUTPUT))

    def capabilities(self) -> list[str]:
        out = []
        if self.can("embed"):
            out.append("embeddings")
        if self.can("caption") or self.can("answer") or self.can("generate image"):
            out.append("chat.completions")
        if self.can("generate image"):
            out.append("images.generations")
        if self.can("caption") and "audio" in self.input_modalities():
            out.append("audio.transcriptions")
        return out

    def describe(self) -> dict:
        """The model as ``GET /v1/models`` lists it: OpenAI's fields, then polymodal's."""
        out = {"id": self.id, "object": "model", "created": self.created, "owned_by": "polymodal",
               "family": self.family, "tasks": list(self.tasks), "input_modalities": self.input_modalities(),
               "output_modalities": self.output_modalities(), "capabilities": self.capabilities()}
        if self.can("embed"):
            out["dimensions"] = getattr(self.get().config, "embed_dim", None)
        if self.can("generate image"):
            side = self.get().config.image_size
            out["image_size"] = f"{side}x{side}"
        return out


class Registry:
    """The served models, by id."""

    def __init__(self, models_dir: str | Path, settings: Settings):
        self.models_dir = Path(models_dir)
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.skipped: dict[str, str] = {}  # folder -> why it is not served
        for id, path in find_models(models_dir):
            try:
                served = ServedModel(id, path, model_type(path))
            except InputError as e:
                self.skipped[str(path)] = e.problem
                log.warning("not serving %s: %s", path, e.problem)
                continue
            if id in self.models:  # two folders of one name (the root and a child)
                id = f"{id}-{len(self.models)}"
                served.id = id
            if served.can("embed"):
                served.batcher = EmbeddingBatcher(served, settings.embedding_batch_window_ms / 1000,
                                                  settings.embedding_max_batch)
            self.models[id] = served
        if settings.preload:
            for served in self.models.values():
                served.get()

    def get(self, id: str, param: str = "model") -> ServedModel:
        """The model ``id``, or a 404 listing the served ones."""
        if id not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise APIError(404, f"the model {id!r} does not exist; served models: {known}", param=param,
                           code="model_not_found")
        return self.models[id]

    def with_task(self, task: str) -> list[ServedModel]:
        return [m for m in self.models.values() if m.can(task)]

    def for_task(self, task: str, requested: str | None, endpoint: str, accept: Callable[[ServedModel], bool]
                 | None = None) -> ServedModel:
        """The model to do ``task``: the requested one (a 400 if it cannot), or the first served
        one that can (a 400 saying none can)."""
        if requested is not None and requested != ASSISTANT:
            served = self.get(requested)
            if not served.can(task) or (accept is not None and not accept(served)):
                raise APIError(400, f"the model {requested!r} cannot serve {endpoint}: it can "
                               f"{', '.join(served.tasks)}", param="model", code="model_not_supported")
            return served
        for served in self.with_task(task):
            if accept is None or accept(served):
                return served
        served = "; ".join(f"{m.id} ({', '.join(m.tasks)})" for m in self.models.values()) or "none"
        raise APIError(400, f"no served model can serve {endpoint} (it needs a model that can {task}); served: "
                       f"{served}", param="model", code="model_not_supported")


# ---- embeddings, batched ----


@dataclass
class EmbedInput:
    """One input of an embedding request, ready for its tower: a text, an image tensor
    ``(3, S, S)`` or a log-mel spectrogram ``(80, T)``."""

    tower: str
    kind: str  # text | image | audio
    value: Any


@dataclass
class _Job:
    inputs: list[EmbedInput]
    future: asyncio.Future
    result: Any = field(default=None)


def _settle(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` from any thread, on its own event loop."""
    def settle():
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    future.get_loop().call_soon_threadsafe(settle)


class EmbeddingBatcher:
    """Micro-batching of one model's embedding requests.

    The first request of a burst becomes the leader: it waits ``window_s`` (a few ms), takes
    every request that arrived meanwhile and runs them as one forward pass per tower (in chunks
    of ``max_batch`` inputs), in a worker thread under the model's lock; each request then gets
    its own rows. If the batch fails, each request is run alone, so one request's failure is not
    another's. ``forwards`` and ``inputs`` count what ran (the benchmark reads them)."""

    def __init__(self, served: ServedModel, window_s: float, max_batch: int):
        self.served, self.window_s, self.max_batch = served, window_s, max(1, max_batch)
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._leading = False
        self.forwards = 0
        self.inputs = 0
        self.requests = 0

    async def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        """Embeddings ``(len(inputs), D)`` float32, L2-normalised."""
        if self.window_s <= 0:
            return (await self.served.run(self._compute, [inputs]))[0]
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._pending.append(_Job(inputs, future))
            lead = not self._leading
            self._leading = True
        if lead:
            with anyio.CancelScope(shield=True):  # the followers wait on the leader even if its client leaves
                await anyio.sleep(self.window_s)
                with self._lock:
                    jobs, self._pending, self._leading = self._pending, [], False
                await self._run(jobs)
        return await future

    async def _run(self, jobs: list[_Job]) -> None:
        try:
            results = await self.served.run(self._compute, [j.inputs for j in jobs])
        except Exception:
            for job in jobs:  # alone, each gets its own result or error
                try:
                    _settle(job.future, (await self.served.run(self._compute, [job.inputs]))[0])
                except Exception as e:
                    _settle(job.future, error=e)
            return
        for job, result in zip(jobs, results, strict=True):
            _settle(job.future, result)

    def _compute(self, model: nn.Module, jobs: list[list[EmbedInput]]) -> list[np.ndarray]:
        """Every job's embeddings, each tower's inputs of all jobs in shared forward passes."""
        flat = [item for job in jobs for item in job]
        out: np.ndarray | None = None
        by_tower: dict[str, list[int]] = {}
        for i, item in enumerate(flat):
            by_tower.setdefault(item.tower, []).append(i)
        for tower, rows in by_tower.items():
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                vectors = model.embed(tower, self._batch(tower, [flat[i] for i in chunk])).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(flat), vectors.shape[1]), np.float32)
                out[chunk] = vectors
                self.forwards += 1
        self.inputs += len(flat)
        self.requests += len(jobs)
        assert out is not None
        results, start = [], 0
        for job in jobs:
            results.append(out[start:start + len(job)])
            start += len(job)
        return results

    @staticmethod
    def _batch(tower: str, items: list[EmbedInput]) -> dict:
        kind = items[0].kind
        if kind == "text":
            return {tower: [item.value for item in items]}
        if kind == "image":
            return {tower: torch.stack([item.value for item in items])}
        mel, mask = pad_spectrograms([item.value for item in items])
        return {tower: mel, f"{tower}_mask": mask}


def timestamp() -> int:
    return int(time.time())
