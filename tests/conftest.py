"""Shared fixtures: tiny and ViT-B-32-structured bases, and paths to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.optim.optimizer import register_optimizer_step_pre_hook

from peftclip.models import BaseConfig, BaseModel, load_base

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL_NAMES = ["peftclip-tiny", "ViT-B-32"]

# Generation speed depends on how busy the shared machine is; the properties do not.
settings.register_profile("peftclip", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("peftclip")


def shared_data(*parts: str) -> Path:
    """A path under the shared real data. Missing data fails the test rather than skipping it: CI always has it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared data missing: {path} (the tests expect it beside the project, at ../shared/data)",
                    pytrace=False)
    return path


def image_batch(model: torch.nn.Module, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Random images at `model`'s input size."""
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def text_batch(base: BaseModel) -> torch.Tensor:
    return base.tokenizer(["a photo of a red circle", "two dogs playing in the snow on a sunny day"])


@pytest.fixture
def tiny_base() -> BaseModel:
    """A fresh tiny base (random weights, seed 0); tests may modify it."""
    return load_base(BaseConfig())


@pytest.fixture(params=MODEL_NAMES)
def any_base(request) -> BaseModel:
    """A fresh base of each covered architecture (random weights)."""
    return load_base(BaseConfig(model_name=request.param))


@pytest.fixture
def optimizer_steps():
    """A list that grows by one at every optimizer step taken anywhere during the test."""
    steps: list[int] = []
    handle = register_optimizer_step_pre_hook(lambda *args: steps.append(1))
    yield steps
    handle.remove()


def randomly_trained(spec, seed: int):
    """A fresh tiny base with `spec` applied and its trainable tensors moved off their initial values.

    Returns (base, model, tokenize); tests save and reload such a model to check every tensor round-trips.
    """
    from peftclip.adapters.strategy import apply_strategy
    torch.manual_seed(seed)
    base = load_base()
    overrides = {"init_lora_weights": False} if spec.lora is not None else {}  # LoRA's B starts off zero
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer, **overrides)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return base, model, tokenize
