"""Issue 14's first bar, end to end: the official ``openai`` client against a live ``polymodal serve``.

A server is started as a subprocess (``polymodal serve --models DIR --lm none``, its store in a
temporary folder, ``OMP_NUM_THREADS=1``), and the client, as any OpenAI user would, runs one
check per feature the bar names. Each check is timed and runs on its own (one failing does not
stop the rest):

- ``models``: ``models.list()`` lists something;
- ``embeddings text``: the client's default encoding (it asks for base64 and decodes it) and
  ``encoding_format="float"`` give the same vector;
- ``embeddings image``: an image as a ``data:`` URL, embedded by a listed model whose
  ``input_modalities`` include image, to a vector as wide as the text's;
- ``chat image colour``: "what colour is the <shape>?" about one-object test images of the
  shapes world; right when the reply names the object's colour; passes at 8 of 10 right;
- ``chat spoken input``: an ``input_audio`` part (a test row's spoken caption, WAV) with a text
  part; passes when a reply comes back and the server says what it heard (the ``polymodal``
  field of the completion: ``heard`` and the ``models`` that made the reply);
- ``chat streamed``: ``stream=True``; passes when text arrives, a finish reason comes and the
  stream ends;
- ``chat audio out``: ``modalities=["text", "audio"]``; ``message.audio.data`` is a WAV and
  there is a transcript;
- ``transcription``: ``audio.transcriptions.create`` on a test clip by a served model that
  transcribes (capability ``audio.transcriptions``), else the virtual ``recogniser``; word
  error rate against the row's caption (``jiwer``, through
  :func:`polymodal.eval.transcription.word_error_rate`); passes at WER <= 0.34 on that clip;
- ``speech mp3`` / ``speech wav``: ``audio.speech.create`` gives bytes with the format's magic;
- ``image generation judged``: ``images.generate`` for up to four single-object prompts (the
  demo's), each read back by the judge (a detector, ``DIR/judge/model``): accepted when it
  finds exactly one object and its colour, shape and position are the prompt's (the demo's
  ``single_object colour+shape+position``); passes when one image is accepted;
- ``stored completion after kill -9``: a completion made with ``store=True``, the server killed
  with SIGKILL and started again on the same store, then ``chat.completions.retrieve`` and
  ``chat.completions.messages.list`` give it back.

One table line per check, the JSON report to ``--out``; the exit status is 0 only when every
check passes. The server is always stopped.

    OMP_NUM_THREADS=1 python benchmarks/openai_checklist.py --models outputs/demo [--port P] [--out report.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openai

# The demo's drawing prompts (polymodal.demo.DEMO_PROMPTS): single objects the judge can check.
DRAW_PROMPTS = ("a large red circle in the top left", "a large blue square in the center",
                "a large yellow triangle at the bottom", "a large green star on the right")
COLOUR_QUESTIONS = 10
COLOUR_RIGHT_NEEDED = 8
MAX_WER = 0.34
START_TIMEOUT_S = 600  # the server loads every model before it listens; slow on a busy machine
REQUEST_TIMEOUT_S = 600.0


# ---- the server ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``polymodal serve`` as a subprocess on one port and one store, its output in ``log``."""

    def __init__(self, models: Path, port: int, store: Path, log: Path):
        self.command = [sys.executable, "-m", "polymodal.cli", "serve", "--models", str(models), "--lm", "none",
                        "--port", str(port), "--store", str(store)]
        self.port, self.log = port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it and wait until it accepts connections (it loads its models first); the
        seconds that took."""
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("a") as out:
            out.write(f"\n---- {' '.join(self.command)}\n")
            out.flush()
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not accept connections in {START_TIMEOUT_S} s:\n{self.tail()}")

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no chance to flush anything it has not already written."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# ---- the checks ----


@dataclass
class Check:
    name: str
    passed: bool = False
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


class Failed(Exception):
    """A check's own verdict of failure, with what it found (``data``)."""

    def __init__(self, detail: str, data: dict | None = None):
        super().__init__(detail)
        self.data = data or {}


