"""The benchmark suite: peftclip beside open_clip's own trainer and the compute floor, in one run.

    python -m benchmarks.run --quick      # tiny base, under 10 minutes on 2 CPU cores; no verdicts
    python -m benchmarks.run              # the ViT-B-32 structure (random weights), about an hour
    python -m benchmarks.run --gpu        # ViT-B-32 on a GPU: bf16 autocast, batch 256
    python -m benchmarks.run --strategies lora,full   # only these rows and the comparisons among them

Measures, on the same machine in one run: training images/s of peftclip's recipe against
`python -m open_clip_train.main` on the same CSV, batch, precision, threads and steps
(median of several runs, the tools alternating); each strategy's fraction of its compute
floor, measured the same way; peak memory (whole-process max RSS) per strategy; adapter file sizes; inference
(adapter switch against reload, merged and unmerged against the bare base); the data
pipeline alone; and the feature cache. Writes `results/suite-<mode>.json`, `.md` and
`.png`, and puts the table and plot into `benchmarks/README.md`. With `--strategies` only those
strategies' recipe and floor runs are made (open_clip_train only for the comparisons whose
strategy is among them); the results go to `suite-<mode>-<a>+<b>` files and a README section of
that name, leaving the whole suite's section as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from benchmarks import feature_cache, floor, inference
from benchmarks.open_clip_trainer import run_open_clip_train
from benchmarks.report import check_targets, render_markdown, render_plot, update_readme, write_results
from benchmarks.training import PRECISIONS, loader_throughput, run_peftclip
from peftclip.config import add_config_arguments
from peftclip.io import save_adapter_weights

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-800" / "captions.csv"
# comparison -> (peftclip strategy, open_clip_train with --lock-image)
COMPARISONS = {
    "full fine-tune vs full fine-tune": ("full", False),
    "freeze vision vs --lock-image": ("freeze_vision", True),
    "LoRA (qkv+out+MLP, r=8) vs full fine-tune": ("lora", False),
}
# peftclip strategy (benchmarks/training.py) -> the compute floor it is held against (benchmarks/floor.py)
FLOOR_OF = {"full": "full", "freeze_vision": "freeze_vision", "lora": "lora",
            "lora_grad_checkpointing": "lora_grad_checkpointing",
            "lora_grad_checkpointing_release_memory": "lora_grad_checkpointing",
            "projections": "projections", "text_prompt": "text_prompt"}


@dataclass(frozen=True)
class Settings:
    """One suite configuration; the defaults are --quick's, and every field is also a flag."""

    model: str = field(default="peftclip-tiny", metadata={"help": "open_clip architecture (random weights)"})
    batch_size: int = field(default=32, metadata={"help": "images per training step and per inference call"})
    steps: int = field(default=6, metadata={"help": "optimiser steps per training run (the first 2 are not timed)"})
    repeats: int = field(default=1, metadata={"help": "runs of each tool per comparison, alternating"})
    threads: int = field(default=2, metadata={"help": "math threads (OMP_NUM_THREADS) of every run"})
    # DataLoader worker processes, the same for both tools. With 0, loading counts fully in the
    # step time; on a quiet 2-core machine, 0 and 1 worker gave the same ViT-B-32 LoRA images/s.
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes of both trainers"})
    precision: str = field(default="fp32", metadata={"help": f"one of {sorted(PRECISIONS)}"})
    device: str = field(default="cpu", metadata={"help": "where every trainer and floor runs: cpu or cuda"})
    feature_cache_images: int = field(default=512, metadata={"help": "images of the feature-cache benchmark"})
    inference_rounds: int = field(default=10, metadata={"help": "timed encode_image calls per model"})


MODES = {
    "quick": Settings(feature_cache_images=256, inference_rounds=5),
    "full": Settings(model="ViT-B-32", repeats=3, feature_cache_images=128),
    "gpu": Settings(model="ViT-B-32", batch_size=256, steps=20, repeats=3, precision="bf16", device="cuda",
                    workers=4, threads=4, feature_cache_images=512),
}
# Modes whose runs are long enough for their shares and ratios to be held against the targets. A --quick
# run takes a few steps of a tiny model: its timings are dominated by start-up noise (shares of the
# floor from 1% to over 2000% were seen), so it reports figures but passes no verdict.
MEASURED_MODES = ("full", "gpu")


