"""The LoRA-gap profile compares like with like: every variant computes the same function and trains."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import lora_gap

MODEL = "peftclip-tiny"


@pytest.mark.parametrize("variant", lora_gap.VARIANTS)
def test_every_variant_starts_from_the_floors_loss_and_then_learns(variant):
    # LoRA's B starts at zero, so before the first update every variant is the same base model.
    want = lora_gap.create_variant_step(MODEL, "floor", batch_size=4)()
    step = lora_gap.create_variant_step(MODEL, variant, batch_size=4)
    first = step()
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(step(), first)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="'qlora'"):
        lora_gap.create_variant_step(MODEL, "qlora", batch_size=2)


def test_main_writes_a_rate_for_every_variant(tmp_path):
    result = lora_gap.main(["--batch-size", "4", "--steps", "1", "--rounds", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"lora_gap-{MODEL}.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["images_per_second"]) == set(lora_gap.VARIANTS)
    assert all(rate > 0 for rate in saved["images_per_second"].values())
    assert saved["vs_floor"]["floor"] == 1.0
    table = (tmp_path / f"lora_gap-{MODEL}.md").read_text()
    assert all(f"| {variant} |" in table for variant in lora_gap.VARIANTS)
