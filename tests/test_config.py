"""Config files and command-line flags fill the same dataclasses, flags last."""

from __future__ import annotations

import argparse

import pytest

from peftclip.adapters.lora import ClipLoraConfig
from peftclip.config import add_config_arguments, parse_config
from peftclip.train import TrainConfig

SECTIONS = {"lora": ClipLoraConfig, "train": TrainConfig}


def _parse(argv, defaults=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    for section, cls in SECTIONS.items():
        add_config_arguments(parser, section, cls)
    return parse_config(parser.parse_args(argv), SECTIONS, defaults)


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora: {r: 8, towers: [text]}\ntrain: {lr: 0.01, epochs: 3}\n")
    config = _parse(["--config", str(path), "--lr", "0.5", "--blocks", "0,-1", "--no-cpu"],
                    defaults={"train": {"epochs": 7, "batch_size": 16}})
    assert config["lora"].r == 8 and config["lora"].towers == ["text"] and config["lora"].blocks == [0, -1]
    assert config["train"].lr == 0.5 and config["train"].epochs == 3 and config["train"].batch_size == 16
    assert config["train"].cpu is False


@pytest.mark.parametrize(("argv", "value"), [(["--blocks", "all"], "all"), (["--blocks", "2"], 2),
                                             (["--target-modules", "q", "v"], ["q", "v"])])
def test_flag_types(argv, value):
    lora = _parse(argv)["lora"]
    assert (lora.blocks if argv[0] == "--blocks" else lora.target_modules) == value


def test_json_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"train": {"max_steps": 5}}')
    assert _parse(["--config", str(path)])["train"].max_steps == 5


@pytest.mark.parametrize(("text", "message"), [
    ("lora: {rank: 4}", r"unknown field\(s\) in \[lora\]: rank"),
    ("optimizer: {lr: 1}", "unknown section 'optimizer'"),
    ("lora: [1, 2]", "expected sections of fields"),
    ("train: {lr: -1.0}", "lr=-1.0"),
    ("train: {group_lr: 0}", r"\[train\] group_lr=0: expected dict\[str, float\]"),
    ("lora: {r: 2.5}", r"\[lora\] r=2.5: expected int"),
    ("lora: {towers: vision}", None),
])
def test_bad_config_file_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    if message is None:  # accepted: a single tower may be written without a list
        assert _parse(["--config", str(path)])["lora"].towers == ["vision"]
        return
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(path)])


def test_yaml_exponent_without_dot_reads_as_a_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-3}\n")  # PyYAML gives the string '1e-3'
    assert _parse(["--config", str(path)])["train"].lr == 1e-3


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        _parse(["--config", str(tmp_path / "nope.yaml")])


def test_group_lr_flag_parses_name_value_pairs():
    assert _parse(["--group-lr", "head=0.01", "lora=1e-3"])["train"].group_lr == {"head": 0.01, "lora": 1e-3}
