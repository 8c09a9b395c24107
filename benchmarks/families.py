"""LoRA training speed per architecture family, as a share of its compute floor (issue 13).

For a native ViT (ViT-B-32), a timm ViT with a custom text tower and the sigmoid loss
(ViT-B-16-SigLIP) and a timm ConvNeXt (convnext_base), all with random weights, this times
two bare training steps on the same random batch (made once; no data loading, no Accelerate):

- `floor`: hand-written rank-r branches (x·Aᵀ·Bᵀ·alpha/r, no PEFT) on exactly the layers
  peftclip's LoRA adapts in that family (q, k, v, out, c_fc, c_proj where the family has
  them, after `convert_attention`; ConvNeXt has MLP targets only), open_clip's own loss
  (`ClipLoss`, or `SigLipLoss` for a model with a `logit_bias`), AdamW on the branches;
- `peftclip`: `apply_lora(model, ClipLoraConfig(r, lora_alpha=2r))`, peftclip's
  `contrastive_step` through the PEFT model's forward, AdamW on its trainable parameters.

Each (model, variant) runs in a process of its own, so its peak RSS is its own; the rate is
batch / median step time after warm-up steps. Both variants train the same number of
parameters (reported). The machine's load average is recorded before and after the run.

    python -m benchmarks.families --batch-size 8 --steps 3
    python -m benchmarks.families --models peftclip-tiny --batch-size 4 --steps 1 --out /tmp/families

Writes <out>/families.json and families.md (default: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from benchmarks import floor
from benchmarks.lora_gap import _HandLora
from benchmarks.process import REPO_ROOT, run_measured, thread_env, timed_seconds
from benchmarks.report import write_results
from peftclip.adapters.attention import convert_attention
from peftclip.adapters.lora import ClipLoraConfig, apply_lora, lora_target_names
from peftclip.losses import contrastive_step
from peftclip.utils import human_size

__all__ = ["MODELS", "VARIANTS", "create_family_step", "family_throughput", "main", "run_family"]

MODELS: tuple[str, ...] = ("ViT-B-32", "ViT-B-16-SigLIP", "convnext_base")
VARIANTS: tuple[str, ...] = ("floor", "peftclip")
RESULTS = Path(__file__).parent / "results"


class _HandConvLora(nn.Module):
    """A frozen dense convolution plus PEFT's Conv2d LoRA written out by hand: conv(x) + B(A(x))·alpha/r.

    A has the base's kernel, stride and padding and r output channels; B is a 1x1 convolution back to
    the base's channels (ConvNeXt blocks with `conv_mlp`, whose MLP is 1x1 convolutions).
    """

    def __init__(self, base: nn.Conv2d, r: int, lora_alpha: float) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight
        self.lora_A = nn.Parameter(torch.randn(r, *base.weight.shape[1:]) / base.weight[0].numel() ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1))
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.conv2d(x, self.lora_A, stride=self.base.stride, padding=self.base.padding,
                       dilation=self.base.dilation)
        return self.base(x) + F.conv2d(low, self.lora_B) * self.scaling


def _add_hand_lora(model: nn.Module, config: ClipLoraConfig) -> None:
    """Freeze `model` and put a hand-written LoRA branch on every layer peftclip's LoRA would adapt."""
    convert_attention(model)
    model.requires_grad_(False)
    for name in lora_target_names(model, config):  # each one a linear or dense convolution layer
        layer = model.get_submodule(name)
        hand = _HandConvLora if isinstance(layer, nn.Conv2d) else _HandLora
        model.set_submodule(name, hand(layer, config.r, config.lora_alpha))


def _floor_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """open_clip's loss for `model` on its normalised features, without any peftclip code."""
    bias = getattr(model, "logit_bias", None)
    loss = SigLipLoss() if bias is not None else ClipLoss()

    def compute(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        features = (model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True))
        return loss(*features, model.logit_scale.exp(), *(() if bias is None else (bias,)))

    return compute


