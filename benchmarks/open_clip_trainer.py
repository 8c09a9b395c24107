"""Measure open_clip's own trainer (``open_clip_train``) on a CSV of image-caption pairs.

Runs ``open_clip_train.main`` for exactly ``steps`` optimiser steps in a subprocess
(random init, CPU, no evaluation, no checkpoint) and reads its per-step log lines, so its
training throughput and peak memory can be set beside ours on the same data.

What open_clip logs as ``Batch (t)`` for a step is the wall time from the end of the
previous step's timing to the end of this step's optimiser update and logit-scale clamp:
it includes waiting for the DataLoader and the host-to-device copy (together logged as
``Data (t)``), the previous step's log line (its ``loss.item()``), forward, loss, backward
and the optimiser step; the first step also includes creating the DataLoader iterator
(starting worker processes when ``workers > 0``). We read it from the logged samples/s,
which has 6 significant digits where ``Batch (t)`` is rounded to milliseconds.
"""

from __future__ import annotations

import csv
import itertools
import re
import sys
from pathlib import Path

from benchmarks.process import run_measured, thread_env
from peftclip.models import MODEL_CONFIG_DIR
from peftclip.train import images_per_second

__all__ = ["RUN_NAME", "run_open_clip_train"]

RUN_NAME = "open_clip_train"  # open_clip's --name: its folder under <workdir>/none/
TRAIN_CSV = "train.csv"

# open_clip_train.main does not know our model configs: register them, then run it.
_WRAPPER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]))"
)
# "Train Epoch: 0 [ 8/12 (67%)] Data (t): 0.001 Batch (t): 0.014, 287.215/s, ..."
_STEP_LINE = re.compile(r"Train Epoch: \d+ \[.*?\] Data \(t\): \S+ Batch \(t\): \S+, (?P<rate>[0-9.eE+-]+)/s,")
# open_clip sets every logger to INFO, so torch._dynamo prints its statistics at exit in
# glog form ("I1125 02:42:54.729000 5732 .../eval_frame.py:837] ..."), burying errors.
_TORCH_INFO_LINE = re.compile(r"I\d{4} \d\d:\d\d:\d\d")
# Variables that make open_clip_train start torch.distributed (distributed.is_using_distributed).
_DISTRIBUTED_ENV = ("WORLD_SIZE", "SLURM_NTASKS")


def run_open_clip_train(
    model: str,
    csv_path: Path,
    *,
    batch_size: int,
    steps: int,
    precision: str = "fp32",
    threads: int = 2,
    workers: int = 0,
    lock_image: bool = False,
    workdir: Path,
    lr: float = 1e-5,
    device: str = "cpu",
) -> dict:
    """Train ``model`` from random weights with open_clip's trainer and report its speed.

    Writes ``<workdir>/train.csv`` with ``steps * batch_size`` rows taken in order from
    ``csv_path`` (cycled if it has fewer), so one epoch is ``steps`` steps, and runs the
    trainer in ``workdir``; open_clip writes its log and ``params.txt`` to
    ``<workdir>/none/open_clip_train/`` (``--logs none`` is what stops it saving a
    checkpoint after the last epoch).

    Args:
        model: an open_clip model name, or one of ``peftclip/model_configs``.
        csv_path: CSV with ``file_name`` (relative to the CSV's folder or absolute) and
            ``caption`` columns.
        batch_size: images per step.
        steps: optimiser steps to run and time.
        precision: open_clip's ``--precision`` (``fp32``, ``amp_bf16``, ``bf16``, ...).
        threads: math threads (``OMP_NUM_THREADS``) the trainer may use.
        device: open_clip's ``--device`` (``cpu`` or ``cuda``).
        workers: DataLoader worker processes (0 loads data in the training process).
        lock_image: freeze the whole image tower (open_clip's ``--lock-image``).
        workdir: folder for the CSV and the trainer's files; it must not hold an earlier run.
        lr: peak learning rate (no warm-up, then open_clip's default cosine decay).

    Returns:
        The settings, ``step_seconds`` (one per step, from open_clip's samples/s),
        ``images_per_second`` (as ``peftclip.train.images_per_second`` computes it for our
        recipes: batch size over the median step, warm-up steps left out), and the trainer
        process's ``max_rss_bytes`` and ``wall_seconds``.

    >>> run_open_clip_train("peftclip-tiny", Path("captions.csv"), batch_size=4, steps=3,
    ...                     workdir=Path("/tmp/oc"))["images_per_second"]  # doctest: +SKIP
    312.5
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size={batch_size}, steps={steps}: both must be positive integers")
    workdir = Path(workdir).resolve()
    log_dir = workdir / "none" / RUN_NAME
    if log_dir.exists():
        raise FileExistsError(f"{log_dir}: an earlier open_clip_train run is there; use a new workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    train_csv = workdir / TRAIN_CSV
    _write_train_csv(Path(csv_path), train_csv, steps * batch_size)

    argv = [
        "--model", model,
        "--train-data", str(train_csv),
        "--dataset-type", "csv",
        "--csv-img-key", "file_name",
        "--csv-caption-key", "caption",
        "--csv-separator", ",",
        "--batch-size", str(batch_size),
        "--epochs", "1",
        "--precision", precision,
        "--workers", str(workers),
        "--lr", str(lr),
        "--warmup", "0",
        "--log-every-n-steps", "1",
        "--report-to", "",
        "--logs", "none",  # a real folder always gets epoch_<last>.pt, whatever --save-frequency says
        "--name", RUN_NAME,
        "--device", device,
        "--seed", "0",
    ] + (["--lock-image"] if lock_image else [])
    env = {k: v for k, v in thread_env(threads).items() if k not in _DISTRIBUTED_ENV}
    run = run_measured([sys.executable, "-c", _WRAPPER, str(MODEL_CONFIG_DIR), *argv], env=env, cwd=workdir)
    if run.returncode != 0:
        lines = [line for line in (run.stderr or run.stdout).splitlines() if not _TORCH_INFO_LINE.match(line)]
        tail = "\n".join(lines[-20:])
        raise RuntimeError(f"open_clip_train failed for {model} (exit {run.returncode}, in {workdir}):\n{tail}")

    step_seconds = [batch_size / float(m["rate"]) for m in _STEP_LINE.finditer(run.stderr)]
    if len(step_seconds) != steps:
        raise RuntimeError(
            f"open_clip_train logged {len(step_seconds)} steps, expected {steps}; see {log_dir / 'out.log'}"
        )
    return {
        "tool": "open_clip_train",
        "model": model,
        "batch_size": batch_size,
        "steps": steps,
        "precision": precision,
        "threads": threads,
        "lock_image": lock_image,
        "step_seconds": step_seconds,
        "images_per_second": images_per_second(step_seconds, batch_size),  # the rule our recipes use
        "max_rss_bytes": run.max_rss_bytes,
        "wall_seconds": run.wall_seconds,
    }


def _write_train_csv(source: Path, dest: Path, rows: int) -> None:
    """Write ``rows`` (file_name, caption) rows from ``source`` to ``dest``, paths made absolute."""
    try:
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file_name", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{source}: no column(s) {sorted(missing)}; columns are {reader.fieldnames}")
            pairs = [(str((source.parent / r["file_name"]).resolve()), r["caption"]) for r in reader]
    except OSError as e:
        raise RuntimeError(f"cannot read {source}: {e}") from e
    if not pairs:
        raise ValueError(f"{source}: no rows")
    with dest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        writer.writerows(itertools.islice(itertools.cycle(pairs), rows))
