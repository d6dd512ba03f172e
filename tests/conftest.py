from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# For a child process's script: ``peak_bytes()``, the most resident memory its own program has held
# (VmHWM). Not ``ru_maxrss``: Linux carries a process's high-water mark across exec, so a child of
# a big test process would report its parent's peak (a child of a 1.5 GB parent read 1,513 MB where
# VmHWM read 13 MB).
PEAK_BYTES = """
def peak_bytes():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: the high-water mark is the best there is
        import resource, sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
"""


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 120-sample shapes world with speech and a few videos, made once per test process."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, WorldConfig(n=120, seed=7, video_fraction=0.1), workers=1)
    return out


OMNI_SIZE = 16  # image side of the tiny omni parts: 16 px through three autoencoder levels, a 4x4 grid


@pytest.fixture(scope="session")
def omni_parts(tmp_path_factory):
    """A 100-sample shapes world without speech, tiny untrained KL and VQ autoencoders (``ae-kl``,
    ``ae-vq``) at 16x16 and a tiny untrained judge: the parts omni models are built from."""
    import torch

    from polymodal.data.shapes import WorldConfig, generate_world
    from polymodal.models.autoencoder import Autoencoder, AutoencoderConfig
    from polymodal.models.detector import DetectorConfig, GridDetector

    root = tmp_path_factory.mktemp("omni")
    generate_world(root / "world", WorldConfig(n=100, seed=3, speech=False, video_fraction=0.0), workers=1)
    torch.manual_seed(0)
    for kind in ("kl", "vq"):
        Autoencoder(AutoencoderConfig(kind=kind, channels=(8, 8, 8), latent_channels=4, codebook_size=32,
                                      image_size=OMNI_SIZE)).save_pretrained(root / f"ae-{kind}")
    GridDetector(DetectorConfig(widths=(8, 16, 16), head_width=16)).save_pretrained(root / "judge")
    return root
