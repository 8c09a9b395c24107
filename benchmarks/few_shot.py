"""Few-shot CIFAR-10: zero-shot against every method of the registry, through the classify recipe.

    python -m benchmarks.few_shot            # 16 shots, 3 seeds, every method (20-30 minutes on 2 cores)
    python -m benchmarks.few_shot --quick    # 2 methods, 1 seed, 2 shots, 2 steps, 50 test images

Each run is `peftclip.recipes.classify.main` in this process on the same built-in random-initialised base,
the same fixed test subset (`--max-val-images`, drawn once with `--split-seed 0`) and the same number of
optimiser steps for every trained method, at the learning rate listed beside it. The random base cannot
recognise CIFAR-10, so the table shows how well each method learns from a few shots, not published accuracy.
Writes benchmarks/results/few_shot.{json,md,png} and replaces the README's few-shot section.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.report import replace_section, write_results
from peftclip.recipes import classify

__all__ = ["METHODS", "QUICK_METHODS", "Method", "main", "render_markdown", "render_plot"]

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
TEMPLATE = "a photo of a {}."
SECTION = "few-shot"


@dataclass(frozen=True)
class Method:
    """One row of the table: the classify flags that turn the method on, and its learning rate."""

    flags: tuple[str, ...]
    lr: float | None  # None: training-free, no optimiser step
    lr_source: str  # why this learning rate


_PROMPTS = ("--no-lora", "--no-head")
_LORA = ("--no-head", "--towers", "vision", "text")
METHODS = {
    "linear probe": Method(("--no-lora", "--head"), 3e-3, "the classify recipe's default"),
    "LoRA": Method(_LORA, 1e-3, "TrainConfig's default"),
    "DoRA": Method((*_LORA, "--use-dora"), 1e-3, "as LoRA"),
    "rsLoRA": Method((*_LORA, "--use-rslora"), 1e-3, "as LoRA"),
    "PiSSA": Method((*_LORA, "--init-lora", "pissa"), 1e-3, "as LoRA"),
    "LoRA+": Method((*_LORA, "--loraplus-lr-ratio", "16"), 1e-3, "A's; B at 16x (Hayou et al.)"),
    "IA³": Method((*_PROMPTS, "--ia3"), 3e-3, "Liu et al.'s 3e-3"),
    "projections": Method((*_PROMPTS, "--projections"), 1e-3, "TrainConfig's default"),
    "CoOp": Method((*_PROMPTS, "--text-prompt"), 2e-3, "Zhou et al.'s 2e-3"),
    "CoCoOp": Method((*_PROMPTS, "--cocoop"), 2e-3, "Zhou et al.'s 2e-3"),
    "VPT": Method((*_PROMPTS, "--visual-prompt"), 1e-3, "TrainConfig's default"),
    # The paper's J=9 of 12 blocks; the tiny base has 2.
    "MaPLe": Method((*_PROMPTS, "--maple", "--prompt-depth", "2"), 1e-2,
                    "probed: Khattak et al.'s 3.5e-3 fell below zero-shot"),
    "CLIP-Adapter": Method((*_PROMPTS, "--clip-adapter"), 1e-3, "TrainConfig's default"),
    "Tip-Adapter": Method((*_PROMPTS, "--tip-adapter"), None, "training-free (alpha 1, beta 5.5)"),
    "Tip-Adapter-F": Method((*_PROMPTS, "--tip-adapter", "--fine-tune"), 1e-3, "Zhang et al.'s 1e-3"),
}
QUICK_METHODS = ("linear probe", "Tip-Adapter")


def _run(source: Path, name: str, seed: int, args: argparse.Namespace, workdir: Path, log) -> dict:
    """One classify run of method `name` with `seed`; its printout and progress bars go to `log`."""
    method = METHODS[name]
    argv = ["--source", str(source), "--val-split", "test", "--max-val-images", str(args.eval_images),
            "--split-seed", "0", "--shots", str(args.shots), "--seed", str(seed), "--templates", TEMPLATE,
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--num-workers", "0",
            "--output-dir", str(workdir / f"{len(list(workdir.iterdir()))}"), *method.flags]
    if method.lr is not None:
        argv += ["--lr", str(method.lr)]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            return classify.main(argv)
    except SystemExit as e:  # the recipe's one-line error, e.g. a flag this base refuses
        last = printed.getvalue().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{name}, seed {seed}: classify exited with {e.code}: {last[0]}") from e
    finally:
        log.write(f"=== {name}, seed {seed}: classify {' '.join(argv)}\n{printed.getvalue()}\n")


def _summary(top1: list[float]) -> dict:
    return {"top1": top1, "top1_mean": statistics.mean(top1), "top1_std": statistics.pstdev(top1)}


def measure(source: Path, names: list[str], args: argparse.Namespace, log) -> dict:
    """Top-1 per method and seed, and the zero-shot top-1 the runs report before training."""
    rows, before, start = {}, set(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftclip-few-shot-") as tmp, \
            tqdm(total=len(names) * len(args.seeds), desc="few-shot runs", file=sys.stderr) as progress:
        for name in names:
            runs = []
            for seed in args.seeds:
                progress.set_postfix(method=name, seed=seed)
                runs.append(_run(source, name, seed, args, Path(tmp), log))
                progress.update()
            before |= {run["before"]["top1"] for run in runs}
            rows[name] = {**_summary([run["after"]["top1"] for run in runs]), "steps": runs[0]["steps"],
                          "lr": METHODS[name].lr, "lr_source": METHODS[name].lr_source,
                          "flags": " ".join(METHODS[name].flags)}
    if len(before) != 1:  # same base, same test subset: zero-shot cannot depend on the method or seed
        raise RuntimeError(f"zero-shot top-1 differs between runs: {sorted(before)}")
    return {"zero_shot": _summary([before.pop()] * len(args.seeds)) | {"steps": 0},
            "methods": rows, "seconds": time.perf_counter() - start}


def render_markdown(result: dict, plot: str | None = None) -> str:
    """The table: zero-shot, then each method's top-1 mean ± std over the seeds, with its lr and flags."""
    s = result["settings"]
    lines = [f"**Random-initialised base: how well each method learns from {s['shots']} shots, not published "
             f"accuracy.** Built-in `{s['model']}` base (random weights, the same for every run), CIFAR-10, "
             f"{s['shots']} training images per class, top-1 on a fixed {s['eval_images']}-image subset of the "
             f"test split, mean ± std over seeds {', '.join(map(str, s['seeds']))}; every trained method takes "
             f"{s['steps']} AdamW steps of batch {s['batch_size']} (recipe defaults otherwise: augmentation, "
             f"weight decay 0.05, cosine schedule), one prompt template `{s['template']}`. "
             f"Zero-shot is what the recipe reports before training.", "",
             "| method | top-1 (%) | vs zero-shot | steps | lr | classify flags |", "|---|---:|---:|---:|---|---|"]
    zero = result["zero_shot"]["top1_mean"]
    lines.append(f"| zero-shot | {zero:.1f} ± 0.0 | | 0 | | |")
    for name, row in result["methods"].items():
        lr = row["lr_source"] if row["lr"] is None else f"{row['lr']:g} ({row['lr_source']})"
        lines.append(f"| {name} | {row['top1_mean']:.1f} ± {row['top1_std']:.1f} | {row['top1_mean'] - zero:+.1f} "
                     f"| {row['steps']} | {lr} | `{row['flags']}` |")
    lines += ["", f"Command: `{result['command']}` ({result['seconds'] / 60:.0f} min on {result['machine']})."]
    if plot:
        lines += ["", f"![few-shot top-1 per method]({plot})"]
    return "\n".join(lines)


