"""Training machinery applied from outside the model: gradient clipping and accumulation, the
weights' moving average (EMA) and validation, in one process and in two (DDP)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from polymodal.train.ema import EMA, averaged_weights
from polymodal.train.module import TrainModule
from polymodal.train.recipe import TrainerSettings
from polymodal.train.run import build_trainer

# ---- a model small enough to follow every step by hand ------------------------------------------


class Regression(nn.Module):
    """A linear fit whose loss is a mean over the batch (``scale`` makes it as large as wanted)."""

    def __init__(self, dim: int = 6, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(dim, 1)
        self.scale = scale

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        error = self.linear(batch["x"]).squeeze(-1) - batch["y"]  # (B,)
        return {"loss": self.scale * error.pow(2).mean()}

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), folder / "weights.pt")


def samples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.linspace(-1, 1, 6) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


class StepRecorder:
    """What the optimizer sees at each step: the gradient (after clipping) and the learning
    rate; and the weights it leaves."""

    def __init__(self):
        self.grads, self.lrs, self.weights = [], [], []

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        def after(opt, args, kwargs):  # the gradients stay until the next step's closure clears them
            self.grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
            self.lrs.append(opt.param_groups[0]["lr"])
            self.weights.append(weights(model).clone())

        optimizer.register_step_post_hook(after)


def fit(out: Path, *, batch_size: int, n: int, model: Regression | None = None, validate=None, resume: Path | None = None,
        stop_at: int | None = None, **settings) -> tuple[TrainModule, object, StepRecorder]:
    """Trains ``model`` (a fresh :class:`Regression`) through the trainer ``polymodal train`` builds
    (interrupted after step ``stop_at``, as a crash would)."""
    import lightning as L

    defaults = dict(max_steps=3, max_minutes=None, lr=0.05, weight_decay=0.0, warmup=0.5, accelerator="cpu",
                    val_every_minutes=0, log_every_steps=1)
    t = TrainerSettings(**{**defaults, **settings})
    model = model if model is not None else Regression()
    module = TrainModule(model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, warmup=t.warmup,
                         max_steps=t.max_steps, max_minutes=t.max_minutes, validate=validate)
    recorder = StepRecorder()

    class Attach(L.Callback):
        def on_train_start(self, trainer, pl_module):
            recorder.attach(trainer.optimizers[0], model)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.should_stop or trainer.global_step == stop_at

    trainer = build_trainer(t, out, progress=False)
    trainer.callbacks.append(Attach())
    loader = torch.utils.data.DataLoader(samples(n), batch_size=batch_size, shuffle=False, drop_last=True)
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None)
    return module, trainer, recorder


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_optimiser_is_fused_adamw_and_steps_as_the_plain_one():
    model = Regression()
    module = TrainModule(model, lr=0.05, weight_decay=0.1, max_steps=3)
    fused = module.configure_optimizers()
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"]
    twin = Regression()
    twin.load_state_dict(model.state_dict())
    plain = TrainModule(twin, lr=0.05, weight_decay=0.1, max_steps=3).configure_optimizers()
    for group in plain.param_groups:
        group["fused"] = None  # the same groups and settings, stepped tensor by tensor
    start = weights(model)
    for step in range(3):
        for m in (model, twin):
            m.zero_grad()
            m.loss({"x": torch.linspace(-1, 1, 24).view(4, 6) * (step + 1), "y": torch.ones(4)})["loss"].backward()
        fused.step()
        plain.step()
    assert not torch.allclose(weights(model), start)
    torch.testing.assert_close(weights(model), weights(twin))


def test_a_cpu_batch_is_handed_over_as_it_is():
    module = TrainModule(Regression(), lr=0.05, weight_decay=0.0, max_steps=3)
    batch = {"x": torch.ones(2, 3), "rows": [{"objects": [{"shape": "star"}]}] * 2}
    assert module.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch


# ---- clipping and accumulation ------------------------------------------------------------------


def test_gradient_clipping_scales_the_global_gradient_norm_down(tmp_path):
    _, _, free = fit(tmp_path / "free", batch_size=16, n=48, model=Regression(scale=1e6))
    _, _, clipped = fit(tmp_path / "clipped", batch_size=16, n=48, model=Regression(scale=1e6), gradient_clip=1.0)
    assert free.grads[0].norm() > 1e3  # a huge loss: a huge gradient
    assert all(g.norm() <= 1.0 + 1e-4 for g in clipped.grads)
    # the global norm is clipped, not each value: the direction stays that of the true gradient
    assert torch.allclose(clipped.grads[0], free.grads[0] / free.grads[0].norm(), atol=1e-5)
    with pytest.raises(ValueError, match="gradient_clip"):
        fit(tmp_path / "bad", batch_size=16, n=16, gradient_clip=0.0)


def test_accumulating_two_batches_of_8_is_one_batch_of_16(tmp_path):
    one, trainer_one, whole = fit(tmp_path / "one", batch_size=16, n=48)
    two, trainer_two, accumulated = fit(tmp_path / "two", batch_size=8, n=48, accumulate=2)
    half, _, _ = fit(tmp_path / "half", batch_size=8, n=48)  # 3 steps on 8 samples: not the same
    assert trainer_one.global_step == trainer_two.global_step == 3  # steps are optimizer steps
    assert len(accumulated.grads) == 3
    # warm-up and cosine follow optimizer steps: the same learning rate at each step
    assert accumulated.lrs == pytest.approx(whole.lrs) and len(set(whole.lrs)) == 3
    for a, b in zip(accumulated.grads, whole.grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(weights(one.model), weights(two.model), atol=1e-6)
    assert not torch.allclose(weights(one.model), weights(half.model), atol=1e-3)


# ---- the weights' moving average ----------------------------------------------------------------


def hand_average(start: torch.Tensor, steps: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = start.clone()
    for n, live in enumerate(steps, start=1):
        d = min(decay, (1 + n) / (10 + n))  # the decay warms up over the first steps
        average = d * average + (1 - d) * live
    return average


def test_the_saved_and_validated_weights_are_the_moving_average(tmp_path):
    model = Regression()
    start = weights(model).clone()
    seen = []

    def validate(m):
        seen.append(weights(m).clone())
        return {"error": 0.0}

    module, trainer, recorder = fit(tmp_path, batch_size=8, n=80, model=model, validate=validate, max_steps=5,
                                    accumulate=2, ema_decay=0.3, snapshot_every_minutes=1000)
    assert len(recorder.weights) == 5  # averaged after each optimizer step, not each batch
    expected, live = hand_average(start, recorder.weights, 0.3), recorder.weights[-1]
    assert not torch.allclose(expected, live, atol=1e-3)
    assert len(seen) == 1 and torch.allclose(seen[0], expected, atol=1e-6)  # validated: the average
    snapshot = torch.load(tmp_path / "snapshots" / "step-000005" / "weights.pt")  # saved: the average
    assert torch.allclose(torch.cat([v.flatten() for v in snapshot.values()]), expected, atol=1e-6)
    assert torch.allclose(weights(module.model), live)  # training goes on from the live weights
    with averaged_weights(trainer):  # how the final model/ folder is written
        assert torch.allclose(weights(module.model), expected, atol=1e-6)
    assert torch.allclose(weights(module.model), live)


def test_resume_restores_the_moving_average(tmp_path):
    # one batch an epoch: a resumed run sees the same batches as an uninterrupted one
    _, straight, _ = fit(tmp_path / "straight", batch_size=16, n=16, max_steps=5, ema_decay=0.6)
    _, first, _ = fit(tmp_path / "resumed", batch_size=16, n=16, max_steps=5, ema_decay=0.6, stop_at=3)
    assert first.global_step == 3
    first.save_checkpoint(tmp_path / "resumed" / "last.ckpt")
    _, resumed, _ = fit(tmp_path / "resumed", batch_size=16, n=16, max_steps=5, ema_decay=0.6,
                        resume=tmp_path / "resumed" / "last.ckpt")
    a, b = (next(c for c in t.callbacks if isinstance(c, EMA)) for t in (straight, resumed))
    assert a.updates == b.updates == 5
    for name in a.shadow:
        assert torch.allclose(a.shadow[name], b.shadow[name], atol=1e-6), name
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(1.0)


# ---- two processes give the numbers of one ------------------------------------------------------

TRAIN = 24  # the training split: the global batch, so that every step sees all of it in any order


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A shapes world without speech whose training split is exactly one global batch."""
    from polymodal.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, WorldConfig(n=40, seed=3, speech=False, video_fraction=0.0), workers=1)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) >= TRAIN and any(r["split"] == "val" for r in rows)
    for row in train[TRAIN:]:
        row["split"] = "val"
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_cli(world: Path, out: Path, devices: int) -> subprocess.CompletedProcess:
    # a ViT and a text Transformer (no batch norm: its statistics are per process on CPUs);
    # validation after every step, which both processes must reach together
    settings = ["model.towers.image={type: vit, preset: tiny}", "model.towers.text={type: text, preset: tiny}",
                "model.embed_dim=16", f"data.batch_size={TRAIN}", "data.val_limit=8", "trainer.max_steps=3",
                "trainer.vocab_size=300", "trainer.val_every_minutes=0.00001",
                "trainer.accelerator=cpu", "trainer.threads=1", "trainer.ema_decay=0.5", "trainer.gradient_clip=0.5",
                f"trainer.devices={devices}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "clip-shapes", "--data",
                           str(world), "--out", str(out), *settings], capture_output=True, text=True, env=env,
                          timeout=300, cwd=Path(__file__).parent.parent)


