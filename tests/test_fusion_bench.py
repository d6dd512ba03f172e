import json

from polymodal.bench.fusion import bench_fusion, format_results

TINY_RECIPE = """
model:
  type: fusion
  strategy: early
  towers:
    image: {type: cnn, preset: tiny}
    question: {type: audio, preset: tiny}
  width: 32
  depth: 1
  heads: 2
data:
  fields: {image: image, question: "audio:fusion_audio_file"}
  batch_size: 16
  bucket_by_length: true
  val_limit: 20
trainer:
  max_steps: 2
  max_minutes: null
  val_every_minutes: 0
"""


def test_bench_trains_every_strategy_and_writes_results(small_world, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    results = bench_fusion(small_world, tmp_path / "bench", recipe_path=recipe,
                           extra=["trainer.max_minutes=null", "data.augment=question_pairs"])
    assert list(results) == ["image-only", "audio-only", "early", "late", "hybrid"]
    for name, row in results.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["parameters"] > 0
        assert ("accuracy image only" in row) == (name in ("early", "late", "hybrid"))
    assert results["image-only"]["parameters"] < results["early"]["parameters"]
    assert json.loads((tmp_path / "bench" / "results.json").read_text()) == results
    assert (tmp_path / "bench" / "accuracy.png").stat().st_size > 1000
    assert format_results(results).row_count == 5
    again = bench_fusion(small_world, tmp_path / "bench", recipe_path=recipe, strategies=["late"],
                         extra=["trainer.max_minutes=null"])
    assert list(again) == list(results) and again["image-only"] == results["image-only"]


def test_bench_names_unknown_strategies(small_world, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown strategies"):
        bench_fusion(small_world, tmp_path, strategies=["telepathy"])
