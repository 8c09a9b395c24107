"""Runnable training recipes shipped with the package: `python -m peftclip.recipes.NAME` or `peftclip train NAME`."""

RECIPES = ("classify", "lora_retrieval")

__all__ = ["RECIPES"]