def _run_job(settings: Settings, csv_path: Path, folder: Path, tool: str, what: str | bool) -> tuple[str, dict]:
    """One measured process: open_clip_train (`what`: lock the image tower), the recipe or a floor."""
    common = {"batch_size": settings.batch_size, "steps": settings.steps, "threads": settings.threads,
              "device": settings.device}
    if tool == "open_clip":
        return ("open_clip lock_image" if what else "open_clip full"), run_open_clip_train(
            settings.model, csv_path, precision=PRECISIONS[settings.precision][1], workers=settings.workers,
            lock_image=what, workdir=folder, **common)
    if tool == "peftclip":
        return f"peftclip {what}", run_peftclip(settings.model, csv_path, what, workers=settings.workers,
                                                workdir=folder, precision=settings.precision, **common)
    return f"floor {what}", floor.run_floor(settings.model, what, workdir=folder, precision=settings.precision,
                                            **{**common, "steps": max(settings.steps - 2, 1)})


def _comparisons(strategies: tuple[str, ...]) -> dict[str, tuple[str, bool]]:
    """The open_clip_train comparisons whose peftclip strategy is among `strategies`."""
    return {name: pair for name, pair in COMPARISONS.items() if pair[0] in strategies}


def _jobs(strategies: tuple[str, ...]) -> list[tuple[str, str | bool]]:
    """(tool, what) of every training process the suite runs for `strategies`."""
    locks = dict.fromkeys(lock for _, lock in _comparisons(strategies).values())
    floors = dict.fromkeys(FLOOR_OF[s] for s in strategies)
    return [*(("open_clip", lock) for lock in sorted(locks)), *(("peftclip", s) for s in strategies),
            *(("floor", s) for s in floor.STRATEGIES if s in floors)]


def measure_training(settings: Settings, csv_path: Path, workdir: Path, progress: tqdm,
                     strategies: tuple[str, ...] = tuple(FLOOR_OF)) -> dict[str, list[dict]]:
    """Every training process of the suite for `strategies`, `repeats` times each, alternating the order every
    repeat so that a machine slowing down or speeding up affects every tool alike."""
    jobs = _jobs(strategies)
    runs: dict[str, list[dict]] = {}
    for repeat in range(settings.repeats):
        for tool, what in (jobs if repeat % 2 == 0 else jobs[::-1]):
            key, result = _run_job(settings, csv_path, workdir / f"{repeat}-{tool}-{what}", tool, what)
            runs.setdefault(key, []).append(result)
            progress.update(1)
    return runs


def summarize_training(runs: dict[str, list[dict]], workdir: Path,
                       strategies: tuple[str, ...] = tuple(FLOOR_OF)) -> dict:
    """Medians per tool and strategy: the open_clip comparisons, and per strategy speed, floor, memory, file."""
    def median(key: str, field_name: str) -> float:
        return statistics.median(r[field_name] for r in runs[key])

    comparisons = {}
    for name, (strategy, lock) in _comparisons(strategies).items():
        ours, theirs = median(f"peftclip {strategy}", "images_per_second"), median(
            "open_clip lock_image" if lock else "open_clip full", "images_per_second")
        comparisons[name] = {"peftclip_images_per_second": ours, "open_clip_images_per_second": theirs,
                             "ratio": ours / theirs}
    rows = {}
    for strategy in strategies:
        ours, floor_strategy = runs[f"peftclip {strategy}"][0], FLOOR_OF[strategy]
        rows[strategy] = {
            "images_per_second": median(f"peftclip {strategy}", "images_per_second"),
            "floor_images_per_second": median(f"floor {floor_strategy}", "images_per_second"),
            "max_rss_bytes": median(f"peftclip {strategy}", "max_rss_bytes"),
            "floor_max_rss_bytes": median(f"floor {floor_strategy}", "max_rss_bytes"),
            "artifact_bytes": ours["artifact_bytes"], "trainable_parameters": ours["trainable_parameters"]}
    if "lora" in rows:
        lora = Path(runs["peftclip lora"][0]["adapter_dir"]) / "adapter_model.safetensors"
        bf16 = workdir / "lora-bf16.safetensors"  # what --save-dtype bf16 writes
        save_adapter_weights(load_file(lora), bf16, "bf16")
        rows["lora"]["artifact_bytes_bf16"] = bf16.stat().st_size
    return {"comparisons": comparisons, "strategies": rows,
            "open_clip": {key.removeprefix("open_clip "): median(key, "images_per_second")
                          for key in ("open_clip full", "open_clip lock_image") if key in runs}}


