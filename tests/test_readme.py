"""The README's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks((REPO / "README.md").read_text())
    run_command, test_command = blocks[0], blocks[1]
    assert "recipes/lora_retrieval.py" in run_command and "\n" not in run_command
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
