"""Training checkpoints: Accelerate state with only the trainable tensors, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from .utils import replace_dir, save_safetensors, write_json_atomic

__all__ = ["Checkpointer", "ResumeError", "checkpoint_root", "find_latest_checkpoint", "trainable_state_dict"]

TRAINER_STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint
TRAINABLE_NAME = "trainable_{index}.safetensors"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed: missing, or made with a different config."""


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, detached on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Checkpoints sit beside the adapter folder, so replacing the adapter never touches them."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f"{output_dir.name}-checkpoints")


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of the run writing to `output_dir`, or None."""
    root = checkpoint_root(output_dir)
    complete = [p for p in root.glob("step-*") if (p / TRAINER_STATE_NAME).is_file()] if root.is_dir() else []
    return max(complete, key=lambda p: int(p.name.removeprefix("step-")), default=None)


class Checkpointer:
    """Saves and restores training state at a step and/or minute interval, keeping the last `keep`.

    Model weights go through Accelerate's state hooks so a checkpoint holds only the
    trainable tensors, never the frozen base. Each checkpoint is assembled under a
    temporary name and renamed into place once every process has written its part.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, fingerprint: dict[str, Any],
                 every_steps: int | None = None, every_minutes: float | None = None, keep: int = 2) -> None:
        self.accelerator = accelerator
        self.root = checkpoint_root(output_dir)
        self.fingerprint = fingerprint
        self.every_steps, self.every_minutes, self.keep = every_steps, every_minutes, keep
        self.last_time = time.monotonic()
        self.last_saved: Path | None = None
        self._hooks = [accelerator.register_save_state_pre_hook(self._save_models),
                       accelerator.register_load_state_pre_hook(self._load_models)]

    def close(self) -> None:
        """Detach the state hooks from the accelerator."""
        for handle in self._hooks:
            handle.remove()

    def _save_models(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for index, model in enumerate(models):
                state = trainable_state_dict(self.accelerator.unwrap_model(model))
                save_safetensors(state, Path(output_dir) / TRAINABLE_NAME.format(index=index))
        weights.clear()  # never write the full model, frozen base included

    def _load_models(self, models: list[nn.Module], input_dir: str) -> None:
        for index, model in enumerate(models):
            state = load_file(Path(input_dir) / TRAINABLE_NAME.format(index=index))
            unwrapped = self.accelerator.unwrap_model(model)
            expected = set(trainable_state_dict(unwrapped))
            if set(state) != expected:
                raise ResumeError(f"{input_dir}: checkpoint tensors do not match the model's trainable parameters")
            with torch.no_grad():
                params = dict(unwrapped.named_parameters())
                for name, tensor in state.items():
                    params[name].copy_(tensor)
        models.clear()

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are written at all."""
        return bool(self.every_steps or self.every_minutes)

    def step_due(self, step: int) -> bool:
        """Whether optimiser step `step` falls on the step interval (the same on every process)."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def time_due(self) -> bool:
        """Whether the minute interval has passed on this process (callers make the processes agree)."""
        return bool(self.every_minutes) and time.monotonic() - self.last_time >= 60 * self.every_minutes

    def save(self, step: int, position: dict[str, Any], monitor: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint for `step` with the data `position` (epoch, batch) to resume from, and the
        training monitor's state (evaluation history, curves, best) when there is one."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_json_atomic(tmp / TRAINER_STATE_NAME, {"step": step, "position": position,
                                                         "fingerprint": self.fingerprint, "monitor": monitor})
            replace_dir(tmp, final)  # a checkpoint of this step from an earlier run is swapped out whole
            self._prune()
        self.accelerator.wait_for_everyone()
        self.last_time, self.last_saved = time.monotonic(), final
        return final

    def _prune(self) -> None:
        complete = sorted((p for p in self.root.glob("step-*") if (p / TRAINER_STATE_NAME).is_file()),
                          key=lambda p: int(p.name.removeprefix("step-")))
        for old in complete[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, checkpoint: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimiser, scheduler and RNG state; return the saved trainer state."""
        checkpoint = Path(checkpoint)
        state_file = checkpoint / TRAINER_STATE_NAME
        if not state_file.is_file():
            raise ResumeError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE_NAME})")
        state = json.loads(state_file.read_text())
        differing = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint)
                           if state["fingerprint"].get(k) != self.fingerprint.get(k))
        if differing:
            details = "; ".join(f"{k}: checkpoint {state['fingerprint'].get(k)!r}, now {self.fingerprint.get(k)!r}"
                                for k in differing)
            raise ResumeError(f"cannot resume from {checkpoint}: the config differs in {details}")
        self.accelerator.load_state(str(checkpoint))
        self.last_saved = checkpoint
        return state
