"""The package as users get it: built and installed (not editable), run from an empty folder outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --target` of a copy of the sources (building in the repo would leave build/ behind)."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "peftclip", source / "peftclip", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
          str(target), str(source)], source, dict(os.environ))
    return target


@pytest.fixture
def user_env(installed, tmp_path) -> dict[str, str]:
    """PYTHONPATH holds only the installed copy, so neither the checkout nor its editable install is imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(installed), "PEFTCLIP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def test_the_install_ships_the_recipes_and_model_configs(installed):
    assert sorted(p.name for p in (installed / "peftclip" / "recipes").glob("*.py")) == [
        "__init__.py", "classify.py", "lora_retrieval.py"]
    assert (installed / "peftclip" / "model_configs" / "peftclip-tiny.json").is_file()


@pytest.mark.slow
def test_an_installed_peftclip_trains_a_recipe_from_an_empty_folder(installed, user_env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    where = _run([sys.executable, "-c", "import peftclip; print(peftclip.__file__)"], work, user_env).stdout
    assert Path(where.strip()).is_relative_to(installed)
    assert "train" in _run([sys.executable, "-m", "peftclip.cli", "--help"], work, user_env).stdout
    _run([sys.executable, "-m", "peftclip.cli", "train", "lora_retrieval", "--max-steps", "2", "--epochs", "1",
          "--output-dir", "out", "--batch-size", "8", "--num-workers", "0"], work, user_env)
    assert (work / "out" / "adapter_model.safetensors").is_file()
