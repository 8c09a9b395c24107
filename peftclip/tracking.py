"""Watching a run: Accelerate's trackers, evaluation during training, the best adapter, early stopping, curves.

The training loop (`train.train`) calls a `TrainingMonitor` after every optimiser step and at the end of
every epoch; everything a run reports lives here, so the loop itself stays about stepping.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from matplotlib.figure import Figure
    from torch import nn

__all__ = ["CURVES_NAME", "REPORT_TO", "TrainingMonitor", "check_report_to", "compare_adapters", "flatten_config",
           "format_comparison", "format_history", "natural_key", "plot_comparison", "plot_curves", "resolve_trackers",
           "save_curves", "save_figure", "tracking_dir"]

# Trackers peftclip passes on to Accelerate (`log_with`), with the package each one needs.
REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
CURVES_NAME = "training_curves.png"  # one of io.ADAPTER_FOLDER_FILES


def check_report_to(report_to: list[str]) -> None:
    """Refuse tracker names peftclip does not know, naming the allowed ones."""
    allowed = ("none", "all", *REPORT_TO)
    for name in report_to:
        if name not in allowed:
            raise ValueError(f"report_to={name!r}; choose from {', '.join(allowed)}")
    if len(report_to) > 1 and ({"none", "all"} & set(report_to)):
        raise ValueError(f"report_to={' '.join(report_to)}: 'none' and 'all' stand alone")


def resolve_trackers(report_to: list[str]) -> list[str]:
    """The Accelerate tracker names for `report_to`: [] for none, every installed one for all.

    A requested tracker whose package is missing is refused with the package to install.
    """
    check_report_to(report_to)
    if report_to == ["all"]:
        return [name for name, package in REPORT_TO.items() if _installed(package)]
    for name in report_to:
        if name != "none" and not _installed(REPORT_TO[name]):
            raise ValueError(f"report_to={name}: the {REPORT_TO[name]!r} package is not installed "
                             f"(pip install {REPORT_TO[name]})")
    return [name for name in report_to if name != "none"]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def tracking_dir(output_dir: str | os.PathLike) -> Path:
    """Tracker logs sit beside the adapter folder (which may hold only its own files), as checkpoints do."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f"{output_dir.name}-logs")


def flatten_config(sections: dict[str, Any]) -> dict[str, bool | int | float | str | None]:
    """Config sections (dataclasses or dicts) as `section.field` scalars, the hyperparameters trackers accept.

    >>> flatten_config({"train": {"lr": 0.1, "group_lr": {"head": 0.01}, "towers": ["text"]}})
    {'train.lr': 0.1, 'train.group_lr.head': 0.01, 'train.towers': "['text']"}
    """
    from dataclasses import asdict, is_dataclass

    flat: dict[str, Any] = {}
    for key, value in sections.items():
        if is_dataclass(value):
            value = asdict(value)
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)
    return flat


def _find_parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    return next((p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == name), None)


