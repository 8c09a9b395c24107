"""Split open_clip's fused attention into plain q/k/v/out linear layers.

open_clip blocks use `nn.MultiheadAttention`, whose q, k and v weights live in one
fused `in_proj_weight` parameter. PEFT can only put LoRA on the fused module as a
whole, and PEFT 0.21 adds the `out_proj` update twice there (W + 2·BA·s). Replacing
each attention with `SplitMultiheadAttention`, which computes the same function
from four `nn.Linear` layers, lets PEFT target each projection as an ordinary
linear layer with exact LoRA math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitMultiheadAttention", "convert_attention"]


class SplitMultiheadAttention(nn.Module):
    """Drop-in replacement for `nn.MultiheadAttention` with separate q/k/v/out projections.

    Accepts the same call as `nn.MultiheadAttention` (additive float or boolean
    `attn_mask` of shape (L, S) or (B·heads, L, S), boolean `key_padding_mask`),
    returns `(output, None)`; attention weights are never materialised.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """Build a module computing exactly what `mha` computes, sharing no storage with it."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias=bias,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        factory = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        new.to(**factory)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3, dim=0)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        with torch.no_grad():
            for linear, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                linear.weight.copy_(weight)
                if b is not None:
                    linear.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.requires_grad_(mha.out_proj.weight.requires_grad)
        return new

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Merge both masks into one additive float mask broadcastable to (B, heads, L, S)."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MHA: True = not allowed
                attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
            mask = attn_mask.to(dtype)
            if mask.dim() == 3:  # (B·heads, L, S)
                mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
            if key_padding_mask.dtype == torch.bool:
                pad = pad.masked_fill(key_padding_mask, float("-inf"))
            else:
                pad = key_padding_mask.to(dtype)
            pad = pad.view(batch, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("SplitMultiheadAttention does not return attention weights")
        if not self.batch_first:  # (L, B, D) -> (B, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        # (B, L, D) -> (B, heads, L, head_dim)
        q = self.q_proj(query).view(batch, q_len, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, key.shape[1], heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, value.shape[1], heads, head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, batch, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def convert_attention(model: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` in `model` by an equivalent `SplitMultiheadAttention`.

    Returns the number of modules replaced (0 when `model` is already converted).

    >>> n = convert_attention(open_clip.create_model("ViT-B-32"))  # doctest: +SKIP
    >>> n
    24
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        split = SplitMultiheadAttention.from_mha(mha)
        split.train(mha.training)
        setattr(parent, child, split)
    return len(targets)