@dataclass
class Context:
    """What the checks share: the client, the server, the world's test rows, the model listing."""

    client: openai.OpenAI
    server: Server
    models_dir: Path
    world: Path
    judge: Path
    rows: list[dict]
    listing: list[dict] = field(default_factory=list)
    text_width: int | None = None  # of the text embedding, for the image embedding to match

    def data_url(self, row: dict) -> str:
        return "data:image/png;base64," + base64.b64encode((self.world / row["file_name"]).read_bytes()).decode()

    def wav(self, row: dict) -> bytes:
        return (self.world / row["audio_file"]).read_bytes()

    def model_with(self, capability: str, modality: str | None = None) -> str:
        """The id of a listed model with ``capability`` (and ``modality`` among its inputs)."""
        for m in self.listing:
            if capability in m.get("capabilities", []) and (modality is None or modality in m.get("input_modalities", [])):
                return m["id"]
        raise Failed(f"no listed model has {capability!r}" + (f" reading {modality}" if modality else ""))


def extra(obj, name: str):
    """A field the server adds beyond OpenAI's types (the client keeps unknown fields)."""
    return (obj.model_extra or {}).get(name)


def words(text: str | None) -> list[str]:
    return re.findall(r"[a-z]+", (text or "").lower())


def check_models(ctx: Context) -> tuple[str, dict]:
    listed = list(ctx.client.models.list())
    ctx.listing = [m.model_dump() for m in listed]
    if not listed:
        raise Failed("the listing is empty")
    summary = {m["id"]: m.get("capabilities", []) for m in ctx.listing}
    return f"{len(listed)} models: {', '.join(summary)}", {"models": summary}


def check_embeddings_text(ctx: Context) -> tuple[str, dict]:
    model = ctx.model_with("embeddings", "text")
    text = ctx.rows[0]["text"]
    raw = ctx.client.embeddings.with_raw_response.create(model=model, input=text)
    asked = json.loads(raw.http_request.content).get("encoding_format")
    default = np.array(raw.parse().data[0].embedding, dtype=np.float32)
    floats = np.array(ctx.client.embeddings.create(model=model, input=text, encoding_format="float").data[0].embedding,
                      dtype=np.float32)
    data = {"model": model, "client_asked": asked, "width": len(default),
            "max_abs_difference": float(np.abs(default - floats).max()) if default.shape == floats.shape else None}
    if default.shape != floats.shape or not default.size:
        raise Failed(f"widths differ: default {default.shape}, float {floats.shape}", data)
    if not np.allclose(default, floats, atol=1e-5):
        raise Failed(f"the two encodings differ by up to {data['max_abs_difference']:.2g}", data)
    ctx.text_width = len(default)
    return (f"{model}: width {len(default)}, client asked {asked!r}, max |diff| {data['max_abs_difference']:.1e}",
            data)


def check_embeddings_image(ctx: Context) -> tuple[str, dict]:
    model = ctx.model_with("embeddings", "image")
    vector = np.array(ctx.client.embeddings.create(model=model, input=ctx.data_url(ctx.rows[0])).data[0].embedding,
                      dtype=np.float32)
    data = {"model": model, "width": len(vector), "norm": float(np.linalg.norm(vector))}
    width = ctx.text_width
    if not vector.size or not np.isfinite(vector).all() or (width is not None and width != len(vector)):
        raise Failed(f"a vector of width {len(vector)} (text: {width}), finite: {bool(np.isfinite(vector).all())}",
                     data)
    return f"{model}: width {len(vector)}, norm {data['norm']:.3f}", data


def one_object_rows(ctx: Context, n: int) -> list[dict]:
    rows = [r for r in ctx.rows if len(r.get("objects", [])) == 1][:n]
    if len(rows) < n:
        raise Failed(f"only {len(rows)} one-object test rows in {ctx.world / 'metadata.jsonl'}")
    return rows


