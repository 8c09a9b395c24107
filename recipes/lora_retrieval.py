"""Retrieval fine-tuning of an open_clip model on image–caption pairs; LoRA by default.

A thin script over `peftclip.recipes.lora_retrieval` (also `python -m peftclip.recipes.lora_retrieval` or
`peftclip train lora_retrieval`); copy the package module to change what the recipe does.
"""

from peftclip.recipes.lora_retrieval import main

if __name__ == "__main__":
    main()
