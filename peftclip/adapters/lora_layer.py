"""peftclip's LoRA layer: PEFT's LoRA `Linear` with a forward that keeps less memory, exactly.

Two things a plain `result + lora_B(lora_A(x)) * scaling` pays for on every adapted layer:

- three activation-sized temporaries (B's product, its scaled copy, the sum), which on a CPU
  fragment glibc's heap: the update is added in place into the base output with one `addmm_`;
- the layer input `x`, kept by autograd for A's weight gradient. When `x` is the output of an
  elementwise activation whose backward keeps its own input anyway (the MLP's GELU before
  `c_proj`: open_clip's `c_fc -> gelu -> c_proj`, timm's `fc1 -> act -> fc2`), A keeps that
  input instead and recomputes the activation in the backward; the 4·d-wide GELU output is
  then kept by nothing. The activation module tags its output with its input through a
  forward hook (`keep_activation_inputs`), so the layer knows exactly when this applies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from peft.tuners.lora import Linear as _PeftLoraLinear
from timm.layers import activations as _timm
from torch import nn

__all__ = ["RECOMPUTABLE_ACTIVATIONS", "LeanLoraLinear", "keep_activation_inputs"]

# Deterministic elementwise activations whose backward keeps their input, so that their output can be
# recomputed from it for free in memory.
RECOMPUTABLE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, QuickGELU, _timm.GELU, _timm.GELUTanh,
                                                         _timm.QuickGELU)
_TAG = "_peftclip_activation_input"  # on an activation's output: (module, its input, the output's version)
_HOOKED = "_peftclip_keeps_input"  # on an activation module whose hook is registered


def _tag_output(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    # Only outputs that need grad: then the activation's backward keeps its input anyway, and the tag holds
    # nothing alive that autograd would not.
    if isinstance(output, torch.Tensor) and output.requires_grad and inputs and isinstance(inputs[0], torch.Tensor):
        setattr(output, _TAG, (module, inputs[0], output._version))


def keep_activation_inputs(model: nn.Module) -> None:
    """Make each activation of `model` in `RECOMPUTABLE_ACTIVATIONS` tag its output with its input (once).

    A `LeanLoraLinear` fed such an output keeps the activation's input for its A gradient
    instead of the output. Outputs that need no grad (`torch.no_grad()`, frozen inputs) are not tagged.
    """
    for module in model.modules():
        if isinstance(module, RECOMPUTABLE_ACTIVATIONS) and not getattr(module, _HOOKED, False):
            module.register_forward_hook(_tag_output)
            setattr(module, _HOOKED, True)


class _LinearOfActivation(torch.autograd.Function):
    """`x·Wᵀ` for `x = act(pre)` that keeps `pre`, not `x`, and recomputes `x` for W's gradient.

    `pre` is kept by `act`'s own backward anyway, so saving it costs no memory; the gradient for
    `x` flows on through `act`'s backward as usual (none is returned for `pre`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pre: torch.Tensor, weight: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(pre, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        pre, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[2]:
            with torch.no_grad():
                x = ctx.act.forward(pre)  # `forward`, not `__call__`: no hooks, no tag
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (r, in)
        return grad_x, None, grad_weight, None


class LeanLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA `Linear` with a leaner forward: the same outputs and gradients, less memory.

    PEFT computes `result + lora_B(lora_A(x)) * scaling`, which allocates three activation-sized
    buffers (B's product, the scaled copy, the sum) per adapted layer and step. On a CPU with
    glibc `malloc` these short-lived buffers, interleaved with the activations autograd keeps,
    fragment the heap: ViT-B-32 LoRA peaked ~2 GB above its floor. Adding `scaling · (A·x) Bᵀ`
    in place into the base output allocates none of them; autograd keeps the same tensors
    (neither the base product nor `addmm` saves its output). When `x` is a tagged activation
    output (`keep_activation_inputs`) and there is no LoRA dropout, A keeps the activation's
    input instead of `x` (see `_LinearOfActivation`). Anything else (DoRA and other variants,
    merged or disabled adapters, mixed-adapter batches, mixed dtypes, autocast) runs PEFT's
    forward. Registered through PEFT's custom-module hook, so saved adapters are plain PEFT LoRA.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if args or kwargs or not self._lean(x, active):
            return super().forward(x, *args, **kwargs)
        # On (tokens, features): the in-place update then lands on addmm's own output, not on a view of it,
        # which autograd would undo in the backward with an output-sized clone and copy (CopySlices).
        flat_x = x.reshape(-1, x.shape[-1])
        result = self.base_layer(flat_x)  # (tokens, out)
        if not result.is_contiguous():
            return super().forward(x)
        for name in active:
            h = self._lora_a(name, x, flat_x)  # (tokens, r)
            result.addmm_(h, self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def _lora_a(self, name: str, x: torch.Tensor, flat_x: torch.Tensor) -> torch.Tensor:
        """A·dropout(x) on `flat_x`, keeping the producing activation's input instead of `x` where that is exact."""
        tag, dropout, lora_a = getattr(x, _TAG, None), self.lora_dropout[name], self.lora_A[name]
        # The tag is the output's own; a version bump means something modified `x` in place since (inplace dropout).
        if tag is None or tag[2] != x._version or not isinstance(dropout, nn.Identity) or lora_a.bias is not None \
                or not torch.is_grad_enabled():
            return lora_a(dropout(flat_x))
        act, pre, _ = tag
        return _LinearOfActivation.apply(flat_x, pre, lora_a.weight, act)

    def _lean(self, x: torch.Tensor, active: list[str]) -> bool:
        """Whether the in-place form computes what PEFT's forward would: vanilla LoRA, one dtype, no autocast."""
        if self.disable_adapters or self.merged or torch.is_autocast_enabled(x.device.type):
            return False
        weights = [layer[a].weight for layer in (self.lora_A, self.lora_B) for a in active]
        return not any(a in self.lora_variant for a in active) and all(w.dtype == x.dtype for w in weights)
