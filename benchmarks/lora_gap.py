"""Where LoRA training loses time against its compute floor, one step at a time.

The suite's LoRA floor is the frozen model's forward plus the activation gradients: it
leaves out the LoRA branches themselves. This splits the gap into its parts by timing
the same bare training step (random batch made once, no data loading, no Accelerate) on:

- `floor`: the suite's LoRA floor (open_clip's fused `nn.MultiheadAttention`);
- `split_trunk`: the same after peftclip's `convert_attention` (q, k and v in one linear, as the
  `qkv` target needs);
- `hand_lora`: `split_trunk` plus hand-written rank-r branches on qkv, out, c_fc and c_proj
  (x·Aᵀ·Bᵀ·alpha/r, no PEFT), training only A and B;
- `peftclip_lora`: the model peftclip's recipe trains (`apply_strategy`, PEFT layers), with the
  suite's LoRA targets (`benchmarks/training.py`: qkv, out, c_fc, c_proj).

`hand_lora` against `split_trunk` is the price of the LoRA math; `peftclip_lora`
against `hand_lora` is the price of PEFT's wrappers.

    python -m benchmarks.lora_gap --model ViT-B-32 --rounds 3

Writes benchmarks/results/lora_gap-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import floor
from benchmarks.process import median_seconds
from benchmarks.report import write_results
from peftclip.adapters import AdapterSpec, apply_strategy
from peftclip.adapters.attention import convert_attention
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.strategy import inner_model
from peftclip.families import FAMILIES

__all__ = ["VARIANTS", "create_variant_step", "main"]

VARIANTS: tuple[str, ...] = ("floor", "split_trunk", "hand_lora", "peftclip_lora")
_POSITIONAL = ("visual.positional_embedding", "positional_embedding")
RESULTS = Path(__file__).parent / "results"
_TARGETS = ["qkv", "out", "c_fc", "c_proj"]  # the suite's LoRA (benchmarks/training.py)


class _HandLora(nn.Module):
    """A frozen linear layer plus a rank-r update written out by hand: W·x + B·A·x·alpha/r."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight  # open_clip reads `c_fc.weight.dtype` for its cast dtype
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def _build(model_name: str, variant: str, lora: ClipLoraConfig) -> nn.Module:
    """The open_clip model of one variant, with exactly its trainable parameters requiring grad."""
    model = open_clip.create_model(model_name)
    model.train()
    if variant == "peftclip_lora":
        return inner_model(apply_strategy(model, AdapterSpec(lora=lora))[0])
    convert_attention(model, fused_qkv=True)
    for name, param in model.named_parameters():
        # Without trainable weights in the trunk, trainable first-block inputs make autograd
        # carry activation gradients through every block, as LoRA's backward must.
        param.requires_grad_(variant == "split_trunk" and name in _POSITIONAL)
    if variant == "hand_lora":
        native = FAMILIES[0].targets  # paths inside a native open_clip block
        leaves = {path.rpartition(".")[2] for t in lora.target_modules for path in native[t]}
        for module in list(model.modules()):
            for child in leaves:
                if isinstance(getattr(module, child, None), nn.Linear):
                    setattr(module, child, _HandLora(getattr(module, child), lora.r, lora.lora_alpha))
    return model


def create_variant_step(model_name: str, variant: str, batch_size: int, *, r: int = 8,
                        seed: int = 0) -> Callable[[], torch.Tensor]:
    """One bare contrastive training step (forward, backward, AdamW) of `variant`.

    Args:
        model_name: open_clip architecture, random weights made from `seed`.
        variant: one of `VARIANTS`.
        batch_size: image-caption pairs per step (random tensors, made once).
        r: LoRA rank of the LoRA variants (alpha = 2r, qkv, out, c_fc and c_proj, both towers).
        seed: seed of the weights and the batch.

    Returns:
        `step()`, returning the detached loss.

    >>> create_variant_step("peftclip-tiny", "hand_lora", batch_size=4)().ndim
    0
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant == "floor":
        return floor.create_floor_step(model_name, "lora", batch_size, seed=seed)[1]
    torch.manual_seed(seed)
    model = _build(model_name, variant, ClipLoraConfig(target_modules=_TARGETS, r=r, lora_alpha=2.0 * r))
    images, texts = floor._random_batch(model, batch_size, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step() -> torch.Tensor:
        loss = floor._contrastive_loss(model, model.encode_image(images), model.encode_text(texts))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="peftclip-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all variants, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            step = create_variant_step(args.model, variant, args.batch_size)
            seconds[variant].append(median_seconds(step, args.steps, warmup=1))  # warm-up: allocator, kernels
    rate = {v: args.batch_size / statistics.median(s) for v, s in seconds.items()}
    result = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
              "steps": args.steps, "step_seconds": seconds, "images_per_second": rate,
              "vs_floor": {v: rate[v] / rate["floor"] for v in VARIANTS}}
    lines = [f"LoRA step parts, {args.model} (random weights), batch {args.batch_size}, {args.threads} threads, "
             f"median of {args.rounds} alternating rounds, CPU", "",
             "| variant | images/s | vs floor |", "|---|---:|---:|"]
    lines += [f"| {v} | {rate[v]:.2f} | {rate[v] / rate['floor']:.0%} |" for v in VARIANTS]
    write_results(args.out, f"lora_gap-{args.model}", result, "\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
