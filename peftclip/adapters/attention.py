"""Split fused attention projections into plain q/k/v/out linear layers, output for output.

open_clip blocks use `nn.MultiheadAttention`, whose q, k and v weights live in one
fused `in_proj_weight` parameter. PEFT can only put LoRA on the fused module as a
whole, and PEFT 0.21 adds the `out_proj` update twice there (W + 2·BA·s). Replacing
each attention with `SplitMultiheadAttention`, which computes the same function
from four `nn.Linear` layers, lets PEFT target each projection as an ordinary
linear layer with exact LoRA math.

timm's attention (ViT, SigLIP, EVA, Swin, FastViT) keeps q, k and v in one `qkv`
linear that its forward only ever calls (`self.qkv(x)`); `SplitQKV` replaces it by
three linears whose outputs are concatenated, so LoRA on `q` adapts q alone, as in
the native ViT. EVA's separate `q_bias`/`v_bias` (which make its forward call
`F.linear` on `qkv.weight` directly) are folded into the split biases. open_clip's
ResNet `AttentionPool2d` passes its weights to `F.multi_head_attention_forward`
directly; `SplitAttentionPool2d` calls its linears instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPLIT_MODULES", "SplitAttentionPool2d", "SplitMultiheadAttention", "SplitQKV", "convert_attention"]


def _base(layer: nn.Module) -> nn.Module:
    """The layer itself, or the (possibly merged) base layer a PEFT wrapper holds."""
    return getattr(layer, "base_layer", layer)


def _uninitialized(build: Callable[[], nn.Module], like: torch.Tensor) -> nn.Module:
    """`build()` with uninitialised storage on `like`'s device and dtype: its weights are copied in next,
    so running the default init (slow for large layers, and done on the CPU even for a meta model) is waste."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=like.device).to(like.dtype)


