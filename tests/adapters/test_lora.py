"""LoRA through PEFT on split attention gives exactly W + B·A·alpha/r."""

from __future__ import annotations

import copy
from collections import OrderedDict

import peft
import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from torch.utils._python_dispatch import TorchDispatchMode

from peftclip.adapters.attention import convert_attention
from peftclip.adapters.lora import TARGETS, ClipLoraConfig, LeanLoraLinear, apply_lora, lora_target_names
from peftclip.adapters.lora_layer import keep_activation_inputs
from peftclip.models import load_base
from tests.conftest import image_batch, text_batch

TOL = 1e-5

LORA_CASES = [
    ClipLoraConfig(),
    ClipLoraConfig(towers=["vision"], target_modules=["q"], r=2, lora_alpha=3.0),
    ClipLoraConfig(towers=["text"], target_modules=["out"], r=8, lora_alpha=16.0),
    ClipLoraConfig(blocks=1, target_modules=["k", "v", "c_fc"], r=3, lora_alpha=5.0),
    ClipLoraConfig(blocks=[0, -1], target_modules=["out", "c_proj"]),
    ClipLoraConfig(target_modules=["qkv", "out", "c_fc", "c_proj"], r=3, lora_alpha=5.0),
    ClipLoraConfig(towers=["text"], blocks=1, target_modules=["qkv"], r=2, lora_alpha=3.0),
]


def _reference(converted, peft_model, config: ClipLoraConfig):
    """A plain copy of the converted base whose targeted weights are W + B·A·alpha/r."""
    reference = copy.deepcopy(converted)
    for name in lora_target_names(reference, config):
        layer = peft_model.get_base_model().get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            reference.get_submodule(name).weight += b @ a * (config.lora_alpha / config.r)
    return reference


@pytest.mark.parametrize("config", LORA_CASES, ids=repr)
def test_lora_outputs_equal_hand_built_reference(any_base, config):
    model = any_base.model
    convert_attention(model, True if "qkv" in config.target_modules else None)  # qkv: one fused q/k/v linear
    converted = copy.deepcopy(model)
    peft_model = apply_lora(model, config, init_lora_weights=False)  # non-zero B
    reference = _reference(converted, peft_model, config)
    images, texts = image_batch(model), text_batch(any_base)
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            got = getattr(peft_model, encode)(images if encode == "encode_image" else texts)
            want = getattr(reference, encode)(images if encode == "encode_image" else texts)
            base = getattr(converted, encode)(images if encode == "encode_image" else texts)
            assert torch.allclose(got, want, atol=TOL, rtol=0), f"{encode}: {(got - want).abs().max()}"
            tower = "vision" if encode == "encode_image" else "text"
            if tower in config.towers:
                assert not torch.allclose(got, base, atol=1e-4), f"{encode}: the adapter had no effect"


def _expected_count(width: int, mlp_width: int, n_blocks: int, config: ClipLoraConfig) -> int:
    """r·(in + out) for each targeted layer, written out from the architecture."""
    dims = {"q": (width, width), "k": (width, width), "v": (width, width), "out": (width, width),
            "c_fc": (width, mlp_width), "c_proj": (mlp_width, width), "qkv": (width, 3 * width)}
    per_block = sum(config.r * sum(dims[t]) for t in config.target_modules)
    blocks = n_blocks if config.blocks == "all" else (config.blocks if isinstance(config.blocks, int)
                                                       else len(set(i % n_blocks for i in config.blocks)))
    return per_block * blocks


# (model, tower) -> (width, mlp width, blocks), from the model configs.
ARCH = {
    ("peftclip-tiny", "vision"): (64, 256, 2), ("peftclip-tiny", "text"): (64, 256, 2),
    ("ViT-B-32", "vision"): (768, 3072, 12), ("ViT-B-32", "text"): (512, 2048, 12),
}


@pytest.mark.parametrize("config", LORA_CASES, ids=repr)
def test_trainable_parameter_count_matches_formula(any_base, config):
    name = any_base.info["model_name"]
    expected = sum(_expected_count(*ARCH[(name, tower)], config) for tower in config.towers)
    peft_model = apply_lora(any_base.model, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in n for n in trainable)