@dataclass
class TrainingMonitor:
    """Logs each step to Accelerate's trackers, evaluates on a schedule, keeps the best adapter, stops early.

    Every process must hold one (evaluation splits its work across processes); trackers and the
    best adapter are written by the main process only. Evaluations are the recipe's held-out
    evaluation (`evaluate()` -> `{metric: value}`, higher is better); the best one's adapter is
    written by `save_best(folder)` to `<output_dir>-best`.

    Args:
        accelerator: the run's Accelerator (created with `log_with` when trackers are on).
        output_dir: the adapter folder; the best adapter goes beside it.
        images_per_step: images in one optimiser step (for images/s).
        evaluate: the held-out evaluation, run on every process.
        save_best: writes the current adapter into the folder it is given (main process).
        eval_every_steps, eval_every_epochs: when to evaluate during training (None: never).
        save_best_metric: the metric whose best evaluation is kept (None: no best adapter).
        early_stopping_patience: stop after this many evaluations without improvement (None: never).

    >>> monitor = TrainingMonitor(accelerator, "out", 64, evaluate, save, eval_every_steps=50)  # doctest: +SKIP
    >>> with monitor: result = train(..., monitor=monitor)  # doctest: +SKIP
    """

    accelerator: Accelerator
    output_dir: str | os.PathLike
    images_per_step: int
    evaluate: Callable[[], dict[str, float]] | None = None
    save_best: Callable[[Path], Any] | None = None
    eval_every_steps: int | None = None
    eval_every_epochs: int | None = None
    save_best_metric: str | None = None
    early_stopping_patience: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "loss": []})
    best: dict[str, Any] | None = None
    stopped_early_at: int | None = None
    _since_best: int = 0
    _last_eval_step: int = -1

    @classmethod
    def from_config(cls, accelerator: Accelerator, config: Any, evaluate: Callable[[], dict[str, float]],
                    save_best: Callable[[Path], Any]) -> "TrainingMonitor":
        """A monitor set up from a `TrainConfig`'s report, evaluation and best-adapter fields."""
        return cls(accelerator, config.output_dir, config.batch_size * config.grad_accum_steps, evaluate, save_best,
                   config.eval_every_steps, config.eval_every_epochs, config.save_best,
                   config.early_stopping_patience)

    @property
    def best_dir(self) -> Path:
        """Where the best evaluation's adapter is kept: `<output_dir>-best`."""
        output_dir = Path(self.output_dir)
        return output_dir.with_name(f"{output_dir.name}-best")

    def start(self, hyperparameters: dict[str, Any], before: dict[str, float] | None = None,
              project_name: str = "peftclip") -> None:
        """Open the trackers with the run's config and record the evaluation before training as step 0."""
        if self.save_best_metric is not None and before is not None and self.save_best_metric not in before:
            raise ValueError(f"save_best={self.save_best_metric!r} is not a metric of this recipe; "
                             f"choose from {', '.join(before)}")
        if self.save_best_metric is not None and self.accelerator.is_main_process:
            from .io import check_output_dir

            check_output_dir(self.best_dir, overwrite=True)  # refuse a folder peftclip did not write, before training
        if self.accelerator.log_with:
            self.accelerator.init_trackers(project_name, config=flatten_config(hyperparameters))
        if before is not None:
            self.history.append({"step": 0, "metrics": dict(before)})
            self.accelerator.log({f"eval/{k}": v for k, v in before.items()}, step=0)

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        # The trackers' own finish, not `accelerator.end_training()`: that also destroys the process group,
        # which the recipe still needs to evaluate and save.
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: int, loss: float,
                grad_norm: float, seconds: float) -> bool:
        """Log one optimiser step, evaluate if due; True if training should stop (early stopping)."""
        values = {"train/loss": loss, "train/grad_norm": grad_norm, "train/epoch": epoch,
                  "train/images_per_second": self.images_per_step / seconds if seconds > 0 else math.nan}
        for group in optimizer.param_groups:
            values[f"lr/{group.get('name', 'default')}"] = group["lr"]
        model = self.accelerator.unwrap_model(model)
        for name, transform in (("logit_scale", math.exp), ("logit_bias", float)):
            param = _find_parameter(model, name)
            if param is not None:
                values[f"train/{name}"] = transform(param.detach().float().item())
        self.accelerator.log(values, step=step)
        self.curves["step"].append(step)
        self.curves["loss"].append(loss)
        for key, value in values.items():
            if key.startswith("lr/"):
                self.curves.setdefault(key, []).append(value)
        if self.eval_every_steps and step % self.eval_every_steps == 0:
            return self._evaluate(step)
        return False

    def on_epoch_end(self, epoch: int, step: int) -> bool:
        """Evaluate if due after epoch `epoch` (0-based); True if training should stop."""
        if self.eval_every_epochs and (epoch + 1) % self.eval_every_epochs == 0 and step != self._last_eval_step:
            return self._evaluate(step)
        return False

    def finish(self, step: int, after: dict[str, float]) -> dict[str, Any]:
        """Record the final evaluation (if not already made at `step`); the run's part of `metrics.json`."""
        if step != self._last_eval_step:
            self._record(step, after)
        summary: dict[str, Any] = {"history": self.history, "curves": self.curves}
        if self.best is not None:
            summary["best"] = self.best
        if self.stopped_early_at is not None:
            summary["stopped_early_at"] = self.stopped_early_at
        return summary

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues this run's history, curves, best and patience."""
        return {"history": self.history, "curves": self.curves, "best": self.best, "since_best": self._since_best,
                "last_eval_step": self._last_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state_dict()` (the evaluation before training is the saved one)."""
        self.history, self.curves, self.best = list(state["history"]), dict(state["curves"]), state["best"]
        self._since_best, self._last_eval_step = state["since_best"], state["last_eval_step"]

    def _evaluate(self, step: int) -> bool:
        if self.evaluate is None:
            return False
        return self._record(step, self.evaluate())

    def _record(self, step: int, metrics: dict[str, float]) -> bool:
        self._last_eval_step = step
        self.history.append({"step": step, "metrics": dict(metrics)})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if self.save_best_metric is None:
            return False
        value = metrics[self.save_best_metric]
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": self.save_best_metric, "value": value, "step": step,
                         "path": self.best_dir.name}  # beside the adapter folder
            self._since_best = 0
            if self.save_best is not None and self.accelerator.is_main_process:
                from .io import save_metrics

                self.save_best(self.best_dir)
                save_metrics(self.best_dir, {"step": step, "before": self.history[0]["metrics"], "after": metrics})
            return False
        self._since_best += 1
        if self.early_stopping_patience is not None and self._since_best >= self.early_stopping_patience:
            self.stopped_early_at = step
            self.accelerator.print(f"early stopping at step {step}: {self.save_best_metric} has not improved on "
                                   f"{self.best['value']:.2f} (step {self.best['step']}) for {self._since_best} "
                                   f"evaluations")
            return True
        return False


def plot_curves(metrics: dict[str, Any]) -> Figure:
    """A figure of a run's loss, learning rates and evaluation metrics against the step, from `metrics.json`."""
    from matplotlib.figure import Figure

    curves, history = metrics.get("curves", {}), metrics.get("history", [])
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    loss_ax, lr_ax, eval_ax = figure.subplots(1, 3)
    loss_ax.plot(curves.get("step", []), curves.get("loss", []), label="loss")
    for key in sorted(k for k in curves if k.startswith("lr/")):
        lr_ax.plot(curves["step"], curves[key], label=key)
    steps = [entry["step"] for entry in history]
    for key in (history[0]["metrics"] if history else {}):
        eval_ax.plot(steps, [entry["metrics"].get(key, math.nan) for entry in history], marker="o", label=key)
    best = metrics.get("best")
    if best:
        eval_ax.axvline(best["step"], color="grey", linestyle=":", label=f"best {best['metric']}")
    for ax, title in ((loss_ax, "training loss"), (lr_ax, "learning rate"), (eval_ax, "held-out evaluation")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path` atomically (a temporary file beside it, renamed into place)."""
    from .utils import write_atomic

    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


def save_curves(adapter_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write `training_curves.png` into an adapter folder."""
    return save_figure(plot_curves(metrics), Path(adapter_dir) / CURVES_NAME)


def natural_key(name: str) -> list[Any]:
    """Sort key ordering numbers inside names by value: R@1, R@5, R@10 (metrics.json stores keys sorted)."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_history(history: list[dict[str, Any]]) -> str:
    """A Markdown table of a run's evaluations, one row per step (`metrics.json`'s history).

    >>> print(format_history([{"step": 0, "metrics": {"top1": 50.0}}, {"step": 10, "metrics": {"top1": 62.5}}]))
    | step | top1 |
    |---:|---:|
    | 0 | 50.00 |
    | 10 | 62.50 |
    """
    keys = sorted({k for entry in history for k in entry["metrics"]}, key=natural_key)
    lines = [f"| step | {' | '.join(keys)} |", "|---:|" + "---:|" * len(keys)]
    for entry in history:
        values = (f"{entry['metrics'][k]:.2f}" if k in entry["metrics"] else "-" for k in keys)
        lines.append(f"| {entry['step']} | {' | '.join(values)} |")
    return "\n".join(lines)


def compare_adapters(folders: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per adapter folder: base, strategy, trainable parameters, file size and final metrics.

    Reads JSON and checks checksums only (no torch), like `peftclip info`.
    """
    from .io import METRICS_NAME, SAFETENSORS_WEIGHTS_NAME, read_metadata

    rows = []
    for folder in map(Path, folders):
        metadata = read_metadata(folder, check_strategy=False)
        metrics_file = folder / METRICS_NAME
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        base = metadata["base"]
        rows.append({"adapter": str(folder),
                     "base": "/".join(str(base[k]) for k in ("model_name", "pretrained") if base.get(k)),
                     "strategy": "+".join(metadata["strategy"]),
                     "trainable_parameters": metadata["trainable_parameters"],
                     "file_bytes": (folder / SAFETENSORS_WEIGHTS_NAME).stat().st_size,
                     "metrics": metrics.get("after", {})})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `compare_adapters` rows, a column per metric any adapter has."""
    from .utils import human_size

    keys = sorted({k for row in rows for k in row["metrics"]}, key=natural_key)
    def line(cells: list[str]) -> str:
        return f"| {' | '.join(cells)} |"

    lines = [line(["adapter", "base", "strategy", "trainable", "size", *keys]),
             "|---|---|---|---:|---:|" + "---:|" * len(keys)]
    for row in rows:
        values = [f"{row['metrics'][k]:.2f}" if k in row["metrics"] else "-" for k in keys]
        lines.append(line([row["adapter"], row["base"], row["strategy"], f"{row['trainable_parameters']:,}",
                           human_size(row["file_bytes"]), *values]))
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]]) -> Figure:
    """Grouped bars of each adapter's final metrics, for choosing between runs."""
    from matplotlib.figure import Figure

    keys = sorted({k for row in rows for k in row["metrics"]}, key=natural_key)
    figure = Figure(figsize=(max(6, 1.2 * len(keys) * max(len(rows), 1) / 2), 4), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        ax.bar([k + i * width for k in range(len(keys))], [row["metrics"].get(key, math.nan) for key in keys],
               width, label=Path(row["adapter"]).name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=30, ha="right")
    ax.set_ylabel("held-out metric")
    ax.legend(fontsize="small")
    return figure
