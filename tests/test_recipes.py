"""Every recipe runs end to end on the tiny base (a couple of steps), in-process and as a CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from peftclip.io import load_adapter, read_metadata
from peftclip.models import load_base
from peftclip.recipes import classify, lora_retrieval
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from peftclip.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=60)


def _run(out: Path, source: Path, *extra: str) -> dict:
    return lora_retrieval.main(["--source", str(source), "--output-dir", str(out), "--max-steps", "2",
                                "--batch-size", "16", "--num-workers", "0", "--cpu", *extra])


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def runs(monkeypatch) -> list[dict]:
    """Each recipe's call of `train`, recorded: the trainable tensors before and after, and the step losses."""
    recorded = []

    def watch(real):
        def watched(model, *args, **kwargs):
            before = _trainable(model)
            result = real(model, *args, **kwargs)
            recorded.append({"before": before, "after": _trainable(model), "losses": result.losses})
            return result
        return watched

    for recipe in (lora_retrieval, classify):
        monkeypatch.setattr(recipe, "train", watch(recipe.train))
    return recorded


def _assert_every_trainable_tensor_moved(runs: list[dict]) -> None:
    """With weight decay off, a tensor that is unchanged after two steps got no gradient: it did not train."""
    (run,) = runs
    assert run["before"], "nothing was trainable"
    unchanged = [n for n, t in run["before"].items() if torch.equal(t, run["after"][n])]
    assert not unchanged, f"not trained: {unchanged}"


STRATEGY_FLAGS = {
    "lora": [],
    "projections_last_block_lora": ["--projections", "--last-blocks", "1"],
    "text_prompt_and_logit_scale": ["--no-lora", "--text-prompt", "--logit-scale"],
    "visual_prompt_deep": ["--no-lora", "--visual-prompt", "--deep"],
    "freeze_vision": ["--no-lora", "--freeze", "vision"],
    "lora_saved_in_bf16": ["--save-dtype", "bf16"],
}


@pytest.mark.parametrize("case", list(STRATEGY_FLAGS))
def test_recipe_trains_saves_and_reloads(tmp_path, shapes, runs, case):
    out = tmp_path / case
    metrics = _run(out, shapes, "--weight-decay", "0", *STRATEGY_FLAGS[case])
    _assert_every_trainable_tensor_moved(runs)
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_retrieval_recipe_learns_the_shapes_task(tmp_path, shapes, runs):
    # Evaluated on the training images: 20 steps at a fixed seed are enough to fit them, not to generalise.
    metrics = _run(tmp_path / "learns", shapes, "--max-steps", "20", "--lr", "1e-2", "--warmup-steps", "0",
                   "--val-split", "train", "--no-augment")
    before, after = metrics["before"], metrics["after"]
    for direction in ("image_to_text", "text_to_image"):
        assert after[f"{direction}_R@10"] >= before[f"{direction}_R@10"] + 15, (before, after)
        assert after[f"{direction}_R@1"] > before[f"{direction}_R@1"], (before, after)
    losses = runs[0]["losses"]
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.15, losses


def test_classify_recipe_learns_the_shapes_labels(tmp_path, shapes, runs):
    metrics = classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(tmp_path / "probe"),
                             "--max-steps", "20", "--lr", "1e-3", "--warmup-steps", "0", "--batch-size", "16",
                             "--num-workers", "0", "--val-split", "train", "--no-augment", "--no-lora"])
    before, after = metrics["before"], metrics["after"]
    assert after["top1"] >= before["top1"] + 5 and after["top5"] >= before["top5"] + 10, (before, after)
    losses = runs[0]["losses"]
    assert _mean(losses[-5:]) < _mean(losses[:5]), losses


def test_recipe_runs_on_shared_flickr8k(tmp_path, runs):
    source = shared_data("flickr8k-800", "captions.csv")
    metrics = _run(tmp_path / "flickr", source, "--max-images", "64", "--max-val-images", "16", "--weight-decay", "0")
    _assert_every_trainable_tensor_moved(runs)
    assert metrics["steps"] == 2 and set(metrics["after"]) == set(metrics["before"])


def test_bad_input_exits_2_with_one_line_error(tmp_path, shapes):
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", str(shapes),
                           "--r", "0", "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: r=0: the LoRA rank must be a positive integer"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# With a head, the objective never runs the text tower, yet the default LoRA puts (and saves) adapters there
