"""The generated shapes task: deterministic, cached, captions that describe the picture, loadable."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import peftclip.synthetic
from peftclip.data import DataConfig, load_labelled, load_pairs
from peftclip.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    VERSION,
    default_data_dir,
    make_shapes_dataset,
)

N_IMAGES = 40
AREA_PER_RADIUS_SQUARED = {"circle": math.pi, "square": 4.0, "triangle": 2.0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=N_IMAGES)


@pytest.fixture(scope="module")
def default_sized(tmp_path_factory):
    """The default 600-image task and the seconds it took to build."""
    start = time.perf_counter()
    root = make_shapes_dataset(tmp_path_factory.mktemp("default") / "shapes")
    return root, time.perf_counter() - start


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _grouped(root):
    grouped = {}
    for file_name, caption in _read(root / "metadata.csv")[1:]:
        grouped.setdefault(file_name, []).append(caption)
    return grouped


def test_layout_is_an_imagefolder_with_two_or_three_phrasings_per_image(shapes):
    assert _read(shapes / "metadata.csv")[0] == ["file_name", "caption"]
    grouped = _grouped(shapes)
    assert list(grouped) == [f"images/{i:05d}.png" for i in range(N_IMAGES)]
    assert all((shapes / name).is_file() for name in grouped)
    assert all(len(set(captions)) == len(captions) in (2, 3) for captions in grouped.values())
    assert {len(captions) for captions in grouped.values()} == {2, 3}


def test_captions_and_labels_describe_the_drawn_shape(shapes):
    labels = dict(_read(shapes / "labels.csv")[1:])
    assert len(labels) == N_IMAGES
    for name, captions in _grouped(shapes).items():
        colour, shape = labels[name].split(" ")
        position = next(p for p in POSITIONS if p in captions[0])
        size = next(s for s in SIZES if s in " ".join(captions))
        assert all(colour in c and shape in c and position in c for c in captions)
        image = Image.open(shapes / name)
        centre = tuple(round(c * image.width) for c in POSITIONS[position])
        assert image.getpixel(centre) == COLOURS[colour], (name, captions[0])
        area = (np.asarray(image) == COLOURS[colour]).all(axis=-1).sum()
        radius = SIZES[size] * image.width  # drawn with a random factor in [0.9, 1.1]
        assert 0.7 < area / (AREA_PER_RADIUS_SQUARED[shape] * radius**2) < 1.5, (name, captions[0])


def test_the_default_size_builds_in_under_five_seconds_and_covers_every_attribute(default_sized):
    root, seconds = default_sized
    assert seconds < 5 and len(_grouped(root)) == 600
    text = " | ".join(caption for _, caption in _read(root / "metadata.csv")[1:])
    for values in (COLOURS, SHAPES, POSITIONS, SIZES):
        assert all(value in text for value in values), values


@pytest.mark.parametrize(("seed", "same"), [(0, True), (1, False)])
def test_same_seed_gives_the_same_bytes(shapes, tmp_path, seed, same):
    again = make_shapes_dataset(tmp_path / "again", n_images=N_IMAGES, seed=seed)
    for name in ("metadata.csv", "labels.csv", "images/00007.png"):
        assert ((again / name).read_bytes() == (shapes / name).read_bytes()) is same, name


def test_a_complete_folder_is_reused_without_rewriting(tmp_path, monkeypatch):
    root = make_shapes_dataset(tmp_path / "shapes", n_images=5)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(peftclip.synthetic, "_write_shapes", must_not_run)
    assert make_shapes_dataset(tmp_path / "shapes", n_images=50, seed=3) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_draw(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peftclip.synthetic, "_draw", broken_draw)
    with pytest.raises(OSError, match="disk full"):
        make_shapes_dataset(tmp_path / "shapes", n_images=3)
    assert list(tmp_path.iterdir()) == []


def test_a_new_build_leaves_only_the_folder(tmp_path):
    make_shapes_dataset(tmp_path / "shapes", n_images=3)
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"n_images": 0}, ValueError, "n_images=0: must be at least 1"),
    ({"image_size": 8}, ValueError, "image_size=8: must be at least 16 pixels"),
    ({"occupied": True}, FileExistsError, "exists but holds no metadata.csv"),
])
def test_bad_arguments_and_occupied_folders_are_refused(tmp_path, kwargs, error, message):
    if kwargs.pop("occupied", False):
        (tmp_path / "shapes").mkdir()
        (tmp_path / "shapes" / "notes.txt").write_text("mine")
    with pytest.raises(error, match=message):
        make_shapes_dataset(tmp_path / "shapes", **kwargs)


def test_loads_through_load_pairs_and_load_labelled(shapes):
    train, val = load_pairs(DataConfig(source=str(shapes), val_fraction=0.25))
    assert (len(train.images), len(val.images)) == (30, 10)
    assert all(len(c) in (2, 3) for c in train.captions + val.captions)
    train, test = load_labelled(DataConfig(source=str(shapes / "labels.csv"), val_fraction=0.25))
    assert len(train.images) + len(test.images) == N_IMAGES
    assert set(train.class_names) <= {f"{c} {s}" for c in COLOURS for s in SHAPES}


@pytest.mark.parametrize(("env", "expected"), [
    ({"PEFTCLIP_CACHE": "/data/cache"}, Path("/data/cache") / VERSION),
    ({"HOME": "/home/someone"}, Path("/home/someone/.cache/peftclip") / VERSION),
])
def test_default_data_dir_honours_peftclip_cache(monkeypatch, env, expected):
    monkeypatch.delenv("PEFTCLIP_CACHE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_data_dir() == expected
