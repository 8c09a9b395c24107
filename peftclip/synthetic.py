"""A generated image–caption task (coloured shapes), so the built-in recipe runs offline."""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["default_data_dir", "make_shapes_dataset"]

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
           "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72)}
SIZES = {"small": 0.16, "large": 0.3}
_PHRASES = ("a {size} {colour} {shape} in the {position}", "a {colour} {shape} at the {position} of the picture",
            "{position}: a {size} {colour} {shape}")


def default_data_dir() -> Path:
    """Where the built-in task is generated: `$PEFTCLIP_CACHE/shapes-v2` (default `~/.cache/peftclip`)."""
    return Path(os.environ.get("PEFTCLIP_CACHE", Path.home() / ".cache" / "peftclip")) / "shapes-v2"


def _draw(colour: str, shape: str, position: str, size: str, image_size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(20, 90) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * image_size + rng.uniform(-2, 2) for c in POSITIONS[position])
    r = SIZES[size] * image_size * rng.uniform(0.9, 1.1)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def make_shapes_dataset(root: str | os.PathLike, n_images: int = 600, seed: int = 0, image_size: int = 64) -> Path:
    """Write an image folder with `metadata.csv` (file_name, caption; 3 phrasings per image)
    and `labels.csv` (file_name, label: "<colour> <shape>", for classification).

    Each image holds one filled shape whose colour, kind, position and size vary at random
    (seeded). An existing complete folder is reused; a new one is built under a temporary
    name and renamed into place.

    >>> make_shapes_dataset("/tmp/shapes", n_images=10)  # doctest: +SKIP
    """
    root = Path(root)
    if (root / "metadata.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        (tmp / "images").mkdir()
        rng = random.Random(seed)
        rows, labels = [], []
        for index in range(n_images):
            attrs = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES),
                     "position": rng.choice(list(POSITIONS)), "size": rng.choice(list(SIZES))}
            name = f"images/{index:05d}.png"
            _draw(**attrs, image_size=image_size, rng=rng).save(tmp / name)
            rows += [(name, phrase.format(**attrs)) for phrase in _PHRASES]
            labels.append((name, f"{attrs['colour']} {attrs['shape']}"))
        for file_name, header, content in (("labels.csv", "label", labels), ("metadata.csv", "caption", rows)):
            with open(tmp / file_name, "w", newline="") as f:  # metadata.csv last: it marks completion
                writer = csv.writer(f)
                writer.writerow(["file_name", header])
                writer.writerows(content)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "metadata.csv").is_file():
            raise
        # another process finished first; use its folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
