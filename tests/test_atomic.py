"""Exclusive runs and atomic writes: one run per output folder (a second refuses, ``--force``
takes over, a dead run's lock is taken with a warning); model folders, checkpoints and indexes
written under unique temporary names and swapped in whole, so that concurrent writers all
succeed and ``kill -9`` at any moment leaves the old version or the new one, loadable, and
nothing behind once the next write has run.

Other processes are forks of the test process: separate processes (their own pids, locks and
deaths) without a second start-up of torch each."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.errors import InputError
from polymodal.index.vectors import VectorIndex, make_index
from polymodal.models.folder import read_model_folder, remove_stale_temporaries, write_model_folder
from polymodal.train.run import LOCK_FILE, FolderBusy, RunLock, atomic_checkpoint_io


def one_line(text: str) -> str:
    return " ".join(text.split())


def temporaries(target: Path) -> list[str]:
    """What writers of ``target`` leave beside it while they work."""
    return sorted(p.name for p in target.parent.iterdir()
                  if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp"))


def in_child(work: Callable[[], object]) -> int:
    """Run ``work`` in a forked copy of this process; returns its pid. The child exits 0 when
    ``work`` returns, 1 when it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit status, or minus the signal that ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def die(*args, **kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---- one run per output folder --------------------------------------------------------------------

def hold(out: Path, *, with_child: bool = False) -> tuple[int, Callable[[], None]]:
    """A live process holding ``out``'s run lock (``with_child``: and a child of it that inherited
    the lock, as a data-loader worker does); returns its pid and a function that ends them."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()

    def work():
        os.close(ready_r)
        os.close(stop_w)
        RunLock(out).acquire()
        if with_child and os.fork() == 0:
            os.read(stop_r, 1)  # until the test ends it
            os._exit(0)
        os.write(ready_w, b"held\n")
        os.read(stop_r, 1)

    pid = in_child(work)
    os.close(ready_w)
    os.close(stop_r)
    with os.fdopen(ready_r) as ready:
        assert ready.readline() == "held\n"

    def end():
        os.close(stop_w)
        try:
            os.kill(pid, signal.SIGKILL)
            wait(pid)
        except (ProcessLookupError, ChildProcessError):
            pass

    return pid, end


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path / 'run'``: the folder and the pid."""
    out = tmp_path / "run"
    pid, end = hold(out)
    yield out, pid
    end()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 24-sample shapes world without speech: enough for a one-step run."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, WorldConfig(n=24, seed=1, speech=False, video_fraction=0.0), workers=1)
    return out


TINY = ["model.towers.image={type: cnn, preset: tiny}", "model.towers.text={type: text, preset: tiny}",
        "model.embed_dim=8", "data.batch_size=4", "trainer.max_steps=1", "trainer.val_every_minutes=0",
        "trainer.vocab_size=300", "data.val_split=null", "trainer.threads=1"]


def test_a_second_train_into_a_busy_folder_refuses_naming_the_folder_and_its_holder(world, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):  # this process is the first run
        result = CliRunner().invoke(app, ["train", "clip-shapes", "--data", str(world), "--out", str(out), *TINY],
                                    env={"COLUMNS": "400"})
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        message = one_line(result.output)
        assert str(out) in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "started" in message and "--force" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the second run wrote nothing
    assert not (out / LOCK_FILE).exists()  # released


def test_the_lock_names_a_live_holder_and_force_takes_over(holder, caplog):
    out, pid = holder
    with pytest.raises(FolderBusy, match=f"pid {pid} on "):
        RunLock(out).acquire()
    with caplog.at_level(logging.WARNING, logger="polymodal.train"), RunLock(out, force=True):
        assert f"pid {pid}" in caplog.text and "--force" in caplog.text
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()} on "):  # later runs see the new holder
            RunLock(out).acquire()
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    with RunLock(out):  # free once both have ended
        pass


def test_a_killed_runs_lock_is_taken_over_with_a_warning(holder, caplog):
    out, pid = holder
    os.kill(pid, signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="polymodal.train"), RunLock(out):
        assert f"pid {pid}" in caplog.text and "without releasing" in caplog.text


