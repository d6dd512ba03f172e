"""A bounded load test of ``polymodal serve`` on loopback, then embedding throughput with and without batching.

Phase 1 (the mix): ``polymodal serve --models DIR --lm none`` is started as a subprocess on a
free loopback port (with ``OMP_NUM_THREADS`` set), warmed up with one request per endpoint, then
``--clients`` concurrent clients (asyncio + httpx) send requests for ``--seconds``. Each client,
in a loop, draws an endpoint by weight: model listing, text and image embeddings (float and
base64), a question about a shapes-world image to the assistant (answered by the captioner),
streamed and not, speech out (mp3 and wav), and, capped at one request in flight each because
each costs seconds of CPU, a spoken question, a transcription and an image generation (few
steps, ``n`` 1). A request is an error when it fails to connect or times out, when its status
is not 2xx, or when its body is not what the client expects (embeddings of the model's width,
a stream that ends in ``[DONE]`` with a finish reason and no error, audio bytes, a PNG, ...).
When the window closes the clients finish the request in flight and stop; requests/s is over
the whole time. The server's own log is scanned for tracebacks.

Phase 2 (batching): the same number of clients send only one-text embedding requests for
``--embed-seconds`` to a server whose embedding batching window is the default (on) or 0
(off), a fresh server over the embedding model alone each time, in ``--embed-rounds``
alternating rounds (on, off; off, on; ...) so that the machine's other load falls on both
alike. It reports texts/s, latency, the inputs per forward pass the server counted
(``/health``) and the server's CPU time per text, which on a shared machine measures what
batching saves more steadily than texts/s does. ``polymodal serve`` has no option for the window, so this
phase starts the same app (``create_app``) with ``Settings(embedding_batch_window_ms=...)``.

    python benchmarks/serve_load.py --models outputs/demo [--clients 32] [--seconds 60] [--embed-seconds 10] [--embed-rounds 3]
        [--threads 1] [--json benchmarks/results/serve_load_cpu2.json]

The shapes world (images, spoken questions, captions) is read from ``--world`` (default
``MODELS/shapes``). The server's store goes to a temporary folder, never into ``--models``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # the HTTP client the openai package ships with here; httpx elsewhere
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

PNG = b"\x89PNG\r\n\x1a\n"
REQUEST_TIMEOUT_S = 120.0  # a client gives up (an error) after this long
LAUNCH = """
import sys
from pathlib import Path
import uvicorn
from polymodal.serve import Settings, create_app
models, port, store, window = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
app = create_app(models, Settings(store=store, preload=True, embedding_batch_window_ms=window))
print(f"serving {models} on {port}; embedding batching window {window} ms", flush=True)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


