"""Every source kind loads to the same pairs; splits, caption sampling and bad rows behave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import peftclip.data
from peftclip.cli import main as cli_main
from peftclip.data import (
    DataConfig,
    DataError,
    EvalImages,
    LabelledImages,
    PairSet,
    TrainPairs,
    decode_image,
    eval_texts,
    load_held_out_labelled,
    load_held_out_pairs,
    load_labelled,
    load_pairs,
    read_texts,
    source_fingerprint,
)
from peftclip.models import load_base
from peftclip.recipe import recipe_parser
from peftclip.recipes import lora_retrieval
from tests import hf_cache
from tests.conftest import shared_data

N_IMAGES = 10
EXPECTED = sorted(((20 * i, 10, 10), (f"image {i} first", f"image {i} second")) for i in range(N_IMAGES))


@pytest.fixture(scope="module")
def base():
    return load_base()


def _image(path, i=0, mode="RGB"):
    """A 20x16 image whose top-left pixel identifies it, (20*i, 10, 10), with a gradient so crops differ."""
    image = Image.new("RGB", (20, 16))
    image.putdata([(20 * i, 10, 10 + 10 * x) for y in range(16) for x in range(20)])
    image.convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """An image folder with two captions per image in metadata.csv (rows 2i and 2i+1 are image i)."""
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(N_IMAGES):
        _image(tmp_path / "images" / f"{i}.png", i)
        rows += [(f"images/{i}.png", f"image {i} first"), (f"images/{i}.png", f"image {i} second")]
    (tmp_path / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{f},{c}\n" for f, c in rows))
    return tmp_path


def _rows(folder):
    return [line.split(",") for line in (folder / "metadata.csv").read_text().splitlines()[1:]]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_source(folder, kind):
    """The same pairs as `folder`, written as `kind`; returns the DataConfig fields to read it."""
    rows = _rows(folder)
    if kind == "imagefolder_csv":
        return {"source": str(folder)}
    if kind == "imagefolder_jsonl":
        (folder / "metadata.csv").unlink()
        _jsonl(folder / "metadata.jsonl", [{"file_name": f, "caption": c} for f, c in rows])
        return {"source": str(folder)}
    if kind == "csv_custom_columns":
        (folder / "pairs.csv").write_text("path,text\n" + "".join(f"{f},{c}\n" for f, c in rows))
        return {"source": str(folder / "pairs.csv"), "image_column": "path", "caption_column": "text"}
    if kind == "tsv":
        (folder / "pairs.tsv").write_text("file_name\tcaption\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
        return {"source": str(folder / "pairs.tsv")}
    if kind == "jsonl":
        _jsonl(folder / "pairs.jsonl", [{"file_name": f, "caption": c} for f, c in rows])
        return {"source": str(folder / "pairs.jsonl")}
    if kind == "jsonl_caption_lists":
        grouped = {}
        for f, c in rows:
            grouped.setdefault(f, []).append(c)
        _jsonl(folder / "pairs.jsonl", [{"file_name": f, "caption": c} for f, c in grouped.items()])
        return {"source": str(folder / "pairs.jsonl")}
    if kind == "json_array":
        (folder / "pairs.json").write_text(json.dumps([{"file_name": f, "caption": c} for f, c in rows]))
        return {"source": str(folder / "pairs.json")}
    if kind == "parquet_paths":
        datasets.Dataset.from_dict({"file_name": [f for f, _ in rows], "caption": [c for _, c in rows]}).to_parquet(
            str(folder / "pairs.parquet"))
        return {"source": str(folder / "pairs.parquet")}
    # an Image() feature: the images embedded as bytes, one encoding per row; equal bytes are one image
    data = datasets.Dataset.from_dict({"image": [Image.open(folder / f).copy() for f, _ in rows],
                                       "caption": [c for _, c in rows]}).cast_column("image", datasets.Image())
    if kind == "parquet_image_feature":
        data.to_parquet(str(folder / "pairs.parquet"))
        return {"source": str(folder / "pairs.parquet"), "image_column": "image"}
    if kind == "arrow_glob":
        data.save_to_disk(str(folder / "saved"))
        return {"source": str(folder / "saved" / "*.arrow")}  # the default image column falls back to `image`
    raise ValueError(kind)


SOURCE_KINDS = ["imagefolder_csv", "imagefolder_jsonl", "csv_custom_columns", "tsv", "jsonl", "jsonl_caption_lists",
                "json_array", "parquet_paths", "parquet_image_feature", "arrow_glob"]


def _content(*sets):
    """(top-left pixel, sorted captions) per image: checks that each image kept exactly its own captions."""
    return sorted((decode_image(ref).getpixel((0, 0)), tuple(sorted(captions)))
                  for pairs in sets for ref, captions in zip(pairs.images, pairs.captions))


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_kind_gives_the_same_grouped_pairs(folder, kind):
    assert _content(*load_pairs(DataConfig(**_write_source(folder, kind), val_fraction=0.2))) == EXPECTED


@pytest.mark.parametrize(("kind", "name"), [
    ("imagefolder_csv", "/images/3.png"),
    ("parquet_image_feature", "pairs.parquet row 6"),
])
def test_names_are_the_file_or_the_source_row(folder, kind, name):
    train, _ = load_pairs(DataConfig(**_write_source(folder, kind), val_fraction=0.0))
    assert train.names[3].endswith(name)


@pytest.mark.parametrize(("val_fraction", "n_val"), [(0.0, 0), (0.05, 1), (0.3, 3), (0.5, 5)])
def test_holdout_is_by_image_disjoint_and_sized_by_val_fraction(folder, val_fraction, n_val):
    train, val = load_pairs(DataConfig(source=str(folder), val_fraction=val_fraction))
    assert len(val.images) == n_val and len(train.images) == N_IMAGES - n_val
    assert not set(train.images) & set(val.images)
    assert all(len(c) == 2 for c in train.captions + val.captions)  # no image has captions on both sides


def test_holdout_is_deterministic_given_the_seed(folder):
    def val_images(seed):
        return load_pairs(DataConfig(source=str(folder), val_fraction=0.3, split_seed=seed))[1].images

    assert val_images(4) == val_images(4)
    assert len({tuple(val_images(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize(("caps", "n_train", "n_val"), [
    ({"max_images": 4}, 4, 2),
    ({"max_images": 4, "max_val_images": 1}, 4, 1),
    ({"max_val_images": 1}, 7, 1),
    ({"max_images": 100}, 7, 3),
])
def test_caps_shrink_each_side_without_moving_images(folder, caps, n_train, n_val):
    full_train, full_val = load_pairs(DataConfig(source=str(folder), val_fraction=0.3))
    train, val = load_pairs(DataConfig(source=str(folder), val_fraction=0.3, **caps))
    assert (len(train.images), len(val.images)) == (n_train, n_val)
    assert set(train.images) <= set(full_train.images) and set(val.images) <= set(full_val.images)


def test_val_split_uses_the_named_split(tmp_path):
    for split, count in (("train", 4), ("test", 2)):  # imagefolder layout: one subfolder per split
        (tmp_path / split / "images").mkdir(parents=True)
        for i in range(count):
            _image(tmp_path / split / "images" / f"{i}.png", i)
        (tmp_path / split / "metadata.csv").write_text(
            "file_name,caption\n" + "".join(f"images/{i}.png,{split} {i}\n" for i in range(count)))
    train, val = load_pairs(DataConfig(source=str(tmp_path), val_split="test"))
    assert sorted(c for (c,) in train.captions) == ["train 0", "train 1", "train 2", "train 3"]
    assert sorted(c for (c,) in val.captions) == ["test 0", "test 1"]


def test_a_single_file_has_only_its_one_split(folder):
    with pytest.raises(DataError, match=r"cannot load split 'test' of .*metadata.csv: Unknown split"):
        load_pairs(DataConfig(source=str(folder), val_split="test"))
    train, val = load_pairs(DataConfig(source=str(folder), val_split="train", max_images=1))  # reuse it whole
    assert (len(train.images), len(val.images)) == (1, N_IMAGES)


def test_too_few_images_to_hold_out_is_an_error(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("file_name,caption\na.png,one\na.png,two\n")
    with pytest.raises(DataError, match="1 image.* too few to hold out val_fraction=0.1"):
        load_pairs(DataConfig(source=str(tmp_path / "pairs.csv")))
    train, val = load_pairs(DataConfig(source=str(tmp_path / "pairs.csv"), val_fraction=0.0))
    assert train.captions == [["one", "two"]] and val.images == []


def _captions(pairs, epoch, seed=1):
    data = TrainPairs(pairs, lambda image: torch.zeros(1), lambda texts: texts, seed=seed)
    data.set_epoch(epoch)
    return [data[i][1] for i in range(len(data))]


def test_caption_sampling_is_reproducible_and_varies_across_epochs_and_seeds(folder):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    per_epoch = [_captions(train, epoch) for epoch in range(6)]
    assert per_epoch == [_captions(train, epoch) for epoch in range(6)]
    assert all(c in train.captions[i] for captions in per_epoch for i, c in enumerate(captions))
    assert len({tuple(captions) for captions in per_epoch}) > 1
    assert per_epoch != [_captions(train, epoch, seed=2) for epoch in range(6)]


def test_items_have_the_model_shapes_and_leave_the_global_rng_alone(folder, base):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    state = torch.get_rng_state()
    image, tokens = TrainPairs(train, base.preprocess_train, base.tokenizer)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert tokens.shape == (24,) and tokens.dtype == torch.long
    assert EvalImages(train, base.preprocess_val)[0].shape == (3, 32, 32)


def test_dataloader_workers_give_the_same_items_as_the_main_process(folder, base):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    data = TrainPairs(train, base.preprocess_train, lambda texts: texts, seed=3)
    data.set_epoch(2)
    (images, captions), = list(DataLoader(data, batch_size=N_IMAGES, num_workers=2))  # ends the workers
    assert images.shape == (N_IMAGES, 3, 32, 32)
    assert torch.equal(images, torch.stack([data[i][0] for i in range(N_IMAGES)]))  # augmentation seeded per item
    assert list(captions) == [data[i][1] for i in range(N_IMAGES)]
    data.set_epoch(3)
    assert not torch.equal(images, torch.stack([data[i][0] for i in range(N_IMAGES)]))


def test_token_batches_from_a_dataloader(folder, base):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    images, tokens = next(iter(DataLoader(TrainPairs(train, base.preprocess_train, base.tokenizer), batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and tokens.shape == (4, 24) and tokens.dtype == torch.long


@pytest.mark.parametrize(("captions", "texts", "owners"), [
    ([["a", "b"], ["c"]], ["a", "b", "c"], [0, 0, 1]),
    ([["x"], ["y"], ["z", "w"]], ["x", "y", "z", "w"], [0, 1, 2, 2]),
    ([], [], []),
])
def test_eval_texts_flattens_captions_with_their_image(captions, texts, owners):
    pairs = PairSet(images=[f"{i}.png" for i in range(len(captions))], captions=captions, names=[])
    assert eval_texts(pairs) == (texts, owners)


def _corrupt(folder, kind, monkeypatch):
    target, metadata = folder / "images" / "4.png", folder / "metadata.csv"
    if kind == "missing":
        target.unlink()
    elif kind == "directory":
        target.unlink()
        target.mkdir()
    elif kind == "decompression_bomb":  # over twice the pixel limit, where PIL refuses to decode
        Image.new("RGB", (40, 40)).save(target)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 2 - 1)
    elif kind == "zero_bytes":
        target.write_bytes(b"")
    elif kind == "text_as_image":
        target.write_text("this is not an image")
    elif kind == "truncated_jpeg":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(target, format="JPEG")
        target.write_bytes(target.read_bytes()[:200])
    else:
        blank = {"empty_caption": "", "whitespace_caption": "  ", "both_captions_blank": " "}[kind]
        text = metadata.read_text().replace("image 4 first", blank)
        metadata.write_text(text.replace("image 4 second", blank) if kind == "both_captions_blank" else text)


# (corruption of image 4, whose first row is on line 10 of metadata.csv; the message; rows skipped; images left)
BAD_ROWS = [
    ("missing", "4.png (metadata.csv line 10): image file not found", 2, N_IMAGES - 1),
    ("directory", "4.png (metadata.csv line 10): image path is a directory", 2, N_IMAGES - 1),
    ("zero_bytes", "4.png (metadata.csv line 10): image file is empty (0 bytes)", 2, N_IMAGES - 1),
    ("text_as_image", "4.png (metadata.csv line 10): cannot decode image: cannot identify image file", 2,
     N_IMAGES - 1),
    ("truncated_jpeg", "4.png (metadata.csv line 10): cannot decode image: .*runcated", 2, N_IMAGES - 1),
    ("decompression_bomb", "4.png (metadata.csv line 10): cannot decode image: Image size (1600 pixels) exceeds "
                           "limit", 2, N_IMAGES - 1),
    ("empty_caption", "4.png (metadata.csv line 10): empty caption ''", 1, N_IMAGES),
    ("whitespace_caption", "4.png (metadata.csv line 10): empty caption '  '", 1, N_IMAGES),
    ("both_captions_blank", "4.png (metadata.csv line 10): empty caption ' '", 2, N_IMAGES - 1),
]


@pytest.mark.parametrize(("kind", "message"), [(k, m) for k, m, _, _ in BAD_ROWS])
def test_a_bad_row_stops_loading_naming_file_line_and_problem(folder, kind, message, monkeypatch):
    _corrupt(folder, kind, monkeypatch)
    with pytest.raises(DataError, match="/images/" + message.replace("(", "[(]").replace(")", "[)]")):
        load_pairs(DataConfig(source=str(folder)))


@pytest.mark.parametrize(("kind", "skipped", "n_images"), [(k, s, n) for k, _, s, n in BAD_ROWS])
def test_bad_rows_are_skipped_and_counted_when_asked(folder, kind, skipped, n_images, monkeypatch):
    _corrupt(folder, kind, monkeypatch)
    train, val = load_pairs(DataConfig(source=str(folder), skip_bad_rows=True, val_fraction=0.2))
    assert train.skipped + val.skipped == skipped
    assert len(train.images) + len(val.images) == n_images
    assert sum(map(len, train.captions + val.captions)) == 2 * N_IMAGES - skipped


@pytest.mark.parametrize(("records", "message"), [
    ([{"file_name": "images/0.png", "caption": 42}], r"0.png \(pairs.jsonl line 1\): caption is not text: 42"),
    ([{"file_name": "images/0.png", "caption": []}], r"0.png \(pairs.jsonl line 1\): no captions"),
    ([{"file_name": "images/0.png", "caption": "x"}, {"file_name": "images/0.png", "caption": ["fine", ""]}],
     r"0.png \(pairs.jsonl line 2\): empty caption ''"),
    ([{"file_name": None, "caption": "x"}], r"pairs.jsonl line 1: no image in this row"),
])
def test_bad_values_in_json_rows_are_named(folder, records, message):
    _jsonl(folder / "pairs.jsonl", records)
    with pytest.raises(DataError, match=message):
        load_pairs(DataConfig(source=str(folder / "pairs.jsonl"), val_fraction=0.0))


def test_a_corrupt_embedded_image_is_named_by_source_row(folder):
    data = datasets.Dataset.from_dict({"image": [{"bytes": b"not a png", "path": None}], "caption": ["x"]})
    data.cast_column("image", datasets.Image()).to_parquet(str(folder / "pairs.parquet"))
    with pytest.raises(DataError, match="pairs.parquet row 0: cannot decode image"):
        load_pairs(DataConfig(source=str(folder / "pairs.parquet"), val_fraction=0.0))


def _unusable(folder, kind):
    """DataConfig fields for a source that cannot be used at all."""
    if kind == "wrong_caption_column":
        return {"source": str(folder), "caption_column": "captoin"}
    if kind == "wrong_image_column":
        return {"source": str(folder), "image_column": "path"}
    if kind == "missing_file":
        return {"source": str(folder / "nowhere" / "missing.csv")}
    if kind == "glob_of_images":
        return {"source": str(folder / "images" / "*.png")}
    if kind == "zero_byte_jsonl":
        (folder / "pairs.jsonl").write_text("")
        return {"source": str(folder / "pairs.jsonl")}
    text = {"header_only_csv": "file_name,caption\n", "all_rows_bad": "file_name,caption\nimages/0.png, \n",
            "malformed_csv": "file_name,caption\nimages/0.png,a\nimages/1.png,a,b\n"}[kind]
    (folder / "pairs.csv").write_text(text)
    return {"source": str(folder / "pairs.csv"), "skip_bad_rows": kind == "all_rows_bad"}


@pytest.mark.parametrize(("kind", "message"), [
    ("wrong_caption_column", "metadata.csv: no column 'captoin'; columns are: file_name, caption"),
    ("wrong_image_column", "metadata.csv: no column 'path'; columns are: file_name, caption"),
    ("missing_file", "data file not found: .*nowhere/missing.csv"),
    ("glob_of_images", r"cannot read .*/images/\*.png: expected a folder"),
    ("zero_byte_jsonl", "pairs.jsonl: the data set is empty"),
    ("header_only_csv", "pairs.csv: the data set is empty"),
    ("all_rows_bad", r"pairs.csv: every row is bad \(1 skipped\)"),
    ("malformed_csv", "cannot load split 'train' of .*pairs.csv: Error tokenizing data"),
])
def test_unusable_sources_name_the_file_or_column(folder, kind, message):
    with pytest.raises(DataError, match=message):
        load_pairs(DataConfig(**_unusable(folder, kind), val_fraction=0.0))


@pytest.mark.parametrize(("source", "message"), [
    ("not-a-hub-id", "cannot read not-a-hub-id: expected a folder"),
    ("a/b/c", "cannot read a/b/c: expected a folder"),
    (None, "no data source given"),
])
def test_sources_that_are_neither_local_nor_a_hub_id(source, message):
    with pytest.raises(DataError, match=message):
        load_pairs(DataConfig(source=source))


@pytest.mark.parametrize(("fields", "message"), [
    ({"val_fraction": 1.0}, r"val_fraction=1.0: must be in \[0, 1\)"),
    ({"val_fraction": -0.1}, r"val_fraction=-0.1: must be in \[0, 1\)"),
    ({"max_images": 0}, "max_images=0: must be at least 1"),
    ({"max_val_images": -2}, "max_val_images=-2: must be at least 1"),
    ({"caption_column": " "}, "caption_column=' ': must not be empty"),
    ({"val_split": ""}, "val_split='': must not be empty"),
    ({"source": ""}, "source='': must not be empty"),
])
def test_config_rejects_bad_values_naming_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields)


def test_config_from_dict_round_trips_and_rejects_unknown_keys():
    config = DataConfig(source="x.csv", val_fraction=0.25, max_images=3)
    assert DataConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown field\(s\) in \[data\]: captoin"):
        DataConfig.from_dict({"captoin": "x"})


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "1"])
def test_grayscale_rgba_and_palette_images_load_as_rgb(folder, base, mode, recwarn):
    path = folder / "images" / "2.png"
    if mode == "P_transparent":
        Image.open(path).convert("P").save(path, transparency=0)
    else:
        _image(path, 2, mode=mode)
    assert Image.open(path).mode == mode.split("_")[0]
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    assert decode_image(train.images[2]).mode == "RGB"
    assert EvalImages(train, base.preprocess_val)[2].shape == (3, 32, 32)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_an_image_spoilt_after_loading_is_named_when_decoded(folder, base):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.0))
    (folder / "images" / "1.png").write_text("gone bad")
    with pytest.raises(DataError, match=r"/images/1.png: cannot decode image"):
        TrainPairs(train, base.preprocess_train, base.tokenizer, max_bad_fraction=0.0)[1]


@pytest.mark.parametrize(("n_rows", "shown"), [(10, False), (1001, True)])
def test_progress_bar_only_for_large_sets(tmp_path, monkeypatch, n_rows, shown):
    _image(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("file_name,caption\n" + "a.png,same image\n" * n_rows)
    bars = []

    def fake_tqdm(rows, **kwargs):
        bars.append(kwargs)
        return rows

    monkeypatch.setattr(peftclip.data, "tqdm", fake_tqdm)
    train, _ = load_pairs(DataConfig(source=str(tmp_path / "pairs.csv"), val_fraction=0.0))
    assert len(train.captions[0]) == n_rows
    assert bars[0]["disable"] is not shown and bars[0]["leave"] is False  # bars[0]: the training set


def test_only_the_kept_images_are_checked(folder):
    (folder / "images" / "4.png").unlink()
    train, val = load_pairs(DataConfig(source=str(folder), val_fraction=0.2, split_seed=0, max_images=2))
    kept = {ref.rsplit("/", 1)[-1] for ref in train.images + val.images}
    assert "4.png" not in kept and train.skipped == val.skipped == 0  # image 4 was never picked, never checked


def test_class_folders_load_as_labelled_images(tmp_path, base):
    for name in ("cat", "dog", "eel"):
        (tmp_path / name).mkdir()
        for i in range(4):
            _image(tmp_path / name / f"{i}.png", i)
    train, val = load_labelled(DataConfig(source=str(tmp_path), val_fraction=0.25))
    assert train.class_names == ["cat", "dog", "eel"] and (len(train.images), len(val.images)) == (9, 3)
    image, label = LabelledImages(train, base.preprocess_train)[0]
    assert image.shape == (3, 32, 32) and label in (0, 1, 2)


@pytest.mark.parametrize("image_column", ["image", "file_name"])
def test_hub_dataset_id_goes_through_load_dataset_by_name(folder, monkeypatch, image_column):
    """Offline: a Hub id reaches datasets.load_dataset(id, split=...); here it is served from local files."""
    calls = []
    real = datasets.load_dataset
    local = datasets.Dataset.from_dict({"image": [str(folder / f"images/{i}.png") for i in range(N_IMAGES)],
                                        "caption": [f"hub caption {i}" for i in range(N_IMAGES)]})
    local = local.cast_column("image", datasets.Image())  # as Hub image data sets have it

    def fake_load_dataset(path, *args, **kwargs):
        if path == "someone/pairs":
            calls.append((path, kwargs.get("split")))
            return local
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, _ = load_pairs(DataConfig(source="someone/pairs", split="train", val_split="validation",
                                     image_column=image_column))
    assert calls == [("someone/pairs", "train"), ("someone/pairs", "validation")]
    assert len(train.images) == N_IMAGES and train.captions[0] == ["hub caption 0"]


def test_a_hub_dataset_that_cannot_be_reached_names_the_id(monkeypatch):
    def unreachable(path, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="of someone/nothing .no such local path, so tried as a Hub dataset id.: "
                                        "Dataset 'someone/nothing' doesn't exist"):
        load_pairs(DataConfig(source="someone/nothing"))


def test_shared_flickr8k_groups_five_captions_per_image():
    source = shared_data("flickr8k-800", "captions.csv")
    train, val = load_pairs(DataConfig(source=str(source), max_images=50))
    assert len(train.images) == 50 and 1 <= len(val.images) <= 10
    assert all(len(c) == 5 for c in train.captions + val.captions)
    assert not set(train.images) & set(val.images)


def test_shared_cifar10_has_classlabel_names():
    source = shared_data("cifar10")
    train, test = load_labelled(DataConfig(source=str(source), val_split="test", max_images=50, max_val_images=20))
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]
    assert len(train.images) == 50 and len(test.images) == 20 and set(train.labels) <= set(range(10))


def test_16_bit_png_decodes_scaled_not_clipped(tmp_path):
    original = Image.new("L", (64, 4))
    original.putdata([x * 4 for _ in range(4) for x in range(64)])  # 0..252, mean 126
    Image.fromarray(np.asarray(original, dtype=np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    decoded = np.asarray(decode_image(str(tmp_path / "deep.png")), dtype=np.float64)
    assert decoded.shape == (4, 64, 3)
    assert abs(decoded.mean() - np.asarray(original).mean()) <= 0.01 * np.asarray(original).mean()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 16)).save(tmp_path / "turned.jpg", exif=exif)
    assert decode_image(str(tmp_path / "turned.jpg")).size == (16, 20)
    assert decode_image((tmp_path / "turned.jpg").read_bytes()).size == (16, 20)


def test_an_image_just_over_the_pixel_limit_warns_and_is_a_bad_row_when_warnings_are_errors(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20 * 16 - 1)  # every image is over it, none twice over
    with pytest.warns(Image.DecompressionBombWarning):
        assert len(load_pairs(DataConfig(source=str(folder), val_fraction=0.0))[0].images) == N_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"/0.png \(metadata.csv line 2\): cannot decode image: Image size"):
            load_pairs(DataConfig(source=str(folder), val_fraction=0.0))


@pytest.mark.parametrize(("kind", "message"), [
    ("decompression_bomb", "cannot decode image: Image size (1600 pixels) exceeds limit"),
    ("text_as_image", "cannot decode image: cannot identify image file"),
])
def test_search_over_a_folder_with_a_bad_image_is_a_one_line_error_naming_it(folder, kind, message, monkeypatch,
                                                                              capsys):
    _corrupt(folder, kind, monkeypatch)
    (folder / "images" / "sub.png").mkdir()  # a folder named like an image is not listed
    assert cli_main(["search", "--model-name", "peftclip-tiny", "--images", str(folder / "images"),
                     "--query", "a red square", "--index", str(folder / "index.safetensors")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and f"images/4.png: {message}" in line
    assert not (folder / "index.safetensors").exists()


def test_csv_errors_name_the_file_line_past_blank_lines_and_multiline_captions(folder):
    (folder / "pairs.csv").write_text('file_name,caption\nimages/0.png,"two\nlines"\n\nimages/1.png, \n')
    with pytest.raises(DataError, match=r"1.png \(pairs.csv line 5\): empty caption"):
        load_pairs(DataConfig(source=str(folder / "pairs.csv"), val_fraction=0.0))


def test_open_clip_tab_separated_csv_with_filepath_and_title_loads_by_default(folder):
    rows = _rows(folder)
    (folder / "train.csv").write_text("filepath\ttitle\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
    assert _content(*load_pairs(DataConfig(source=str(folder / "train.csv"), val_fraction=0.2))) == EXPECTED


def test_open_clip_flag_spellings_set_the_columns_and_separator(folder):
    parser = recipe_parser("", lora_retrieval.SECTIONS)
    args = parser.parse_args(["--csv-img-key", "path", "--csv-caption-key", "text", "--csv-separator", "\\t"])
    config = DataConfig.from_dict({k.partition(".")[2]: v for k, v in vars(args).items() if k.startswith("data.")})
    assert (config.image_column, config.caption_column, config.csv_separator) == ("path", "text", "\t")
    (folder / "pairs.csv").write_text("path;text\n" + "".join(f"{f};{c}\n" for f, c in _rows(folder)))
    metrics = lora_retrieval.main(["--source", str(folder / "pairs.csv"), "--csv-img-key", "path",
                                   "--csv-caption-key", "text", "--csv-separator", ";", "--max-steps", "1",
                                   "--batch-size", "4", "--num-workers", "0", "--val-fraction", "0.2",
                                   "--output-dir", str(folder / "out")])
    assert metrics["steps"] == 1


def _test_split_only(tmp_path):
    """A parquet folder with only a test split: 4 embedded images, one caption and label each."""
    images = [Image.new("RGB", (20, 16), (60 * i, 10, 10)) for i in range(4)]
    data = datasets.Dataset.from_dict({"image": images, "caption": [f"picture {i}" for i in range(4)],
                                       "label": [i % 2 for i in range(4)]}).cast_column("image", datasets.Image())
    (tmp_path / "parquet").mkdir()
    data.to_parquet(str(tmp_path / "parquet" / "test-00000-of-00001.parquet"))
    return tmp_path / "parquet"


def test_held_out_loaders_read_only_the_split_they_evaluate(tmp_path):
    source = _test_split_only(tmp_path)
    with pytest.raises(DataError, match="cannot load split 'train'"):
        load_pairs(DataConfig(source=str(source), val_split="test"))
    assert len(load_held_out_pairs(DataConfig(source=str(source), val_split="test")).images) == 4
    assert load_held_out_labelled(DataConfig(source=str(source), val_split="test")).labels == [0, 1, 0, 1]


def test_held_out_pairs_without_val_split_are_the_images_load_pairs_holds_out(folder):
    config = DataConfig(source=str(folder), val_fraction=0.3, split_seed=2)
    assert load_held_out_pairs(config) == load_pairs(config)[1]


@pytest.mark.parametrize("task", ["retrieval", "classification"])
def test_eval_of_a_source_with_only_a_test_split(tmp_path, task, capsys):
    source = _test_split_only(tmp_path)
    assert cli_main(["eval", "--model-name", "peftclip-tiny", "--source", str(source), "--val-split", "test",
                     "--task", task]) == 0
    assert capsys.readouterr().out.startswith("4 images")


def _touch_later(path):
    """Push the modification time forward, as a later edit would (file systems may have coarse clocks)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", ["edit_csv_row", "replace_image", "add_class_image", "edit_parquet"])
