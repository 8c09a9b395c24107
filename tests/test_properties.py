"""Property-based tests: the config parsers accept every valid input and round-trip it, reject every invalid one
with a message naming the field, and the data-row validator drops exactly the blank captions."""

from __future__ import annotations

import csv

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from peftclip.adapters.lora import TARGETS, TOWERS, ClipLoraConfig
from peftclip.data import DataConfig, DataError, load_pairs
from peftclip.train import MIXED_PRECISION, PARAM_GROUPS, TrainConfig

POSITIVE = st.floats(1e-6, 1e3) | st.integers(1, 1000)
NOT_A_NUMBER = st.text(alphabet="abc", min_size=1, max_size=4) | st.none() | st.lists(st.integers(), max_size=2)
VALID_LORA = st.fixed_dictionaries({}, optional={
    "towers": st.sampled_from(["both", *TOWERS]) | st.lists(st.sampled_from(list(TOWERS)), min_size=1, max_size=2,
                                                           unique=True),
    "blocks": st.just("all") | st.integers(1, 50) | st.lists(st.integers(-12, 11), min_size=1, max_size=4),
    "target_modules": st.lists(st.sampled_from(list(TARGETS)), min_size=1, max_size=len(TARGETS), unique=True),
    "r": st.integers(1, 256),
    "lora_alpha": POSITIVE,
    "lora_dropout": st.floats(0.0, 0.99),
})
# For each field, values it must refuse, and the word the error must contain to point the user at that field.
INVALID_LORA = {
    "towers": (st.just([]) | st.sampled_from(["audio", "all", "Vision"]) | st.lists(st.just("audio"), min_size=1)
               | st.integers() | st.booleans(), "tower"),
    "blocks": (st.integers(-50, 0) | st.sampled_from(["last", "", "2"]) | st.floats(0.5, 3) | st.booleans(), "blocks"),
    "target_modules": (st.just([]) | st.lists(st.sampled_from(["query", "x", "c_fc2", ""]), min_size=1)
                       | st.sampled_from(list(TARGETS)), "target"),
    "r": (st.integers(-100, 0) | st.floats(0.5, 8) | st.booleans() | NOT_A_NUMBER, "r="),
    "lora_alpha": (st.floats(-10, 0) | st.booleans() | NOT_A_NUMBER, "lora_alpha"),
    "lora_dropout": (st.floats(1.0, 10) | st.floats(-10, -1e-6) | NOT_A_NUMBER, "lora_dropout"),
    "rank": (st.integers(1, 8), "rank"),  # not a field: PEFT calls it `r`
}


@given(VALID_LORA)
def test_lora_config_parser_accepts_every_valid_input_and_round_trips(fields):
    config = ClipLoraConfig.from_dict(fields)
    towers = fields.get("towers", "both")
    assert config.towers == (list(TOWERS) if towers == "both" else [towers] if isinstance(towers, str) else towers)
    for name in ("blocks", "target_modules", "r", "lora_alpha", "lora_dropout"):
        if name in fields:
            assert getattr(config, name) == fields[name], name
    assert ClipLoraConfig.from_dict(config.to_dict()) == config  # the adapter_config.json round trip


VALID_TRAIN = st.fixed_dictionaries({}, optional={
    "lr": POSITIVE,
    "batch_size": st.integers(1, 4096),
    "epochs": st.integers(1, 100),
    "max_steps": st.none() | st.integers(1, 10**6),
    "warmup_steps": st.integers(0, 1000),
    "mixed_precision": st.sampled_from(MIXED_PRECISION),
    "group_lr": st.dictionaries(st.sampled_from(PARAM_GROUPS), POSITIVE, max_size=3),
    "group_weight_decay": st.dictionaries(st.sampled_from(PARAM_GROUPS), st.floats(0, 1), max_size=3),
})
INVALID_TRAIN = {
    "lr": (st.floats(-1, 0) | st.booleans() | NOT_A_NUMBER, "lr"),
    "batch_size": (st.integers(-10, 0) | st.floats(1, 64) | NOT_A_NUMBER, "batch_size"),
    "epochs": (st.integers(-10, 0) | st.floats(1, 64), "epochs"),
    "max_steps": (st.integers(-10, 0) | st.floats(1, 64), "max_steps"),
    "warmup_steps": (st.integers(-10, -1), "warmup_steps"),
    "mixed_precision": (st.sampled_from(["fp8", "fp32", "BF16", "", "yes"]) | st.booleans(), "mixed_precision"),
    "group_lr": (st.dictionaries(st.sampled_from(["heads", "x", "Lora"]), POSITIVE, min_size=1)
                 | st.dictionaries(st.sampled_from(PARAM_GROUPS), st.floats(-1, 0), min_size=1), "group_lr"),
    "group_weight_decay": (st.dictionaries(st.sampled_from(PARAM_GROUPS), st.floats(-1, -1e-6), min_size=1),
                           "group_weight_decay"),
    "learning_rate": (POSITIVE, "learning_rate"),
}


@given(VALID_TRAIN)
def test_train_config_parser_accepts_every_valid_input_and_round_trips(fields):
    config = TrainConfig.from_dict(fields)
    for name, value in fields.items():
        assert getattr(config, name) == value, name
    assert TrainConfig.from_dict(config.to_dict()) == config


CONFIGS = {"lora": (ClipLoraConfig, VALID_LORA, INVALID_LORA), "train": (TrainConfig, VALID_TRAIN, INVALID_TRAIN)}


@pytest.mark.parametrize("section", CONFIGS)
@given(data=st.data())
def test_config_parser_refuses_an_invalid_field_and_names_it(section, data):
    cls, valid, invalid = CONFIGS[section]
    name, value = data.draw(st.sampled_from(sorted(invalid)).flatmap(
        lambda name: st.tuples(st.just(name), invalid[name][0])), label="bad field")
    with pytest.raises(ValueError) as error:
        cls.from_dict({**data.draw(valid, label="valid fields"), name: value})
    assert invalid[name][1] in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


# Found by the properties above once they were allowed to fail: non-finite numbers and an empty block list
# passed validation (comparisons with < and <= let NaN and inf through).
@pytest.mark.parametrize(("cls", "fields", "word"), [
    (ClipLoraConfig, {"lora_alpha": float("nan")}, "lora_alpha"),
    (ClipLoraConfig, {"lora_alpha": float("inf")}, "lora_alpha"),
    (ClipLoraConfig, {"blocks": []}, "blocks"),
    (TrainConfig, {"lr": float("inf")}, "lr"),
    (TrainConfig, {"group_lr": {"lora": float("nan")}}, "group_lr"),
])
def test_non_finite_or_empty_values_are_refused(cls, fields, word):
    try:
        cls.from_dict(fields)
    except ValueError as e:
        assert word in str(e)
        return
    raise AssertionError(f"{cls.__name__} accepted {fields}")


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