# ---- the server ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port, its output in ``log``; stopped on exit."""

    def __init__(self, command: list[str], log: Path, threads: int):
        self.port = free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.log = log
        self.threads = threads
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        self._out = self.log.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"the server did not answer /health in 300 s:\n{self.log.read_text()[-3000:]}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server process has used (Linux; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()

    def problems(self) -> list[str]:
        """Lines of the server's log that report a failure (tracebacks, errors)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]


# ---- what the clients send ----


@dataclass
class World:
    """Inputs from the shapes world: image data URLs with a colour question and its answer,
    captions (texts to embed, speak and draw), spoken questions (WAV bytes)."""

    questions: list[tuple[str, str, str]]  # (image data URL, question, answer)
    images: list[str]
    captions: list[str]
    spoken: list[tuple[bytes, str]]  # (WAV bytes, image data URL)

    @classmethod
    def load(cls, folder: Path, n: int = 64) -> World:
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("split") == "test"][:n] or rows[:n]
        if not rows:
            raise SystemExit(f"{folder / 'metadata.jsonl'}: no rows")

        def url(row: dict) -> str:
            return "data:image/png;base64," + base64.b64encode((folder / row["file_name"]).read_bytes()).decode()

        questions = [(url(r), qa["question"], qa["answer"]) for r in rows for qa in r.get("qa", [])
                     if qa.get("type") == "colour"]
        spoken = [((folder / r["fusion_audio_file"]).read_bytes(), url(r)) for r in rows if r.get("fusion_audio_file")]
        if not questions or not spoken:
            raise SystemExit(f"{folder}: no colour questions or spoken questions in the test split")
        return cls(questions, [url(r) for r in rows], [r["text"] for r in rows], spoken)


@dataclass
class Outcome:
    status: int | str  # the HTTP status, or the name of the transport error
    ok: bool  # a 2xx with the body the client expects
    correct: bool | None = None  # a question about an image answered right (None: not a question)
    problem: str | None = None
    note: str | None = None  # what the server did, counted (e.g. the route of a spoken request)


Call = Callable[[httpx.AsyncClient, World, random.Random, dict], Awaitable[Outcome]]


def checked(response: httpx.Response, check: Callable[[httpx.Response], str | None]) -> Outcome:
    """The outcome of a response: not ok if the status is not 2xx or ``check`` names a problem."""
    if not 200 <= response.status_code < 300:
        return Outcome(response.status_code, False, problem=response.text[:300])
    problem = check(response)
    return Outcome(response.status_code, problem is None, problem=problem)


async def list_models(client, world, rng, info) -> Outcome:
    r = await client.get("/v1/models")
    return checked(r, lambda r: None if any(m["id"] == info["embed_model"] for m in r.json()["data"])
                   else "the embedding model is not listed")


def embedding_check(info: dict, encoding: str, count: int):
    def check(r: httpx.Response) -> str | None:
        data = r.json()["data"]
        if len(data) != count:
            return f"{len(data)} embeddings for {count} inputs"
        for item in data:
            vector = item["embedding"]
            width = len(base64.b64decode(vector)) // 4 if encoding == "base64" else len(vector)
            if width != info["dimensions"]:
                return f"an embedding of width {width}, not {info['dimensions']}"
        return None
    return check


async def embed_text(client, world, rng, info) -> Outcome:
    encoding = rng.choice(["float", "base64"])
    r = await client.post("/v1/embeddings", json={"model": info["embed_model"], "input": rng.choice(world.captions),
                                                  "encoding_format": encoding})
    return checked(r, embedding_check(info, encoding, 1))


async def embed_image(client, world, rng, info) -> Outcome:
    r = await client.post("/v1/embeddings", json={"model": info["embed_model"], "input": rng.choice(world.images),
                                                  "encoding_format": "float"})
    return checked(r, embedding_check(info, "float", 1))


def question(image: str, text: str, **extra) -> dict:
    return {"model": "assistant", **extra, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]}]}


async def chat(client, world, rng, info) -> Outcome:
    image, text, answer = rng.choice(world.questions)
    r = await client.post("/v1/chat/completions", json=question(image, text))
    out = checked(r, lambda r: None if isinstance(r.json()["choices"][0]["message"]["content"], str)
                  and r.json()["choices"][0]["finish_reason"] else "no content or no finish reason")
    if out.ok:
        out.correct = answer in r.json()["choices"][0]["message"]["content"].lower().split()
    return out


async def chat_stream(client, world, rng, info) -> Outcome:
    image, text, answer = rng.choice(world.questions)
    body = question(image, text, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(r.status_code, False, problem=r.text[:300])
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return Outcome(r.status_code, False, problem="the stream does not end with [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return Outcome(r.status_code, False, problem=f"an error in the stream: {chunks}"[:300])
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if not choices or choices[0]["delta"].get("role") != "assistant" or not any(c["finish_reason"] for c in choices):
        return Outcome(r.status_code, False, problem="no role delta or no finish reason")
    if not chunks[-1].get("usage"):
        return Outcome(r.status_code, False, problem="no usage chunk")
    text = "".join(c["delta"].get("content") or "" for c in choices)
    return Outcome(r.status_code, True, correct=answer in text.lower().split())


async def chat_spoken(client, world, rng, info) -> Outcome:
    wav, image = rng.choice(world.spoken)
    body = {"model": "assistant", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": image}}]}]}
    r = await client.post("/v1/chat/completions", json=body)
    out = checked(r, lambda r: None if r.json()["polymodal"]["heard"] else "nothing was heard")
    if out.ok:
        made = r.json()["polymodal"]
        out.note = f"route {made['route']['modality']} by {'+'.join(made['models'])}"
    return out


async def speech(client, world, rng, info) -> Outcome:
    fmt = rng.choice(["mp3", "wav"])
    r = await client.post("/v1/audio/speech", json={"model": "speech", "voice": "alloy", "response_format": fmt,
                                                    "input": rng.choice(world.captions)[:80]})
    return checked(r, lambda r: None if len(r.content) > 100 and r.headers["content-type"].startswith("audio/")
                   else f"{len(r.content)} bytes of {r.headers.get('content-type')}")


async def transcription(client, world, rng, info) -> Outcome:
    wav, _ = rng.choice(world.spoken)
    r = await client.post("/v1/audio/transcriptions", data={"model": "recogniser", "response_format": "json"},
                          files={"file": ("question.wav", wav, "audio/wav")})
    return checked(r, lambda r: None if isinstance(r.json().get("text"), str) else "no text")


async def image_generation(client, world, rng, info) -> Outcome:
    r = await client.post("/v1/images/generations", json={"model": info["draw_model"], "n": 1, "steps": info["steps"],
                                                           "prompt": rng.choice(world.captions)})
    return checked(r, lambda r: None if base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(PNG)
                   else "not a PNG")


@dataclass
class Endpoint:
    name: str
    call: Call
    weight: float
    max_in_flight: int | None = None  # None: any number
    in_flight: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, of every finished request
    starts: list[float] = field(default_factory=list)  # time.perf_counter() at each one's start
    notes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    answered: int = 0
    correct: int = 0
    problems: Counter = field(default_factory=Counter)


def endpoints(slow_in_flight: int) -> list[Endpoint]:
    """The mix: cheap requests by weight; those costing seconds of CPU capped in flight."""
    return [Endpoint("GET /v1/models", list_models, 2), Endpoint("embeddings text", embed_text, 4),
            Endpoint("embeddings image", embed_image, 2), Endpoint("chat image question", chat, 2),
            Endpoint("chat image question, streamed", chat_stream, 2), Endpoint("audio/speech", speech, 2),
            Endpoint("chat spoken question", chat_spoken, 0.5, slow_in_flight),
            Endpoint("audio/transcriptions", transcription, 0.5, slow_in_flight),
            Endpoint("images/generations", image_generation, 0.5, slow_in_flight)]


async def send(endpoint: Endpoint, client: httpx.AsyncClient, world: World, rng: random.Random, info: dict) -> None:
    """One request of ``endpoint``, its latency and outcome recorded."""
    endpoint.in_flight += 1
    start = time.perf_counter()
    try:
        outcome = await endpoint.call(client, world, rng, info)
    except httpx.HTTPError as e:
        outcome = Outcome(type(e).__name__, False, problem=str(e)[:300])
    except (ValueError, KeyError, IndexError, TypeError) as e:  # a body that is not what the API promises
        outcome = Outcome("bad body", False, problem=f"{type(e).__name__}: {e}"[:300])
    finally:
        endpoint.in_flight -= 1
    endpoint.latencies.append(time.perf_counter() - start)
    endpoint.starts.append(start)
    if outcome.note:
        endpoint.notes[outcome.note] += 1
    endpoint.statuses[str(outcome.status)] += 1
    if not outcome.ok:
        endpoint.errors += 1
        endpoint.problems[f"{outcome.status}: {outcome.problem}"] += 1
    if outcome.correct is not None:
        endpoint.answered += 1
        endpoint.correct += outcome.correct


async def run_mix(url: str, world: World, info: dict, clients: int, seconds: float, seed: int,
                  slow_in_flight: int) -> tuple[list[Endpoint], float]:
    mix = endpoints(slow_in_flight)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        for endpoint in mix:  # warm-up: every endpoint once (models loaded, first-call costs paid), not counted
            warm = Endpoint(endpoint.name, endpoint.call, 1)
            await send(warm, client, world, random.Random(seed), info)
            if warm.errors:
                raise SystemExit(f"warm-up request to {endpoint.name} failed: {dict(warm.problems)}")
        start = time.perf_counter()
        deadline = start + seconds

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline:
                open_ = [e for e in mix if e.max_in_flight is None or e.in_flight < e.max_in_flight]
                endpoint = rng.choices(open_, weights=[e.weight for e in open_])[0]
                await send(endpoint, client, world, rng, info)

        await asyncio.gather(*(user(i) for i in range(clients)))
        return mix, start, time.perf_counter() - start


async def run_embeddings(url: str, world: World, info: dict, clients: int, seconds: float, seed: int,
                         endpoint: Endpoint) -> float:
    """Only one-text embedding requests from every client for ``seconds``, recorded in
    ``endpoint``; returns the time they took."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        for _ in range(3):
            await send(Endpoint("warm-up", embed_text, 1), client, world, random.Random(seed), info)
        start = time.perf_counter()
        deadline = start + seconds

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < deadline:
                await send(endpoint, client, world, rng, info)

        await asyncio.gather(*(user(i) for i in range(clients)))
        return time.perf_counter() - start