def test_source_fingerprint_follows_the_data_and_nothing_else(folder, change):
    if change == "add_class_image":
        for name in ("cat", "dog"):
            (folder / "classes" / name).mkdir(parents=True)
            _image(folder / "classes" / name / "0.png")
        config = DataConfig(source=str(folder / "classes"))
    elif change == "edit_parquet":
        config = DataConfig(**_write_source(folder, "parquet_image_feature"))
    else:
        config = DataConfig(source=str(folder))
    before = source_fingerprint(config)
    assert source_fingerprint(config) == before
    (folder / "unrelated.txt").write_text("not data")  # beside the table, named by no row
    assert source_fingerprint(config) == before
    if change == "edit_csv_row":
        target = folder / "metadata.csv"
        target.write_text(target.read_text().replace("image 3 first", "image 3 FIRST"))
    elif change == "replace_image":
        target = folder / "images" / "7.png"
        _image(target, 8)
    elif change == "add_class_image":
        target = folder / "classes" / "dog" / "1.png"
        _image(target)
    else:
        target = folder / "pairs.parquet"
        datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "caption": ["x"]}).cast_column(
            "image", datasets.Image()).to_parquet(str(target))
    _touch_later(target)
    assert source_fingerprint(config) != before


def test_source_fingerprint_of_a_hub_id_is_the_datasets_fingerprint(monkeypatch):
    served = {"train": datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["x"]})}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None, **kwargs: served[split])
    config = DataConfig(source="someone/pairs")
    before = source_fingerprint(config)
    assert source_fingerprint(config) == before
    served["train"] = datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["y"]})
    assert source_fingerprint(config) != before