def run_suite(settings: Settings, csv_path: Path, workdir: Path,
              strategies: tuple[str, ...] = tuple(FLOOR_OF)) -> dict:
    """Every measurement of the suite (training only for `strategies`), as one JSON-able dict."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"benchmark data not found: {csv_path} (see ../shared/data/README.md)")
    total = settings.repeats * len(_jobs(strategies)) + 3
    with tqdm(total=total, desc="benchmark runs") as progress:
        runs = measure_training(settings, csv_path, workdir / "train", progress, strategies)
        training = summarize_training(runs, workdir, strategies)
        loader = loader_throughput(settings.model, csv_path, batch_size=settings.batch_size,
                                   workers=settings.workers, batches=8, threads=settings.threads)
        progress.update(1)
        infer = inference.run(settings.model, settings.batch_size, settings.inference_rounds, 30, settings.threads)
        progress.update(1)
        cache = feature_cache.main(["--model", settings.model, "--images", str(settings.feature_cache_images),
                                    "--epochs", "2", "--out", str(workdir / "feature_cache")])
        progress.update(1)
    for results in runs.values():  # keep every figure but the temporary folders
        for result in results:
            result.pop("adapter_dir", None)
    return {"settings": asdict(settings), "machine": _machine(), "data": str(csv_path), "strategies": list(strategies),
            "runs": runs,
            "training": training, "loader": loader, "inference": infer, "feature_cache": cache}


def _strategy_list(text: str) -> tuple[str, ...]:
    """`--strategies lora,full` as ('lora', 'full'), refusing unknown or repeated names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FLOOR_OF]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--strategies {text!r}: name each of {', '.join(FLOOR_OF)} at most once"
                                         + (f" ({unknown[0]!r} is unknown)" if unknown else ""))
    return names


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--quick", action="store_true", help="tiny base, a few steps, one run per tool; no verdicts")
    chosen.add_argument("--gpu", action="store_true", help="ViT-B-32 on cuda, bf16 autocast, batch 256")
    add_config_arguments(parser, "settings", Settings)  # overrides of the mode's settings
    parser.add_argument("--data", type=Path, default=FLICKR, help="CSV of file_name, caption (default: Flickr8k-800)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for suite-<mode>.json/.md/.png")
    parser.add_argument("--readme", type=Path, default=README, help="README whose suite section is replaced")
    parser.add_argument("--no-readme", action="store_true", help="leave the README as it is")
    parser.add_argument("--strategies", type=_strategy_list, default=tuple(FLOOR_OF),
                        help=f"comma-separated subset of {','.join(FLOOR_OF)} (default: all)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "gpu" if args.gpu else "full"
    overrides = {key.removeprefix("settings."): value for key, value in vars(args).items()
                 if key.startswith("settings.")}
    settings = replace(MODES[mode], **overrides)
    with tempfile.TemporaryDirectory(prefix="peftclip-suite-") as tmp:
        result = run_suite(settings, args.data, Path(tmp), args.strategies)
    subset = args.strategies != tuple(FLOOR_OF)
    command = "python -m benchmarks.run" + (f" --{mode}" if mode != "full" else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()) + (
        f" --strategies {','.join(args.strategies)}" if subset else "")
    result["command"], result["subset"] = command, subset
    result["targets"] = check_targets(result) if mode in MEASURED_MODES else []
    # A subset run gets files and a README section of its own, so the whole suite's rows stay as they were.
    name = f"suite-{mode}" + (f"-{'+'.join(args.strategies)}" if subset else "")
    args.out.mkdir(parents=True, exist_ok=True)
    plot = render_plot(result, args.out / f"{name}.png")
    report = render_markdown(result, plot=plot.name)
    write_results(args.out, name, result, report)
    if not args.no_readme:
        update_readme(args.readme, name.removeprefix("suite-"),
                      render_markdown(result, plot=os.path.relpath(plot, args.readme.parent)))
    print(report)
    return result


if __name__ == "__main__":
    main()
