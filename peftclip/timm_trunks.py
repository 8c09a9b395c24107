"""Shrunk timm image trunks, registered with timm so tiny open_clip configs can name them.

open_clip builds a timm tower from `vision_cfg.timm_model_name` alone (no width or depth
kwargs), so each tiny trunk is a timm entrypoint: the real family's entrypoint with a
32 px input, two blocks and a narrow width. The `peftclip-tiny-<family>.json` configs in
`model_configs/` name them; they have no pretrained weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["TINY_TRUNKS"]

# timm entrypoint name -> (the real family's entrypoint, the architecture arguments that shrink it)
TINY_TRUNKS: dict[str, tuple[str, dict[str, Any]]] = {
    "peftclip_tiny_vit_siglip": ("vit_base_patch16_siglip_224",
                                 dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "peftclip_tiny_eva02": ("eva02_tiny_patch14_224",
                            dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, ref_feat_shape=(4, 4))),
    "peftclip_tiny_convnext": ("convnext_atto", dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))),
}


def _register() -> None:
    try:
        import timm
        from timm.models import register_model
    except ImportError:  # timm is optional for open_clip; the tiny timm configs then fail with open_clip's message
        return
    for name, (family, shrink) in TINY_TRUNKS.items():
        if timm.is_model(name):
            continue

        def entrypoint(pretrained: bool = False, _family: str = family, _shrink: dict = shrink, **kwargs) -> nn.Module:
            if pretrained:
                raise ValueError(f"tiny timm trunk of {_family} has no pretrained weights: set timm_model_pretrained "
                                 f"to false")
            return timm.create_model(_family, pretrained=False, **{**_shrink, **kwargs})

        entrypoint.__name__ = name
        entrypoint.__module__ = __name__
        register_model(entrypoint)


_register()