def test_a_lock_kept_by_a_dead_runs_child_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    pid, end = hold(out, with_child=True)
    try:
        os.kill(pid, signal.SIGKILL)
        wait(pid)  # its child lives on, holding the lock
        with caplog.at_level(logging.WARNING, logger="polymodal.train"), RunLock(out):
            assert f"pid {pid}" in caplog.text and "gone" in caplog.text
    finally:
        end()


def test_train_force_runs_in_a_folder_another_run_holds(holder, world):
    out, _ = holder
    args = ["train", "clip-shapes", "--data", str(world), "--out", str(out), *TINY]
    refused = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert refused.exit_code == 2 and "in use" in refused.output
    forced = CliRunner().invoke(app, [*args, "--force"], env={"COLUMNS": "400"})
    assert forced.exit_code == 0, forced.output
    assert (out / "model" / "model.safetensors").is_file()


# ---- model folders: unique temporaries, swapped in whole -------------------------------------------

def save(target: Path, version: int, size: int = 1000) -> None:
    write_model_folder(target, {"model_type": "killtest", "version": version},
                       {"w": torch.full((size,), float(version))},
                       extra=lambda folder: (folder / "tokenizer.json").write_text(json.dumps(version)))


def saved_version(target: Path) -> int:
    """The version in ``target``, after checking that its files are all of that one version."""
    config, weights = read_model_folder(target, "killtest")
    version = config["version"]
    assert torch.all(weights["w"] == version) and json.loads((target / "tokenizer.json").read_text()) == version
    return version


def test_two_processes_saving_one_model_folder_both_succeed(tmp_path):
    target, go = tmp_path / "model", tmp_path / "go"

    def writer(number: int) -> Callable[[], None]:
        def work():
            while not go.exists():
                time.sleep(0.001)
            for r in range(25):
                save(target, number * 1000 + r, size=20_000)
        return work

    writers = [in_child(writer(number)) for number in (1, 2)]
    go.touch()
    assert [wait(pid) for pid in writers] == [0, 0]
    assert saved_version(target) in (1024, 2024)
    assert temporaries(target) == []


