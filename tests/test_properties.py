"""Property-based tests: the config parser and the data-row validator never misbehave."""

from __future__ import annotations

import csv

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from peftclip.adapters.lora import TARGETS, LoraConfig
from peftclip.data import DataConfig, DataError, load_pairs
from peftclip.train import TrainConfig

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(-10, 10, allow_nan=False),
                      st.text(max_size=8), st.lists(st.sampled_from(["q", "k", "v", "out", "c_fc", "x", "vision",
                                                                     "text", "audio"]), max_size=4))
LORA_FIELDS = st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "towers", "target_modules",
                                               "blocks", "rank"]), ANY_VALUE, max_size=4)


@given(LORA_FIELDS)
def test_lora_config_parser_accepts_valid_or_raises_value_error(fields):
    try:
        config = LoraConfig.from_dict(fields)
    except (ValueError, TypeError):
        return
    assert config.r >= 1 and config.lora_alpha > 0 and 0 <= config.lora_dropout < 1
    assert set(config.target_modules) <= set(TARGETS) and set(config.towers) <= {"vision", "text"}
    assert LoraConfig.from_dict(config.to_dict()) == config  # JSON round trip


@given(st.dictionaries(st.sampled_from(["lr", "batch_size", "epochs", "max_steps", "warmup_steps",
                                        "mixed_precision", "group_lr"]),
                       st.one_of(st.integers(-3, 50), st.floats(-1, 1, allow_nan=False), st.sampled_from(
                           ["no", "fp16", "bf16", "fp8"]), st.dictionaries(st.sampled_from(["lora", "head", "x"]),
                                                                           st.floats(-1, 1, allow_nan=False))),
                       max_size=4))
def test_train_config_parser_accepts_valid_or_raises(fields):
    try:
        config = TrainConfig.from_dict(fields)
    except (ValueError, TypeError):
        return
    assert config.lr > 0 and config.batch_size >= 1 and config.mixed_precision in ("no", "fp16", "bf16")
    assert all(v > 0 for v in config.group_lr.values())


CAPTION = st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
                    st.sampled_from(["", " ", "\t", "NA", "null", "nan", "None", "#N/A"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(CAPTION, min_size=2, max_size=8))
def test_validator_drops_exactly_the_blank_captions(tmp_path, captions):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        writer.writerows([["a.png", c] for c in captions])
    blank = sum(not c.strip() for c in captions)
    config = DataConfig(source=str(tmp_path / "pairs.csv"), skip_bad_rows=True, val_split="train")
    if blank == len(captions):
        with pytest.raises(DataError, match="every row is bad"):
            load_pairs(config)
        return
    train, _ = load_pairs(config)
    assert train.skipped == blank
    assert train.captions == [[c.strip() for c in captions if c.strip()]]
