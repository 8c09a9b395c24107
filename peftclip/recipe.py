"""The command-line shell every recipe shares: flags from config sections, one-line errors, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import signal
import threading
from typing import Any, Callable, Iterator

from accelerate import Accelerator

from .config import add_config_arguments, parse_config
from .io import check_output_dir, lock_output_dir, save_metrics
from .tracking import save_curves
from .train import TrainingInterrupted, create_accelerator, format_metrics_table

__all__ = ["finish_run", "recipe_parser", "recipe_prog", "run_recipe"]

# The command a recipe runs under when another command starts it (`peftclip train NAME`); None: the script's name.
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftclip_recipe_prog", default=None)


@contextlib.contextmanager
def recipe_prog(prog: str) -> Iterator[None]:
    """Name the command (e.g. `peftclip train lora_retrieval`) in the usage line of recipes run inside.

    A recipe's `main(argv)` builds its parser itself; this is how `peftclip train` tells it its name.
    """
    token = _PROG.set(prog)
    try:
        yield
    finally:
        _PROG.reset(token)


def recipe_parser(doc: str, sections: dict[str, type], skip: frozenset[str] = frozenset(),
                  prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with `--config` and one flag per field of every section (fields in `skip` left out).

    Its usage line names `prog`, else the command `recipe_prog` set, else the script (argparse's default:
    `lora_retrieval.py` for `python recipes/lora_retrieval.py` and `python -m peftclip.recipes.lora_retrieval`).
    """
    parser = argparse.ArgumentParser(prog=prog or _PROG.get(), description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file with sections named as below; flags override it.")
    for section, cls in sections.items():
        add_config_arguments(parser, section, cls, skip=skip)
    return parser


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), so the lock and temporary files are cleaned up."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_recipe(argv: list[str] | None, parser: argparse.ArgumentParser, sections: dict[str, type],
               defaults: dict[str, dict[str, Any]], default_source: Callable[[], str],
               training_function: Callable[[dict, Accelerator], dict],
               find_unused_parameters: Callable[[dict], bool] = lambda config: False) -> dict:
    """Parse `argv`, fill in the built-in data source if none was given, and run `training_function`.

    Before any work, the output folder is checked (writable; not a folder peftclip did not
    write; an earlier adapter only with --overwrite or --resume) and locked against a second
    run. Bad input (a ValueError, OSError or RuntimeError with a one-line message) exits with
    status 2; SIGINT and SIGTERM stop after the current step with 130 and 143.
    """
    args = parser.parse_args(argv)
    try:
        config = parse_config(args, sections, defaults)
        if config["data"].source is None:
            config["data"].source = default_source()
        train_config, data_config = config["train"], config["data"]
        if data_config.val_split is None and data_config.val_fraction == 0:  # every recipe evaluates
            raise ValueError("val_fraction=0.0 and no val_split leave nothing to evaluate on; give --val-split or "
                             "a --val-fraction above 0")
        check_output_dir(train_config.output_dir, overwrite=train_config.overwrite or train_config.resume is not None)
        accelerator = create_accelerator(train_config, find_unused_parameters(config))
        with (lock_output_dir(train_config.output_dir) if accelerator.is_main_process else contextlib.nullcontext(),
              _terminate_as_interrupt()):
            return training_function(config, accelerator)
    except TrainingInterrupted as e:
        parser.exit(e.exit_status, f"{e}\n")
    except KeyboardInterrupt as e:  # a signal outside the training loop (loading, evaluating, saving)
        parser.exit(143 if "SIGTERM" in str(e) else 130, "interrupted before or after training; nothing was saved\n")
    except (ValueError, OSError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")


def finish_run(accelerator: Accelerator, metrics: dict[str, Any], save: Callable[[str], Any],
               output_dir: str) -> dict[str, Any]:
    """A recipe's last words: the before/after table and throughput printed, then (main process) the adapter
    saved with `save(output_dir)`, its `metrics.json` and training curves beside it."""
    accelerator.print(format_metrics_table(metrics["before"], metrics["after"]))
    speed = metrics["train_images_per_second"]
    accelerator.print(f"{metrics['steps']} steps at {speed:.1f} images/s (after the first steps)" if speed
                      else f"{metrics['steps']} training steps")
    if accelerator.is_main_process:
        out = save(output_dir)
        save_metrics(out, metrics)
        save_curves(out, metrics)
        accelerator.print(f"adapter saved to {out}")
    accelerator.wait_for_everyone()
    return metrics