def batching_phase(args: argparse.Namespace, world: World, info: dict, tmp: Path) -> dict:
    """Embedding throughput with the batching window on (the default) and off (0), in
    alternating rounds (on, off; off, on; ...) so that a change in the machine's other load
    falls on both alike. Each round starts a fresh server over the embedding model alone."""
    from polymodal.serve.registry import find_models
    from polymodal.serve.settings import Settings

    folder = tmp / "embedding_model"
    folder.mkdir()
    path = dict(find_models(args.models))[info["embed_model"]]
    (folder / info["embed_model"]).symlink_to(path.resolve(), target_is_directory=True)
    windows = {"on": Settings().embedding_batch_window_ms, "off": 0.0}
    recorded = {label: Endpoint(label, embed_text, 1) for label in windows}
    totals = {label: Counter() for label in windows}
    problems: list[str] = []
    for round_ in range(args.embed_rounds):
        for label in (("on", "off") if round_ % 2 == 0 else ("off", "on")):
            command = [sys.executable, "-c", LAUNCH, str(folder), "{port}", str(tmp / f"{label}{round_}.sqlite"),
                       str(windows[label])]
            with Server(command, tmp / f"embed_{label}{round_}.log", args.threads) as server:
                done = len(recorded[label].latencies)
                cpu = (time.process_time(), server.cpu_seconds())
                elapsed = asyncio.run(run_embeddings(server.url, world, info, args.clients, args.embed_seconds,
                                                     args.seed + round_, recorded[label]))
                used = cpu_used(cpu, server)
                counted = server.health()["embedding"]
            problems += server.problems()
            texts = len(recorded[label].latencies) - done
            totals[label].update(elapsed_s=elapsed, texts=texts, inputs=counted["inputs"],
                                 forwards=counted["forwards"], client_cpu_s=used["client_cpu_s"],
                                 server_cpu_s=used["server_cpu_s"] or 0.0)
            print(f"  round {round_ + 1}, batching {label}: {texts / elapsed:.1f} texts/s, "
                  f"{counted['inputs'] / max(1, counted['forwards']):.2f} inputs per forward, server CPU "
                  f"{1000 * (used['server_cpu_s'] or 0.0) / max(1, texts):.2f} ms per text", flush=True)
    out: dict = {"rounds": args.embed_rounds, "seconds_per_round": args.embed_seconds}
    for label, window in windows.items():
        t = totals[label]
        out[label] = {**summary(recorded[label], t["elapsed_s"]), "window_ms": window,
                      "texts_per_s": round(t["texts"] / t["elapsed_s"], 1),
                      "inputs_per_forward": round(t["inputs"] / max(1, t["forwards"]), 2),
                      "server_cpu_ms_per_text": round(1000 * t["server_cpu_s"] / max(1, t["texts"]), 2),
                      "client_cpu_s": round(t["client_cpu_s"], 1), "server_cpu_s": round(t["server_cpu_s"], 1)}
    out["throughput_ratio"] = round(out["on"]["texts_per_s"] / out["off"]["texts_per_s"], 2)
    out["server_cpu_per_text_ratio"] = round(out["off"]["server_cpu_ms_per_text"] / out["on"]["server_cpu_ms_per_text"], 2)
    out["server_log_problems"] = problems[:20]
    return out