tiny_hub = hf_cache.tiny_hub  # the fixture: an offline hub cache


def _cache_dataset_revision(hub_cache, repo_id: str, commit: str) -> None:
    """Record `commit` as `repo_id`'s main branch in the hub cache, with the README.md a streamed load fetches."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_streamed_hub_id_fingerprint_follows_its_revision_offline(tiny_hub):
    config = DataConfig(source="peftclip/tiny-pairs", streaming=True)
    _cache_dataset_revision(tiny_hub, config.source, "a" * 40)
    before = source_fingerprint(config)
    assert source_fingerprint(config) == before
    _cache_dataset_revision(tiny_hub, config.source, "b" * 40)  # the set got a new commit
    assert source_fingerprint(config) != before


def test_streamed_hub_id_without_a_resolvable_revision_is_named(tiny_hub):
    with pytest.raises(DataError, match=r"^peftclip/absent: .*revision cannot be resolved"):
        source_fingerprint(DataConfig(source="peftclip/absent", streaming=True))


@pytest.mark.parametrize(("content", "message"), [
    (b"first\ncaf\xe9 au lait\n", r"texts.txt line 2: not UTF-8 text \(byte 0xe9\)"),
    (b"\n  \n", "texts.txt: no texts"),
])
def test_read_texts_names_the_file_and_line_of_bad_text(tmp_path, content, message):
    (tmp_path / "texts.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_texts(tmp_path / "texts.txt")


def test_read_texts_strips_lines_and_a_byte_order_mark(tmp_path):
    (tmp_path / "texts.txt").write_bytes("\ufeffa dog \n\n  two cats\n".encode())
    assert read_texts(tmp_path / "texts.txt") == ["a dog", "two cats"]


def test_embed_of_a_non_utf8_texts_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "texts.txt").write_bytes(b"caf\xe9\n")
    assert cli_main(["embed", "--model-name", "peftclip-tiny", "--texts", str(tmp_path / "texts.txt"),
                     "--out", str(tmp_path / "out.safetensors")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "texts.txt line 1: not UTF-8 text" in line


_POOL_PEAK = """import sys, pyarrow as pa
from peftclip.data import DataConfig, load_pairs
load_pairs(DataConfig(source=sys.argv[1], check_data="off"))
print(pa.default_memory_pool().max_memory())
"""


def test_first_load_of_a_large_parquet_set_converts_it_outside_the_training_process(tmp_path):
    # datasets' one-time conversion to its arrow cache left memory growing with the set in the loading process
    # (17 MB of pyarrow's pool for this 10 MB set, +110 MB RSS for 16k JPEGs): the run's peak RSS grew with it.
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": rng.bytes(2500), "path": None} for _ in range(4000)],
                                "caption": [f"caption {i}" for i in range(4000)]},
                               features=features).to_parquet(str(tmp_path / "set.parquet"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _POOL_PEAK, str(tmp_path / "set.parquet")], env=env,
                         capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) < 4 << 20, run.stdout
    assert list((tmp_path / "hf").rglob("*.arrow"))  # converted once, into the cache the process then maps
