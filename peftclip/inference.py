"""One frozen base, many LoRA adapters: switch per call, disable, merge, interpolate, export."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from .adapters.attention import SplitMultiheadAttention
from .io import AdapterError, _check_base, load_adapter, read_metadata
from .models import BaseModel

__all__ = ["AdaptedCLIP", "export_open_clip_state_dict"]


class AdaptedCLIP:
    """A base loaded once with any number of named LoRA adapters.

    >>> clip = AdaptedCLIP(load_base())  # doctest: +SKIP
    >>> clip.add_adapter("shapes", "outputs/lora_retrieval")  # doctest: +SKIP
    >>> with clip.using("shapes"):  # doctest: +SKIP
    ...     features = clip.model.encode_image(images)
    """

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model: nn.Module = base.model
        self.adapters: list[str] = []
        self.merged: str | None = None

    def add_adapter(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Attach the LoRA adapter in `adapter_dir` under `name` (checked like `load_adapter`)."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already attached")
        metadata = read_metadata(adapter_dir)
        if set(metadata["strategy"]) != {"lora"}:
            raise AdapterError(f"{adapter_dir}: only LoRA adapters can share one base at run time "
                               f"(this one has {sorted(metadata['strategy'])}); load it with load_adapter")
        if not self.adapters:
            self.model = load_adapter(self.base, adapter_dir, adapter_name=name)
        else:
            _check_base(Path(adapter_dir), metadata["base"], self.base.info)
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
        self.adapters.append(name)
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter."""
        self._require(name)
        self.model.set_adapter(name)

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; attached: {self.adapters or 'none'}")

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[nn.Module]:
        """Run a block with adapter `name` active, or with every adapter off when `name` is None."""
        if name is None:
            if not self.adapters:
                yield self.model
                return
            with self.model.disable_adapter():
                yield self.model
            return
        previous = self.model.active_adapter
        self.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)

    def set_scale(self, name: str, alpha: float) -> None:
        """Interpolate adapter `name` between the base (alpha=0) and itself (alpha=1), WiSE-FT style."""
        self._require(name)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: must be in [0, 1]")
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, alpha)

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights for zero-overhead inference."""
        self._require(name)
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged already; unmerge it first")
        self.model.base_model.merge_adapter([name])
        self.merged = name

    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weights."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self.model.base_model.unmerge_adapter()
        self.merged = None

    def export_merged(self, name: str, path: str | os.PathLike) -> Path:
        """Write base + adapter `name` as a plain open_clip checkpoint (`.safetensors`).

        It loads with `open_clip.create_model_and_transforms(model_name, pretrained=path)` and
        needs nothing from peftclip.
        """
        self._require(name)
        self.merge(name)
        try:
            state = export_open_clip_state_dict(self.model.get_base_model())
        finally:
            self.unmerge()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(state, tmp)
        os.replace(tmp, path)
        return path


def export_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's own state dict layout for a converted (and maybe LoRA-wrapped, merged) model.

    Split attention goes back to fused `in_proj_weight`/`in_proj_bias`; PEFT wrappers are
    looked through to their (merged) base layers; LoRA and peftclip-only tensors are dropped.
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitMultiheadAttention):
            linears = [getattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            layers = [getattr(layer, "base_layer", layer) for layer in linears]
            state[f"{name}.in_proj_weight"] = torch.cat([lin.weight for lin in layers[:3]])
            if layers[0].bias is not None:
                state[f"{name}.in_proj_bias"] = torch.cat([lin.bias for lin in layers[:3]])
                state[f"{name}.out_proj.bias"] = layers[3].bias
            state[f"{name}.out_proj.weight"] = layers[3].weight
    attention = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, SplitMultiheadAttention))
    for key, tensor in model.state_dict().items():
        if key.startswith(attention) or "lora_" in key or key.startswith("peftclip_"):
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    # Copies, not views: the caller may unmerge the live weights before writing these out.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