def check_chat_colour(ctx: Context) -> tuple[str, dict]:
    answers = []
    for row in one_object_rows(ctx, COLOUR_QUESTIONS):
        thing = row["objects"][0]
        question = f"what colour is the {thing['shape']}?"
        reply = ctx.client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": ctx.data_url(row)}}]}])
        content = reply.choices[0].message.content or ""
        answers.append({"image": row["file_name"], "question": question, "colour": thing["colour"], "reply": content,
                        "right": thing["colour"] in words(content), "models": (extra(reply, "polymodal") or {})
                        .get("models")})
    right = sum(a["right"] for a in answers)
    detail = f"{right}/{len(answers)} right (needs {COLOUR_RIGHT_NEEDED}); e.g. {answers[0]['reply']!r}"
    if right < COLOUR_RIGHT_NEEDED:
        raise Failed(detail, {"right": right, "answers": answers})
    return detail, {"right": right, "answers": answers}


def check_chat_spoken(ctx: Context) -> tuple[str, dict]:
    row = ctx.rows[0]
    reply = ctx.client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Here is what I said:"},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(ctx.wav(row)).decode(), "format": "wav"}}]}])
    made = extra(reply, "polymodal") or {}
    content = reply.choices[0].message.content
    data = {"audio": row["audio_file"], "said": row["text"], "heard": made.get("heard"), "models": made.get("models"),
            "route": made.get("route"), "reply": content}
    if not content:
        raise Failed("no reply text", data)
    if not made.get("heard"):
        raise Failed("the completion does not say what was heard (polymodal.heard)", data)
    return f"heard {made['heard'][0]!r} (said {row['text']!r}) by {'+'.join(made.get('models') or [])}", data


def check_chat_stream(ctx: Context) -> tuple[str, dict]:
    row = one_object_rows(ctx, 1)[0]
    stream = ctx.client.chat.completions.create(
        model="assistant", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": f"what colour is the {row['objects'][0]['shape']}?"},
            {"type": "image_url", "image_url": {"url": ctx.data_url(row)}}]}])
    pieces, finish, chunks, usage, first_role = [], None, 0, None, None
    for chunk in stream:  # ends when the server sends [DONE]
        chunks += 1
        usage = chunk.usage or usage
        for choice in chunk.choices:
            first_role = first_role or choice.delta.role
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    data = {"chunks": chunks, "content_deltas": len(pieces), "text": text, "finish_reason": finish,
            "first_role": first_role, "usage": usage.model_dump() if usage else None}
    if not text or not finish:
        raise Failed(f"text {text!r}, finish reason {finish!r}", data)
    return f"{chunks} chunks, {len(pieces)} content deltas, finish {finish!r}: {text!r}", data


def check_chat_audio_out(ctx: Context) -> tuple[str, dict]:
    import soundfile

    reply = ctx.client.chat.completions.create(
        model="assistant", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
        messages=[{"role": "user", "content": "say hello"}])
    message = reply.choices[0].message
    if message.audio is None:
        raise Failed("no message.audio", {"content": message.content})
    wav = base64.b64decode(message.audio.data)
    data = {"bytes": len(wav), "transcript": message.audio.transcript, "content": message.content,
            "id": message.audio.id, "expires_at": message.audio.expires_at}
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise Failed(f"message.audio.data is not a WAV (starts {wav[:12]!r})", data)
    info = soundfile.info(io.BytesIO(wav))
    data["seconds"] = info.duration
    if not message.audio.transcript or info.duration <= 0:
        raise Failed(f"transcript {message.audio.transcript!r}, {info.duration:.2f} s of audio", data)
    return f"{info.duration:.2f} s WAV, transcript {message.audio.transcript!r}", data


