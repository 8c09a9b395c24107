"""Every recipe runs end to end on the tiny base (a couple of steps), in-process and as a CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftclip.io import load_adapter, read_metadata
from peftclip.models import load_base
from peftclip.recipes import lora_retrieval
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from peftclip.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=60)


def _run(out: Path, source: Path, *extra: str) -> dict:
    return lora_retrieval.main(["--source", str(source), "--output-dir", str(out), "--max-steps", "2",
                                "--batch-size", "16", "--num-workers", "0", "--cpu", *extra])


STRATEGY_FLAGS = {
    "lora": [],
    "projections_last_block_lora": ["--projections", "--last-blocks", "1"],
    "text_prompt_and_logit_scale": ["--no-lora", "--text-prompt", "--logit-scale"],
    "visual_prompt_deep": ["--no-lora", "--visual-prompt", "--deep"],
    "freeze_vision": ["--no-lora", "--freeze", "vision"],
    "lora_saved_in_bf16": ["--save-dtype", "bf16"],
}


@pytest.mark.parametrize("case", list(STRATEGY_FLAGS))
def test_recipe_trains_saves_and_reloads(tmp_path, shapes, case):
    out = tmp_path / case
    metrics = _run(out, shapes, *STRATEGY_FLAGS[case])
    assert metrics["steps"] == 2 and set(metrics["before"]) == set(metrics["after"])
    assert metrics["train_images_per_second"] > 0
    assert json.loads((out / "metrics.json").read_text())["after"] == metrics["after"]
    assert sorted(read_metadata(out)["strategy"]) == sorted(
        {"lora": ["lora"], "projections_last_block_lora": ["lora", "partial"],
         "text_prompt_and_logit_scale": ["partial", "text_prompt"], "visual_prompt_deep": ["visual_prompt"],
         "freeze_vision": ["partial"], "lora_saved_in_bf16": ["lora"]}[case])
    assert read_metadata(out)["save_dtype"] == ("bf16" if case == "lora_saved_in_bf16" else "fp32")
    load_adapter(load_base(), out)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_recipe_runs_on_shared_flickr8k(tmp_path):
    source = SHARED_DATA / "flickr8k-800" / "captions.csv"
    if not source.is_file():
        pytest.skip(f"shared data missing: {source}")
    metrics = _run(tmp_path / "flickr", source, "--max-images", "64", "--max-val-images", "16")
    assert metrics["steps"] == 2 and 0.0 <= metrics["after"]["text_to_image_R@1"] <= 100.0


def test_bad_input_exits_2_with_one_line_error(tmp_path, shapes):
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", str(shapes),
                           "--r", "0", "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: r=0: the LoRA rank must be a positive integer"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


CLASSIFY_FLAGS = {
    "lora_and_head": [],
    "linear_probe": ["--no-lora"],
    "coop_text_prompt": ["--no-lora", "--no-head", "--text-prompt", "--ctx-init", "a photo of a"],
    "class_specific_prompt": ["--no-lora", "--no-head", "--text-prompt", "--class-specific"],
    "flyp_lora": ["--no-head", "--objective", "flyp"],
}


@pytest.mark.parametrize("case", list(CLASSIFY_FLAGS))
def test_classify_recipe_reports_three_accuracies_and_reloads(tmp_path, shapes, case):
    from peftclip.recipes import classify
    out = tmp_path / case
    metrics = classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(out), "--max-steps", "2",
                             "--batch-size", "16", "--num-workers", "0", "--val-fraction", "0.25",
                             *CLASSIFY_FLAGS[case]])
    for when in ("before", "after"):
        assert set(metrics[when]) == {"top1", "top5", "mean_per_class"}
        assert metrics[when]["top5"] >= metrics[when]["top1"]
    assert json.loads((out / "metrics.json").read_text())["class_names"] == metrics["class_names"]
    load_adapter(load_base(), out)


def test_classify_recipe_runs_on_shared_cifar10(tmp_path):
    from peftclip.recipes import classify
    source = SHARED_DATA / "cifar10"
    if not source.is_dir():
        pytest.skip(f"shared data missing: {source}")
    metrics = classify.main(["--source", str(source), "--val-split", "test", "--max-images", "64",
                             "--max-val-images", "32", "--output-dir", str(tmp_path / "cifar"), "--max-steps", "2",
                             "--batch-size", "16", "--num-workers", "0"])
    assert metrics["class_names"][0] == "airplane" and metrics["steps"] == 2
    assert 0.0 <= metrics["after"]["mean_per_class"] <= 100.0