def test_two_processes_train_the_weights_of_one(tiny_world, tmp_path):
    for devices in (1, 2):
        result = run_cli(tiny_world, tmp_path / f"d{devices}", devices)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (load_file(str(tmp_path / f"d{d}" / "model" / "model.safetensors")) for d in (1, 2))
    assert one.keys() == two.keys()
    for name in one:
        a, b = one[name], two[name]
        if name.endswith("attn.kv.bias"):  # the keys' bias has no gradient (softmax ignores a shift
            a, b = a[len(a) // 2 :], b[len(b) // 2 :]  # common to all keys): Adam steps on rounding noise
        assert torch.allclose(a, b, atol=1e-5), name
    last = torch.load(tmp_path / "d1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    live = {k.removeprefix("model."): v for k, v in last["state_dict"].items()}
    assert any(not torch.allclose(one[k], live[k]) for k in one)  # model/ holds the average, not the last step
    # validation ran at every step and at the end, on the same (averaged) weights in both runs
    logged = [list(csv.DictReader((tmp_path / f"d{d}" / "logs" / "csv" / "version_0" / "metrics.csv").open()))
              for d in (1, 2)]
    val = [[{k: v for k, v in row.items() if k.startswith("val/") or k == "step"} for row in rows] for rows in logged]
    assert len(val[0]) == 4 and val[0] == val[1]


def test_snapshots_every_so_many_steps_and_at_the_end(tmp_path):
    # steps, not minutes: the same snapshots on any machine; the last step is saved once
    fit(tmp_path, batch_size=8, n=80, max_steps=7, accumulate=2, snapshot_every_steps=3)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step-000003", "step-000006", "step-000007"]
    fit(tmp_path / "b", batch_size=8, n=80, max_steps=6, snapshot_every_steps=3)
    assert sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir()) == ["step-000003", "step-000006"]


def test_snapshot_every_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="snapshot_every_steps"):
        fit(tmp_path, batch_size=8, n=80, snapshot_every_steps=0)
