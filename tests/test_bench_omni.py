"""`polymodal bench omni` (polymodal.bench.omni): the comparisons on made-up curves whose answer is
known, and the whole bench end to end at tiny sizes (four arms, a few steps, a tiny world)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from polymodal.bench import omni as bench
from polymodal.cli import app

SIZE = 16  # image side of the omni_parts fixture (conftest)


# ---- the comparisons -------------------------------------------------------------------------


def power_curve(scale: float, steps=range(10, 1001, 10)) -> list[tuple[int, float]]:
    """A loss that falls as a power of the steps; ``scale`` < 1 gets there sooner."""
    return [(s, 3.0 * (s / scale) ** -0.3) for s in steps]


def test_step_matching_slope_finds_how_much_sooner_mot_gets_there():
    dense, mot = power_curve(1.0), power_curve(0.5)  # MoT reaches each loss in half the steps
    result = bench.step_matching_slope(dense, mot)
    assert result["slope"] == pytest.approx(0.5, abs=0.03)
    assert result["matched"] > 0
    same = bench.step_matching_slope(dense, dense)
    assert same["slope"] == pytest.approx(1.0, abs=0.03)


def test_a_mot_run_that_never_reaches_the_dense_loss_has_no_slope():
    dense, worse = power_curve(1.0), [(s, v + 1.0) for s, v in power_curve(1.0)]
    assert bench.step_matching_slope(dense, worse) == {"slope": None, "matched": 0, "points": 91}


def test_parity_ratio_of_power_laws():
    flops = [1e9, 2e9, 4e9, 8e9]
    chameleon = [(f, 0.01 * f**0.2) for f in flops]
    # Transfusion scores at F what Chameleon scores at 3F: it needs a third of the FLOPs
    transfusion = [(f, 0.01 * (3 * f) ** 0.2) for f in flops]
    result = bench.parity_ratio(transfusion, chameleon)
    assert result["ratio"] == pytest.approx(1 / 3, rel=1e-6)
    assert result["extrapolated"]  # Chameleon's best (at 8e9) is below Transfusion's last
    assert bench.parity_ratio(chameleon, chameleon)["ratio"] == pytest.approx(1.0)


def test_parity_ratio_of_a_metric_where_lower_is_better():
    flops = [1e9, 2e9, 4e9, 8e9]
    chameleon = [(f, 400.0 * (f / 1e9) ** -0.5) for f in flops]  # a distance falling with FLOPs
    # Transfusion's distance at F is Chameleon's at 4F: a quarter of the FLOPs for the same distance
    transfusion = [(f, 400.0 * (4 * f / 1e9) ** -0.5) for f in flops]
    result = bench.parity_ratio(transfusion, chameleon, higher_is_better=False)
    assert result["ratio"] == pytest.approx(1 / 4, rel=1e-6)
    assert result["extrapolated"]  # Chameleon's best distance (at 8e9) is above Transfusion's last
    assert not bench.parity_ratio(chameleon[:2], chameleon, higher_is_better=False)["extrapolated"]
    # read as higher-is-better, a falling distance has no parity
    assert "does not grow" in bench.parity_ratio(transfusion, chameleon)["why"]
    assert "does not fall" in bench.parity_ratio(chameleon, [(f, 1 / d) for f, d in chameleon],
                                                  higher_is_better=False)["why"]


def test_parity_ratio_says_why_there_is_none():
    flat = [(1e9, 0.5), (2e9, 0.4)]
    assert bench.parity_ratio([(1e9, 0.3)], flat)["ratio"] is None
    assert "does not grow" in bench.parity_ratio([(1e9, 0.3)], flat)["why"]
    assert "no fit" in bench.parity_ratio([(1e9, 0.3)], [(1e9, 0.0), (2e9, 0.5)])["why"]
    assert bench.parity_ratio([(1e9, 0.0)], flat)["ratio"] is None


def test_curves_are_read_per_modality_from_the_runs_log(tmp_path):
    log = tmp_path / "logs" / "csv" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text("step,train/text_loss,train/diffusion_loss,val/text loss\n"
                                     "10,4.0,0.9,\n20,3.0,0.8,\n20,,,2.5\n30,nan,0.7,\n")
    curves = bench.read_curves(tmp_path)
    assert curves == {"text": [(10, 4.0), (20, 3.0)], "image": [(10, 0.9), (20, 0.8), (30, 0.7)]}


def test_an_unknown_arm_or_missing_autoencoder_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown arms"):
        bench.bench_omni(tmp_path, tmp_path / "out", judge=tmp_path, arms=["parti"])
    with pytest.raises(ValueError, match="--vq-autoencoder"):
        bench.arm_overrides("chameleon", {"latent": "ae"}, 10, 0, 5)


# ---- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(omni_parts):
    return omni_parts


TINY = ["model.width=32", "model.depth=1", "model.heads=2", "model.context_length=64", f"data.image_size={SIZE}",
        "data.batch_size=8", "data.val_limit=8", "trainer.val_every_minutes=0", "trainer.log_every_steps=1",
        "trainer.vocab_size=300", "trainer.warmup=0.0"]


def test_the_bench_trains_every_arm_on_one_budget_and_compares_them(parts, monkeypatch):
    out = parts / "bench"
    args = ["bench", "omni", "--data", str(parts / "world"), "--out", str(out), "--judge", str(parts / "judge"),
            "--autoencoder", str(parts / "ae-kl"), "--vq-autoencoder", str(parts / "ae-vq"), "--steps", "4",
            "--seeds", "0", "--snapshots", "2", "--per-category", "1", "--limit", "4", "--sample-steps", "2",
            "--scales", "1,3", *TINY]
    # the Chameleon arms trained first (as a process beside another would), the rest and the scores after
    trained = CliRunner().invoke(app, [*args, "--arms", "chameleon,chameleon-mot", "--train-only"])
    assert trained.exit_code == 0, trained.output
    assert "trained: chameleon-seed0, chameleon-mot-seed0" in trained.output and not (out / "results.json").exists()
    assert (out / "chameleon-seed0" / "model" / "config.json").is_file()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {f"{arm}-seed0" for arm in bench.ARMS}
    for r in runs.values():
        assert r["train_seconds"] > 0  # the train-only runs' too, from their folders
        assert r["steps"] == 4 and r["flops_per_step"] > 0 and r["flops"] == pytest.approx(4 * r["flops_per_step"])
        assert [s["step"] for s in r["snapshots"]] == [2, 4]
        assert {"text", "image"} <= set(r["curves"]) and len(r["curves"]["text"]) == 4
        assert set(r["final"]) == {"test", "test_novel"} and "overall" in r["final"]["test"]
        assert "text loss" in r["validation"]
        assert ("guidance" in r) == (bench.ARMS[r["arm"]][1] == "dense")
    for kind in ("chameleon", "transfusion"):
        dense, mot = runs[f"{kind}-seed0"], runs[f"{kind}-mot-seed0"]
        # MoT: one parameter set a modality, each token through one, so the same FLOPs and active
        # parameters as dense, and more parameters in all
        assert mot["active_parameters"] == dense["total_parameters"] < mot["total_parameters"]
        assert mot["flops_per_step"] == pytest.approx(dense["flops_per_step"], rel=0.01)
        assert dense["active_parameters"] == dense["total_parameters"]
    comparisons = results["comparisons"]
    assert set(comparisons["mot_step_matching_slope"]) == {"chameleon text", "chameleon image", "transfusion text",
                                                           "transfusion image"}
    # the bars' metrics and the paper's (CIDEr; the Frechet distance), from each snapshot's scores
    assert set(comparisons["transfusion_parity_flop_ratio"]) == {"caption", "cider", "image", "frechet"}
    assert all(s["frechet"] > 0 and s["cider"] is not None for r in runs.values() for s in r["snapshots"])
    assert (out / "losses.png").stat().st_size > 0 and (out / "guidance.png").stat().st_size > 0
    assert "parity FLOP ratio" in result.output

    # a second call neither trains the finished runs again nor scores them again with the same settings ...
    def not_again(*a, **k):
        raise AssertionError("retrained or rescored a finished run")

    monkeypatch.setattr("polymodal.train.run.train", not_again)
    monkeypatch.setattr(bench, "run_scores", not_again)
    kept = bench.bench_omni(parts / "world", out, judge=parts / "judge", autoencoder=parts / "ae-kl",
                            steps=4, seeds=[0], arms=["transfusion"], snapshots=2, per_category=1, limit=4,
                            sample_steps=2, scales=[1.0, 3.0], extra=TINY)
    assert kept["runs"]["transfusion-seed0"] == runs["transfusion-seed0"]
    # ... and with other settings scores them again, keeping the other arms' rows
    monkeypatch.undo()
    monkeypatch.setattr("polymodal.train.run.train", not_again)
    again = bench.bench_omni(parts / "world", out, judge=parts / "judge", autoencoder=parts / "ae-kl",
                             steps=4, seeds=[0], arms=["transfusion"], snapshots=2, per_category=1, limit=4,
                             sample_steps=2, scales=[1.0], extra=TINY)
    assert again["runs"]["transfusion-seed0"]["scored_with"]["scales"] == [1.0]
    assert again["runs"]["transfusion-seed0"]["train_seconds"] == runs["transfusion-seed0"]["train_seconds"]
    assert math.isfinite(again["runs"]["chameleon-seed0"]["flops"])  # the other arms' rows are kept


def test_attention_on_cpu_is_counted():
    # without the CPU kernel's formula the counter would call attention free
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 32, 16)
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    counter = FlopCounterMode(display=False, custom_mapping=bench.cpu_attention_flops())
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert counter.get_total_flops() >= 2 * (2 * 2 * 4 * 32 * 32 * 16)  # QK^T and AV
