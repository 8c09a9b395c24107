"""The compute floor of each training strategy: a bare PyTorch step doing only the needed work.

peftclip's training throughput is reported as a fraction of this floor. The floor of a
strategy is a plain loop over one open_clip model (random weights) that computes exactly
the forward and backward the strategy mathematically needs and nothing else: the batch
is random tensors made once before timing, there is no data loading, no Accelerate, no
PEFT wrapper and no peftclip code in the timed step. Frozen towers run under
`torch.no_grad()`; a trained projection after a frozen trunk is applied by hand to the
trunk's pre-projection features; adapter-style strategies (LoRA, text prompts) are
modelled by frozen weights whose first-block input requires grad, so autograd pays for
the activation gradients through every block but computes no weight gradients.

    python benchmarks/floor.py --model peftclip-tiny --batch-size 32 --steps 5
    python benchmarks/floor.py --model ViT-B-32 --batch-size 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

import peftclip.models  # noqa: F401  (registers the peftclip-tiny config with open_clip)

__all__ = ["PRECISIONS", "STRATEGIES", "create_floor_step", "floor_throughput", "main", "run_floor"]

# Parameter names of open_clip's CLIP text tower (the vision tower lives under `visual.`).
_TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
_PROJECTIONS = ("visual.proj", "text_projection", "logit_scale")
_END_OF_TEXT_POSITION = 20  # where a typical caption ends; open_clip pools at the largest token id


@dataclass(frozen=True)
class _Plan:
    """What one strategy's step computes."""

    trainable: tuple[str, ...]  # parameters (or modules, by name prefix) that get grads and AdamW; "" = all
    no_grad_towers: frozenset[str] = frozenset()  # towers whose trunk runs under no_grad ("vision", "text")
    grad_checkpointing: bool = False  # open_clip's own recompute-in-backward switch


