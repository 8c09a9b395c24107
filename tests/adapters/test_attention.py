"""SplitMultiheadAttention computes exactly what nn.MultiheadAttention computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftclip.adapters.attention import SplitMultiheadAttention, convert_attention
from tests.conftest import image_batch, text_batch

TOL = 1e-5


def test_converted_base_matches_original(any_base):
    model = any_base.model
    images, texts = image_batch(model), text_batch(any_base)
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
        convert_attention(model)
        after = model.encode_image(images), model.encode_text(texts)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    for tower, (b, a) in zip(("vision", "text"), zip(before, after)):
        assert torch.allclose(b, a, atol=TOL, rtol=0), f"{tower} tower differs by {(b - a).abs().max()}"


def test_convert_counts_every_block_and_is_idempotent(any_base):
    model = any_base.model
    n_blocks = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    assert convert_attention(model) == n_blocks
    assert convert_attention(model) == 0


MASK_CASES = [
    # (batch_first, mask kind)
    (True, None),
    (True, "causal_float"),
    (True, "bool"),
    (True, "per_head"),
    (True, "key_padding"),
    (False, "causal_float"),
]


@pytest.mark.parametrize(("batch_first", "mask_kind"), MASK_CASES)
def test_split_attention_matches_mha_with_masks(batch_first, mask_kind):
    torch.manual_seed(0)
    batch, length, dim, heads = 3, 7, 16, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first).eval()
    split = SplitMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(batch, length, dim) if batch_first else torch.randn(length, batch, dim)
    kwargs = {}
    if mask_kind == "causal_float":
        kwargs["attn_mask"] = torch.full((length, length), float("-inf")).triu(1)
    elif mask_kind == "bool":
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif mask_kind == "per_head":
        kwargs["attn_mask"] = torch.randn(batch * heads, length, length)
    elif mask_kind == "key_padding":
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[:, -2:] = True
        kwargs["key_padding_mask"] = pad
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, **kwargs)[0]
        actual = split(x, x, x, need_weights=False, **kwargs)[0]
    assert torch.allclose(expected, actual, atol=TOL, rtol=0)


def test_split_attention_gradients_flow_to_each_projection():
    split = SplitMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    split(x, x, x)[0].sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(split, name).weight.grad.abs().sum() > 0, name


def test_bias_kv_is_refused():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        SplitMultiheadAttention.from_mha(mha)
