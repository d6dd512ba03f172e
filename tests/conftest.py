from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 120-sample shapes world with speech and a few videos, made once per test process."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, WorldConfig(n=120, seed=7, video_fraction=0.1), workers=1)
    return out