def create_family_step(model_name: str, variant: str, batch_size: int, *, r: int = 8,
                       seed: int = 0) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """Build a random-weight LoRA model of `variant` and a closure doing one training step.

    Args:
        model_name: open_clip architecture (`ViT-B-32`, `ViT-B-16-SigLIP`, `convnext_base`, a tiny config...).
        variant: `floor` (hand-written LoRA branches, bare loss) or `peftclip` (`apply_lora` + `contrastive_step`).
        batch_size: image-caption pairs per step (random images and token ids, made once).
        r: LoRA rank (alpha = 2r), both towers, every target the family has.
        seed: seed of the weights, the branches and the batch.

    Returns:
        The trained model and `step()`, which runs forward, backward, AdamW and zero_grad and
        returns the detached loss.

    >>> model, step = create_family_step("peftclip-tiny", "floor", batch_size=4)
    >>> step().ndim
    0
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    model.train()
    images, texts = floor._random_batch(model, batch_size, torch.Generator().manual_seed(seed))
    config = ClipLoraConfig(r=r, lora_alpha=2.0 * r)
    if variant == "peftclip":
        model = apply_lora(model, config)
        compute = lambda images, texts: contrastive_step(model, (images, texts))  # noqa: E731
    else:
        _add_hand_lora(model, config)
        compute = _floor_loss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step() -> torch.Tensor:
        loss = compute(images, texts)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return model, step


def family_throughput(model_name: str, variant: str, *, batch_size: int, steps: int, threads: int,
                      warmup: int = 1, r: int = 8) -> dict:
    """Time `steps` training steps of `variant` after `warmup` untimed ones, in this process.

    >>> family_throughput("peftclip-tiny", "peftclip", batch_size=4, steps=1, threads=1, warmup=0)["steps"]
    1
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one timed step")
    torch.set_num_threads(threads)
    model, step = create_family_step(model_name, variant, batch_size, r=r)
    seconds = timed_seconds(step, steps, warmup)
    return {"model": model_name, "variant": variant, "batch_size": batch_size, "steps": steps, "threads": threads,
            "r": r, "step_seconds": seconds, "images_per_second": batch_size / statistics.median(seconds),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_family(model_name: str, variant: str, *, batch_size: int, steps: int, threads: int, workdir: Path,
               warmup: int = 1, r: int = 8) -> dict:
    """`family_throughput` in a process of its own, with that process's peak RSS added."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{model_name}-{variant}.json"
    cmd = [sys.executable, "-m", "benchmarks.families", "--measure", model_name, variant, "--json", str(out),
           "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads), "--r", str(r)]
    run = run_measured(cmd, env=thread_env(threads), cwd=REPO_ROOT)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.splitlines()[-20:])
        raise RuntimeError(f"{model_name} {variant} failed (exit {run.returncode}):\n{tail}")
    return {**json.loads(out.read_text()), "max_rss_bytes": run.max_rss_bytes}


def _rows(runs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per model: both variants' rates, the share of the floor, trainable parameters and peak RSS."""
    rows = {}
    for model_name, by_variant in runs.items():
        floor_run, ours = by_variant["floor"], by_variant["peftclip"]
        rows[model_name] = {
            "floor_images_per_second": floor_run["images_per_second"],
            "peftclip_images_per_second": ours["images_per_second"],
            "share_of_floor": ours["images_per_second"] / floor_run["images_per_second"],
            "trainable_parameters": ours["trainable_parameters"],
            "floor_trainable_parameters": floor_run["trainable_parameters"],
            "max_rss_bytes": ours["max_rss_bytes"], "floor_max_rss_bytes": floor_run["max_rss_bytes"],
            "step_seconds": {v: run["step_seconds"] for v, run in by_variant.items()}}
    return rows


# Said under the table when the load average exceeded the core count during the run.
_LOADED = (" The load exceeded the core count: busy neighbours stall PyTorch's OpenMP threads, by different"
           " amounts from one process to the next, so these shares of the floor are noise, not a verdict;"
           " rerun on an idle machine.")


def _spread(result: dict) -> float:
    """The largest ratio of slowest to fastest timed step within one run."""
    return max(max(t) / min(t) for row in result["models"].values() for t in row["step_seconds"].values())


def _markdown(result: dict) -> str:
    s, load = result["settings"], result["machine"]["load_average_1_5_15"]
    cpus = result["machine"]["cpu_count"]
    lines = [f"LoRA (r={s['r']}, alpha={2 * s['r']}, q/k/v/out/c_fc/c_proj where the family has them, both towers) "
             f"per family: random weights, batch {s['batch_size']}, {s['warmup']} warm-up + {s['steps']} timed "
             f"steps (median), {s['threads']} threads, fp32, CPU ({result['machine']['cpu_count']} cores, "
             f"torch {result['machine']['torch']}), each run in its own process.", "",
             f"Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load['before'])}; "
             f"after: {' / '.join(f'{x:.2f}' for x in load['after'])}; step times varied up to "
             f"{_spread(result):.1f}x within one run." + _LOADED * (max(*load["before"], *load["after"]) > cpus), "",
             f"Command: `{result['command']}`", "",
             "| model | floor images/s | peftclip images/s | share of floor | step s, floor (min-max) "
             "| step s, peftclip (min-max) | trainable params | peak RSS (floor's) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["models"].items():
        spread = [f"{min(t):.1f}-{max(t):.1f}" for t in (row["step_seconds"][v] for v in VARIANTS)]
        lines.append(f"| {name} | {row['floor_images_per_second']:.2f} | {row['peftclip_images_per_second']:.2f} "
                     f"| {100 * row['share_of_floor']:.0f}% | {spread[0]} | {spread[1]} "
                     f"| {row['trainable_parameters']:,} "
                     f"| {human_size(row['max_rss_bytes'])} ({human_size(row['floor_max_rss_bytes'])}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every model's floor and peftclip step in their own processes and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="open_clip architectures (random weights)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for families.json and families.md")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "VARIANT"),
                        help="internal: time one variant in this process and write it to --json")
    parser.add_argument("--json", type=Path, help="with --measure: where its result goes")
    args = parser.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("batch_size", "steps", "warmup", "threads", "r")}
    if args.measure:
        if args.json is None:
            parser.error("--measure needs --json")
        result = family_throughput(*args.measure, **settings)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        return result
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        runs = {name: {variant: run_family(name, variant, workdir=Path(workdir), **settings)
                       for variant in VARIANTS} for name in args.models}
    result = {"settings": settings, "command": "python -m benchmarks.families " + " ".join(argv or sys.argv[1:]),
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(), "torch": torch.__version__,
                          "load_average_1_5_15": {"before": before, "after": os.getloadavg()}},
              "models": _rows(runs)}
    table = _markdown(result)
    write_results(args.out, "families", result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
