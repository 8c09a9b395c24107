"""The peftclip command: help, each subcommand end to end, and adapter errors as exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.cli import main
from peftclip.io import SAFETENSORS_WEIGHTS_NAME, save_adapter, save_metrics
from peftclip.models import BaseConfig, load_base
from peftclip.synthetic import make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=40)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Two local weights files for the tiny architecture, with different values."""
    folder = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (0, 1):
        state = load_base(BaseConfig(init_seed=seed)).model.state_dict()
        path = folder / f"tiny-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        paths.append(path)
    return paths


@pytest.fixture
def adapter(tmp_path, weights_files):
    """A LoRA adapter trained (well, set) on the base loaded from the first weights file."""
    base = load_base(BaseConfig(pretrained=str(weights_files[0])))
    model = apply_lora(base.model, LoraConfig(r=2), init_lora_weights=False)
    out = save_adapter(model, tmp_path / "adapter", base.info, {"lora": LoraConfig(r=2).to_dict()})
    save_metrics(out, {"before": {"top1": 10.0}, "after": {"top1": 42.0}})
    return out


def test_base_from_a_local_weights_file_loads_those_weights(weights_files):
    base = load_base(BaseConfig(pretrained=str(weights_files[1])))
    reference = load_base(BaseConfig(init_seed=1)).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in base.model.state_dict().items())
    assert base.info["pretrained"] == "tiny-1.safetensors" and len(base.info["weights_sha256"]) == 64


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["info", "--help"], ["eval", "--help"]])
def test_help_explains_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: peftclip" in text and ("--source" in text if argv[0] == "eval" else True)


def test_console_script_is_installed():
    done = subprocess.run([Path(sys.executable).with_name("peftclip"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "{train,info,eval}" in done.stdout


def test_info_shows_base_strategy_size_and_metrics(adapter, capsys):
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "model_name=peftclip-tiny" in text and "pretrained=tiny-0.safetensors" in text
    assert "lora: blocks=all" in text and "r=2" in text and "KB" in text
    assert "top1: 10.00 -> 42.00" in text


def test_eval_reports_base_and_adapted_recall(adapter, shapes, weights_files, capsys):
    argv = ["eval", str(adapter), "--source", str(shapes), "--pretrained", str(weights_files[0])]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 images, ") and any(line.startswith("| image_to_text_R@1 |") for line in lines)


def test_train_runs_a_recipe_by_name(tmp_path, shapes, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["train", "lora_retrieval", "--source", str(shapes), "--output-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--batch-size", "8", "--num-workers", "0"]
    assert main(argv) == 0
    assert (tmp_path / "out" / SAFETENSORS_WEIGHTS_NAME).is_file()


def _break(adapter: Path, kind: str) -> None:
    weights = adapter / SAFETENSORS_WEIGHTS_NAME
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif kind == "pickle":
        weights.rename(adapter / "adapter_model.bin")


CLI_ERRORS = {
    "wrong_base": (None, "was trained on base", True),
    "truncated": ("truncated", "checksum mismatch (file is truncated or altered)", False),
    "pickle": ("pickle", "pickle files are never loaded", False),
    "weights_file_not_given": (None, "pass it with --pretrained", False),
    "missing_adapter": (None, "adapter folder not found", False),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_adapter_errors_exit_2_with_one_line(case, adapter, shapes, weights_files, capsys):
    kind, message, other_base = CLI_ERRORS[case]
    if kind:
        _break(adapter, kind)
    folder = adapter.parent / "nowhere" if case == "missing_adapter" else adapter
    argv = ["eval", str(folder), "--source", str(shapes)]
    if case != "weights_file_not_given":
        argv += ["--pretrained", str(weights_files[1 if other_base else 0])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
