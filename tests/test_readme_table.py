"""The README's architecture × strategy table is the one the registry generates, so it stays true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import open_clip

from peftclip.families import FAMILIES, _config_family, support_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_equals_the_generated_one():
    text = README.read_text()
    section = text.split("## Which architectures and strategies\n", 1)[1].split("\n## ", 1)[0]
    # In a fresh interpreter: other tests register extra model configs, which the counts would include.
    done = subprocess.run([sys.executable, "-c", "from peftclip.families import support_table; "
                           "print(support_table(), end='')"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout in section


def test_table_has_one_row_per_family_and_counts_every_open_clip_vision_tower():
    rows = support_table().splitlines()[2:]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == [f.name for f in FAMILIES]
    vision = [f.name for f in FAMILIES if f.tower == "vision"]
    counted = sum(int(row.split(" | ")[2].split(":")[0]) for row in rows[:len(vision)])
    assert counted == len([n for n in open_clip.list_models() if not n.startswith("peftclip-")])


def test_config_family_reads_the_tiny_configs_as_their_built_families():
    expected = {"peftclip-tiny": ("vit", "text"), "peftclip-tiny-siglip": ("timm-vit", "text"),
                "peftclip-tiny-convnext": ("timm-convnext", "text"), "peftclip-tiny-resnet": ("resnet", "text")}
    for name, families in expected.items():
        config = open_clip.get_model_config(name)
        assert (_config_family(config, "vision"), _config_family(config, "text")) == families
