"""The command line starts quickly and names itself: `peftclip info` reads JSON and checksums without importing
torch, and each recipe's usage line names the command that ran it."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.cli import main
from peftclip.io import SAFETENSORS_WEIGHTS_NAME, save_adapter
from peftclip.models import load_base
from peftclip.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "peft", "safetensors", "datasets", "accelerate")
_INFO = """
import sys
from peftclip.cli import main
status = main(['info', sys.argv[1]])
heavy = [m for m in {heavy!r} if m in sys.modules]
print('imported', heavy)
sys.exit(status)
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2), init_lora_weights=False)
    folder = tmp_path_factory.mktemp("info") / "adapter"
    return save_adapter(model, folder, base.info, {"lora": ClipLoraConfig(r=2).to_dict()})


def _info_in_a_fresh_interpreter(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _INFO.format(heavy=HEAVY), str(folder)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_info_reads_an_adapter_without_importing_torch(adapter):
    done = _info_in_a_fresh_interpreter(adapter)
    assert done.returncode == 0, done.stderr
    assert "lora: " in done.stdout and "model_name=peftclip-tiny" in done.stdout
    assert "imported []" in done.stdout


def test_info_still_verifies_the_weights_checksum_without_torch(adapter, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in adapter.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = damaged / SAFETENSORS_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    done = _info_in_a_fresh_interpreter(damaged)
    assert done.returncode == 2 and "checksum mismatch" in done.stderr, done.stderr
    assert "imported []" in done.stdout


# how each entry point runs a recipe -> the command its usage line must name
USAGE = {
    "script": (lambda name: runpy.run_path(str(REPO / "recipes" / f"{name}.py"), run_name="__main__"),
               "usage: {name}.py "),
    "module": (lambda name: runpy.run_module(f"peftclip.recipes.{name}", run_name="__main__", alter_sys=True),
               "usage: {name}.py "),
    "peftclip_train": (lambda name: main(["train", name, "--help"]), "usage: peftclip train {name} "),
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("entry", list(USAGE))
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: the test imported it already
def test_recipe_usage_names_the_command_that_ran_it(entry, name, capsys, monkeypatch):
    run, usage = USAGE[entry]
    monkeypatch.setattr(sys, "argv", ["peftclip" if entry == "peftclip_train" else f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run(name)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(usage.format(name=name))
