"""The per-family LoRA benchmark compares like with like: the floor and peftclip's step train the same thing."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import families
from tests import hf_cache

tiny_hub = hf_cache.tiny_hub  # the fixture: peftclip-tiny-siglip names a Hub tokenizer

# Tiny stand-ins of the benchmarked families: native ViT + softmax loss, timm ViT + custom text tower +
# sigmoid loss, timm ConvNeXt (1x1-convolution MLP here, so the floor's convolution branch runs too).
TINY_MODELS = ("peftclip-tiny", "peftclip-tiny-siglip", "peftclip-tiny-convnext")


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_floor_and_peftclip_start_from_the_same_loss_train_as_many_parameters_and_learn(model_name, tiny_hub):
    # LoRA's B starts at zero, so the first loss is the base model's in both variants.
    floor_model, floor_step = families.create_family_step(model_name, "floor", batch_size=4)
    ours, our_step = families.create_family_step(model_name, "peftclip", batch_size=4)
    first = our_step()
    torch.testing.assert_close(floor_step(), first, rtol=1e-5, atol=1e-5)
    trained = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (floor_model, ours)]
    assert trained[0] == trained[1] > 0
    assert not torch.allclose(our_step(), first)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant 'qlora'"):
        families.create_family_step("peftclip-tiny", "qlora", batch_size=2)


def test_main_times_each_variant_in_its_own_process_and_writes_the_share(tmp_path):
    result = families.main(["--models", "peftclip-tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                            "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "families.json").read_text())
    assert saved == json.loads(json.dumps(result))
    row = saved["models"]["peftclip-tiny"]
    assert row["share_of_floor"] == pytest.approx(row["peftclip_images_per_second"] / row["floor_images_per_second"])
    assert row["trainable_parameters"] == row["floor_trainable_parameters"] > 0
    assert row["max_rss_bytes"] > 50_000_000 and row["floor_max_rss_bytes"] > 50_000_000  # torch alone is more
    assert len(saved["machine"]["load_average_1_5_15"]["after"]) == 3
    assert "| peftclip-tiny |" in (tmp_path / "families.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["families.json", "families.md"]  # no worker files left


@pytest.mark.parametrize("load, flagged", [(1.5, False), (4.0, True)])
def test_report_calls_a_run_noise_when_the_load_exceeded_the_cores(load, flagged):
    row = {"floor_images_per_second": 1.0, "peftclip_images_per_second": 0.9, "share_of_floor": 0.9,
           "trainable_parameters": 10, "max_rss_bytes": 1, "floor_max_rss_bytes": 1,
           "step_seconds": {"floor": [1.0, 3.0], "peftclip": [1.0, 1.1]}}
    result = {"settings": {"batch_size": 8, "steps": 2, "warmup": 1, "threads": 2, "r": 8}, "command": "c",
              "machine": {"cpu_count": 2, "torch": "x", "load_average_1_5_15": {"before": [load] * 3,
                                                                                 "after": [1.0] * 3}},
              "models": {"ViT-B-32": row}}
    table = families._markdown(result)
    assert ("noise, not a verdict" in table) is flagged
    assert "up to 3.0x within one run" in table and "| ViT-B-32 | 1.00 | 0.90 | 90% | 1.0-3.0 | 1.0-1.1 |" in table