def render_plot(result: dict, path: Path) -> Path:
    """A PNG bar chart of top-1 mean ± std per method, zero-shot first and as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"zero-shot": result["zero_shot"], **result["methods"]}
    fig, axis = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 1.5), 4.2))
    axis.bar(list(rows), [r["top1_mean"] for r in rows.values()], yerr=[r["top1_std"] for r in rows.values()],
             capsize=3, color=["grey"] + ["tab:blue"] * (len(rows) - 1))
    axis.axhline(result["zero_shot"]["top1_mean"], color="grey", linestyle="--", linewidth=1)
    axis.set_ylabel("top-1 (%)")
    axis.tick_params(axis="x", labelrotation=40, labelsize=8)
    s = result["settings"]
    axis.set_title(f"{s['shots']}-shot CIFAR-10, random-initialised {s['model']}, {len(s['seeds'])} seed(s)",
                   fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_METHODS)}; 1 seed, 2 shots, 2 steps of batch 8, 50 test images")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all (--quick: two)")
    parser.add_argument("--source", type=Path, default=CIFAR10, help="CIFAR-10 as parquet (train and test splits)")
    parser.add_argument("--shots", type=int, help="training images per class (default 16; --quick 2)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (default 1 2 3; --quick 1)")
    parser.add_argument("--steps", type=int, help="optimiser steps of every trained method (default 50; --quick 2)")
    parser.add_argument("--batch-size", type=int, help="training batch (default 32; --quick 8)")
    parser.add_argument("--eval-images", type=int, help="test images, a fixed subset (default 1000; --quick 50)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for few_shot.{json,md,png}")
    parser.add_argument("--readme", type=Path, default=README, help="README whose few-shot section is replaced")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the table, write the results and the README section; returns the result."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    defaults = dict(shots=2, seeds=[1], steps=2, eval_images=50, batch_size=8) if args.quick else \
        dict(shots=16, seeds=[1, 2, 3], steps=50, eval_images=1000, batch_size=32)
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    names = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    if not (args.source / "test-00000-of-00001.parquet").is_file():
        raise FileNotFoundError(f"{args.source}: no CIFAR-10 test split (test-00000-of-00001.parquet) there")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / "peftclip-few-shot.log"  # every run's printout, for a failed run
    with log_path.open("w") as log:
        result = measure(args.source, names, args, log)
    result |= {"settings": {"model": "peftclip-tiny", "shots": args.shots, "seeds": args.seeds, "steps": args.steps,
                            "batch_size": args.batch_size, "eval_images": args.eval_images, "template": TEMPLATE,
                            "source": args.source.name},
               "command": " ".join(["python -m benchmarks.few_shot", *argv]),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
    render_plot(result, args.out / "few_shot.png")
    write_results(args.out, "few_shot", result, render_markdown(result, plot="few_shot.png"))
    readme_plot = Path(os.path.relpath(args.out / "few_shot.png", args.readme.resolve().parent)).as_posix()
    replace_section(args.readme, SECTION, render_markdown(result, plot=readme_plot), heading="Few-shot methods")
    print(json.dumps({name: round(row["top1_mean"], 2) for name, row in result["methods"].items()}))
    return result


if __name__ == "__main__":
    main()