# ---- results ----


def summary(endpoint: Endpoint, elapsed: float, origin: float | None = None) -> dict:
    ms = np.asarray(endpoint.latencies) * 1000
    out = {"requests": len(ms), "per_s": round(len(ms) / elapsed, 2), "errors": endpoint.errors,
           "status_5xx": sum(n for s, n in endpoint.statuses.items() if s.isdigit() and int(s) >= 500),
           "statuses": dict(endpoint.statuses),
           "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
           "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
           "max_ms": round(float(ms.max()), 1) if len(ms) else None}
    if endpoint.answered:
        out["answered_right"] = round(endpoint.correct / endpoint.answered, 3)
    if endpoint.problems:
        out["problems"] = dict(endpoint.problems.most_common(5))
    if endpoint.notes:
        out["notes"] = dict(endpoint.notes.most_common())
    if origin is not None and len(ms):  # when the slowest started (s into the window): together or not
        slowest = np.argsort(ms)[::-1][:3]
        out["slowest"] = [{"start_s": round(endpoint.starts[i] - origin, 1), "ms": round(float(ms[i]))}
                          for i in slowest]
    return out


def table(rows: dict[str, dict]) -> str:
    lines = ["| endpoint | requests | req/s | p50 | p99 | errors | 5xx |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        p50, p99 = (f"{r[k]:.0f} ms" if r[k] is not None else "-" for k in ("p50_ms", "p99_ms"))
        lines.append(f"| {name} | {r['requests']} | {r['per_s']} | {p50} | {p99} | {r['errors']} | {r['status_5xx']} |")
    return "\n".join(lines)


def cpu_used(before: tuple[float, float | None], server: Server) -> dict:
    """CPU seconds the clients (this process) and the server used since ``before`` (includes
    the warm-up): on a shared 2-core machine, who had the CPU explains the throughput."""
    now = server.cpu_seconds()
    return {"client_cpu_s": round(time.process_time() - before[0], 1),
            "server_cpu_s": round(now - before[1], 1) if now is not None and before[1] is not None else None}


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="the folder polymodal serve serves")
    parser.add_argument("--world", type=Path, help="the shapes world (default: MODELS/shapes)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="of the mixed load")
    parser.add_argument("--embed-seconds", type=float, default=10.0,
                        help="of each embedding round, batching on or off (0: skip)")
    parser.add_argument("--embed-rounds", type=int, default=3, help="rounds of embedding throughput (on, off)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of a generated image")
    parser.add_argument("--slow-in-flight", type=int, default=1,
                        help="requests in flight at most for each slow endpoint (spoken chat, transcription, drawing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/serve_load_cpu2.json"))
    args = parser.parse_args()
    world = World.load(args.world or args.models / "shapes")
    polymodal = Path(sys.executable).with_name("polymodal")
    results: dict = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(),
                     "cpus": os.cpu_count(), "load_average_before": load_average()},
                     "clients": args.clients, "seconds": args.seconds, "server_threads": args.threads,
                     "image_steps": args.steps, "slow_in_flight": args.slow_in_flight}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        tmp = Path(tmp)
        serve = [str(polymodal) if polymodal.exists() else "polymodal", "serve", "--models", str(args.models),
                 "--lm", "none", "--port", "{port}", "--store", str(tmp / "mix.sqlite")]
        with Server(serve, tmp / "mix.log", args.threads) as server:
            listed = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
            embed = next(m for m in listed if "embeddings" in m.get("capabilities", []))
            draw = next(m for m in listed if "images.generations" in m.get("capabilities", []))
            info = {"embed_model": embed["id"], "dimensions": embed["dimensions"], "draw_model": draw["id"],
                    "steps": args.steps}
            cpu = (time.process_time(), server.cpu_seconds())
            print(f"phase 1: {args.clients} clients for {args.seconds:g} s against {server.url} "
                  f"(embeddings: {info['embed_model']}, drawing: {info['draw_model']})", flush=True)
            mix, origin, elapsed = asyncio.run(run_mix(server.url, world, info, args.clients, args.seconds, args.seed,
                                               args.slow_in_flight))
            health = server.health()
            cpu = cpu_used(cpu, server)
        rows = {e.name: summary(e, elapsed, origin) for e in mix}
        total = {"requests": sum(r["requests"] for r in rows.values()),
                 "per_s": round(sum(r["requests"] for r in rows.values()) / elapsed, 1),
                 "errors": sum(r["errors"] for r in rows.values()),
                 "status_5xx": sum(r["status_5xx"] for r in rows.values()), "elapsed_s": round(elapsed, 1)}
        results["mix"] = {"endpoints": rows, "total": total, "server_health": health, **cpu,
                          "server_log_problems": server.problems()[:20]}
        print(table(rows))
        print(f"total: {total['requests']} requests in {total['elapsed_s']} s ({total['per_s']}/s), "
              f"{total['errors']} errors, {total['status_5xx']} 5xx; server log problems: "
              f"{len(server.problems())}", flush=True)
        if args.embed_seconds > 0 and args.embed_rounds > 0:
            print(f"phase 2: {args.clients} clients sending one-text embedding requests, batching on and off, "
                  f"{args.embed_rounds} rounds of {args.embed_seconds:g} s each", flush=True)
            batching = results["batching"] = batching_phase(args, world, info, tmp)
            for label in ("on", "off"):
                b = batching[label]
                print(f"embeddings, batching {label} (window {b['window_ms']:g} ms): {b['texts_per_s']} texts/s, "
                      f"p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, {b['inputs_per_forward']} inputs per forward, "
                      f"server CPU {b['server_cpu_ms_per_text']} ms per text, {b['errors']} errors")
            print(f"batching on / off: {batching['throughput_ratio']}x texts/s, "
                  f"{batching['server_cpu_per_text_ratio']}x less server CPU per text", flush=True)
    results["machine"]["load_average_after"] = load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
