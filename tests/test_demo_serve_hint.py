"""The demo ends by saying how to serve what it made (issue 14, item 7)."""

from __future__ import annotations

import shlex

from polymodal.demo import run_demo


def test_the_demo_ends_with_the_command_that_serves_its_models(tmp_path, capsys):
    out = tmp_path / "my demo [1]"  # a space to quote, brackets that rich must not read as markup
    run_demo(out, steps=[])
    printed = capsys.readouterr().err
    lines = [line.strip() for line in printed.splitlines()]
    command = next(line for line in lines if line.startswith("polymodal serve"))
    assert shlex.split(command) == ["polymodal", "serve", "--models", str(out)]
    assert "http://127.0.0.1:8000/" in printed
    assert printed.rstrip().endswith("http://127.0.0.1:8000/v1")  # the last words of the demo
