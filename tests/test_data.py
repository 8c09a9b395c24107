"""Every source kind loads to the same pairs; splits, caption sampling and bad rows behave."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from peftclip.data import (
    DataConfig,
    DataError,
    EvalImages,
    LabelledImages,
    TrainPairs,
    eval_texts,
    load_labelled,
    load_pairs,
)
from peftclip.models import load_base
from tests.conftest import SHARED_DATA

N_IMAGES = 10


@pytest.fixture(scope="module")
def base():
    return load_base()


def _image(path, colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, (20, 16), colour if mode == "RGB" else 128).save(path)


@pytest.fixture
def folder(tmp_path):
    """An image folder with two captions per image in metadata.csv."""
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(N_IMAGES):
        _image(tmp_path / "images" / f"{i}.png", (20 * i, 10, 10))
        rows += [(f"images/{i}.png", f"image {i} first"), (f"images/{i}.png", f"image {i} second")]
    (tmp_path / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{f},{c}\n" for f, c in rows))
    return tmp_path


def _all_pairs(config):
    train, val = load_pairs(config)
    return {n.split("/")[-1].split(" ")[0]: sorted(c) for n, c in zip(train.names + val.names,
                                                                       train.captions + val.captions)}


def _write_source(folder, kind):
    """The same pairs as `folder`, written as `kind`; returns the DataConfig fields to read it."""
    rows = [line.split(",") for line in (folder / "metadata.csv").read_text().splitlines()[1:]]
    if kind == "imagefolder_csv":
        return {"source": str(folder)}
    if kind == "imagefolder_jsonl":
        (folder / "metadata.csv").unlink()
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n"
                                                       for f, c in rows))
        return {"source": str(folder)}
    if kind == "csv_custom_columns":
        (folder / "pairs.csv").write_text("path,text\n" + "".join(f"{f},{c}\n" for f, c in rows))
        return {"source": str(folder / "pairs.csv"), "image_column": "path", "caption_column": "text"}
    if kind == "tsv":
        (folder / "pairs.tsv").write_text("file_name\tcaption\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
        return {"source": str(folder / "pairs.tsv")}
    if kind == "jsonl_caption_lists":
        grouped = {}
        for f, c in rows:
            grouped.setdefault(f, []).append(c)
        (folder / "pairs.jsonl").write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n"
                                                    for f, c in grouped.items()))
        return {"source": str(folder / "pairs.jsonl")}
    data = datasets.Dataset.from_dict({"image": [str(folder / f) for f, _ in rows],
                                       "caption": [c for _, c in rows]})
    if kind == "parquet_paths":
        data.to_parquet(str(folder / "pairs.parquet"))
        return {"source": str(folder / "pairs.parquet"), "image_column": "image"}
    if kind == "parquet_image_feature":  # images embedded as bytes, one row each
        data = datasets.Dataset.from_dict({"image": [Image.open(folder / f).copy() for f, _ in rows],
                                           "caption": [c for _, c in rows]}).cast_column("image", datasets.Image())
        data.to_parquet(str(folder / "pairs.parquet"))
        return {"source": str(folder / "pairs.parquet"), "image_column": "image"}
    raise ValueError(kind)


SOURCE_KINDS = ["imagefolder_csv", "imagefolder_jsonl", "csv_custom_columns", "tsv", "jsonl_caption_lists",
                "parquet_paths"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_kind_gives_the_same_grouped_pairs(folder, kind):
    pairs = _all_pairs(DataConfig(**_write_source(folder, kind), val_fraction=0.2))
    assert len(pairs) == N_IMAGES
    assert pairs["3.png"] == ["image 3 first", "image 3 second"]


def test_parquet_with_embedded_images_keeps_each_row_as_an_image(folder):
    train, val = load_pairs(DataConfig(**_write_source(folder, "parquet_image_feature"), val_fraction=0.2))
    assert len(train.images) + len(val.images) == 2 * N_IMAGES  # bytes rows are not merged
    assert all(isinstance(ref, bytes) for ref in train.images)


def test_split_is_by_image_disjoint_and_deterministic(folder):
    config = DataConfig(source=str(folder), val_fraction=0.3, split_seed=4)
    train, val = load_pairs(config)
    again, _ = load_pairs(config)
    assert len(val.images) == 3 and len(train.images) == 7
    assert not set(train.images) & set(val.images)
    assert train.images == again.images
    other, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.3, split_seed=5))
    assert other.images != train.images


def test_caption_sampling_is_per_epoch_and_reproducible(folder, base):
    train, _ = load_pairs(DataConfig(source=str(folder), val_fraction=0.2))
    seen = {}
    tokenizer = base.tokenizer

    def caption_of(epoch, i):
        data = TrainPairs(train, base.preprocess_train, lambda texts: texts, seed=1)
        data.set_epoch(epoch)
        return data[i][1]

    for epoch in range(6):
        seen[epoch] = [caption_of(epoch, i) for i in range(len(train.images))]
        assert seen[epoch] == [caption_of(epoch, i) for i in range(len(train.images))]
        assert all(c in train.captions[i] for i, c in enumerate(seen[epoch]))
    assert len({tuple(v) for v in seen.values()}) > 1
    image, tokens = TrainPairs(train, base.preprocess_train, tokenizer)[0]
    assert image.shape == (3, 32, 32) and tokens.dtype == torch.long and tokens.shape == (24,)


def test_dataloader_workers_decode_and_batch(folder, base):
    train, val = load_pairs(DataConfig(source=str(folder), val_fraction=0.2))
    loader = DataLoader(TrainPairs(train, base.preprocess_train, base.tokenizer), batch_size=4, num_workers=2)
    images, tokens = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and tokens.shape == (4, 24)
    captions, owners = eval_texts(val)
    assert len(captions) == 2 * len(val.images) and owners == [0, 0, 1, 1]
    assert EvalImages(val, base.preprocess_val)[1].shape == (3, 32, 32)


def _corrupt(folder, kind):
    target = folder / "images" / "4.png"
    if kind == "missing":
        target.unlink()
    elif kind == "zero_bytes":
        target.write_bytes(b"")
    elif kind == "text_as_image":
        target.write_text("this is not an image")
    elif kind == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(target, format="JPEG")
        target.write_bytes(target.read_bytes()[:200])
    elif kind == "empty_caption":
        text = (folder / "metadata.csv").read_text().replace("image 4 first", "  ")
        (folder / "metadata.csv").write_text(text)


BAD_ROWS = {
    "missing": "4.png (row 8): image file not found",
    "zero_bytes": "4.png (row 8): image file is empty",
    "text_as_image": "4.png (row 8): cannot decode image",
    "truncated": "4.png (row 8): cannot decode image",
    "empty_caption": "4.png (row 8): empty caption",
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_stops_naming_file_and_row(folder, kind):
    _corrupt(folder, kind)
    with pytest.raises(DataError, match=BAD_ROWS[kind].replace("(", r"\(").replace(")", r"\)")):
        load_pairs(DataConfig(source=str(folder)))


@pytest.mark.parametrize(("kind", "skipped"), [("missing", 2), ("empty_caption", 1), ("truncated", 2)])
def test_bad_rows_are_skipped_and_counted_when_asked(folder, kind, skipped):
    _corrupt(folder, kind)
    train, val = load_pairs(DataConfig(source=str(folder), skip_bad_rows=True, val_fraction=0.2))
    assert train.skipped == skipped
    expected_images = N_IMAGES - 1 if skipped == 2 else N_IMAGES
    assert len(train.images) + len(val.images) == expected_images


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_images_work(folder, base, mode):
    _image(folder / "images" / "2.png", mode=mode)
    train, val = load_pairs(DataConfig(source=str(folder), val_fraction=0.2))
    images = EvalImages(train, base.preprocess_val)
    assert all(images[i].shape == (3, 32, 32) for i in range(len(images)))


@pytest.mark.parametrize(("change", "message"), [
    ({"caption_column": "captoin"}, "no column 'captoin'; columns are: file_name, caption"),
    ({"source": "nowhere/missing.csv"}, "data file not found: nowhere/missing.csv"),
    ({"source": "not-a-hub-id"}, "cannot read not-a-hub-id"),
])
def test_bad_config_names_the_column_or_source(folder, change, message):
    with pytest.raises(DataError, match=message):
        load_pairs(DataConfig(**{"source": str(folder), **change}))


def test_empty_data_set_is_an_error(tmp_path):
    (tmp_path / "pairs.csv").write_text("file_name,caption\n")
    with pytest.raises(DataError, match="pairs.csv: the data set is empty"):
        load_pairs(DataConfig(source=str(tmp_path / "pairs.csv")))


def test_class_folders_load_as_labelled_images(tmp_path, base):
    for name in ("cat", "dog", "eel"):
        (tmp_path / name).mkdir()
        for i in range(4):
            _image(tmp_path / name / f"{i}.png")
    train, val = load_labelled(DataConfig(source=str(tmp_path), val_fraction=0.25))
    assert train.class_names == ["cat", "dog", "eel"] and len(train.images) + len(val.images) == 12
    image, label = LabelledImages(train, base.preprocess_train)[0]
    assert image.shape == (3, 32, 32) and label in (0, 1, 2)


def test_shared_cifar10_has_classlabel_names():
    source = SHARED_DATA / "cifar10"
    if not source.is_dir():
        pytest.skip(f"shared data missing: {source}")
    train, test = load_labelled(DataConfig(source=str(source), val_split="test", max_images=50, max_val_images=20))
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]
    assert len(train.images) == 50 and len(test.images) == 20 and set(train.labels) <= set(range(10))


def test_shared_flickr8k_groups_five_captions_per_image():
    source = SHARED_DATA / "flickr8k-800" / "captions.csv"
    if not source.is_file():
        pytest.skip(f"shared data missing: {source}")
    train, val = load_pairs(DataConfig(source=str(source), val_fraction=0.2))
    assert len(train.images) + len(val.images) == 800
    assert all(len(c) == 5 for c in train.captions + val.captions)


def test_hub_dataset_id_goes_through_load_dataset_by_name(folder, monkeypatch):
    """Offline: a Hub id reaches datasets.load_dataset(id, split=...); here it is served from local files."""
    calls = []
    real = datasets.load_dataset
    local = datasets.Dataset.from_dict({"image": [str(folder / f"images/{i}.png") for i in range(N_IMAGES)],
                                        "caption": [f"hub caption {i}" for i in range(N_IMAGES)]})

    def fake_load_dataset(path, *args, **kwargs):
        if path == "someone/pairs":
            calls.append((path, kwargs.get("split")))
            return local
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, val = load_pairs(DataConfig(source="someone/pairs", split="train", val_split="validation",
                                       image_column="image"))
    assert calls == [("someone/pairs", "train"), ("someone/pairs", "validation")]
    assert len(train.images) == N_IMAGES and train.captions[0] == ["hub caption 0"]