class SplitMultiheadAttention(nn.Module):
    """Drop-in replacement for `nn.MultiheadAttention` with separate q/k/v/out projections.

    Accepts the same call as `nn.MultiheadAttention` (additive float or boolean
    `attn_mask` of shape (L, S) or (B·heads, L, S), boolean `key_padding_mask`),
    returns `(output, None)`; attention weights are never materialised. With `fused_qkv`, q, k and v
    come from one `qkv_proj` linear (D -> 3D) whose output is split: one product instead of three,
    and LoRA on it is W_qkv + B·A·alpha/r with one A shared by q, k and v (self-attention only).
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False, fused_qkv: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        if fused_qkv:
            if (kdim or embed_dim) != embed_dim or (vdim or embed_dim) != embed_dim:
                raise ValueError(f"fused_qkv needs kdim == vdim == embed_dim, got {kdim}, {vdim}, {embed_dim}")
            self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
            self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @property
    def fused_qkv(self) -> bool:
        return hasattr(self, "qkv_proj")

    @classmethod
    def from_mha(cls, mha: nn.Module, fused_qkv: bool = False) -> "SplitMultiheadAttention":
        """Build a module computing exactly what `mha` (an `nn.MultiheadAttention`, or a split one in either
        form, not PEFT-wrapped) computes, sharing no storage with it."""
        if isinstance(mha, cls):
            weights, biases = mha._projections()
            dims = (mha.embed_dim, mha.num_heads, weights[1].shape[1], weights[2].shape[1], biases[3] is not None,
                    mha.dropout, mha.batch_first)
        else:
            if mha.bias_k is not None or mha.add_zero_attn:
                raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
            if mha._qkv_same_embed_dim:
                weights = (*mha.in_proj_weight.chunk(3, dim=0), mha.out_proj.weight)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight)
            bias = mha.in_proj_bias is not None
            biases = (*mha.in_proj_bias.chunk(3), mha.out_proj.bias) if bias else (None,) * 4
            dims = (mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        new = _uninitialized(lambda: cls(*dims, fused_qkv=fused_qkv), weights[3])
        targets = [new.qkv_proj] * 3 if fused_qkv else [new.q_proj, new.k_proj, new.v_proj]
        rows = [slice(i * new.embed_dim, (i + 1) * new.embed_dim) if fused_qkv else slice(None) for i in range(3)]
        with torch.no_grad():
            for linear, part, weight, b in zip(targets + [new.out_proj], rows + [slice(None)], weights, biases):
                linear.weight[part].copy_(weight)
                if b is not None:
                    linear.bias[part].copy_(b)
        new.requires_grad_(weights[3].requires_grad)
        return new

    def _projections(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """(q, k, v, out) weights and biases, looking through PEFT wrappers to their (merged) base layers."""
        out = _base(self.out_proj)
        if self.fused_qkv:
            qkv = _base(self.qkv_proj)
            biases = qkv.bias.chunk(3) if qkv.bias is not None else (None,) * 3
            return (*qkv.weight.chunk(3), out.weight), (*biases, out.bias)
        q, k, v = (_base(getattr(self, p)) for p in ("q_proj", "k_proj", "v_proj"))
        return (q.weight, k.weight, v.weight, out.weight), (q.bias, k.bias, v.bias, out.bias)

    def open_clip_state(self, name: str) -> dict[str, torch.Tensor]:
        """This module's weights as the `nn.MultiheadAttention` at `name` held them (fused in_proj)."""
        weights, biases = self._projections()
        state = {f"{name}.in_proj_weight": torch.cat(weights[:3]), f"{name}.out_proj.weight": weights[3]}
        if biases[0] is not None:
            state[f"{name}.in_proj_bias"] = torch.cat(biases[:3])
            state[f"{name}.out_proj.bias"] = biases[3]
        return state

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
        if self.fused_qkv and not query is key is value:
            raise ValueError("a fused qkv_proj computes self-attention only (query is key is value); "
                             "convert with fused_qkv=False for cross-attention")
        if not self.batch_first:  # (L, B, D) -> (B, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        if self.fused_qkv:  # self-attention: query is key is value
            q, k, v = self.qkv_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        # (B, L, D) -> (B, heads, L, head_dim)
        q = q.view(batch, q_len, heads, head_dim).transpose(1, 2)
        k = k.view(batch, key.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(batch, value.shape[1], heads, head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, batch, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class SplitQKV(nn.Module):
    """Three linears standing in for a fused `qkv` linear: `forward(x)` is `cat(q(x), k(x), v(x))`."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                 separate_biases: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        # EVA keeps its biases beside a bias-free `qkv` ("q_bias", "v_bias"); empty for a fused `qkv.bias`.
        self.separate_biases = separate_biases

    @classmethod
    def from_fused(cls, qkv: nn.Linear, biases: tuple[torch.Tensor | None, ...] = (None, None, None)) -> "SplitQKV":
        """Split `qkv` into three equal linears; `biases` (EVA's q/k/v_bias) replace the fused bias when given."""
        dim = qkv.out_features // 3
        has_bias = qkv.bias is not None or any(b is not None for b in biases)
        factory = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        linears = [_uninitialized(lambda: nn.Linear(qkv.in_features, dim, bias=has_bias), qkv.weight) for _ in range(3)]
        fused_bias = qkv.bias.detach().chunk(3) if qkv.bias is not None else (None, None, None)
        with torch.no_grad():
            for i, linear in enumerate(linears):
                linear.weight.copy_(qkv.weight[i * dim:(i + 1) * dim])
                bias = biases[i] if biases[i] is not None else fused_bias[i]
                if has_bias:
                    linear.bias.copy_(bias if bias is not None else torch.zeros(dim, **factory))
                linear.requires_grad_(qkv.weight.requires_grad)
        return cls(*linears)

    def to_fused(self) -> nn.Linear:
        """The fused `qkv` linear this module was split from (EVA's separate biases cannot go back into one)."""
        if self.separate_biases:
            raise ValueError(f"EVA attention keeps {self.separate_biases} beside a bias-free qkv linear: its q, k "
                             f"and v cannot be fused back; target q, k and v instead of qkv")
        layers = [self.q_proj, self.k_proj, self.v_proj]
        has_bias = layers[0].bias is not None
        fused = _uninitialized(lambda: nn.Linear(layers[0].in_features, 3 * layers[0].out_features, bias=has_bias),
                               layers[0].weight)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
            if has_bias:
                fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
        return fused.requires_grad_(layers[0].weight.requires_grad)

    def open_clip_state(self, name: str) -> dict[str, torch.Tensor]:
        """This module's weights as the fused `qkv` linear at `name` (and EVA's biases beside it) held them."""
        layers = dict(zip("qkv", (_base(p) for p in (self.q_proj, self.k_proj, self.v_proj))))
        state = {f"{name}.weight": torch.cat([layer.weight for layer in layers.values()])}
        if self.separate_biases:
            owner = name.rpartition(".")[0]
            state.update({f"{owner}.{bias}": layers[bias[0]].bias for bias in self.separate_biases})
        elif layers["q"].bias is not None:
            state[f"{name}.bias"] = torch.cat([layer.bias for layer in layers.values()])
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class SplitAttentionPool2d(nn.Module):
    """open_clip's ResNet `AttentionPool2d` computed by calling its q/k/v/c linears (same parameters, same names)."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.positional_embedding = pool.positional_embedding
        self.k_proj, self.q_proj, self.v_proj, self.c_proj = pool.k_proj, pool.q_proj, pool.v_proj, pool.c_proj
        self.num_heads = pool.num_heads

    def open_clip_state(self, name: str) -> dict[str, torch.Tensor]:
        """This module's weights as the `AttentionPool2d` at `name` held them (the same names)."""
        state = {f"{name}.positional_embedding": self.positional_embedding}
        for projection in ("k_proj", "q_proj", "v_proj", "c_proj"):
            layer = _base(getattr(self, projection))
            state.update({f"{name}.{projection}.{k}": t for k, t in layer.named_parameters(recurse=False)})
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        heads = self.num_heads
        # Only the mean token's output is kept, so only its query is computed: (N, heads, 1 | L, head_dim).
        q = self.q_proj(x[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, width)
        return self.c_proj(out)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_unwrapped(name: str, module: nn.Module, fused_qkv: bool) -> None:
    """Refuse to re-form attention whose q/k/v projections already carry adapters (PEFT wrappers)."""
    if any(hasattr(m, "base_layer") for m in module.modules()):
        form, other = ("fused qkv", "split q, k, v") if fused_qkv else ("split q, k, v", "fused qkv")
        raise ValueError(f"{name}: an adapter needs {form} projections, but this model's attention already holds "
                         f"adapters on {other}; attach them to separate models")


def _split_fused_qkv(model: nn.Module, fused_qkv: bool | None) -> int:
    """Replace every attention's fused `qkv` linear (timm's layout) by a `SplitQKV`, or back with `fused_qkv`."""
    if fused_qkv:
        for name, m in model.named_modules():
            if isinstance(getattr(m, "qkv", None), nn.Linear) and any(getattr(m, f"{x}_bias", None) is not None
                                                                      for x in "qkv"):
                raise ValueError(f"{name}: EVA attention adds separate q/v biases to a bias-free qkv linear, so "
                                 f"LoRA on qkv would be bypassed; target q, k and v instead of qkv")
        split = [(n, m) for n, m in model.named_modules() if isinstance(m, SplitQKV)]
        for name, module in split:
            _check_unwrapped(name, module, fused_qkv)
            _replace(model, name, module.to_fused())
        return len(split)
    owners = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
    if fused_qkv is None and any(hasattr(getattr(m, "qkv"), "base_layer") for _, m in owners):
        return 0  # fused and adapted: keep the form the adapters were attached to
    for name, owner in owners:
        biases = tuple(getattr(owner, f"{x}_bias", None) for x in "qkv")
        saved = tuple(k for k in owner.state_dict(keep_vars=True) if k in ("q_bias", "k_bias", "v_bias"))
        owner.qkv = SplitQKV.from_fused(owner.qkv, tuple(None if b is None else b.detach() for b in biases))
        owner.qkv.separate_biases = saved  # EVA's k_bias is a zero buffer left out of checkpoints
        for x in "qkv":  # folded into the split biases; None makes EVA's forward call self.qkv(x)
            if getattr(owner, f"{x}_bias", None) is not None:
                setattr(owner, f"{x}_bias", None)
    return len(owners)


def convert_attention(model: nn.Module, fused_qkv: bool | None = None) -> int:
    """Make every attention projection in `model` a plain linear layer, computing the same outputs.

    Replaces each `nn.MultiheadAttention` by a `SplitMultiheadAttention`, each fused timm `qkv`
    linear by a `SplitQKV`, and open_clip's ResNet `AttentionPool2d` by a `SplitAttentionPool2d`.
    `fused_qkv=True` keeps q, k and v in one linear instead (`qkv_proj`, timm's own `qkv`), the
    layer the `qkv` LoRA target adapts; False splits them; None (the default) keeps a converted
    model's form and splits an unconverted one. Re-forming attention that already carries
    adapters is refused. Returns the number of modules replaced (0 when nothing changed).

    >>> import open_clip
    >>> n = convert_attention(open_clip.create_model("ViT-B-32"))  # random weights
    >>> n
    24
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.MultiheadAttention) or (isinstance(module, SplitMultiheadAttention)
                                                                and fused_qkv not in (None, module.fused_qkv))]
    for name, mha in targets:
        _check_unwrapped(name, mha, bool(fused_qkv))
        split = SplitMultiheadAttention.from_mha(mha, bool(fused_qkv))
        split.train(mha.training)
        _replace(model, name, split)
    pools = [(name, module) for name, module in model.named_modules() if type(module).__name__ == "AttentionPool2d"]
    for name, pool in pools:
        _replace(model, name, SplitAttentionPool2d(pool).train(pool.training))
    return len(targets) + len(pools) + _split_fused_qkv(model, fused_qkv)


# Every module `convert_attention` puts in; each writes back its original layout with `open_clip_state`.
SPLIT_MODULES = (SplitMultiheadAttention, SplitQKV, SplitAttentionPool2d)
