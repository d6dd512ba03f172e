"""``kill -9`` at random moments during checkpoint writes, model saves and index saves.

For each kind of write, until ``--trials`` kills have landed: the target holds version v; a
forked child (its own process, without a second start-up of torch) writes version v+1 of it and
is sent SIGKILL after a delay drawn uniformly over one uninterrupted write (the median of 5,
measured first). A write that finished before its kill is checked too but not counted as a kill. The script then checks the target as its
readers load it: it must be version v or v+1 with every part of one version (config, weights,
tokenizer; vectors, items, index.json). It counts the temporaries the kill left beside it, writes
the next version itself (whose first step removes the temporaries of writers that are gone) and
checks that none is left.

The payload (``--mb`` of float32 per write) is small enough for a shared machine and large
enough that a write takes tens of milliseconds, so kills land inside it.

    python benchmarks/kill_writes.py [--trials 20] [--mb 16] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from polymodal.index.vectors import VectorIndex, make_index
from polymodal.models.folder import read_model_folder, write_model_folder
from polymodal.train.run import atomic_checkpoint_io

KINDS = ("checkpoint", "model", "index")
DIM = 256  # index vectors


def payload(kind: str, version: int, floats: int):
    """What a write of ``version`` writes: built before the child forks, so that the child only writes."""
    if kind == "checkpoint":
        return {"version": version, "state_dict": {"w": torch.full((floats,), float(version))}}
    if kind == "model":
        return ({"model_type": "killtest", "version": version}, {"w": torch.full((floats,), float(version))})
    n = floats // DIM
    return VectorIndex(make_index(np.full((n, DIM), version, dtype=np.float32), kind="exact"),
                       [{"version": version, "file": f"{i:06d}.png"} for i in range(n)], {"version": version})


def write(kind: str, target: Path, data) -> None:
    if kind == "checkpoint":
        atomic_checkpoint_io().save_checkpoint(data, target)
    elif kind == "model":
        config, state = data
        write_model_folder(target, config, state,
                           extra=lambda folder: (folder / "tokenizer.json").write_text(json.dumps(config["version"])))
    else:
        data.save(target)


def loaded_version(kind: str, target: Path) -> int:
    """The version at ``target``, loaded as its readers load it; raises if its parts disagree."""
    if kind == "checkpoint":
        checkpoint = torch.load(target, weights_only=True)
        versions = {checkpoint["version"], float(checkpoint["state_dict"]["w"][0]), float(checkpoint["state_dict"]["w"][-1])}
    elif kind == "model":
        config, weights = read_model_folder(target, "killtest")
        versions = {config["version"], float(weights["w"][0]), float(weights["w"][-1]),
                    json.loads((target / "tokenizer.json").read_text())}
    else:
        index = VectorIndex.open(target)  # checks that vectors, items and index.json agree in count
        versions = {index.info["version"], index.items[0]["version"], index.items[-1]["version"],
                    float(index.index.reconstruct(index.index.ntotal - 1)[0])}
    if len(versions) != 1:
        raise ValueError(f"parts of different versions: {versions}")
    return int(versions.pop())


def temporaries(target: Path) -> list[Path]:
    return [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp")]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def killed_write(kind: str, target: Path, data, delay: float) -> bool:
    """Write ``data`` in a forked child and SIGKILL it ``delay`` seconds after it starts; whether
    the kill landed (False: the write had finished first)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.write(ready_w, b"go")
        code = 0
        try:
            write(kind, target, data)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(ready_w)
    os.read(ready_r, 2)
    os.close(ready_r)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)  # reaped: its pid is gone, as after a real kill
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the {kind} write failed on its own")
    return os.WIFSIGNALED(status)


def run(kind: str, folder: Path, trials: int, floats: int, rng: random.Random) -> dict:
    target = folder / {"checkpoint": "last.ckpt", "model": "model", "index": "index"}[kind]
    durations = []
    for version in range(6):  # the first one warms up (imports, the page cache)
        data = payload(kind, version, floats)
        start = time.perf_counter()
        write(kind, target, data)
        durations.append(time.perf_counter() - start)
    write_s = statistics.median(durations[1:])
    version = loaded_version(kind, target)
    outcomes, left_bytes, left_after_next, broken, kills, finished = Counter(), [], 0, [], 0, 0
    while kills < trials:
        data = payload(kind, version + 1, floats)
        landed = killed_write(kind, target, data, rng.uniform(0, write_s))
        kills, finished = kills + landed, finished + (not landed)
        try:
            found = loaded_version(kind, target)
            ok = found in (version, version + 1)
        except Exception as e:  # a torn or missing target
            found, ok = None, False
            broken.append(repr(e)[:200])
        left = temporaries(target)
        left_bytes.append(sum(size_of(p) for p in left))
        phase = ("old" if found == version else "new" if found == version + 1 else "torn") + \
            (", temporaries left" if left else "")
        if landed:
            outcomes[phase] += 1
        elif phase != "new":
            broken.append(f"a finished write left {phase}")
        version = (found if ok else version) + 2
        write(kind, target, payload(kind, version, floats))  # the next write: cleans up first
        left_after_next += len(temporaries(target))
        if loaded_version(kind, target) != version:
            broken.append("the next write did not land")
    return {"kind": kind, "trials": trials, "finished_before_the_kill": finished,
            "write_ms": round(1000 * write_s, 1),
            "bytes_per_write": int(size_of(target)), "outcomes": dict(outcomes),
            "old_or_new_and_loadable": trials - sum(v for k, v in outcomes.items() if k.startswith("torn")),
            "temporary_mb_left_by_kills": round(sum(left_bytes) / 2**20, 1),
            "temporaries_after_next_write": left_after_next, "broken": broken}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--mb", type=float, default=16, help="float32 payload per write, in MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    floats = int(args.mb * 2**20 / 4)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind in KINDS:
            (Path(tmp) / kind).mkdir()
            results.append(run(kind, Path(tmp) / kind, args.trials, floats, rng))
            r = results[-1]
            print(f"{kind:10s} write {r['write_ms']:7.1f} ms  old-or-new+loadable {r['old_or_new_and_loadable']}"
                  f"/{r['trials']}  temporaries: {r['temporary_mb_left_by_kills']} MB left by kills, "
                  f"{r['temporaries_after_next_write']} after the next writes; "
                  f"{r['finished_before_the_kill']} writes finished before their kill", flush=True)
            for phase, count in sorted(r["outcomes"].items()):
                print(f"{'':12s}{count:3d}  {phase}")
    report = {"trials": args.trials, "mb": args.mb, "seed": args.seed, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in results if r["broken"] or r["old_or_new_and_loadable"] != r["trials"]
              or r["temporaries_after_next_write"]]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