def check_transcription(ctx: Context) -> tuple[str, dict]:
    from polymodal.eval.transcription import word_error_rate

    served = [m["id"] for m in ctx.listing if "audio.transcriptions" in m.get("capabilities", [])
              and m["id"] != "recogniser"]
    model = served[0] if served else "recogniser"
    row = ctx.rows[0]
    with (ctx.world / row["audio_file"]).open("rb") as clip:
        text = ctx.client.audio.transcriptions.create(model=model, file=clip).text
    wer = word_error_rate([row["text"]], [text])["word error rate"]
    data = {"model": model, "served_model": bool(served), "audio": row["audio_file"], "text": text,
            "reference": row["text"], "word_error_rate": wer}
    detail = f"{model}: WER {wer:.3f} (needs <= {MAX_WER}); heard {text!r}, said {row['text']!r}"
    if wer > MAX_WER:
        raise Failed(detail, data)
    return detail, data


def is_mp3(audio: bytes) -> bool:
    return audio[:3] == b"ID3" or (len(audio) > 1 and audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0)


def is_wav(audio: bytes) -> bool:
    return audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"


def speech_check(fmt: str, magic: Callable[[bytes], bool]) -> Callable[[Context], tuple[str, dict]]:
    def check(ctx: Context) -> tuple[str, dict]:
        audio = ctx.client.audio.speech.create(model="speech", voice="alloy", input=ctx.rows[0]["text"],
                                               response_format=fmt).content
        data = {"bytes": len(audio), "starts": audio[:12].hex()}
        if not audio or not magic(audio):
            raise Failed(f"{len(audio)} bytes starting {audio[:12]!r}: not {fmt}", data)
        return f"{len(audio):,} bytes of {fmt}", data
    return check


def check_image_generation(ctx: Context) -> tuple[str, dict]:
    from PIL import Image

    from polymodal.data.scene import SceneObject, parse_claims
    from polymodal.eval.geneval import judge_prompts
    from polymodal.modalities.image import to_tensor
    from polymodal.models import load_model

    model = ctx.model_with("images.generations")
    judge = load_model(ctx.judge)
    tries = []
    for seed, prompt in enumerate(DRAW_PROMPTS):
        result = ctx.client.images.generate(model=model, prompt=prompt, n=1, response_format="b64_json",
                                            extra_body={"seed": seed})
        png = base64.b64decode(result.data[0].b64_json)
        image = to_tensor(Image.open(io.BytesIO(png)).convert("RGB")) * 2 - 1  # the judge reads [-1, 1]
        verdict = judge_prompts(judge, [{"category": "single_object", "prompt": prompt}], image[None])[0]
        asked = parse_claims(prompt).mentions[0]
        found = verdict["detected"]
        one = SceneObject.from_dict(found[0]) if len(found) == 1 else None
        accepted = one is not None and (one.colour, one.shape, one.cell) == (asked.colour, asked.shape, asked.cell)
        tries.append({"prompt": prompt, "seed": seed, "accepted": accepted, "all_attributes_right": verdict["ok"],
                      "problems": verdict["problems"],
                      "detected": [f"{o['size']} {o['colour']} {o['shape']} at {o['position']}" for o in found]})
    accepted = sum(t["accepted"] for t in tries)
    seen = "; ".join(f"{t['prompt']!r} -> {', '.join(t['detected']) or 'nothing'}" for t in tries)
    detail = f"{model}: {accepted}/{len(tries)} accepted by the judge ({seen})"
    data = {"model": model, "judge": str(ctx.judge), "accepted": accepted, "tries": tries}
    if not accepted:
        raise Failed(detail, data)
    return detail, data


def check_store_kill9(ctx: Context) -> tuple[str, dict]:
    said = "Please keep this: the blue star is in the top left."
    reply = ctx.client.chat.completions.create(model="assistant", store=True, metadata={"check": "kill-9"},
                                               messages=[{"role": "user", "content": said}])
    ctx.server.kill9()
    restart = ctx.server.start()
    kept = ctx.client.chat.completions.retrieve(reply.id)
    messages = list(ctx.client.chat.completions.messages.list(reply.id))
    data = {"id": reply.id, "restart_seconds": restart, "kept_id": kept.id, "kept_metadata": kept.metadata,
            "kept_content": kept.choices[0].message.content, "messages": [m.content for m in messages]}
    if kept.id != reply.id or kept.choices[0].message.content != reply.choices[0].message.content:
        raise Failed(f"retrieve gave {kept.id} with {kept.choices[0].message.content!r}", data)
    if [m.content for m in messages] != [said]:
        raise Failed(f"messages.list gave {data['messages']}", data)
    return f"{reply.id} and its message read back after SIGKILL and a restart ({restart:.0f} s)", data