# that never train: the recipe should default to towers=["vision"] when the text tower is unused.
CLASSIFY_FLAGS = {
    "lora_and_head": [],
    "vision_lora_and_head": ["--towers", "vision"],
    "linear_probe": ["--no-lora"],
    "coop_text_prompt": ["--no-lora", "--no-head", "--text-prompt", "--ctx-init", "a photo of a"],
    "class_specific_prompt": ["--no-lora", "--no-head", "--text-prompt", "--class-specific"],
    "flyp_lora": ["--no-head", "--objective", "flyp"],
}


@pytest.mark.parametrize("case", list(CLASSIFY_FLAGS))
def test_classify_recipe_trains_reports_three_accuracies_and_reloads(tmp_path, shapes, runs, case):
    out = tmp_path / case
    metrics = classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(out), "--max-steps", "2",
                             "--batch-size", "16", "--num-workers", "0", "--val-fraction", "0.25",
                             "--weight-decay", "0", *CLASSIFY_FLAGS[case]])
    _assert_every_trainable_tensor_moved(runs)
    assert set(metrics["before"]) == set(metrics["after"]) == {"top1", "top5", "mean_per_class"}
    assert json.loads((out / "metrics.json").read_text())["class_names"] == metrics["class_names"]
    load_adapter(load_base(), out)


def test_classify_recipe_runs_on_shared_cifar10(tmp_path, runs):
    source = shared_data("cifar10")
    metrics = classify.main(["--source", str(source), "--val-split", "test", "--max-images", "64",
                             "--max-val-images", "32", "--output-dir", str(tmp_path / "cifar"), "--max-steps", "2",
                             "--batch-size", "16", "--num-workers", "0", "--weight-decay", "0"])
    _assert_every_trainable_tensor_moved(runs)
    assert metrics["class_names"][0] == "airplane" and metrics["steps"] == 2


def test_classify_refuses_text_tower_lora_that_a_head_would_leave_untrained(tmp_path, shapes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(tmp_path / "out"),
                       "--towers", "vision", "text", "--num-workers", "0"])
    assert exit_info.value.code == 2
    assert "lora.towers includes 'text', but a head trained with objective 'ce'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [[], ["--no-head", "--no-lora", "--text-prompt"], ["--no-head", "--objective",
                                                                                       "flyp"]])
def test_classify_trains_under_bf16_autocast_on_the_cpu(tmp_path, shapes, flags, monkeypatch):
    """Each objective goes through the model's forward, where Accelerate applies autocast."""
    seen = []
    original = torch.nn.Linear.forward

    def recording(self, x):
        out = original(self, x)
        if torch.is_grad_enabled():  # a training step, not evaluation
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    AcceleratorState._reset_state(reset_partial_state=True)  # this process made fp32 Accelerators before
    metrics = classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(tmp_path / "out"),
                             "--max-steps", "2", "--batch-size", "16", "--num-workers", "0", "--val-fraction", "0.25",
                             "--mixed-precision", "bf16", "--cpu", "--no-feature-cache", *flags])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert metrics["steps"] == 2
    assert torch.bfloat16 in seen, "no linear layer ran under bf16 autocast"


WATCHED = ["--report-to", "tensorboard", "--eval-every-steps", "1", "--save-best", "top1"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--no-head", "--no-lora", "--text-prompt"], WATCHED,
                                   ["--no-head", "--no-lora", "--tip-adapter", "--fine-tune"]])
def test_classify_runs_in_two_real_processes(tmp_path, shapes, flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "recipes" / "classify.py"), "--source", str(shapes / "labels.csv"), "--output-dir",
           str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "16", "--num-workers", "0",
           "--val-fraction", "0.25", "--cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    load_adapter(load_base(), tmp_path / "out")
    if flags == WATCHED:  # trackers, evaluation and the best adapter on the main process only, once per step
        assert [entry["step"] for entry in metrics["history"]] == [0, 1, 2]
        events = list((tmp_path / "out-logs").rglob("events.out.tfevents.*"))  # name: ...<time>.<host>.<pid>.<n>
        assert events and len({path.name.split(".")[-2] for path in events}) == 1, events
        load_adapter(load_base(), tmp_path / "out-best")
