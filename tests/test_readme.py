"""The README's commands and code run as written: its test command is the one CI runs, its Python blocks
execute in a folder holding what they name (tiny adapters at outputs/lora_retrieval and outputs/pets, a cached
Hub repo someone/cars-lora, images a.jpg, b.jpg and photos/), and every command of its other bash blocks runs
in-process, offline, in a folder holding what they name (my_images/, photos/, captions.csv, queries.txt)."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from peftclip.cli import main as peftclip_main
from tests.test_hub import _fill_cache

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# README commands name real bases, which open_clip downloads; offline, they run on the tiny built-in base.
TINY_BASE = {"--model-name ViT-B-32 --pretrained laion2b_s34b_b79k": "--model-name peftclip-tiny",
             "--model-name ViT-B-32 --pretrained openai": "--model-name peftclip-tiny"}
# Appended to every training command so that it takes seconds (later flags win).
FAST = ["--max-steps", "2", "--num-workers", "0", "--batch-size", "8"]
# Accelerate refuses bf16 on a CPU unless told cpu=True; the README shows it for real bases, on a GPU.
CPU_ONLY = {"--mixed-precision bf16": "--mixed-precision no"}


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv: continuation lines joined, comments dropped, real bases swapped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for real, tiny in {**TINY_BASE, **CPU_ONLY}.items():
            line = line.replace(real, tiny)
        if argv := shlex.split(line, comments=True):
            commands.append(argv)
    return commands


def _run(argv: list[str]) -> None:
    """Run one README command in-process: `peftclip ...` through its main, a recipe script through its module."""
    if argv[0] == "peftclip":
        assert peftclip_main(argv[1:] + (FAST if argv[1] == "train" else [])) == 0, argv
        return
    if argv[:2] == ["accelerate", "launch"]:
        argv = argv[2:]
        while argv[0].startswith("--"):  # accelerate's own options and their values
            argv = argv[2:]
    elif argv[0] in ("python", "python3"):
        argv = argv[1:]
    script = Path(argv[0])
    assert script.parent == Path("recipes") and script.suffix == ".py", f"not a README command kind: {argv}"
    importlib.import_module(f"peftclip.recipes.{script.stem}").main(argv[1:] + FAST)


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
def data_folder(tmp_path, monkeypatch):
    """A working folder holding the data the README's commands name, built from the shapes set; Hub offline, cache
    and $PEFTCLIP_CACHE inside it."""
    from peftclip.synthetic import make_shapes_dataset

    shapes = make_shapes_dataset(tmp_path / "my_images", n_images=24)
    shutil.copytree(shapes / "images", tmp_path / "photos")
    rows = (shapes / "metadata.csv").read_text().splitlines()
    (tmp_path / "captions.csv").write_text("\n".join([rows[0], *(f"my_images/{row}" for row in rows[1:])]) + "\n")
    (tmp_path / "queries.txt").write_text("a red circle\na blue square\n")
    for name, image in zip(("a.jpg", "b.jpg"), sorted((shapes / "images").iterdir())):
        shutil.copy(image, tmp_path / name)
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "peftclip-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def user_folder(data_folder):
    """The folder as the README's reader has it after training: a tiny LoRA adapter at outputs/lora_retrieval, a
    classification adapter at outputs/pets, and someone/cars-lora (revision v1) in the Hub cache."""
    from peftclip.adapters.lora import ClipLoraConfig, apply_lora
    from peftclip.io import save_adapter
    from peftclip.models import load_base

    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2), init_lora_weights=False)
    adapter = save_adapter(model, data_folder / "outputs" / "lora_retrieval", base.info,
                           {"lora": ClipLoraConfig(r=2).to_dict()})
    _fill_cache(data_folder / "hub-cache", "someone/cars-lora", {p.name: p.read_bytes() for p in adapter.iterdir()},
                revision="v1")
    # zero-shot classes through LoRA (no head), so the block can also merge, interpolate and export it
    _run(["python", "recipes/classify.py", "--source", "my_images/labels.csv", "--no-head",
          "--output-dir", "outputs/pets"])
    return data_folder


@pytest.mark.parametrize("heading", list(_python_blocks(README)))
def test_readme_python_block_runs(heading, user_folder):
    exec(compile(_python_blocks(README)[heading], f"README.md ({heading})", "exec"), {})


def _later_bash_blocks() -> dict[str, str]:
    """{first command: block} of every bash block after the install and test commands (checked above)."""
    return {block.splitlines()[0]: block for block in _bash_blocks(README)[2:]}


@pytest.mark.parametrize("first_line", list(_later_bash_blocks()))
def test_readme_bash_block_runs(first_line, data_folder, monkeypatch, capsys):
    """Every command of the block succeeds in order; `peftclip push` talks to a stand-in for the Hub."""
    from peftclip.synthetic import make_shapes_dataset

    shutil.copytree(REPO / "recipes" / "configs", data_folder / "recipes" / "configs")
    config_data = make_shapes_dataset(data_folder / "recipes" / "configs" / "flickr8k", n_images=24)
    shutil.copy(config_data / "metadata.csv", config_data / "captions.csv")  # where flickr8k.yaml says to put it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # push refuses when offline
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pushed = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: pushed.append(kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: f"https://huggingface.co/{kw['repo_id']}/commit/0")
    commands = _commands(_later_bash_blocks()[first_line])
    for argv in commands:
        _run(argv)
    if any(argv[:2] == ["peftclip", "push"] for argv in commands):
        assert pushed == [{"private": True, "exist_ok": True}]
        assert "pushed outputs/lora_retrieval -> https://huggingface.co/someone/shapes-lora" in capsys.readouterr().out
