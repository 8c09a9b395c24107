"""A generated image–caption task (coloured shapes), so the built-in recipes run offline."""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from .utils import cache_root, default_mode

__all__ = ["default_data_dir", "make_shapes_dataset"]

VERSION = "shapes-v3"  # the cache folder's name: bump it whenever the generated content changes
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
SIZES = {"small": 0.11, "large": 0.21}  # radius as a share of the side: a large shape stays in its quadrant
PHRASES = ("a {size} {colour} {shape} in the {position}", "a {colour} {shape} at the {position} of the picture",
           "{position}: a {size} {colour} {shape}", "a picture with a {size} {colour} {shape} towards the {position}")


def default_data_dir() -> Path:
    """Where the built-in task is generated: `cache_root()/<VERSION>`."""
    return cache_root() / VERSION


def _draw(colour: str, shape: str, position: str, size: str, image_size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(20, 90) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = ((c + rng.uniform(-0.03, 0.03)) * image_size for c in POSITIONS[position])
    r = SIZES[size] * image_size * rng.uniform(0.9, 1.1)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def _write_shapes(folder: Path, n_images: int, seed: int, image_size: int) -> None:
    """Draw `folder/images/*.png`, then write labels.csv and, last as it marks completion, metadata.csv."""
    (folder / "images").mkdir()
    rng = random.Random(seed)
    captions, labels = [], []
    for index in range(n_images):
        attrs = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES),
                 "position": rng.choice(list(POSITIONS)), "size": rng.choice(list(SIZES))}
        name = f"images/{index:05d}.png"
        _draw(**attrs, image_size=image_size, rng=rng).save(folder / name)
        captions += [(name, phrase.format(**attrs)) for phrase in rng.sample(PHRASES, rng.choice((2, 3)))]
        labels.append((name, f"{attrs['colour']} {attrs['shape']}"))
    for file_name, header, rows in (("labels.csv", "label", labels), ("metadata.csv", "caption", captions)):
        with open(folder / file_name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", header])
            writer.writerows(rows)


def make_shapes_dataset(root: str | os.PathLike, n_images: int = 600, seed: int = 0, image_size: int = 64) -> Path:
    """Write an image folder in Hugging Face imagefolder layout, or reuse a complete one.

    `metadata.csv` has columns file_name (`images/00000.png`, ...) and caption, with 2 or 3
    phrasings per image; `labels.csv` has file_name and label ("<colour> <shape>", for
    classification). Each image holds one filled shape whose colour, kind, position and size
    are drawn at random (seeded: the same arguments give the same bytes). A new folder is built
    under a temporary name and renamed into place, so a half-written one is never reused.

    Args:
        root: the folder to create; returned as is when it already holds `metadata.csv`.
        n_images: how many images.
        seed: seed of the attributes and the drawing jitter.
        image_size: side of the square PNGs in pixels.

    >>> make_shapes_dataset("shapes", n_images=10)
    PosixPath('shapes')
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images!r}: must be at least 1")
    if image_size < 16:
        raise ValueError(f"image_size={image_size!r}: must be at least 16 pixels")
    root = Path(root)
    if (root / "metadata.csv").is_file():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists but holds no metadata.csv; remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _write_shapes(tmp, n_images, seed, image_size)
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp creates it 0700
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
