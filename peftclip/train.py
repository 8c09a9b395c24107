"""The Accelerate training loop and distributed evaluation every recipe uses."""

from __future__ import annotations

import ctypes
import itertools
import math
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from tqdm.auto import tqdm

from .checkpoint import (
    Checkpointer,
    ResumeError,
    checkpoint_root,
    find_latest_checkpoint,
)
from .data import source_fingerprint
from .evaluate import retrieval_recall
from .io import PEFT_METHODS, SAVE_DTYPES
from .losses import LossFn, clamp_logit_scale, contrastive_step
from .tracking import REPORT_TO, TrainingMonitor, check_report_to, resolve_trackers, tracking_dir
from .utils import ConfigMixin, canonical_name, stable_seed

__all__ = ["PARAM_GROUPS", "TrainConfig", "TrainResult", "TrainingError", "TrainingInterrupted", "create_accelerator",
           "create_optimizer",
           "create_scheduler", "embed_dataset", "evaluate_retrieval", "format_metrics_table", "images_per_second",
           "param_group", "release_freed_memory", "result_fingerprint", "train"]

# Settings that do not change a run's result up to where it stopped, and so may differ on resume
# (`epochs` and `max_steps` may grow: the schedule then stretches to the new end).
_NOT_IN_FINGERPRINT = {"output_dir", "resume", "num_workers", "eval_batch_size", "checkpoint_every_steps",
                       "checkpoint_every_minutes", "keep_checkpoints", "grad_checkpointing", "feature_cache",
                       "save_dtype", "release_memory", "overwrite", "epochs", "max_steps", "report_to",
                       "eval_every_steps", "eval_every_epochs", "save_best", "early_stopping_patience"}

MIXED_PRECISION = ("no", "fp16", "bf16")
PARAM_GROUPS = ("lora", "ia3", "prompts", "head", "adapters", "projections", "blocks")