def test_a_failed_save_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    save(target, 1)

    def broken(folder: Path) -> None:
        (folder / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_model_folder(target, {"model_type": "killtest", "version": 2}, {"w": torch.zeros(3)}, extra=broken)
    assert saved_version(target) == 1 and temporaries(target) == []


def test_a_save_does_not_replace_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files"):
        save(tmp_path, 1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    save(empty, 1)  # an empty folder is fine
    assert saved_version(empty) == 1


def test_only_the_temporaries_of_gone_writers_are_removed(tmp_path):
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    ended = subprocess.Popen(["true"])
    ended.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        names = {"ended": f".model.{ended.pid}.{host}.00aa.tmp", "alive": f".model.{alive.pid}.{host}.00bb.tmp",
                 "mine": f".model.{os.getpid()}.{host}.00cc.tmp", "elsewhere": ".model.12.otherhost.00dd.tmp",
                 "old elsewhere": ".model.13.otherhost.00ee.tmp", "another target": f".model2.{ended.pid}.{host}.00ff.tmp",
                 "not a temporary": ".model.notes.tmp"}
        for name in names.values():
            (tmp_path / name).mkdir()
        two_days_ago = time.time() - 2 * 24 * 3600
        os.utime(tmp_path / names["old elsewhere"], (two_days_ago, two_days_ago))
        removed = {p.name for p in remove_stale_temporaries(tmp_path / "model")}
        assert removed == {names["ended"], names["old elsewhere"]}, removed
    finally:
        alive.kill()
        alive.wait()


# ---- kill -9 at the moments that matter --------------------------------------------------------------

def save_any(kind: str, target: Path, version: int) -> None:
    if kind == "model":
        save(target, version)
    elif kind == "checkpoint":
        atomic_checkpoint_io().save_checkpoint({"version": version}, target)
    else:
        VectorIndex(make_index(np.full((8, 4), version, dtype=np.float32)), [{"version": version}] * 8,
                    {"version": version}).save(target)


def version_of(kind: str, target: Path) -> int:
    """The version in ``target``, loaded as its readers load it."""
    if kind == "model":
        return saved_version(target)
    if kind == "checkpoint":
        return torch.load(target, weights_only=True)["version"]
    index = VectorIndex.open(target)
    assert {item["version"] for item in index.items} == {index.info["version"]}
    return index.info["version"]


def half_then_die(path, *args) -> None:
    Path(path).write_bytes(b"\0" * 4096)  # part of the file is out when the process dies
    die()


def killed_write(kind: str, when: str, target: Path, version: int) -> None:
    """(In a child.) Write ``version`` of ``target`` and die by SIGKILL ``when``: mid write, with a
    file of it half out; after swap, with the new version in place and the old not yet removed."""
    import faiss

    from polymodal.models import folder

    if when == "after swap":
        swap = folder._swap_in
        folder._swap_in = lambda new, directory: (swap(new, directory), die())
    elif kind == "model":
        folder.save_file = lambda tensors, path: half_then_die(path)
    elif kind == "checkpoint":
        torch.save = lambda obj, path: half_then_die(path)
    else:
        faiss.write_index = lambda index, path: half_then_die(path)
    save_any(kind, target, version)


@pytest.mark.parametrize(("kind", "when", "expected"), [
    ("model", "mid write", 1), ("model", "after swap", 2), ("checkpoint", "mid write", 1),
    ("index", "mid write", 1), ("index", "after swap", 2)])
def test_kill_9_leaves_the_old_or_the_new_version_and_the_next_write_cleans_up(tmp_path, kind, when, expected):
    target = tmp_path / ("last.ckpt" if kind == "checkpoint" else kind)
    save_any(kind, target, 1)
    assert wait(in_child(lambda: killed_write(kind, when, target, 2))) == -signal.SIGKILL
    assert version_of(kind, target) == expected
    assert temporaries(target)  # the killed writer left its temporary ...
    save_any(kind, target, 3)
    assert temporaries(target) == [] and version_of(kind, target) == 3  # ... and the next write removed it


# ---- an index is one unit ------------------------------------------------------------------------

def small_index(folder: Path, n: int = 10, dim: int = 4) -> None:
    vectors = np.eye(n, dim, dtype=np.float32) + 0.01
    VectorIndex(make_index(vectors), [{"id": i} for i in range(n)], {"model": "m"}).save(folder)


def test_an_index_whose_parts_disagree_is_a_clear_error_not_an_index_error(tmp_path):
    index = tmp_path / "index"
    small_index(index)
    items = (index / "items.jsonl").read_text().splitlines()
    (index / "items.jsonl").write_text("\n".join(items[:7]) + "\n")  # a torn or hand-edited index
    with pytest.raises(InputError, match="parts disagree.*vectors.faiss holds 10.*items.jsonl lists 7"):
        VectorIndex.open(index)
    result = CliRunner().invoke(app, ["search", str(index), "a red circle"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "disagree" in result.output and "Traceback" not in result.output

    small_index(index)
    info = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**info, "dim": 8}))
    with pytest.raises(InputError, match="4-dimensional"):
        VectorIndex.open(index)

    small_index(index)
    (index / "vectors.faiss").write_bytes(b"not an index")
    with pytest.raises(InputError, match="vectors.faiss: unreadable"):
        VectorIndex.open(index)


def test_a_query_from_another_model_names_the_index(tmp_path):
    small_index(tmp_path / "index")
    opened = VectorIndex.open(tmp_path / "index")
    with pytest.raises(InputError, match=r"index: the query has 16 dimensions .* have 4"):
        opened.search(np.zeros((1, 16), np.float32))


def test_an_index_save_does_not_replace_a_folder_of_other_files(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"png")
    with pytest.raises(InputError, match="holds other files"):
        small_index(tmp_path)
    assert (tmp_path / "photo.png").read_bytes() == b"png"
