"""Hugging Face `datasets` in; validated image–caption or image–label sets and torch Datasets out."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import datasets
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .utils import ConfigMixin

__all__ = ["DataConfig", "DataError", "EvalImages", "LabelledImages", "LabelledSet", "PairSet", "TrainPairs",
           "count_truncated", "decode_image", "eval_texts", "load_labelled", "load_pairs"]

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".arrow": "arrow"}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_PROGRESS_MIN_ROWS = 1000


class DataError(ValueError):
    """A data set that cannot be used as given: the message names the file, row, column or value."""


@dataclass
class DataConfig(ConfigMixin):
    """Where the images and their captions or labels come from, and how to split them."""

    section: ClassVar[str] = "data"

    source: str | None = field(default=None, metadata={
        "help": "Image folder (metadata.csv/jsonl, or class subfolders), .csv/.tsv/.jsonl/.parquet/.arrow file, "
                "a folder of parquet files, or a Hugging Face Hub dataset id."})
    image_column: str = field(default="file_name", metadata={
        "help": "Column holding image paths (relative to the file's folder) or an Image feature; "
                "'image' is used when this column is absent and an Image feature exists."})
    caption_column: str = field(default="caption", metadata={"help": "Column of captions (a string or a list)."})
    label_column: str = field(default="label", metadata={"help": "Column of class labels, for classification."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    val_split: str | None = field(default=None, metadata={
        "help": "Split to evaluate on; if unset, hold out val_fraction of the images."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of images held out when val_split is unset."})
    max_images: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_val_images: int | None = field(default=None, metadata={"help": "Use at most this many held-out images."})
    augment: bool = field(default=True, metadata={
        "help": "Random crops on training images (open_clip's train transform); without them a frozen image "
                "tower's features can be cached."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Drop and count bad rows (missing/corrupt image, empty caption) instead of stopping."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/held-out split and subsampling."})

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0 and self.val_split is None:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in (0, 1)")
        for name in ("max_images", "max_val_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        for name in ("image_column", "caption_column", "label_column", "split"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")


@dataclass
class PairSet:
    """Distinct images (a path or encoded bytes each) with all their captions."""

    images: list[str | bytes]
    captions: list[list[str]]
    names: list[str]
    skipped: int = 0


@dataclass
class LabelledSet:
    """Images with one integer label each, and the class names."""

    images: list[str | bytes]
    labels: list[int]
    names: list[str]
    class_names: list[str]
    skipped: int = 0


def decode_image(ref: str | bytes) -> Image.Image:
    """An RGB PIL image from a path or encoded bytes (grayscale, palette and RGBA are converted)."""
    image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    image.load()
    return image.convert("RGB")


def _image_problem(ref: str | bytes) -> str | None:
    """Why `ref` is not a usable image, or None."""
    if isinstance(ref, str):
        path = Path(ref)
        if not path.is_file():
            return "image file not found"
        if path.stat().st_size == 0:
            return "image file is empty (0 bytes)"
    try:
        decode_image(ref)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"cannot decode image ({e})"
    return None


def _csv_options(suffix: str) -> dict[str, Any]:
    """Read CSV text as written: pandas would otherwise turn captions like 'NA' or 'null' into NaN."""
    if suffix not in (".csv", ".tsv"):
        return {}
    return {"keep_default_na": False, "na_values": [], **({"delimiter": "\t"} if suffix == ".tsv" else {})}


def _load_split(config: DataConfig, split: str) -> tuple[datasets.Dataset, Path, str]:
    """The split as a `datasets.Dataset`, the folder relative paths start from, and a display name."""
    source = shown = Path(config.source)
    try:
        if source.is_dir():
            metadata = next((source / m for m in _METADATA_FILES if (source / m).is_file()), None)
            if metadata is not None:
                shown = metadata
                data = datasets.load_dataset(_BUILDERS[metadata.suffix], data_files={split: str(metadata)},
                                             split=split, **_csv_options(metadata.suffix))
                return data, source, metadata.name
            return datasets.load_dataset(str(source), split=split), source, source.name
        if source.suffix in _BUILDERS or "*" in source.name:
            if "*" not in source.name and not source.is_file():
                raise DataError(f"data file not found: {source}")
            kwargs = _csv_options(source.suffix)
            data = datasets.load_dataset(_BUILDERS[source.suffix], data_files={split: str(source)}, split=split,
                                         **kwargs)
            return data, source.parent, source.name
        if source.exists() or config.source.count("/") != 1:
            raise DataError(f"cannot read {config.source}: expected a folder, a "
                            f"{'/'.join(sorted(_BUILDERS))} file, or a Hub dataset id 'user/name'")
        return datasets.load_dataset(config.source, split=split), Path("."), config.source
    except DataError:
        raise
    except (ValueError, FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "corresponds to no data" in first_line:
            raise DataError(f"{shown}: the data set is empty (split {split!r} has no rows)") from e
        raise DataError(f"cannot load split {split!r} of {config.source}: {first_line}") from e


def _image_column(data: datasets.Dataset, config: DataConfig, name: str) -> str:
    column = config.image_column
    if column not in data.column_names:
        images = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
        if not images:
            raise DataError(f"{name}: no column {column!r}; columns are: {', '.join(data.column_names)}")
        column = images[0]
    return column


def _refs(data: datasets.Dataset, column: str, root: Path) -> list[str | bytes]:
    """Image references per row: bytes when the data set stores them, else a resolved path."""
    if isinstance(data.features[column], datasets.Image):
        data = data.cast_column(column, datasets.Image(decode=False))
    refs = []
    for value in data[column]:
        if isinstance(value, dict):
            value = value["bytes"] if value.get("bytes") is not None else value["path"]
        if isinstance(value, str):
            value = str(root / value) if not Path(value).is_absolute() else value
        refs.append(value)
    return refs


def _check_column(data: datasets.Dataset, column: str, name: str) -> None:
    if column not in data.column_names:
        raise DataError(f"{name}: no column {column!r}; columns are: {', '.join(data.column_names)}")


def _describe(ref: str | bytes, row: int, name: str) -> str:
    return f"{ref} (row {row})" if isinstance(ref, str) else f"{name}: row {row}"


def _validate(refs: list[str | bytes], texts: list[Any] | None, name: str, skip: bool) -> tuple[list[int], int]:
    """Indices of good rows and the number of bad ones; raises on the first bad row unless `skip`."""
    good, bad, problems = [], 0, {}
    for row, ref in enumerate(tqdm(refs, desc="checking data", leave=False,
                                   disable=len(refs) < _PROGRESS_MIN_ROWS)):
        key = ref if isinstance(ref, str) else row
        if key not in problems:
            problems[key] = _image_problem(ref)
        problem = problems[key]
        if problem is None and texts is not None:
            captions = texts[row] if isinstance(texts[row], list) else [texts[row]]
            if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
                problem = f"empty caption {texts[row]!r}"
        if problem is None:
            good.append(row)
        elif skip:
            bad += 1
        else:
            raise DataError(f"{_describe(ref, row, name)}: {problem} (pass --skip-bad-rows to drop such rows)")
    return good, bad


def _group_pairs(refs: list[str | bytes], texts: list[Any], rows: list[int], name: str) -> PairSet:
    """One entry per distinct image path (rows with encoded bytes are each their own image)."""
    index: dict[Any, int] = {}
    pairs = PairSet(images=[], captions=[], names=[])
    for row in rows:
        ref = refs[row]
        key = ref if isinstance(ref, str) else ("row", row)
        if key not in index:
            index[key] = len(pairs.images)
            pairs.images.append(ref)
            pairs.captions.append([])
            pairs.names.append(_describe(ref, row, name))
        captions = texts[row] if isinstance(texts[row], list) else [texts[row]]
        pairs.captions[index[key]].extend(c.strip() for c in captions)
    return pairs


def _subset(pairs: PairSet, keep: list[int]) -> PairSet:
    return PairSet([pairs.images[i] for i in keep], [pairs.captions[i] for i in keep],
                   [pairs.names[i] for i in keep], pairs.skipped)


def _split_indices(n: int, config: DataConfig) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(config.split_seed).shuffle(order)
    if config.max_images is not None:
        order = order[:config.max_images + (config.max_val_images or max(1, int(config.max_images
                                                                                 * config.val_fraction)))]
    n_val = max(1, round(len(order) * config.val_fraction))
    if n_val >= len(order):
        raise DataError(f"{config.source}: {len(order)} images are too few to hold out {config.val_fraction:.0%}")
    val, train = order[:n_val], order[n_val:]
    return sorted(train[:config.max_images] if config.max_images else train), \
        sorted(val[:config.max_val_images] if config.max_val_images else val)


def _load_pair_split(config: DataConfig, split: str) -> PairSet:
    data, root, name = _load_split(config, split)
    if len(data) == 0:
        raise DataError(f"{name}: the data set is empty")
    column = _image_column(data, config, name)
    _check_column(data, config.caption_column, name)
    refs, texts = _refs(data, column, root), data[config.caption_column]
    rows, bad = _validate(refs, texts, name, config.skip_bad_rows)
    if not rows:
        raise DataError(f"{name}: every row is bad ({bad} skipped)")
    pairs = _group_pairs(refs, texts, rows, name)
    pairs.skipped = bad
    return pairs


def _cap(pairs: PairSet, limit: int | None, seed: int) -> PairSet:
    if limit is None or limit >= len(pairs.images):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs.images)), limit))
    return _subset(pairs, keep)


def load_pairs(config: DataConfig) -> tuple[PairSet, PairSet]:
    """Validated (train, held-out) image–caption sets; rows sharing an image path are grouped.

    >>> train, val = load_pairs(DataConfig(source="../shared/data/flickr8k-800/captions.csv"))  # doctest: +SKIP
    """
    if config.source is None:
        raise DataError("no data source given (--source)")
    pairs = _load_pair_split(config, config.split)
    if config.val_split is not None:
        val = _load_pair_split(config, config.val_split)
        return _cap(pairs, config.max_images, config.split_seed), _cap(val, config.max_val_images, config.split_seed)
    train_idx, val_idx = _split_indices(len(pairs.images), config)
    val = _subset(pairs, val_idx)
    val.skipped = 0  # bad rows of the shared pool are counted once, on the training set
    return _subset(pairs, train_idx), val


def _load_label_split(config: DataConfig, split: str) -> LabelledSet:
    data, root, name = _load_split(config, split)
    if len(data) == 0:
        raise DataError(f"{name}: the data set is empty")
    column = _image_column(data, config, name)
    _check_column(data, config.label_column, name)
    feature = data.features[config.label_column]
    raw = data[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        class_names, labels = list(feature.names), list(raw)
    else:
        class_names = sorted({str(v) for v in raw})
        labels = [class_names.index(str(v)) for v in raw]
    refs = _refs(data, column, root)
    rows, bad = _validate(refs, None, name, config.skip_bad_rows)
    if not rows:
        raise DataError(f"{name}: every row is bad ({bad} skipped)")
    return LabelledSet([refs[r] for r in rows], [labels[r] for r in rows],
                       [_describe(refs[r], r, name) for r in rows], class_names, bad)


def _label_subset(data: LabelledSet, keep: list[int]) -> LabelledSet:
    return LabelledSet([data.images[i] for i in keep], [data.labels[i] for i in keep],
                       [data.names[i] for i in keep], data.class_names, data.skipped)


def _label_cap(data: LabelledSet, limit: int | None, seed: int) -> LabelledSet:
    if limit is None or limit >= len(data.images):
        return data
    return _label_subset(data, sorted(random.Random(seed).sample(range(len(data.images)), limit)))


def load_labelled(config: DataConfig) -> tuple[LabelledSet, LabelledSet]:
    """Validated (train, held-out) labelled image sets, with class names from a ClassLabel or the values.

    >>> train, test = load_labelled(DataConfig(source="../shared/data/cifar10", val_split="test"))  # doctest: +SKIP
    """
    if config.source is None:
        raise DataError("no data source given (--source)")
    train = _load_label_split(config, config.split)
    if config.val_split is not None:
        val = _load_label_split(config, config.val_split)
        if val.class_names != train.class_names:
            raise DataError(f"{config.source}: splits {config.split!r} and {config.val_split!r} "
                            f"have different classes")
        return (_label_cap(train, config.max_images, config.split_seed),
                _label_cap(val, config.max_val_images, config.split_seed))
    train_idx, val_idx = _split_indices(len(train.images), config)
    val = _label_subset(train, val_idx)
    val.skipped = 0  # bad rows of the shared pool are counted once, on the training set
    return _label_subset(train, train_idx), val


def _seed(*parts: int) -> int:
    return hash(parts) % (2**63)


class _ImageDataset(Dataset):
    """Decodes and transforms images in DataLoader workers, with augmentation seeded per item."""

    def __init__(self, images: list[str | bytes], names: list[str], transform: Callable, seed: int = 0) -> None:
        self.images, self.names, self.transform, self.seed = images, names, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change caption sampling and augmentation for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        try:
            image = decode_image(self.images[i])
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"{self.names[i]}: cannot decode image ({e})") from e
        # Random augmentation becomes a function of (seed, epoch, item), the same in any worker.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, self.epoch, i))
            return self.transform(image)


class TrainPairs(_ImageDataset):
    """(image tensor, token ids) with one caption per image, sampled anew each epoch."""

    def __init__(self, pairs: PairSet, transform: Callable, tokenizer: Callable, seed: int = 0) -> None:
        super().__init__(pairs.images, pairs.names, transform, seed)
        self.captions, self.tokenizer = pairs.captions, tokenizer

    def caption_index(self, i: int) -> int:
        """Which of image `i`'s captions this epoch uses."""
        return random.Random(_seed(self.seed, self.epoch, i)).randrange(len(self.captions[i]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(i), self.tokenizer([self.captions[i][self.caption_index(i)]])[0]


class LabelledImages(_ImageDataset):
    """(image tensor, label) pairs."""

    def __init__(self, data: LabelledSet, transform: Callable, seed: int = 0) -> None:
        super().__init__(data.images, data.names, transform, seed)
        self.labels = data.labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), self.labels[i]


class EvalImages(_ImageDataset):
    """Image tensors only, for embedding a held-out set."""

    def __init__(self, data: PairSet | LabelledSet, transform: Callable) -> None:
        super().__init__(data.images, data.names, transform)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image(i)


def count_truncated(captions: list[list[str]], tokenizer: Callable, reserved: int = 0) -> int:
    """How many captions exceed the tokenizer's context length (open_clip truncates them silently).

    `reserved` tokens are taken by learned prompt context.
    """
    encode, limit = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or limit is None:
        return 0
    return sum(len(encode(c)) + 2 + reserved > limit for group in captions for c in group)


def eval_texts(pairs: PairSet) -> tuple[list[str], list[int]]:
    """Every caption of every image, and for each caption the index of its image."""
    captions, owners = [], []
    for index, image_captions in enumerate(pairs.captions):
        captions.extend(image_captions)
        owners.extend([index] * len(image_captions))
    return captions, owners