@dataclass
class TrainConfig(ConfigMixin):
    """How to train: optimiser, schedule, batch, precision and where to write the adapter."""

    section: ClassVar[str] = "train"

    output_dir: str = field(default="outputs/lora_retrieval", metadata={"help": "Adapter output folder."})
    epochs: int = field(default=10, metadata={"help": "Passes over the training images."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    batch_size: int = field(default=64, metadata={"help": "Global batch (split across processes)."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases/norms)."})
    group_lr: dict[str, float] = field(default_factory=dict, metadata={
        "help": f"Learning rate per parameter group, e.g. head=1e-2 lora=1e-3; groups: {PARAM_GROUPS}."})
    group_weight_decay: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Weight decay per parameter group, e.g. projections=0.1 (never on biases, norms, logit_scale)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps before the cosine decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={
        "help": "Clip the gradient norm to this (positive) value; None to disable."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {MIXED_PRECISION}."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, shuffling and caption sampling."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process."})
    eval_batch_size: int = field(default=128, metadata={"help": "Batch size for embedding the held-out set."})
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    feature_cache: bool = field(default=True, metadata={
        "help": "Compute frozen towers' features once and reuse them every epoch (an image tower only "
                "with --no-augment)."})
    release_memory: bool = field(default=False, metadata={
        "help": "Return freed buffers of 1 MB and more to the OS at once (glibc, whole process): on the CPU, "
                "a much lower peak (ViT-B-32 LoRA about 45% less) for 10-50% slower steps."})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute block activations in the backward pass: less memory, more compute."})
    checkpoint_every_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps."})
    checkpoint_every_minutes: float | None = field(default=None, metadata={"help": "Checkpoint every N minutes."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many recent checkpoints to keep (at least 1)."})
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."})
    save_dtype: str = field(default="fp32", metadata={
        "help": f"Type the adapter's tensors are written in, one of {sorted(SAVE_DTYPES)} (bf16 halves the file)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an adapter folder already at output_dir (a folder peftclip did not write is never replaced)."})
    skip_nonfinite: bool = field(default=False, metadata={
        "help": "Skip (and count) steps whose loss or gradient is not finite, instead of stopping."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": f"Trackers to log to through Accelerate: none, all (every installed one) or some of "
                f"{', '.join(REPORT_TO)}; logs go to <output_dir>-logs."})
    eval_every_steps: int | None = field(default=None, metadata={
        "help": "Evaluate on the held-out set every N optimiser steps (kept as metrics.json's history)."})
    eval_every_epochs: int | None = field(default=None, metadata={
        "help": "Evaluate on the held-out set every N epochs."})
    save_best: str | None = field(default=None, metadata={
        "help": "Keep the adapter of the evaluation with the highest value of this metric (e.g. top1, "
                "text_to_image_R@1) in <output_dir>-best."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without improvement of the --save-best metric."})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: the learning rate must be positive")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be positive (or None for no clipping)")
        for name in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must not be negative")
        for name in ("checkpoint_every_steps", "checkpoint_every_minutes", "eval_every_steps", "eval_every_epochs",
                     "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        for name in ("group_lr", "group_weight_decay"):
            for group, value in getattr(self, name).items():
                if group not in PARAM_GROUPS:
                    raise ValueError(f"{name}: unknown parameter group {group!r}; choose from {PARAM_GROUPS}")
                if value < 0 or (name == "group_lr" and value == 0):
                    raise ValueError(f"{name}: {group}={value} must be positive")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype={self.save_dtype!r}; choose from {sorted(SAVE_DTYPES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose from {MIXED_PRECISION}")
        self.report_to = [name for names in self.report_to for name in names.split(",") if name]
        check_report_to(self.report_to)
        if self.early_stopping_patience is not None and (
                self.save_best is None or not (self.eval_every_steps or self.eval_every_epochs)):
            raise ValueError(f"early_stopping_patience={self.early_stopping_patience} needs --save-best METRIC (what "
                             f"to watch) and --eval-every-steps or --eval-every-epochs")




def result_fingerprint(sections: dict[str, Any], base_info: dict[str, Any]) -> dict[str, Any]:
    """Flatten config sections into `section.field` keys, keeping what changes the result.

    When the run checkpoints or resumes, the data's own fingerprint (`data.source_fingerprint`)
    is included, so data changed under the same path is not resumed on.
    """
    flat = {f"base.{k}": v for k, v in base_info.items()}
    train_config, data_config = sections.get("train"), sections.get("data")
    if data_config is not None and train_config is not None and (
            train_config.checkpoint_every_steps or train_config.checkpoint_every_minutes or train_config.resume):
        flat["data.fingerprint"] = source_fingerprint(data_config)
    for section, config in sections.items():
        if section == "base":
            continue
        for key, value in asdict(config).items():
            if key not in _NOT_IN_FINGERPRINT:
                flat[f"{section}.{key}"] = value
    return flat


def create_accelerator(config: TrainConfig, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator where `batch_size` is the global batch, split evenly across processes.

    `find_unused_parameters` is for objectives that leave trainable parameters without a
    gradient (e.g. a head trained while the text tower holds LoRA): DDP must then be told.
    The trackers of `config.report_to` are Accelerate's `log_with`; one whose package is missing is refused.
    """
    trackers = resolve_trackers(config.report_to)
    accelerator = Accelerator(
        log_with=trackers or None,
        project_dir=str(tracking_dir(config.output_dir)) if trackers else None,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        cpu=config.cpu,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{accelerator.num_processes} processes")
    set_seed(config.seed)
    return accelerator


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "logit_scale" in name or "norm" in name or "ln_" in name


def param_group(name: str) -> str:
    """Which of PARAM_GROUPS a trainable parameter belongs to, by its name under any wrapper."""
    name = canonical_name(name)
    for method, (_, prefix) in PEFT_METHODS.items():  # a PEFT tuner's tensors (lora_A/B, ia3_l): its own group
        if prefix in name:
            return method
    if name.startswith(("peftclip_text_prompt", "peftclip_visual_prompt")):
        return "prompts"
    if name.startswith("peftclip_head"):
        return "head"
    if name.startswith(("peftclip_clip_adapter", "peftclip_tip_adapter")):
        return "adapters"
    if name in ("visual.proj", "text_projection", "logit_scale", "logit_bias"):
        return "projections"
    return "blocks"


def create_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per (parameter group, decay or not) and each group's own lr and weight decay.

    Biases, norms and `logit_scale` get no weight decay. With LoRA+ (`ClipLoraConfig.loraplus_lr_ratio`),
    the LoRA parameters split as PEFT's `create_loraplus_optimizer` splits them: `lora_B` and
    one-dimensional ones (DoRA's magnitude) form the `lora_B` group at ratio × the lora group's lr.
    """
    ratio = next((m.peftclip_loraplus_lr_ratio for m in model.modules()
                  if getattr(m, "peftclip_loraplus_lr_ratio", None) is not None), None)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = param_group(name)
            if ratio is not None and group == "lora" and ("lora_B" in name or param.ndim == 1):
                group = "lora_B"
            groups.setdefault((group, _no_decay(name, param)), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")

    def lr(group: str) -> float:
        return lr("lora") * ratio if group == "lora_B" else config.group_lr.get(group, config.lr)

    def decay(group: str) -> float:  # lora_B decays as the lora group does
        return config.group_weight_decay.get("lora" if group == "lora_B" else group, config.weight_decay)

    return torch.optim.AdamW([
        {"params": params, "name": group, "lr": lr(group), "weight_decay": 0.0 if no_decay else decay(group)}
        for (group, no_decay), params in sorted(groups.items(), key=lambda kv: kv[0])
    ], lr=config.lr)


def create_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                     total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up to the peak learning rate, then cosine decay to zero at `total_steps`.

    The factor is a plain function of the step, which a checkpoint does not store: a run
    resumed with more `epochs`/`max_steps` follows the schedule of its new length.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps) / decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    steps = config.epochs * math.ceil(batches_per_epoch / config.grad_accum_steps)
    return min(steps, config.max_steps) if config.max_steps else steps


class TrainingError(RuntimeError):
    """Training cannot go on: a non-finite loss or gradient, or out of memory."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after a step (and a checkpoint, if checkpoints are on)."""

    def __init__(self, step: int, signum: int, checkpoint: str | None) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_status = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        hint = ("resume with --resume latest" if checkpoint else
                "no checkpoint was written (pass --checkpoint-every-steps N to be able to resume)")
        super().__init__(f"interrupted at step {step}; {hint}")


class _StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step, while installed.

    A second signal gets the previous handler (so a second Ctrl-C stops at once).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    """What a training run did: the loss of every optimiser step and any skipped or resumed steps."""

    losses: list[float]
    skipped_steps: int = 0
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    # Wall time of each optimiser step run in this process, from the end of the previous one
    # (data loading wait included), as open_clip's trainer times its steps.
    step_seconds: list[float] = field(default_factory=list)


def images_per_second(step_seconds: list[float], images_per_step: int, warmup: int = 2) -> float | None:
    """Steady-state throughput: images per step over the median step time, the first `warmup` steps
    left out when there are more than that; None when no step was timed (e.g. resumed at the end)."""
    if not step_seconds:
        return None
    steady = step_seconds[warmup:] if len(step_seconds) > warmup else step_seconds
    return images_per_step / statistics.median(steady)


def _seed_step(seed: int, epoch: int, batch: int, rank: int) -> None:
    # Re-seeding per micro-batch makes dropout and other in-step randomness a function of
    # the position alone, so a resumed run repeats an uninterrupted one exactly.
    torch.manual_seed(stable_seed(seed, epoch, batch, rank))


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _check_finite(loss: float, grad_norm: float, step: int, config: TrainConfig,
                  last_checkpoint: str | None) -> bool:
    """True if the step may go ahead; False to skip it; raises unless skipping is allowed."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if config.skip_nonfinite:
        return False
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    raise TrainingError(f"non-finite {what} at step {step + 1} (loss={loss}, grad_norm={grad_norm}); "
                        f"last good checkpoint: {last_checkpoint or 'none'}; "
                        f"lower the learning rate or pass --skip-nonfinite")


def _resume(checkpointer: Checkpointer, config: TrainConfig) -> dict[str, Any] | None:
    if config.resume is None:
        return None
    path = find_latest_checkpoint(config.output_dir) if config.resume == "latest" else config.resume
    if path is None:
        raise ResumeError(f"--resume latest: no complete checkpoint in {checkpoint_root(config.output_dir)}")
    return checkpointer.load(path)


@dataclass
class _Loop:
    """The prepared objects one training run steps through."""

    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    compute_loss: LossFn
    generator: torch.Generator
    total_steps: int
    config: TrainConfig
    accelerator: Accelerator
    checkpointer: Checkpointer
    result: TrainResult
    progress: Any
    stop: _StopSignals
    last_step_end: float = 0.0
    monitor: TrainingMonitor | None = None


def _set_grad_checkpointing(model: nn.Module) -> None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "set_grad_checkpointing"):
        raise ValueError(f"{type(inner).__name__} does not support gradient checkpointing")
    inner.set_grad_checkpointing(True)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def release_freed_memory() -> None:
    """Have glibc serve every buffer of 1 MB or more by mmap, so that freeing it returns it to the OS.

    By default glibc raises that threshold as it sees large frees, then keeps freed
    activations and LoRA's short-lived branch outputs in a heap fragmented by the
    activations still alive: peak RSS grows well past what autograd holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError) as e:
        raise ValueError(f"release_memory needs glibc (Linux): {e}") from e
    if ok != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) was refused")


def train(model: nn.Module, dataset: Dataset, config: TrainConfig, accelerator: Accelerator,
          compute_loss: LossFn = contrastive_step, fingerprint: dict[str, Any] | None = None,
          monitor: TrainingMonitor | None = None) -> TrainResult:
    """Train `model`'s trainable parameters on `dataset` with `compute_loss(model, batch)`.

    The default objective is the symmetric contrastive loss on (image, tokens) batches. If
    `dataset` has `set_epoch`, it is called each epoch so caption sampling changes.
    Checkpoints and resume follow `config`; `fingerprint` (the settings that change the
    result) must match for a resume to be accepted. `monitor` logs each step, evaluates on its
    schedule and may stop the run early (see `tracking.TrainingMonitor`).

    >>> result = train(model, TrainPairs(...), TrainConfig(max_steps=10), create_accelerator(...))  # doctest: +SKIP
    """
    generator = torch.Generator()
    loader, batches_per_epoch = _create_loader(dataset, config, accelerator, generator)
    if config.grad_checkpointing:
        _set_grad_checkpointing(model)
    if config.release_memory:
        release_freed_memory()
    optimizer = create_optimizer(model, config)
    total_steps = _total_steps(config, batches_per_epoch)
    scheduler = create_scheduler(optimizer, config.warmup_steps, total_steps)
    if isinstance(dataset, IterableDataset):  # a stream splits itself across processes; Accelerate would not
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    checkpointer = Checkpointer(accelerator, config.output_dir, fingerprint or {}, config.checkpoint_every_steps,
                                config.checkpoint_every_minutes, config.keep_checkpoints)
    try:
        state = _resume(checkpointer, config)
        position = state["position"] if state else {"epoch": 0, "batch": 0, "losses": [], "skipped": 0}
        result = TrainResult(losses=list(position["losses"]), skipped_steps=position["skipped"],
                             resumed_from=str(checkpointer.last_saved) if state else None)
        if state:
            accelerator.print(f"resumed from step {len(result.losses)} of {checkpointer.last_saved}")
            if monitor is not None and state.get("monitor"):
                monitor.load_state_dict(state["monitor"])
        progress = tqdm(total=total_steps, initial=len(result.losses), desc="train",
                        disable=not accelerator.is_local_main_process)
        with _StopSignals() as stop, progress:  # the bar is closed before any error message is printed
            loop = _Loop(model, loader, optimizer, scheduler, compute_loss, generator, total_steps, config,
                         accelerator, checkpointer, result, progress, stop, last_step_end=time.perf_counter(),
                         monitor=monitor)
            for epoch in range(position["epoch"], config.epochs):
                if len(result.losses) >= loop.total_steps:  # early stopping may have moved the end
                    break
                _train_epoch(loop, epoch, skip=position["batch"] if epoch == position["epoch"] else 0)
    except RuntimeError as e:
        if _is_oom(e):
            raise TrainingError(f"out of memory at batch_size={config.batch_size}: try a smaller --batch-size, "
                                f"--grad-accum-steps, --grad-checkpointing, or on the CPU --release-memory") from None
        raise
    finally:
        checkpointer.close()
    accelerator.wait_for_everyone()
    result.last_checkpoint = str(checkpointer.last_saved) if checkpointer.last_saved else None
    return result


def _agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any process; no communication with a single process."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = accelerator.reduce(torch.tensor([float(f) for f in flags], device=accelerator.device), reduction="sum")
    return [bool(v) for v in votes.tolist()]


def _optimizer_step(loop: _Loop, mean_loss: float, grad_norm: float) -> bool:
    """Step the optimiser and scheduler unless the step must be skipped; True if it was taken.

    Under fp16 a GradScaler skips steps whose gradients overflow and lowers its scale: that is
    normal, so only a non-finite loss is an error there, and the scaler always sees the step.
    """
    config, accelerator = loop.config, loop.accelerator
    last = str(loop.checkpointer.last_saved) if loop.checkpointer.last_saved else None
    step = len(loop.result.losses)
    if accelerator.scaler is not None:
        _check_finite(mean_loss, 0.0, step, config, last)
        loop.optimizer.step()
        loop.scheduler.step()  # Accelerate's scheduler does not advance on a skipped step
        taken = not accelerator.optimizer_step_was_skipped
    else:
        taken = _check_finite(mean_loss, grad_norm, step, config, last)
        if taken:
            loop.optimizer.step()
            loop.scheduler.step()
    if taken:
        clamp_logit_scale(loop.model)
    return taken


def _create_loader(dataset: Dataset, config: TrainConfig, accelerator: Accelerator,
                   generator: torch.Generator) -> tuple[DataLoader, int]:
    """The training DataLoader and the optimiser-step batches in one epoch.

    A map-style set is shuffled by `generator` and split across processes by Accelerate. A stream
    (`streaming.StreamingPairs`) batches itself per process: an epoch is `train_num_samples` over the global
    batch, else `max_steps` long, so every process runs the same number of steps.
    """
    if not isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            num_workers=config.num_workers, generator=generator)
        if len(loader) == 0:
            raise ValueError(f"batch_size={config.batch_size} is larger than the training set ({len(dataset)} items)")
        return loader, len(loader)
    if dataset.num_samples is not None:
        batches = dataset.num_samples // config.batch_size
        if batches == 0:
            raise ValueError(f"train_num_samples={dataset.num_samples} is less than one batch "
                             f"(batch_size={config.batch_size})")
    elif config.max_steps is not None:
        batches = config.max_steps * config.grad_accum_steps
    else:
        raise ValueError("a streaming source needs --train-num-samples (samples per epoch) or --max-steps")
    dataset.configure(config.batch_size // accelerator.num_processes, batches)
    return DataLoader(dataset, batch_size=None, num_workers=config.num_workers), batches


def _epoch_batches(loop: _Loop, epoch: int, skip: int) -> Any:
    """The batches of `epoch` from batch `skip` on, on the training device."""
    dataset = loop.loader.dataset
    if isinstance(dataset, IterableDataset):  # each worker reads its own shards: read the skipped batches again
        dataset.set_epoch(epoch)
        return (send_to_device(batch, loop.accelerator.device) for batch in itertools.islice(loop.loader, skip, None))
    batches = loop.accelerator.skip_first_batches(loop.loader, skip) if skip else loop.loader
    # Accelerate's loaders pass their epoch to `dataset.set_epoch` on every iteration; a new
    # skipping loader would start at 0, so give it the real epoch.
    batches.set_epoch(epoch)
    return batches


def _train_mode(model: nn.Module) -> None:
    """`model.train()`, but BatchNorm layers with frozen parameters stay in eval mode: their running
    statistics belong to the frozen base, which no adapter holds, so they must not move."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()


def _train_epoch(loop: _Loop, epoch: int, skip: int) -> None:
    """One pass over the loader from batch `skip`, stepping, guarding, checkpointing and stopping on a signal."""
    config, accelerator, result, checkpointer = loop.config, loop.accelerator, loop.result, loop.checkpointer
    loop.generator.manual_seed(config.seed + epoch)  # shuffling is a function of the epoch alone
    batches = _epoch_batches(loop, epoch, skip)
    _train_mode(loop.model)
    for index, batch in enumerate(batches, start=skip):
        _seed_step(config.seed, epoch, index, accelerator.process_index)
        with accelerator.accumulate(loop.model):
            loss = loop.compute_loss(loop.model, batch)
            accelerator.backward(loss)
            # Holding the loss would keep its spent graph alive through the next step's forward, and with it
            # what its nodes still hold (ViT-B-32 batch-32 LoRA: +0.22 GiB peak RSS).
            loss = loss.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(loop.model.parameters(), config.max_grad_norm or math.inf)
                mean_loss = accelerator.reduce(loss, reduction="mean").item()
                if not _optimizer_step(loop, mean_loss, float(grad_norm)):
                    result.skipped_steps += 1
            loop.optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        result.losses.append(mean_loss)
        now = time.perf_counter()
        result.step_seconds.append(now - loop.last_step_end)
        loop.last_step_end = now
        loop.progress.update(1)
        loop.progress.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
        step = len(result.losses)
        if loop.monitor is not None and loop.monitor.on_step(loop.model, loop.optimizer, step, epoch, mean_loss,
                                                             float(grad_norm), result.step_seconds[-1]):
            loop.total_steps = step  # early stopping: this step is the run's last
        # Every process must agree on saving and stopping, or they would deadlock in save_state.
        by_time, stop = _agree(accelerator, checkpointer.time_due(), loop.stop.signum is not None)
        end = step >= loop.total_steps or stop
        if checkpointer.enabled and (checkpointer.step_due(step) or by_time or end):
            checkpointer.save(step, {"epoch": epoch, "batch": index + 1, "losses": result.losses,
                                     "skipped": result.skipped_steps},
                              monitor=loop.monitor.state_dict() if loop.monitor is not None else None)
        if stop:
            raise TrainingInterrupted(step, loop.stop.signum or signal.SIGTERM,
                                      str(checkpointer.last_saved) if checkpointer.last_saved else None)
        if step >= loop.total_steps:
            return
    if loop.monitor is not None and loop.monitor.on_epoch_end(epoch, len(result.losses)):
        loop.total_steps = len(result.losses)


@torch.no_grad()
def embed_dataset(accelerator: Accelerator, encode: Callable[[torch.Tensor], torch.Tensor],
           dataset: Dataset, batch_size: int, num_workers: int) -> torch.Tensor:
    """`encode` applied to every item of `dataset` (first element of tuple items), split across processes."""
    batch_size = max(batch_size // accelerator.num_processes, 1) * accelerator.num_processes
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers))
    chunks = []
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        with accelerator.autocast():
            chunks.append(accelerator.gather_for_metrics(encode(inputs).float()))
    return torch.cat(chunks)


def evaluate_retrieval(accelerator: Accelerator, model: nn.Module, images: Dataset, captions: list[str],
                       text_to_image: list[int], tokenizer: Callable, batch_size: int = 128,
                       num_workers: int = 0) -> dict[str, float]:
    """Recall@1/5/10 both ways on a held-out set, with the embedding work split across processes."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    image_features = embed_dataset(accelerator, lambda x: model.encode_image(x, normalize=True), images,
                            batch_size, num_workers)
    text_features = embed_dataset(accelerator, lambda x: model.encode_text(x, normalize=True),
                           TensorDataset(tokenizer(captions)), batch_size, 0)
    model.train(was_training)
    return retrieval_recall(image_features, text_features, text_to_image)


def format_metrics_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A Markdown table of each metric before and after adaptation, with the change."""
    lines = ["| metric | base | adapted | change |", "|---|---:|---:|---:|"]
    for key in before:
        lines.append(f"| {key} | {before[key]:.2f} | {after[key]:.2f} | {after[key] - before[key]:+.2f} |")
    return "\n".join(lines)
