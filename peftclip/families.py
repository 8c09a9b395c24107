"""One description per open_clip tower family: where its blocks, projections and norms are.

PEFT keeps one target-module mapping per model type; peftclip keeps one `TowerFamily` per
architecture a tower can have in open_clip (native ViT, timm ViT/EVA/ConvNeXt/FastViT/Swin,
ModifiedResNet, native text, Hugging Face text encoders). Strategies ask the registry where
things are instead of hard-coding `visual.transformer.resblocks`. Adding a family is one entry
in `FAMILIES`.

Paths in a family are relative to the tower module (`visual`, `text`, or the CLIP model itself
for open_clip's native text tower, whose parts live on the model). `blocks` lists the block
containers in forward order; a `*` in a path expands to every child, so stage-based trunks
(ConvNeXt, FastViT, Swin, ResNet) have their stages flattened and `--blocks` counts blocks
across stages. Shared LoRA target names (`q`, `k`, `v`, `out` for attention, `c_fc` / `c_proj`
for the MLP's input and output layers, open_clip's names) mean the same thing in every family;
a name mapping to several paths (SwiGLU's gate and value inputs) adapts all of them, and a
path a block lacks (FastViT's RepMixer blocks have no attention) is skipped for that block.

>>> import open_clip
>>> family_of(open_clip.create_model("ViT-B-32"), "vision").name  # random weights
'vit'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["FAMILIES", "TOWERS", "TowerFamily", "block_paths", "family_of", "final_norm_names", "projection_name",
           "tower_of", "tower_prefix"]

TOWERS = ("vision", "text")
# `qkv` is q, k and v in one linear (one A shared by the three), present when `convert_attention` runs with
# fused_qkv=True; `q`, `k`, `v` are the split linears it makes otherwise (see adapters/attention.py).
_ATTENTION = {"q": ("attn.q_proj",), "k": ("attn.k_proj",), "v": ("attn.v_proj",), "out": ("attn.out_proj",),
              "qkv": ("attn.qkv_proj",)}
_TIMM_ATTENTION = {"q": ("attn.qkv.q_proj", "attn.q_proj"), "k": ("attn.qkv.k_proj", "attn.k_proj"),
                   "v": ("attn.qkv.v_proj", "attn.v_proj"), "out": ("attn.proj",), "qkv": ("attn.qkv",)}
_TIMM_MLP = {"c_fc": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "mlp.w0", "mlp.w1"), "c_proj": ("mlp.fc2", "mlp.w2")}


@dataclass(frozen=True)
class TowerFamily:
    """How one architecture family lays out a tower, for every strategy that needs to find its parts."""

    name: str
    tower: str  # "vision" or "text"
    kinds: tuple[str, ...]  # what `_kind` returns for this family's tower module
    blocks: tuple[str, ...]  # block containers in forward order; "*" expands children (stages flattened)
    blocks_meaning: str  # what `--blocks` / `last_blocks` count in this family, for the docs
    targets: dict[str, tuple[str, ...]]  # LoRA target name -> candidate paths inside one block
    tower_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # LoRA targets outside the blocks
    projections: tuple[str, ...] = ()  # candidate paths of the output projection (parameter or module)
    final_norms: tuple[str, ...] = ()  # norms after the last block, trained with `final_norms`
    class_token: str | None = None  # class embedding / token embedding, for prompt methods

    @property
    def target_names(self) -> list[str]:
        return list(self.targets) + [t for t in self.tower_targets if t not in self.targets]


FAMILIES: tuple[TowerFamily, ...] = (
    TowerFamily("vit", "vision", ("VisionTransformer",), ("transformer.resblocks",), "residual blocks",
                {**_ATTENTION, "c_fc": ("mlp.c_fc",), "c_proj": ("mlp.c_proj",)},
                projections=("proj",), final_norms=("ln_post",), class_token="class_embedding"),
    TowerFamily("timm-vit", "vision", ("TimmModel:VisionTransformer", "TimmModel:VisionTransformerRelPos",
                                       "TimmModel:Eva"),
                ("trunk.blocks",), "transformer blocks", {**_TIMM_ATTENTION, **_TIMM_MLP},
                projections=("head.proj", "head.mlp", "trunk.head"), final_norms=("trunk.norm", "trunk.fc_norm"),
                class_token="trunk.cls_token"),
    TowerFamily("timm-swin", "vision", ("TimmModel:SwinTransformer",), ("trunk.layers.*.blocks",),
                "transformer blocks, stages flattened", {**_TIMM_ATTENTION, **_TIMM_MLP},
                projections=("head.proj", "head.mlp", "trunk.head.fc"), final_norms=("trunk.norm",)),
    TowerFamily("timm-convnext", "vision", ("TimmModel:ConvNeXt",), ("trunk.stages.*.blocks",),
                "ConvNeXt blocks, stages flattened", dict(_TIMM_MLP),
                projections=("head.proj", "head.mlp", "trunk.head.fc"), final_norms=("trunk.head.norm",)),
    TowerFamily("timm-fastvit", "vision", ("TimmModel:FastVit",), ("trunk.stages.*.blocks",),
                "RepMixer and attention blocks, stages flattened (q/k/v/out exist in attention blocks only)",
                {"q": ("token_mixer.qkv.q_proj",), "k": ("token_mixer.qkv.k_proj",), "v": ("token_mixer.qkv.v_proj",),
                 "out": ("token_mixer.proj",), "qkv": ("token_mixer.qkv",), "c_fc": ("mlp.fc1",),
                 "c_proj": ("mlp.fc2",)},
                projections=("head.proj", "head.mlp", "trunk.head.fc")),
    TowerFamily("resnet", "vision", ("ModifiedResNet",), ("layer1", "layer2", "layer3", "layer4"),
                "bottleneck blocks, stages flattened (the attention pool is adapted whatever --blocks says)",
                {"c_fc": ("conv1",), "conv2": ("conv2",), "c_proj": ("conv3",)},
                tower_targets={"q": ("attnpool.q_proj",), "k": ("attnpool.k_proj",), "v": ("attnpool.v_proj",),
                               "out": ("attnpool.c_proj",)},
                projections=("attnpool.c_proj",)),
    TowerFamily("text", "text", ("TextTransformer",), ("transformer.resblocks",), "residual blocks",
                {**_ATTENTION, "c_fc": ("mlp.c_fc",), "c_proj": ("mlp.c_proj",)},
                projections=("text_projection",), final_norms=("ln_final",), class_token="token_embedding"),
    TowerFamily("hf-roberta", "text", ("HFTextEncoder:roberta", "HFTextEncoder:xlm-roberta",
                                       "HFTextEncoder:bert"),
                ("transformer.encoder.layer",), "encoder layers",
                {"q": ("attention.self.query",), "k": ("attention.self.key",), "v": ("attention.self.value",),
                 "out": ("attention.output.dense",), "c_fc": ("intermediate.dense",), "c_proj": ("output.dense",)},
                projections=("proj",), class_token="transformer.embeddings.word_embeddings"),
    TowerFamily("hf-t5", "text", ("HFTextEncoder:mt5", "HFTextEncoder:t5"), ("transformer.block",),
                "encoder blocks",
                {"q": ("layer.0.SelfAttention.q",), "k": ("layer.0.SelfAttention.k",),
                 "v": ("layer.0.SelfAttention.v",), "out": ("layer.0.SelfAttention.o",),
                 "c_fc": ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"),
                 "c_proj": ("layer.1.DenseReluDense.wo",)},
                projections=("proj",), final_norms=("transformer.final_layer_norm",),
                class_token="transformer.embed_tokens"),
    TowerFamily("hf-m2m100", "text", ("HFTextEncoder:m2m_100",), ("transformer.layers",), "encoder layers",
                {"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
                 "out": ("self_attn.out_proj",), "c_fc": ("fc1",), "c_proj": ("fc2",)},
                projections=("proj",), final_norms=("transformer.layer_norm",),
                class_token="transformer.embed_tokens"),
)


_SHARED = ("logit_scale", "logit_bias")
_NO_TOWER = ("text_decoder.",)  # CoCa's captioning decoder: part of neither embedding tower


def tower_of(name: str) -> str | None:
    """'vision', 'text', or None (shared, e.g. logit_scale) for a parameter name of an unwrapped open_clip model.

    Everything outside `visual.` is the text tower's (open_clip's native text tower lives on the CLIP
    model itself); parameters that adapter methods add (`peftclip_*`) are their owners' to place.

    >>> tower_of("visual.conv1.weight"), tower_of("ln_final.bias"), tower_of("logit_scale")
    ('vision', 'text', None)
    """
    if name.startswith("visual."):
        return "vision"
    return None if name in _SHARED or name.startswith(_NO_TOWER) else "text"


def tower_prefix(model: nn.Module, tower: str) -> str:
    """'visual.', 'text.' or '' (open_clip's native text tower lives on the CLIP model itself)."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; choose from {list(TOWERS)}")
    if tower == "vision":
        return "visual."
    return "text." if isinstance(getattr(model, "text", None), nn.Module) else ""


def _kind(model: nn.Module, tower: str) -> str:
    prefix = tower_prefix(model, tower)
    if not prefix:
        return "TextTransformer" if hasattr(model, "token_embedding") else type(model).__name__
    module = model.get_submodule(prefix[:-1])
    name = type(module).__name__
    if name == "TimmModel":
        return f"{name}:{type(module.trunk).__name__}"
    if name == "HFTextEncoder":
        return f"{name}:{module.config.model_type}"
    return name


def family_of(model: nn.Module, tower: str) -> TowerFamily:
    """The registered family of `model`'s `tower`; a clear error for an architecture peftclip cannot adapt."""
    kind = _kind(model, tower)
    for family in FAMILIES:
        if family.tower == tower and kind in family.kinds:
            return family
    known = sorted(k for f in FAMILIES if f.tower == tower for k in f.kinds)
    raise ValueError(f"{type(model).__name__}: no peftclip family for its {tower} tower ({kind}); "
                     f"known {tower} towers: {known}")


def _expand(model: nn.Module, path: str) -> list[str]:
    """`path` with each '*' replaced by every child name, in order; paths that do not exist are dropped."""
    head, star, rest = path.partition("*")
    if not star:
        try:
            model.get_submodule(path)
        except AttributeError:
            return []
        return [path]
    parent = head.rstrip(".")
    try:
        children = [name for name, _ in model.get_submodule(parent).named_children()]
    except AttributeError:
        return []
    return [p for child in children for p in _expand(model, f"{head}{child}{rest}")]


def block_paths(model: nn.Module, tower: str) -> list[str]:
    """Full dotted names of every block of `tower`, in forward order, stages flattened."""
    family = family_of(model, tower)
    prefix = tower_prefix(model, tower)
    names = []
    for container in family.blocks:
        for path in _expand(model, prefix + container):
            names += [f"{path}.{child}" for child, _ in model.get_submodule(path).named_children()]
    if not names:
        raise ValueError(f"{type(model).__name__}: its {family.name} {tower} tower has no blocks "
                         f"(looked for {', '.join(prefix + b for b in family.blocks)})")
    return names


def _existing(model: nn.Module, names: list[str]) -> list[str]:
    """The names in `names` that are a parameter or a non-empty module of `model`."""
    found = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            try:
                model.get_parameter(name)
            except AttributeError:
                continue
            module = None
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and not len(module)):
            continue
        found.append(name)
    return found


