"""Classification with an open_clip model: zero-shot evaluation → adaptation → evaluation.

A thin script over `peftclip.recipes.classify` (also `python -m peftclip.recipes.classify` or
`peftclip train classify`); copy the package module to change what the recipe does.
"""

from peftclip.recipes.classify import main

if __name__ == "__main__":
    main()
