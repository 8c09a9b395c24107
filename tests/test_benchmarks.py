"""The benchmark scripts run on the smallest case, so they cannot rot."""

from __future__ import annotations

import json

from benchmarks import feature_cache


def test_feature_cache_benchmark_smallest_case(tmp_path):
    result = feature_cache.main(["--images", "40", "--epochs", "1", "--out", str(tmp_path)])
    assert set(result["strategies"]) == set(feature_cache.STRATEGIES)
    assert all(row["cached_s_per_epoch"] > 0 and row["speedup"] > 0 for row in result["strategies"].values())
    saved = json.loads((tmp_path / "feature_cache-peftclip-tiny.json").read_text())
    assert saved["images"] == 40 and "| projections |" in (tmp_path / "feature_cache-peftclip-tiny.md").read_text()


def test_inference_benchmark_smallest_case(tmp_path):
    from benchmarks import inference
    result = inference.main(["--rounds", "2", "--switch-repeats", "3", "--batch-size", "4", "--out", str(tmp_path)])
    assert set(result["switch_seconds"]) == {"lora_a <-> lora_b", "lora_a <-> projections_last2", "lora_a <-> base"}
    assert all(s > 0 for s in result["switch_seconds"].values()) and result["reload_seconds"] > 0
    assert set(result["images_per_second"]) == {"base", "unmerged", "merged"}
    assert "| reload base + adapter from disk |" in (tmp_path / "inference-peftclip-tiny.md").read_text()