_PLANS: dict[str, _Plan] = {
    "full": _Plan(trainable=("",)),
    "freeze_vision": _Plan(trainable=_TEXT_TOWER + ("visual.proj", "logit_scale"),
                           no_grad_towers=frozenset({"vision"})),
    # The first-block inputs require grad, so backward runs through every block of both towers.
    "lora": _Plan(trainable=("visual.positional_embedding", "positional_embedding")),
    "lora_grad_checkpointing": _Plan(trainable=("visual.positional_embedding", "positional_embedding"),
                                     grad_checkpointing=True),
    "projections": _Plan(trainable=_PROJECTIONS, no_grad_towers=frozenset({"vision", "text"})),
    "text_prompt": _Plan(trainable=("positional_embedding",), no_grad_towers=frozenset({"vision"})),
}
STRATEGIES: tuple[str, ...] = tuple(_PLANS)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    """True when parameter `name` is one of `prefixes` or lives inside a module named by one."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


@contextmanager
def _without(module: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """Set parameter `name` of `module` to None for the block and yield it.

    open_clip skips a tower's projection when it is None (`VisionTransformer.forward`
    for `proj`, `CLIP.encode_text` for `text_projection`), giving pre-projection features.
    """
    param = getattr(module, name)
    setattr(module, name, None)
    try:
        yield param
    finally:
        setattr(module, name, param)


def _encode(model: nn.Module, tower: str, inputs: torch.Tensor, no_grad: bool) -> torch.Tensor:
    """Features of one tower; with `no_grad` the trunk runs without autograd and only the projection may train."""
    owner, proj_name, encode = {
        "vision": (model.visual, "proj", model.encode_image),
        "text": (model, "text_projection", model.encode_text),
    }[tower]
    if not no_grad:
        return encode(inputs)
    with _without(owner, proj_name) as proj, torch.no_grad():
        pooled = encode(inputs)
    return pooled @ proj


def _contrastive_loss(model: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over scaled cosine similarities."""
    logits = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _random_batch(model: nn.Module, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images at the model's input size and random captions ending in end-of-text at token 20."""
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(batch_size, 3, *size, generator=generator)
    end_of_text = model.vocab_size - 1  # the largest id: open_clip's argmax pooling finds it
    position = min(_END_OF_TEXT_POSITION, model.context_length - 1)
    texts = torch.zeros(batch_size, model.context_length, dtype=torch.long)
    texts[:, :position] = torch.randint(1, end_of_text, (batch_size, position), generator=generator)
    texts[:, position] = end_of_text
    return images, texts


def create_floor_step(model_name: str, strategy: str, batch_size: int, *, precision: str = "fp32",
                      seed: int = 0, device: str = "cpu") -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """Build a random-weight model and a closure doing one bare training step of `strategy`.

    Args:
        model_name: open_clip architecture (`peftclip-tiny`, `ViT-B-32`, ...).
        strategy: one of `STRATEGIES`.
        batch_size: image-caption pairs per step (random tensors, made once here).
        precision: a key of `PRECISIONS`; bf16 runs the forward under autocast.
        seed: seed of the weights and the batch.
        device: where the model and batch live (`cpu` or `cuda`).

    Returns:
        The model (so its parameters can be inspected) and `step()`, which runs forward,
        backward, AdamW step and zero_grad, and returns the detached loss.

    >>> model, step = create_floor_step("peftclip-tiny", "projections", batch_size=4)
    >>> step().ndim
    0
    """
    if strategy not in _PLANS:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    plan = _PLANS[strategy]
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, device=device)
    if not isinstance(model, open_clip.CLIP):
        raise ValueError(f"{model_name} builds a {type(model).__name__}; the floor needs open_clip's CLIP")
    model.train()
    model.set_grad_checkpointing(plan.grad_checkpointing)
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, plan.trainable))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    images, texts = (t.to(device) for t in _random_batch(model, batch_size, torch.Generator().manual_seed(seed)))
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()

    def step() -> torch.Tensor:
        with autocast:
            image_features = _encode(model, "vision", images, "vision" in plan.no_grad_towers)
            text_features = _encode(model, "text", texts, "text" in plan.no_grad_towers)
            loss = _contrastive_loss(model, image_features.float(), text_features.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if images.is_cuda:
            torch.cuda.synchronize()  # the step's time is its kernels', not their launch
        return loss.detach()

    return model, step


def floor_throughput(model_name: str, strategy: str, *, batch_size: int, steps: int, threads: int,
                     warmup: int = 2, precision: str = "fp32", device: str = "cpu") -> dict:
    """Time `steps` bare training steps of `strategy` after `warmup` untimed ones.

    Args:
        model_name: open_clip architecture, random weights.
        strategy: one of `STRATEGIES`.
        batch_size: images per step.
        steps: timed steps; the median step time gives the throughput.
        threads: `torch.set_num_threads` value, set before anything else.
        warmup: untimed steps first (allocator, kernel selection).
        precision: a key of `PRECISIONS`.
        device: `cpu` or `cuda`.

    >>> floor_throughput("peftclip-tiny", "lora", batch_size=4, steps=1, threads=1, warmup=0)["steps"]
    1
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one timed step")
    torch.set_num_threads(threads)
    _, step = create_floor_step(model_name, strategy, batch_size, precision=precision, device=device)
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {"strategy": strategy, "model": model_name, "batch_size": batch_size, "steps": steps,
            "threads": threads, "step_seconds": seconds,
            "images_per_second": batch_size / statistics.median(seconds)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the floor throughput of every strategy (or those named) and return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="peftclip-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = []
    for strategy in args.strategies:
        result = floor_throughput(args.model, strategy, batch_size=args.batch_size, steps=args.steps,
                                  threads=args.threads, warmup=args.warmup, precision=args.precision,
                                  device=args.device)
        print(f"{strategy}: {result['images_per_second']:.1f} images/s "
              f"({args.model}, batch {args.batch_size}, {args.threads} threads, {args.precision})", flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def run_floor(model_name: str, strategy: str, *, batch_size: int, steps: int, threads: int, workdir: Path,
              warmup: int = 2, precision: str = "fp32", device: str = "cpu") -> dict:
    """`floor_throughput` in a process of its own (as the trainers run), with its peak RSS added."""
    from benchmarks.process import run_measured, thread_env

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"floor-{strategy}.json"
    cmd = [sys.executable, "-m", "benchmarks.floor", "--model", model_name, "--strategies", strategy,
           "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
           "--precision", precision, "--device", device, "--json", str(out)]
    run = run_measured(cmd, env=thread_env(threads), cwd=Path(__file__).resolve().parents[1])
    if run.returncode != 0:
        tail = "\n".join(run.stderr.splitlines()[-20:])
        raise RuntimeError(f"floor {strategy} failed (exit {run.returncode}):\n{tail}")
    return {**json.loads(out.read_text())[0], "max_rss_bytes": run.max_rss_bytes}


if __name__ == "__main__":
    main()
