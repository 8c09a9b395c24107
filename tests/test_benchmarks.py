"""The benchmark scripts run on the smallest case, so they cannot rot."""

from __future__ import annotations

import json

import pytest

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


def test_suite_quick_smallest_case(tmp_path):
    """Every section of `python -m benchmarks.run --quick`, on the tiny base with the fewest steps."""
    from benchmarks import run
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n<!-- suite-quick:begin -->\nold\n<!-- suite-quick:end -->\n")
    argv = ["--quick", "--batch-size", "4", "--steps", "3", "--feature-cache-images", "40", "--inference-rounds", "2",
            "--out", str(tmp_path / "results"), "--readme", str(readme)]
    result = run.main(argv)
    comparisons = result["training"]["comparisons"]
    assert set(comparisons) == set(run.COMPARISONS) and all(row["ratio"] > 0 for row in comparisons.values())
    rows = result["training"]["strategies"]
    assert set(rows) == set(run.FLOOR_OF) and all(len(r) == 1 for r in result["runs"].values())
    assert all(row["max_rss_bytes"] > 50e6 and row["floor_images_per_second"] > 0 and row["artifact_bytes"] > 0
               for row in rows.values())
    assert rows["lora"]["artifact_bytes_bf16"] < rows["lora"]["artifact_bytes"]
    assert result["targets"] == []  # too short to measure: no verdicts
    assert result["settings"]["device"] == "cpu"
    saved = json.loads((tmp_path / "results" / "suite-quick.json").read_text())
    assert saved["command"] == ("python -m benchmarks.run --quick --batch-size 4 --steps 3 --feature-cache-images 40 "
                                "--inference-rounds 2")
    assert (tmp_path / "results" / "suite-quick.png").read_bytes()[:4] == b"\x89PNG"
    text = readme.read_text()
    assert "old" not in text and "| LoRA (qkv+out+MLP, r=8) vs full fine-tune |" in text
    assert "results/suite-quick.png" in text and text.count("<!-- suite-quick:begin -->") == 1
    assert "| target | goal |" not in text and "No target verdicts" in text


def test_full_mode_holds_the_figures_against_the_targets():
    from benchmarks import run
    from benchmarks.report import check_targets
    result = json.loads((run.RESULTS / "suite-full.json").read_text())  # the last full run, committed
    targets = check_targets(result)
    assert {"LoRA training vs open_clip's full fine-tune", "merged LoRA inference vs bare base"} <= \
        {t["target"] for t in targets}
    assert all(isinstance(t["met"], bool) for t in targets)
    assert run.MEASURED_MODES == ("full", "gpu") and run.MODES["gpu"].device == "cuda"


def test_strategies_subset_runs_only_its_rows_and_comparisons(tmp_path):
    """--strategies lora: open_clip_train's full fine-tune (LoRA's comparison), LoRA's recipe and floor, nothing else;
    its report has only those rows and targets, and says so."""
    from benchmarks import run
    from benchmarks.report import check_targets, render_markdown
    assert run._jobs(("lora",)) == [("open_clip", False), ("peftclip", "lora"), ("floor", "lora")]
    assert run._jobs(("freeze_vision", "lora_grad_checkpointing_release_memory")) == [
        ("open_clip", True), ("peftclip", "freeze_vision"), ("peftclip", "lora_grad_checkpointing_release_memory"),
        ("floor", "freeze_vision"), ("floor", "lora_grad_checkpointing")]
    with pytest.raises(SystemExit):
        run.main(["--strategies", "lora,nope", "--out", str(tmp_path)])
    result = json.loads((run.RESULTS / "suite-full.json").read_text())  # the last full run, cut down to LoRA
    runs = {key: value for key, value in result["runs"].items() if key in ("open_clip full", "peftclip lora")}
    rows = {"lora": result["training"]["strategies"]["lora"]}
    comparisons = {name: row for name, row in result["training"]["comparisons"].items() if name.startswith("LoRA")}
    result.update(runs=runs, subset=True, command="python -m benchmarks.run --strategies lora",
                  training={"comparisons": comparisons, "strategies": rows, "open_clip": {"full": 1.0}})
    names = {t["target"] for t in check_targets(result)}
    assert {"LoRA training vs open_clip's full fine-tune", "lora: share of the compute floor",
            "lora: peak memory vs its floor"} <= names
    assert not any(n.startswith(("full", "freeze_vision", "lora_grad")) for n in names)  # not run, not judged
    result["targets"] = []
    text = render_markdown(result)
    assert "Strategies run: lora only" in text and "| lora |" in text and "| full |" not in text


def test_floor_runs_on_the_device_it_is_given():
    from benchmarks.floor import create_floor_step
    model, step = create_floor_step("peftclip-tiny", "lora", batch_size=2, device="cpu")
    assert step().device.type == "cpu" and next(model.parameters()).device.type == "cpu"


def test_wds_loader_benchmark_quick_reads_every_sample_once_with_each_loader(tmp_path):
    """peftclip's stream and open_clip_train's get_wds_dataset over the same tiny shards, 2 workers: one epoch each."""
    from benchmarks import wds_loader
    report = wds_loader.main(["--quick", "--root", str(tmp_path), "--results", str(tmp_path / "wds_loader"),
                              "--timeout", "300"])
    delivered = {name: (r["images"], r["distinct"], r["batches"]) for name, r in report["loaders"].items()}
    assert delivered == {"peftclip": (64, 64, 8), "open_clip_train": (64, 64, 8)}
    assert report["ratio"] > 0 and "peftclip / open_clip_train" in (tmp_path / "wds_loader.md").read_text()


def test_wds_loader_benchmark_refuses_shards_that_would_hang_open_clip_train(tmp_path):
    from benchmarks import wds_loader
    argv = ["--shards-count", "2", "--per-shard", "16", "--batch-size", "64", "--root", str(tmp_path)]
    with pytest.raises(ValueError, match="never fill a batch of 64"):
        wds_loader.main(argv)
    assert not any(tmp_path.iterdir())  # refused before writing shards or starting a loader


def test_few_shot_quick_has_a_row_per_method_and_replaces_the_readme_section(tmp_path):
    """Two methods, one seed, two steps on real CIFAR-10: zero-shot, each method's top-1, the README section."""
    from benchmarks import few_shot
    from tests.conftest import shared_data
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n### Methods\n\n<!-- few-shot:begin -->\nold\n<!-- few-shot:end -->\n\n## Next\n")
    result = few_shot.main(["--quick", "--source", str(shared_data("cifar10")), "--out", str(tmp_path / "results"),
                            "--readme", str(readme)])
    rows = result["methods"]
    assert list(rows) == list(few_shot.QUICK_METHODS) and result["settings"]["seeds"] == [1]
    assert all(0 <= row["top1_mean"] <= 100 and row["top1_std"] == 0 for row in [*rows.values(), result["zero_shot"]])
    assert rows["linear probe"]["steps"] == 2 and rows["Tip-Adapter"]["steps"] == 0  # training-free
    table = (tmp_path / "results" / "few_shot.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and " ± " in line] == \
        ["| zero-shot", "| linear probe", "| Tip-Adapter"]
    assert "not published accuracy" in table and (tmp_path / "results" / "few_shot.png").read_bytes()[:4] == b"\x89PNG"
    text = readme.read_text()
    assert "old" not in text and text.count("<!-- few-shot:begin -->") == 1 and text.endswith("## Next\n")
    assert "| Tip-Adapter |" in text and "](results/few_shot.png)" in text
