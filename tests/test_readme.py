"""The README's commands and code run as written: its test command is the one CI runs, and its Python blocks
execute in a folder holding what they name (a tiny adapter at outputs/lora_retrieval, images a.jpg and b.jpg)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# Python blocks not yet rewritten to run offline, by the heading above them, with the reason; strict xfail, so a
# block that starts to run must leave this table.
PENDING = {
    "Using a peftclip adapter from plain PEFT": "downloads ViT-B-32 laion2b_s34b_b79k; `images` undefined",
    "Many adapters on one base": "downloads ViT-B-32 laion2b_s34b_b79k and a Hub repo; `batch` undefined",
}


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _python_blocks(text: str) -> dict[str, str]:
    """{heading: code} of each ```python block, under the nearest heading above it."""
    blocks = {}
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        heading = re.findall(r"^#+ (.+)$", text[:match.start()], flags=re.M)[-1]
        blocks[heading] = match.group(1)
    return blocks


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks(README)
    run_command, test_command = blocks[0], blocks[1]
    assert "recipes/lora_retrieval.py" in run_command and "\n" not in run_command
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder as the README's reader has it after the quick start: a tiny LoRA adapter and two images."""
    from peftclip.adapters.lora import LoraConfig, apply_lora
    from peftclip.io import save_adapter
    from peftclip.models import load_base
    from peftclip.synthetic import make_shapes_dataset

    base = load_base()
    model = apply_lora(base.model, LoraConfig(r=2), init_lora_weights=False)
    save_adapter(model, tmp_path / "outputs" / "lora_retrieval", base.info, {"lora": LoraConfig(r=2).to_dict()})
    shapes = make_shapes_dataset(tmp_path / "shapes", n_images=2)
    for name, image in zip(("a.jpg", "b.jpg"), sorted((shapes / "images").iterdir())):
        (tmp_path / name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("heading", [
    pytest.param(h, marks=pytest.mark.xfail(strict=True, reason=PENDING[h])) if h in PENDING else h
    for h in _python_blocks(README)])
def test_readme_python_block_runs(heading, user_folder):
    exec(compile(_python_blocks(README)[heading], f"README.md ({heading})", "exec"), {})