def projection_name(model: nn.Module, tower: str) -> str | None:
    """Full name of `tower`'s output projection (a parameter or a module), or None when it has none."""
    family = family_of(model, tower)
    prefix = tower_prefix(model, tower)
    found = _existing(model, [prefix + p for p in family.projections])
    return found[0] if found else None


def final_norm_names(model: nn.Module, tower: str) -> list[str]:
    """Full names of the norms after `tower`'s last block."""
    family = family_of(model, tower)
    prefix = tower_prefix(model, tower)
    return _existing(model, [prefix + p for p in family.final_norms])


# Config-name fragments -> family, for counting open_clip's models without building them.
_TIMM_NAMES = (("convnext", "timm-convnext"), ("fastvit", "timm-fastvit"), ("swin", "timm-swin"))
_HF_NAMES = (("roberta", "hf-roberta"), ("t5", "hf-t5"), ("nllb", "hf-m2m100"), ("m2m", "hf-m2m100"))
_PARAMETER_PROJECTIONS = ("vit", "text")  # projections that are bare matrices, which new_proj_dim can resize
_NOTES = {("timm-vit", "visual prompt"): "✓ (not `vit_relpos_*`)",  # fixed-length relative position tables
          ("hf-t5", "text prompt"): "✓ (no tiny test)", ("hf-m2m100", "text prompt"): "✓ (no tiny test)"}


