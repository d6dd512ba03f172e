import json

import numpy as np
from PIL import Image

from polymodal.data.noisy import add_noisy_task, bury, occlude


def test_one_object_rows_carry_the_noisy_task(small_world):
    rows = [json.loads(line) for line in (small_world / "metadata.jsonl").read_text().splitlines()]
    single = [r for r in rows if len(r["objects"]) == 1]
    assert single and all("noisy_label" not in r for r in rows if len(r["objects"]) > 1)
    for row in single:
        assert row["noisy_label"] == row["objects"][0]["colour"]
        assert (small_world / row["noisy_file"]).is_file() and (small_world / row["noisy_audio_file"]).is_file()
    hidden = [np.asarray(Image.open(small_world / r["noisy_file"])).astype(int) for r in single[:20]]
    clean = [np.asarray(Image.open(small_world / r["file_name"])).astype(int) for r in single[:20]]
    changed = [np.mean(np.abs(h - c).sum(-1) > 30) for h, c in zip(hidden, clean, strict=True)]
    assert 0.2 < np.mean(changed) < 0.7  # about 40% of the cells hidden


def test_adding_the_task_to_an_old_world_reproduces_it(small_world, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small_world, old)
    rows = [json.loads(line) for line in (old / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        for k in ("noisy_file", "noisy_audio_file", "noisy_label"):
            r.pop(k, None)
    (old / "metadata.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    assert add_noisy_task(old) == len(rows)
    assert (old / "metadata.jsonl").read_text() == (small_world / "metadata.jsonl").read_text()
    first = next(r["id"] for r in rows if len(r["objects"]) == 1)
    assert (old / f"images/{first}_noisy.png").read_bytes() == (small_world / f"images/{first}_noisy.png").read_bytes()


def test_occlusion_and_noise_are_what_they_say():
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    assert (np.asarray(occlude(image, np.random.default_rng(0), p=0.0)) == np.asarray(image)).all()
    everything = np.asarray(occlude(image, np.random.default_rng(0), p=1.0)).astype(int)
    assert np.abs(everything[:, :, 0] - everything[:, :, 1]).mean() < 5  # grey everywhere
    speech = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32) * 0.5
    noisy = bury(speech, np.random.default_rng(0))
    assert noisy.shape == speech.shape and np.abs(noisy).max() <= 1.0
    assert 0.3 < np.mean(np.abs(noisy - speech) > 0.3) < 0.9  # bursts drown part of it