CHECKS: list[tuple[str, Callable[[Context], tuple[str, dict]]]] = [
    ("models", check_models),
    ("embeddings text", check_embeddings_text),
    ("embeddings image", check_embeddings_image),
    ("chat image colour", check_chat_colour),
    ("chat spoken input", check_chat_spoken),
    ("chat streamed", check_chat_stream),
    ("chat audio out", check_chat_audio_out),
    ("transcription", check_transcription),
    ("speech mp3", speech_check("mp3", is_mp3)),
    ("speech wav", speech_check("wav", is_wav)),
    ("image generation judged", check_image_generation),
    ("stored completion after kill -9", check_store_kill9),  # last: it restarts the server
]


def run_check(name: str, fn: Callable[[Context], tuple[str, dict]], ctx: Context) -> Check:
    """One check, timed; any exception is its failure, named in one line (the traceback kept)."""
    check = Check(name)
    start = time.perf_counter()
    try:
        check.detail, check.data = fn(ctx)
        check.passed = True
    except Failed as e:
        check.detail, check.data = str(e), e.data
    except Exception as e:  # an API error, a bad body, a dead server: this check fails, the next runs
        check.detail = f"{type(e).__name__}: {e}"
        check.data = {"traceback": traceback.format_exc()}
    check.seconds = time.perf_counter() - start
    return check


def read_rows(world: Path) -> list[dict]:
    metadata = world / "metadata.jsonl"
    if not metadata.is_file():
        raise SystemExit(f"{metadata}: not found (give the shapes world with --world)")
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "test" and r.get("audio_file")]
    if not rows:
        raise SystemExit(f"{metadata}: no test rows with spoken captions")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="the folder polymodal serve serves")
    parser.add_argument("--port", type=int, default=None, help="default: a free loopback port")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report")
    parser.add_argument("--world", type=Path, default=None, help="the shapes world (default MODELS/shapes)")
    parser.add_argument("--judge", type=Path, default=None, help="the judge model folder (default MODELS/judge/model)")
    args = parser.parse_args()
    world = args.world or args.models / "shapes"
    judge = args.judge or args.models / "judge" / "model"
    rows = read_rows(world)
    port = args.port or free_port()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="openai_checklist_") as tmp:
        server = Server(args.models, port, Path(tmp) / "store.sqlite", Path(tmp) / "server.log")
        started = time.perf_counter()
        try:
            try:
                load = server.start()
            except RuntimeError as e:  # nothing to check without a server: say why, in the report too
                checks.append(Check("server start", detail=str(e)))
                print(f"the server did not start: {e}", file=sys.stderr)
            else:
                print(f"server on 127.0.0.1:{port} after {load:.1f} s: {' '.join(server.command)}", flush=True)
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                                       timeout=REQUEST_TIMEOUT_S)
                ctx = Context(client, server, args.models, world, judge, rows)
                for name, fn in CHECKS:
                    check = run_check(name, fn, ctx)
                    checks.append(check)
                    print(f"{check.name:<33} {'PASS' if check.passed else 'FAIL'} {check.seconds:7.1f}s  "
                          f"{check.detail}", flush=True)
        finally:
            server.stop()
            log_tail = server.tail()
    passed = sum(c.passed for c in checks)
    print(f"{passed}/{len(CHECKS)} checks passed in {time.perf_counter() - started:.0f} s")
    if args.out:
        report = {"models": str(args.models), "world": str(world), "judge": str(judge),
                  "server": " ".join(server.command), "openai": openai.__version__,
                  "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                  "passed": passed, "total": len(CHECKS), "checks": [asdict(c) for c in checks],
                  "server_log_tail": log_tail}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"report: {args.out}")
    return 0 if passed == len(CHECKS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