def _config_family(config: dict, tower: str) -> str | None:
    """The family an open_clip model config's `tower` belongs to, read from the config alone."""
    if tower == "vision":
        vision = config.get("vision_cfg", {})
        timm_name = vision.get("timm_model_name")
        if timm_name:
            return next((family for key, family in _TIMM_NAMES if key in timm_name), "timm-vit")
        return "resnet" if isinstance(vision.get("layers"), (list, tuple)) else "vit"
    hf_name = config.get("text_cfg", {}).get("hf_model_name")
    return next((family for key, family in _HF_NAMES if key in hf_name), None) if hf_name else "text"


def support_table() -> str:
    """The README's family × strategy table, in Markdown, generated from `FAMILIES` and open_clip's model list.

    Cells: ✓ applies, — refused with an error naming the family. The model-level strategies
    (full, logit scale and bias, head) apply whatever the towers are.

    >>> support_table().splitlines()[0].startswith("| Family ")
    True
    """
    import open_clip

    names: dict[str, list[str]] = {family.name: [] for family in FAMILIES}
    for name in open_clip.list_models():
        if name.startswith("peftclip-"):
            continue
        config = open_clip.get_model_config(name) or {}
        for tower in TOWERS:
            family = _config_family(config, tower)
            if family in names:
                names[family].append(name)
    rows = ["| Family | Tower | open_clip models | LoRA targets | freeze tower | projections | last blocks "
            "| new_proj_dim | text prompt | visual prompt |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        covered = names[family.name]
        examples = ", ".join(f"`{n}`" for n in sorted(covered)[:2]) + (", …" if len(covered) > 2 else "")
        prompt = family.class_token is not None
        cells = [f"`{family.name}`", family.tower, f"{len(covered)}: {examples}" if covered else "0",
                 ", ".join(f"`{t}`" for t in family.target_names), "✓", "✓" if family.projections else "—",
                 f"✓ ({family.blocks_meaning}{'; + final norms' if family.final_norms else ''})",
                 "✓" if family.name in _PARAMETER_PROJECTIONS else "—",
                 _NOTES.get((family.name, "text prompt"), "✓") if prompt and family.tower == "text" else "—",
                 _NOTES.get((family.name, "visual prompt"), "✓") if prompt and family.tower == "vision" else "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
