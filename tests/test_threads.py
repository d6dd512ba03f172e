"""Torch threads of a training process: the cores shared out, OMP_NUM_THREADS obeyed, and cores
that other processes keep busy left to them."""

import subprocess
import sys

import polymodal.train.run as run


def test_the_environment_decides_when_it_sets_the_threads(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(run, "cores_busy_elsewhere", lambda: 7.0)  # not even measured
    assert run.default_threads(1) == 3
    assert run.default_threads(4) == 2  # 8 cores over 4 processes


def test_busy_cores_are_left_to_the_processes_that_use_them(monkeypatch):
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run, "cores_busy_elsewhere", lambda: 0.2)
    assert run.default_threads(1) == 2  # a quiet machine: every core
    monkeypatch.setattr(run, "cores_busy_elsewhere", lambda: 1.1)
    assert run.default_threads(1) == 1  # one core taken by another job
    monkeypatch.setattr(run, "cores_busy_elsewhere", lambda: 3.0)
    assert run.default_threads(1) == 1  # never fewer than one
    monkeypatch.setattr(run.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(run, "cores_busy_elsewhere", lambda: 2.0)
    assert run.default_threads(2) == 3  # 6 free cores over 2 processes


def test_another_process_spinning_is_seen():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        busy = run.cores_busy_elsewhere(seconds=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.5  # the spinner's core (other tests running beside may add more)
