"""The command-line shell every recipe shares: flags from config sections, one-line errors, exit 2."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from accelerate import Accelerator

from .config import add_config_arguments, parse_config
from .train import create_accelerator

__all__ = ["recipe_parser", "run_recipe"]


def recipe_parser(doc: str, sections: dict[str, type], skip: frozenset[str] = frozenset()) -> argparse.ArgumentParser:
    """A parser with `--config` and one flag per field of every section (fields in `skip` left out)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file with sections named as below; flags override it.")
    for section, cls in sections.items():
        add_config_arguments(parser, section, cls, skip=skip)
    return parser


def run_recipe(argv: list[str] | None, parser: argparse.ArgumentParser, sections: dict[str, type],
               defaults: dict[str, dict[str, Any]], default_source: Callable[[], str],
               training_function: Callable[[dict, Accelerator], dict]) -> dict:
    """Parse `argv`, fill in the built-in data source if none was given, and run `training_function`.

    Bad input (a ValueError, OSError or RuntimeError with a one-line message) exits with status 2.
    """
    args = parser.parse_args(argv)
    try:
        config = parse_config(args, sections, defaults)
        if config["data"].source is None:
            config["data"].source = default_source()
        return training_function(config, create_accelerator(config["train"]))
    except (ValueError, OSError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
