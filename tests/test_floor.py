"""The compute-floor benchmark times every strategy, and each strategy trains what it claims."""

from __future__ import annotations

import pytest
import torch

from benchmarks import floor

MODEL = "peftclip-tiny"
POSITIONAL = {"visual.positional_embedding", "positional_embedding"}
PROJECTIONS = {"visual.proj", "text_projection", "logit_scale"}

# strategy -> predicate on a parameter name: True when one step must change it, False when it must not.
CHANGES = {
    "full": lambda name: True,
    "freeze_vision": lambda name: not name.startswith("visual.") or name == "visual.proj",
    "lora": lambda name: name in POSITIONAL,
    "lora_grad_checkpointing": lambda name: name in POSITIONAL,
    "projections": lambda name: name in PROJECTIONS,
    "text_prompt": lambda name: name == "positional_embedding",
}


@pytest.mark.parametrize("strategy", floor.STRATEGIES)
def test_floor_throughput_reports_every_timed_step(strategy):
    result = floor.floor_throughput(MODEL, strategy, batch_size=8, steps=2, threads=2, warmup=1)
    assert (result["strategy"], result["model"], result["batch_size"]) == (strategy, MODEL, 8)
    assert len(result["step_seconds"]) == 2 and result["images_per_second"] > 0


@pytest.mark.parametrize("strategy", floor.STRATEGIES)
def test_one_step_changes_exactly_the_parameters_the_strategy_trains(strategy):
    model, step = floor.create_floor_step(MODEL, strategy, batch_size=4)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    step()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == {name for name in before if CHANGES[strategy](name)}


def test_bf16_autocast_step_runs():
    model, step = floor.create_floor_step(MODEL, "lora", batch_size=4, precision="bf16")
    assert torch.isfinite(step())


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "no_such"}, "unknown strategy 'no_such'"),
    ({"strategy": "lora", "precision": "fp16"}, "unknown precision 'fp16'"),
])
def test_bad_strategy_or_precision_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        floor.create_floor_step(MODEL, batch_size=2, **kwargs)


def test_cli_prints_one_line_per_strategy(capsys):
    results = floor.main(["--batch-size", "4", "--steps", "1", "--warmup", "0", "--strategies", "lora", "full"])
    assert [r["strategy"] for r in results] == ["lora", "full"]
    assert capsys.readouterr().out.count("images/s") == 2
