"""The benchmark suite: peftclip beside open_clip's own trainer and the compute floor, in one run.

    python -m benchmarks.run --quick      # tiny base, under 10 minutes on 2 CPU cores
    python -m benchmarks.run              # the ViT-B-32 structure (random weights), about an hour

Measures, on the same machine in one run: training images/s of peftclip's recipe against
`python -m open_clip_train.main` on the same CSV, batch, precision, threads and steps
(median of several runs, the tools alternating); each strategy's fraction of its compute
floor; peak memory (whole-process max RSS) per strategy; adapter file sizes; inference
(adapter switch against reload, merged and unmerged against the bare base); the data
pipeline alone; and the feature cache. Writes `results/suite-<mode>.json`, `.md` and
`.png`, and puts the table and plot into `benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from benchmarks import feature_cache, floor, inference
from benchmarks.open_clip_trainer import run_open_clip_train
from benchmarks.report import check_targets, render_markdown, render_plot, update_readme
from benchmarks.training import PRECISIONS, loader_throughput, run_peftclip
from peftclip.config import add_config_arguments

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-800" / "captions.csv"
# comparison -> (peftclip strategy, open_clip_train with --lock-image)
COMPARISONS = {
    "full fine-tune vs full fine-tune": ("full", False),
    "freeze vision vs --lock-image": ("freeze_vision", True),
    "LoRA (attn+MLP, r=8) vs full fine-tune": ("lora", False),
}
STRATEGIES = ("full", "freeze_vision", "lora", "lora_grad_checkpointing", "projections", "text_prompt")


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
    feature_cache_images: int = field(default=512, metadata={"help": "images of the feature-cache benchmark"})
    inference_rounds: int = field(default=10, metadata={"help": "timed encode_image calls per model"})


MODES = {
    "quick": Settings(feature_cache_images=256, inference_rounds=5),
    "full": Settings(model="ViT-B-32", repeats=3, feature_cache_images=128),
}


def compare_trainers(settings: Settings, csv_path: Path, workdir: Path, progress: tqdm) -> dict:
    """peftclip and open_clip_train runs for every comparison, alternating which tool goes first."""
    runs: dict[str, list[dict]] = {}
    jobs = [("open_clip", False), ("open_clip", True)] + [("peftclip", s) for s, _ in COMPARISONS.values()]
    for repeat in range(settings.repeats):
        for tool, what in (jobs if repeat % 2 == 0 else jobs[::-1]):
            folder = workdir / f"{tool}-{what}-{repeat}"
            if tool == "open_clip":
                key = "open_clip lock_image" if what else "open_clip full"
                result = run_open_clip_train(settings.model, csv_path, batch_size=settings.batch_size,
                                             steps=settings.steps, precision=PRECISIONS[settings.precision][1],
                                             threads=settings.threads, workers=settings.workers, lock_image=what,
                                             workdir=folder)
            else:
                key = f"peftclip {what}"
                result = run_peftclip(settings.model, csv_path, what, batch_size=settings.batch_size,
                                      steps=settings.steps, threads=settings.threads, workers=settings.workers,
                                      workdir=folder, precision=settings.precision)
            runs.setdefault(key, []).append(result)
            progress.update(1)
    median = {key: statistics.median(r["images_per_second"] for r in results) for key, results in runs.items()}
    pairs = {}
    for name, (strategy, lock) in COMPARISONS.items():
        ours, theirs = median[f"peftclip {strategy}"], median["open_clip lock_image" if lock else "open_clip full"]
        pairs[name] = {"peftclip_images_per_second": ours, "open_clip_images_per_second": theirs,
                       "ratio": ours / theirs}
    return {"runs": runs, "median_images_per_second": median, "comparisons": pairs}


def measure_memory_and_size(settings: Settings, csv_path: Path, workdir: Path, training: dict,
                            progress: tqdm) -> dict:
    """Peak RSS and adapter size per strategy; reuses the comparison runs where they cover a strategy."""
    rows = {}
    for strategy in STRATEGIES:
        runs = training["runs"].get(f"peftclip {strategy}")
        if runs is None:
            runs = [run_peftclip(settings.model, csv_path, strategy, batch_size=settings.batch_size,
                                 steps=settings.steps, threads=settings.threads, workers=settings.workers,
                                 workdir=workdir / f"memory-{strategy}", precision=settings.precision)]
            progress.update(1)
        rows[strategy] = {"max_rss_bytes": statistics.median(r["max_rss_bytes"] for r in runs),
                          "images_per_second": statistics.median(r["images_per_second"] for r in runs),
                          "artifact_bytes": runs[0]["artifact_bytes"],
                          "trainable_parameters": runs[0]["trainable_parameters"],
                          "adapter_dir": runs[0]["adapter_dir"]}
    lora = Path(rows["lora"]["adapter_dir"]) / "adapter_model.safetensors"
    bf16 = workdir / "lora-bf16.safetensors"  # what --save-dtype bf16 writes
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(lora).items()}, bf16)
    rows["lora"]["artifact_bytes_bf16"] = bf16.stat().st_size
    return rows


def measure_floor(settings: Settings, progress: tqdm) -> dict:
    """The compute floor's images/s per strategy."""
    results = {}
    for strategy in floor.STRATEGIES:
        results[strategy] = floor.floor_throughput(settings.model, strategy, batch_size=settings.batch_size,
                                                   steps=max(settings.steps - 2, 1), threads=settings.threads,
                                                   precision=settings.precision)["images_per_second"]
        progress.update(1)
    return results