def test_lora_targets_only_named_blocks_and_projections(tiny_base):
    config = ClipLoraConfig(towers=["vision"], blocks=[1], target_modules=["q", "c_fc"])
    peft_model = apply_lora(tiny_base.model, config)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"visual.transformer.resblocks.1.attn.q_proj", "visual.transformer.resblocks.1.mlp.c_fc"}


INVALID_CONFIGS = [
    ({"r": 0}, "r=0"),
    ({"target_modules": ["qk"]}, "unknown LoRA target 'qk'"),
    ({"target_modules": ["qkv", "v"]}, "cannot be combined with ['v']"),
    ({"towers": ["audio"]}, "unknown tower 'audio'"),
    ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
    ({"blocks": "some"}, "blocks='some'"),
    ({"blocks": 0}, "blocks=0"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID_CONFIGS)
def test_invalid_config_is_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        ClipLoraConfig(**kwargs)


@pytest.mark.parametrize(("blocks", "message"), [([5], "block index 5 is out of range"), (3, "has only 2 blocks")])
def test_block_out_of_range_names_the_index(tiny_base, blocks, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny_base.model, ClipLoraConfig(blocks=blocks))


def test_towers_both_means_vision_and_text():
    assert ClipLoraConfig(towers="both").towers == ["vision", "text"]
    assert set(TARGETS) == {"q", "k", "v", "out", "c_fc", "c_proj"}


def test_peftclips_lora_config_never_shadows_peft_lora_config():
    import peft

    import peftclip
    from peftclip.adapters.lora import to_peft_config
    assert "LoraConfig" not in peftclip.__all__ and not hasattr(peftclip, "LoraConfig")
    namespace: dict = {}
    exec("from peft import *\nfrom peftclip import *", namespace)
    assert namespace["LoraConfig"] is peft.LoraConfig and namespace["ClipLoraConfig"] is peftclip.ClipLoraConfig
    base = load_base()
    assert isinstance(to_peft_config(base.model, peftclip.ClipLoraConfig(r=2)), peft.LoraConfig)


def _lora_linear(lean: bool, seed: int = 0):
    """One LoRA-wrapped linear (4 -> 6, r=2, non-zero B): peftclip's lean layer or PEFT's own."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    config = peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["0"], init_lora_weights=False)
    if lean:
        config._register_custom_module({torch.nn.Linear: LeanLoraLinear})
    return peft.get_peft_model(model, config).get_base_model()[0]


def test_lean_lora_linear_matches_peft_forward_and_gradients():
    x = torch.randn(3, 5, 4, requires_grad=True)
    outputs = []
    for lean in (True, False):
        layer = _lora_linear(lean)
        assert isinstance(layer, LeanLoraLinear) == lean
        y = layer(x)
        (grad_x,) = torch.autograd.grad((y * y).sum(), x, retain_graph=True)
        grad_a, grad_b = torch.autograd.grad((y * y).sum(), [layer.lora_A["default"].weight,
                                                              layer.lora_B["default"].weight])
        outputs.append((y, grad_x, grad_a, grad_b))
    for got, want in zip(*outputs):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


class _OutputSizedAllocations(TorchDispatchMode):
    """Counts the aten results of `numel` elements in new storage (views and in-place ops reuse their input's)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.count += out.untyped_storage().data_ptr() not in inputs
        return out


@pytest.mark.parametrize(("lean", "allocations"), [(True, 1), (False, 4)])
def test_lean_lora_linear_allocates_one_output_sized_tensor(lean, allocations):
    layer, x = _lora_linear(lean), torch.randn(3, 5, 4, requires_grad=True)
    with _OutputSizedAllocations(3 * 5 * 6) as counter:
        layer(x)
    assert counter.count == allocations  # PEFT: base output, B's product, its scaled copy, the sum


class _OpenClipMlp(torch.nn.Sequential):
    """open_clip's native block MLP: c_fc -> gelu -> c_proj."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__(OrderedDict(c_fc=torch.nn.Linear(4, 16), gelu=act, c_proj=torch.nn.Linear(16, 4)))


MLP_CASES = {  # name -> (module, LoRA targets)
    "open_clip gelu": (lambda: _OpenClipMlp(torch.nn.GELU()), ["c_fc", "c_proj"]),
    "open_clip gelu tanh": (lambda: _OpenClipMlp(torch.nn.GELU(approximate="tanh")), ["c_fc", "c_proj"]),
    "open_clip QuickGELU": (lambda: _OpenClipMlp(QuickGELU()), ["c_proj"]),
    "timm Mlp": (lambda: timm.layers.Mlp(4, 16, act_layer=torch.nn.GELU), ["fc1", "fc2"]),
    # GELU's output changed in place before c_proj: recomputing GELU would be wrong, the plain form runs
    "in-place op after gelu": (lambda: torch.nn.Sequential(OrderedDict(
        c_fc=torch.nn.Linear(4, 16), gelu=torch.nn.GELU(), relu=torch.nn.ReLU(inplace=True),
        c_proj=torch.nn.Linear(16, 4))), ["c_proj"]),
}


def _lora_mlp(case: str, lean: bool) -> torch.nn.Module:
    """One MLP with LoRA (r=2, non-zero B) on its targets: peftclip's lean layers or PEFT's own."""
    torch.manual_seed(0)
    build, targets = MLP_CASES[case]
    model = build()
    config = peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=targets, init_lora_weights=False)
    if lean:
        config._register_custom_module({torch.nn.Linear: LeanLoraLinear})
        keep_activation_inputs(model)
    return peft.get_peft_model(model, config).get_base_model()


@pytest.mark.parametrize("case", MLP_CASES)
def test_lora_after_an_activation_matches_peft_forward_and_gradients(case):
    """LoRA on the MLP's output layer keeps the activation's input and recomputes its output: PEFT's numbers."""
    x = torch.randn(3, 5, 4, requires_grad=True)
    outputs = []
    for lean in (True, False):
        model = _lora_mlp(case, lean)
        y = model(x)
        trained = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        outputs.append((y, *torch.autograd.grad((y * y).sum(), [x, *trained])))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _saved_bytes(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of both encoders."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.encode_image(images), model.encode_text(texts)
    return sum(saved.values())


def test_lora_keeps_no_more_than_the_floor_and_the_inputs_a_must_keep(tiny_base):
    """The frozen model whose first-block inputs need grad (the suite's LoRA floor) keeps F bytes; LoRA on qkv,
    out, c_fc and c_proj may add only the d-wide inputs of the first three A products and the r-wide A outputs:
    not c_proj's 4d-wide input, the GELU output, which it recomputes."""
    model, r = tiny_base.model, 8
    images, texts = image_batch(model, 8), text_batch(tiny_base)
    floor = copy.deepcopy(model)
    convert_attention(floor, True)
    floor.requires_grad_(False)
    for param in (floor.visual.positional_embedding, floor.positional_embedding):
        param.requires_grad_(True)
    config = ClipLoraConfig(target_modules=["qkv", "out", "c_fc", "c_proj"], r=r, lora_alpha=16.0)
    lora = apply_lora(model, config).get_base_model()
    width, blocks = model.transformer.width, len(model.transformer.resblocks)  # both towers: 64 wide, 2 blocks
    tokens = images.shape[0] * (model.visual.grid_size[0] ** 2 + 1) + texts.numel()
    unavoidable = blocks * tokens * (3 * width + 4 * r) * 4  # fp32
    assert model.visual.transformer.width == width and len(model.visual.transformer.resblocks) == blocks
    assert _saved_bytes(lora, images, texts) - _saved_bytes(floor, images, texts) <= unavoidable


def test_lora_recompute_is_exact_under_open_clips_grad_checkpointing(tiny_base):
    """open_clip's non-reentrant checkpointing replays the blocks' forwards: the same gradients as without it."""
    model = tiny_base.model
    lora = apply_lora(model, ClipLoraConfig(target_modules=["qkv", "out", "c_fc", "c_proj"]),
                      init_lora_weights=False).get_base_model()
    images = image_batch(model, 4)
    grads = []
    for checkpointing in (False, True):
        lora.set_grad_checkpointing(checkpointing)
        trained = [p for n, p in sorted(lora.named_parameters()) if p.requires_grad and n.startswith("visual.")]
        grads.append(torch.autograd.grad(lora.encode_image(images).square().sum(), trained))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
