"""Measure peftclip's own retrieval recipe, run the way a user runs it, strategy by strategy.

Each run is `recipes/lora_retrieval.py` in a subprocess with a fixed number of optimiser
steps, so its imports, threads and memory are its own. It reports the recipe's
steady-state images/s (from its per-step timer, which times steps as open_clip's trainer
does), the process's peak RSS, and the adapter file it saved.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.process import REPO_ROOT, run_measured, thread_env
from peftclip.data import DataConfig, TrainPairs, load_pairs
from peftclip.io import METADATA_NAME, SAFETENSORS_WEIGHTS_NAME
from peftclip.models import BaseConfig, load_base

__all__ = ["LORA_FLAGS", "PRECISIONS", "STRATEGIES", "loader_throughput", "run_peftclip"]

# q, k and v through one fused linear with one A (`qkv`): exact, one GEMM instead of three, 7.86 MB at r=8 on ViT-B-32.
LORA_FLAGS = ["--r", "8", "--lora-alpha", "16", "--target-modules", "qkv", "out", "c_fc", "c_proj"]
# strategy -> the recipe's flags for it
STRATEGIES: dict[str, list[str]] = {
    "full": ["--no-lora", "--full"],
    "freeze_vision": ["--no-lora", "--freeze", "vision"],
    "lora": LORA_FLAGS,
    "lora_grad_checkpointing": [*LORA_FLAGS, "--grad-checkpointing"],
    "lora_grad_checkpointing_release_memory": [*LORA_FLAGS, "--grad-checkpointing", "--release-memory"],
    "projections": ["--no-lora", "--projections"],
    # Unaugmented images, so the frozen image tower's features are cached before training.
    "text_prompt": ["--no-lora", "--text-prompt", "--no-augment"],
}
# our precision name -> (the recipe's --mixed-precision, open_clip_train's --precision)
PRECISIONS = {"fp32": ("no", "fp32"), "bf16": ("bf16", "amp_bf16")}


def run_peftclip(model: str, csv_path: Path, strategy: str, *, batch_size: int, steps: int, threads: int,
                 workers: int, workdir: Path, precision: str = "fp32", lr: float = 1e-5, device: str = "cpu") -> dict:
    """Run the retrieval recipe for `steps` steps of `strategy` and report its speed, memory and file.

    Evaluation is kept to 8 held-out images so that it adds little to the run; it is not
    part of the step times either way.
    """
    out = Path(workdir) / strategy
    cmd = [sys.executable, str(REPO_ROOT / "recipes" / "lora_retrieval.py"), "--model-name", model,
           "--source", str(csv_path), "--output-dir", str(out), "--batch-size", str(batch_size),
           "--max-steps", str(steps), "--epochs", "1000", "--warmup-steps", "0", "--lr", str(lr),
           "--num-workers", str(workers), "--max-val-images", "8", *(["--cpu"] if device == "cpu" else []),
           "--mixed-precision", PRECISIONS[precision][0], *STRATEGIES[strategy]]
    env = {**thread_env(threads), "PEFTCLIP_CACHE": str(Path(workdir) / "cache")}  # no feature cache reuse
    run = run_measured(cmd, env=env)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.splitlines()[-20:])
        raise RuntimeError(f"peftclip recipe failed for {strategy} on {model} (exit {run.returncode}):\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tool": "peftclip", "strategy": strategy, "model": model, "batch_size": batch_size, "steps": steps,
            "precision": precision, "threads": threads, "images_per_second": metrics["train_images_per_second"],
            "max_rss_bytes": run.max_rss_bytes, "wall_seconds": run.wall_seconds,
            "artifact_bytes": (out / SAFETENSORS_WEIGHTS_NAME).stat().st_size,
            "trainable_parameters": json.loads((out / METADATA_NAME).read_text())["trainable_parameters"],
            "adapter_dir": str(out)}


def loader_throughput(model: str, csv_path: Path, *, batch_size: int, workers: int, batches: int,
                      threads: int) -> dict:
    """Images/s of the recipe's training data pipeline alone (decode, augment, tokenize, collate),
    timed over `batches` - 1 batches after the first."""
    if batches < 2:
        raise ValueError(f"batches={batches}: need at least 2 (the first one is not timed)")
    torch.set_num_threads(threads)
    base = load_base(BaseConfig(model_name=model))
    train_pairs, _ = load_pairs(DataConfig(source=str(csv_path)))
    data = TrainPairs(train_pairs, base.preprocess_train, base.tokenizer)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers)
    batches = min(batches, len(loader))
    iterator = iter(loader)
    next(iterator)  # workers started, first batch in
    start = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"model": model, "batch_size": batch_size, "workers": workers, "batches": batches - 1,
            "images_per_second": (batches - 1) * batch_size / seconds}