def run_suite(settings: Settings, csv_path: Path, workdir: Path) -> dict:
    """Every measurement of the suite, as one JSON-able dict."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"benchmark data not found: {csv_path} (see ../shared/data/README.md)")
    total = 5 * settings.repeats + 3 + len(floor.STRATEGIES) + 3
    with tqdm(total=total, desc="benchmark runs") as progress:
        training = compare_trainers(settings, csv_path, workdir / "train", progress)
        memory = measure_memory_and_size(settings, csv_path, workdir / "train", training, progress)
        floors = measure_floor(settings, progress)
        loader = loader_throughput(settings.model, csv_path, batch_size=settings.batch_size,
                                   workers=settings.workers, batches=8, threads=settings.threads)
        progress.update(1)
        infer = inference.run(settings.model, settings.batch_size, settings.inference_rounds, 30, settings.threads)
        progress.update(1)
        cache = feature_cache.main(["--model", settings.model, "--images", str(settings.feature_cache_images),
                                    "--epochs", "2", "--out", str(workdir / "feature_cache")])
        progress.update(1)
    return {"settings": asdict(settings), "machine": _machine(), "data": str(csv_path), "training": training,
            "memory": memory, "floor": floors, "loader": loader, "inference": infer, "feature_cache": cache}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cpu_count": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny base, a few steps, one run per tool")
    add_config_arguments(parser, "settings", Settings)  # overrides of the mode's settings
    parser.add_argument("--data", type=Path, default=FLICKR, help="CSV of file_name, caption (default: Flickr8k-800)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for suite-<mode>.json/.md/.png")
    parser.add_argument("--readme", type=Path, default=README, help="README whose suite section is replaced")
    parser.add_argument("--no-readme", action="store_true", help="leave the README as it is")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    overrides = {key.removeprefix("settings."): value for key, value in vars(args).items()
                 if key.startswith("settings.")}
    settings = replace(MODES[mode], **overrides)
    with tempfile.TemporaryDirectory(prefix="peftclip-suite-") as tmp:
        result = run_suite(settings, args.data, Path(tmp))
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    result["command"] = command
    result["targets"] = check_targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"suite-{mode}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot = render_plot(result, stem.with_suffix(".png"))
    report = render_markdown(result, plot=plot.name)
    stem.with_suffix(".md").write_text(report + "\n")
    if not args.no_readme:
        update_readme(args.readme, mode, render_markdown(result, plot=os.path.relpath(plot, args.readme.parent)))
    print(report)
    return result


if __name__ == "__main__":
    main()
