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
