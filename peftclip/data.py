"""Hugging Face `datasets` in; validated image–caption or image–label sets and torch Datasets out."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import datasets
import pyarrow as pa
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .utils import ConfigMixin, stable_seed

__all__ = ["CHECK_DATA", "BadSamples", "DataConfig", "DataError", "EvalImages", "LabelledImages", "LabelledSet",
           "PairSet", "TrainPairs", "count_truncated", "decode_image", "eval_texts", "load_held_out_labelled",
           "load_held_out_pairs", "load_labelled", "load_pairs", "read_texts", "source_fingerprint"]

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".arrow": "arrow"}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_PROGRESS_MIN_ROWS = 1000
CHECK_DATA = ("full", "fast", "off")
_FULL_CHECK_MAX_ROWS = 10_000  # above this, check_data defaults to "fast": decoding every image takes minutes
_BAD_FRACTION_MIN_SAMPLES = 100  # max_bad_fraction is measured over at least this many samples
_DEFAULT_IMAGE_COLUMN = "file_name"
_DEFAULT_CAPTION_COLUMN = "caption"
_OPEN_CLIP_COLUMNS = ("filepath", "title")  # open_clip_train's --csv-img-key and --csv-caption-key defaults
# Converts a set to its arrow cache; on failure silent, as the load in the calling process then raises the error.
_PREPARE = """import datasets, json, sys
try:
    path, kwargs = json.loads(sys.argv[1])
    datasets.load_dataset(path, **kwargs)
except Exception:
    sys.exit(1)
"""
_PREPARE_IN_CHILD_BYTES = 8 << 20  # data files from this size on are converted in a child process
# DecompressionBombWarning is here for runs that turn warnings into errors (python -W error).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)

ImageRef = str | bytes
T = TypeVar("T", "PairSet", "LabelledSet")
_Select = Callable[[int], Sequence[list[int]]]  # number of images -> the image indices of each set to build


class DataError(ValueError):
    """A data set that cannot be used as given: the message names the file, row, column or value."""

    def __init__(self, message: str) -> None:
        # A DataLoader re-raises a worker's error as type(error)("Caught DataError in DataLoader worker process N.\n
        # Original Traceback ... peftclip.data.DataError: <message>"): keep the one line that says what is wrong.
        if message.startswith("Caught ") and "\n" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


@dataclass
class DataConfig(ConfigMixin):
    """Where the images and their captions or labels come from, and how to split them."""

    section: ClassVar[str] = "data"

    source: str | None = field(default=None, metadata={
        "help": "Image folder (metadata.csv/jsonl beside the images, or split/class subfolders), a "
                ".csv/.tsv/.jsonl/.json/.parquet/.arrow file or a glob of them, a folder of parquet files, "
                "or a Hugging Face Hub dataset id 'user/name'.", "path": True})
    image_column: str = field(default=_DEFAULT_IMAGE_COLUMN, metadata={
        "help": "Column of image paths (relative to the file's folder) or an Image feature; with the default, "
                "a data set without that column uses open_clip's 'filepath' or its first Image feature (e.g. "
                "'image').", "aliases": ["--csv-img-key"]})
    caption_column: str = field(default=_DEFAULT_CAPTION_COLUMN, metadata={
        "help": "Column of captions (a string or a list); with the default, a data set without that column "
                "uses open_clip's 'title'.", "aliases": ["--csv-caption-key"]})
    csv_separator: str | None = field(default=None, metadata={
        "help": "Column separator of .csv/.tsv files ('\\t' for a tab); default: a tab for .tsv files and for "
                ".csv files whose header has tabs but no commas (as open_clip_train writes them), else a comma."})
    label_column: str = field(default="label", metadata={"help": "Column of class labels, for classification."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    val_split: str | None = field(default=None, metadata={
        "help": "Split of the source to evaluate on; if unset, hold out val_fraction of the images."})
    val_fraction: float = field(default=0.1, metadata={
        "help": "Share of images held out (all captions of an image stay together) when val_split is unset."})
    max_images: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_val_images: int | None = field(default=None, metadata={"help": "Use at most this many held-out images."})
    augment: bool = field(default=True, metadata={
        "help": "Random crops on training images (open_clip's train transform); without them a frozen image "
                "tower's features can be cached."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Drop and count bad rows (missing/corrupt image, empty caption) instead of stopping."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/held-out split and subsampling."})
    check_data: str | None = field(default=None, metadata={
        "help": f"Up-front check of the chosen rows, one of {CHECK_DATA}: 'full' decodes every image (at 1/8 scale), "
                f"'fast' checks columns, captions and that image files exist, 'off' checks nothing; default 'full' "
                f"for sets of at most {_FULL_CHECK_MAX_ROWS:,} rows, else 'fast'. Images that fail to decode while "
                f"training are then counted and skipped (see max_bad_fraction)."})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "Stop when more than this share of the training samples read so far (counted over at least 100) "
                "cannot be used (undecodable image, empty caption, missing member); 0 stops at the first."})
    streaming: bool = field(default=False, metadata={
        "help": "Read a parquet/arrow source or Hub dataset id with datasets' streaming=True instead of "
                "memory-mapping it (webdataset .tar shards always stream)."})
    train_num_samples: int | None = field(default=None, metadata={
        "help": "Samples in one epoch of a streaming source (open_clip_train's --train-num-samples); without it "
                "one epoch is max_steps long."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "Samples in the shuffle buffer of a streaming source."})
    val_source: str | None = field(default=None, metadata={
        "help": "A separate source to evaluate on (any map-style source; its val_split, else all of it); a "
                "webdataset source without one holds out its last val_shards shards.", "path": True})
    val_shards: int = field(default=1, metadata={
        "help": "Shards of a webdataset source held out for evaluation when val_source is unset."})

    def __post_init__(self) -> None:
        if self.source is not None and not self.source.strip():
            raise ValueError(f"source={self.source!r}: must not be empty")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if self.check_data is not None and self.check_data not in CHECK_DATA:
            raise ValueError(f"check_data={self.check_data!r}; choose from {CHECK_DATA}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction!r}: must be in [0, 1]")
        for name in ("max_images", "max_val_images", "train_num_samples", "shuffle_buffer", "val_shards"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be at least 1")
        if self.csv_separator == "\\t":  # as typed in a shell or YAML without escapes
            self.csv_separator = "\t"
        if self.csv_separator is not None and len(self.csv_separator) != 1:
            raise ValueError(f"csv_separator={self.csv_separator!r}: must be one character, e.g. ',' or '\\t'")
        for name in ("image_column", "caption_column", "label_column", "split", "val_split"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(f"{name}={getattr(self, name)!r}: must not be empty")


@dataclass
class PairSet:
    """Distinct images (a path or encoded bytes each) with all their captions."""

    images: Sequence[ImageRef]  # paths, or encoded images read from a memory-mapped table when used
    captions: list[list[str]]
    names: list[str]  # the file path, else where the row is: "<file> line N" or "<source> row N"
    skipped: int = 0  # bad rows dropped (only with skip_bad_rows)


@dataclass
class LabelledSet:
    """Images with one integer label each, and the class names."""

    images: Sequence[ImageRef]
    labels: list[int]
    names: list[str]
    class_names: list[str]
    skipped: int = 0


def _path_problem(path: Path) -> str | None:
    """Why the image file at `path` cannot be opened at all, or None."""
    if path.is_dir():
        return "image path is a directory, not a file"
    if not path.is_file():
        return "image file not found"
    if path.stat().st_size == 0:
        return "image file is empty (0 bytes)"
    return None


def _open_image(ref: ImageRef) -> Image.Image:
    """`Image.open` of a path or encoded bytes; above 2x `Image.MAX_IMAGE_PIXELS` PIL refuses (a decompression bomb)."""
    return Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, upright as its EXIF orientation says.

    PIL's convert() clips 16-bit grayscale ("I;16", and "I" as PNG gives it) at 255, a white image, so those
    are scaled from 0..65535 to 0..255 first. The decoded image is changed in place and an RGB one returned as
    is: `exif_transpose` and `convert` would each copy every pixel even when there is nothing to change.
    """
    ImageOps.exif_transpose(image, in_place=True)  # transposes only when the image has an orientation tag
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        return image.convert("I").point(lambda v: v / 257).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")  # PIL warns when dropping palette alpha directly
    return image.convert("RGB")


def decode_image(ref: ImageRef, name: str | None = None) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path or encoded bytes.

    Grayscale, 16-bit, palette and RGBA images are converted and EXIF orientation is applied, as a viewer
    shows the image. A file that cannot be decoded raises `DataError` naming it (`name`, else the path).

    >>> decode_image("photo.jpg").mode  # doctest: +SKIP
    'RGB'
    """
    name = name or (ref if isinstance(ref, str) else "image bytes")
    if isinstance(ref, str) and (problem := _path_problem(Path(ref))) is not None:
        raise DataError(f"{name}: {problem}")
    try:
        with _open_image(ref) as image:
            return _to_rgb(image)
    except _DECODE_ERRORS as e:
        raise DataError(f"{name}: cannot decode image: {e}") from e


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _caption_problem(value: Any) -> str | None:
    captions = _as_list(value)
    if not captions:
        return "no captions (empty list)"
    for caption in captions:
        if not isinstance(caption, str):
            return f"caption is not text: {caption!r}"
        if not caption.strip():
            return f"empty caption {caption!r}"
    return None


def _separator(path: Path, config: DataConfig) -> str | None:
    """The column separator of a .csv/.tsv file (None for other files).

    `csv_separator` if set, else a tab for .tsv, and for a .csv whose header has tabs but no commas
    (open_clip_train writes tab-separated .csv files); else a comma.
    """
    if path.suffix not in (".csv", ".tsv"):
        return None
    if config.csv_separator is not None:
        return config.csv_separator
    if path.suffix == ".tsv":
        return "\t"
    if "*" in path.name:
        return ","
    with path.open(encoding="utf-8", errors="replace") as f:
        header = f.readline()
    return "\t" if "\t" in header and "," not in header else ","


def _csv_options(separator: str | None) -> dict[str, Any]:
    """Read CSV text as written: pandas would otherwise turn captions like 'NA' or 'null' into NaN."""
    return {} if separator is None else {"keep_default_na": False, "na_values": [], "delimiter": separator}


def _line_numbers(path: Path, separator: str | None) -> list[int] | None:
    """The line each row starts on in one .csv/.tsv (the header is line 1) or .jsonl file; None for other files.

    Blank lines are passed over, as pandas and pyarrow pass over them; a quoted CSV field may span lines.
    """
    if "*" in path.name or (separator is None and path.suffix != ".jsonl"):
        return None
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        if separator is None:
            return [n for n, line in enumerate(f, start=1) if line.strip()]
        reader, starts, previous = csv.reader(f, delimiter=separator), [], 0
        for record in reader:
            if record:
                starts.append(previous + 1)
            previous = reader.line_num
    return starts[1:]


@contextmanager
def _loading(shown: str, split: str) -> Iterator[None]:
    """Turn what `datasets.load_dataset` raises into a one-line DataError naming the source and split."""
    try:
        yield
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        cause = e  # datasets wraps parser errors in "An error occurred while generating the dataset"
        while isinstance(cause, datasets.exceptions.DatasetBuildError) and cause.__cause__ is not None:
            cause = cause.__cause__
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in reason:
            raise DataError(f"{shown}: the data set is empty (split {split!r} has no rows)") from e
        raise DataError(f"cannot load split {split!r} of {shown}: {reason}") from e


def _load_dataset(path: str, **kwargs: Any) -> datasets.Dataset:
    """`datasets.load_dataset`, with a set's one-time conversion to its arrow cache run in a child process.

    The conversion leaves memory in this process that grows with the set (pyarrow's pool and the heap keep the
    record batches it wrote: +110 MB anonymous RSS for 16k embedded 224x224 JPEGs, +45 MB for 4k), counted in a
    training run's peak RSS; loading the prepared cache only memory-maps it. For local sets only (a Hub id loads in
    this process); data files under 8 MB are converted here, saving the child's start. If the child fails, the
    load here raises the error.
    """
    try:
        builder = datasets.load_dataset_builder(path, **{k: v for k, v in kwargs.items() if k != "split"})
        prepared = Path(builder.cache_dir, datasets.config.DATASET_INFO_FILENAME).is_file()
        files = [f for split_files in (builder.config.data_files or {}).values() for f in split_files]
        small = bool(files) and all(os.path.isfile(f) for f in files) and sum(map(os.path.getsize, files)) < \
            _PREPARE_IN_CHILD_BYTES
    except Exception:  # noqa: BLE001 - whatever it is, load_dataset below raises it inside _loading
        prepared = small = True
    if not prepared and not small:  # not multiprocessing: its child would import the caller's __main__ and torch
        subprocess.run([sys.executable, "-c", _PREPARE, json.dumps([path, kwargs])], check=False)
    return datasets.load_dataset(path, **kwargs)


def _is_hub_id(source: str) -> bool:
    """Whether `source` names a Hub dataset ('user/name') rather than a local path."""
    return source.count("/") == 1 and not Path(source).exists()


def _read_file(path: Path, config: DataConfig, split: str) -> datasets.Dataset:
    """A table file (or glob) as one split named `config.split`, so that asking it for another split fails."""
    if "*" not in path.name:
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the data set is empty (0 bytes)")
    with _loading(str(path), split):
        return _load_dataset(_BUILDERS[path.suffix], data_files={config.split: str(path)}, split=split,
                             **_csv_options(_separator(path, config)))


class _Split(NamedTuple):
    """One split as loaded: the rows, the folder relative image paths start from, a display name, and the
    local table file (or glob) it was read from, if one."""

    data: datasets.Dataset
    root: Path
    name: str
    table_file: Path | None


def _load_split(config: DataConfig, split: str) -> _Split:
    """The split as a `datasets.Dataset`, with where it came from."""
    source = Path(config.source)
    if source.is_dir():
        metadata = next((source / m for m in _METADATA_FILES if (source / m).is_file()), None)
        if metadata is not None:  # read directly: the imagefolder builder turns captions like 'NA' into None
            return _Split(_read_file(metadata, config, split), source, metadata.name, metadata)
        with _loading(str(source), split):  # split or class subfolders, or parquet shards: datasets infers which
            return _Split(_load_dataset(str(source), split=split), source, source.name, None)
    if source.suffix in _BUILDERS:
        return _Split(_read_file(source, config, split), source.parent, source.name, source)
    if not _is_hub_id(config.source):
        raise DataError(f"cannot read {config.source}: expected a folder, a "
                        f"{'/'.join(sorted(_BUILDERS))} file or glob, or a Hub dataset id 'user/name'")
    with _loading(f"{config.source} (no such local path, so tried as a Hub dataset id)", split):
        # In this process: resolving a Hub id twice (here and in a child) would double its Hub round trips.
        return _Split(datasets.load_dataset(config.source, split=split), Path("."), config.source, None)


class _Table(NamedTuple):
    """One split read from the source: the table, its caption or label column, per-row image refs, names and
    locations, and its display name."""

    data: datasets.Dataset
    column: str  # of captions or labels
    refs: Sequence[ImageRef | None]  # a list of paths, or `_EncodedImages` read from the table on access
    keys: list[Any]  # per row, what identifies its image: the path, a hash of its bytes, or None for no image
    names: list[str]  # the image path, else the row's location
    where: list[str]  # "<file> line N" for CSV/TSV/JSONL files, else "<source> row N"
    name: str


def _column(data: datasets.Dataset, wanted: str, default: str, fallbacks: Sequence[str], name: str) -> str:
    """`wanted`, or while it is the default and absent, the first of `fallbacks` present; else a DataError."""
    if wanted not in data.column_names and wanted == default:
        wanted = next((c for c in fallbacks if c in data.column_names), wanted)
    if wanted not in data.column_names:
        raise DataError(f"{name}: no column {wanted!r}; columns are: {', '.join(data.column_names)}")
    return wanted


def _image_column(data: datasets.Dataset, config: DataConfig, name: str) -> str:
    """The image column: as configured; with the default, open_clip's `filepath` or the first Image feature
    (imagefolder and most Hub sets have an `image` feature)."""
    image_features = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
    return _column(data, config.image_column, _DEFAULT_IMAGE_COLUMN, [_OPEN_CLIP_COLUMNS[0], *image_features], name)


def _ref(value: Any, root: Path) -> ImageRef | None:
    """A path (resolved against `root`) or encoded bytes from an image column's value."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, str):
        return value if Path(value).is_absolute() else str(root / value)
    return value if isinstance(value, bytes) else None


class _EncodedImages(Sequence):
    """The images of an Image column, read from the (memory-mapped) table when asked for, never held as a list.

    Pickled into DataLoader workers as a reference to the table's cache files, so memory does not grow with the
    image bytes; `take` selects rows without copying any.
    """

    def __init__(self, data: datasets.Dataset, column: str, root: Path, rows: Sequence[int] | None = None) -> None:
        self.data = data.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column, self.root = column, root
        self.rows = range(len(data)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> ImageRef | None:  # type: ignore[override]
        return _ref(self.data[int(self.rows[i])][self.column], self.root)

    def take(self, indices: Sequence[int]) -> "_EncodedImages":
        """The images at `indices`, still unread."""
        taken = _EncodedImages.__new__(_EncodedImages)
        taken.data, taken.column, taken.root = self.data, self.column, self.root
        taken.rows = [self.rows[i] for i in indices]
        return taken


def _take(refs: Sequence[ImageRef | None], indices: Sequence[int]) -> Sequence[ImageRef | None]:
    return refs.take(indices) if isinstance(refs, _EncodedImages) else [refs[i] for i in indices]


def _file_batches(data: datasets.Dataset) -> Iterator[pa.RecordBatch]:
    """The rows of `data` (as loaded: not selected or reordered) read from its cache files with plain reads, none
    if it has none. A pass over every image through the table's memory map would leave all of them resident in
    this process, counted in its RSS until the kernel reclaims them."""
    for cache_file in data.cache_files:
        with pa.OSFile(cache_file["filename"]) as source:
            yield from pa.ipc.open_stream(source)


def _hash_images(batches: Iterable[pa.RecordBatch], images: _EncodedImages) -> list[Any]:
    keys: list[Any] = []
    for batch in batches:
        column = batch.column(images.column)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        for data, path in zip(column.field("bytes"), column.field("path")):
            if data.is_valid:
                keys.append(hashlib.blake2b(data.as_buffer(), digest_size=16).digest())
            else:
                keys.append(_ref(path.as_py(), images.root))
    return keys


def _image_keys(images: _EncodedImages) -> list[Any]:
    """Per row: the path of a path-only image, else a hash of its bytes (rows with the same image group
    together), else None. Reads the table in batches, so memory stays flat however many images there are."""
    keys = _hash_images(_file_batches(images.data), images)
    if len(keys) != len(images.data):  # in memory, or fewer rows than its files: through the table
        keys = _hash_images(images.data.with_format("arrow").iter(batch_size=1024), images)
    return keys


def _refs(data: datasets.Dataset, column: str, root: Path,
          where: list[str]) -> tuple[Sequence[ImageRef | None], list[Any], list[str]]:
    """Per row: the image (lazily read `_EncodedImages` for an Image feature, else resolved paths), its grouping
    key, and a readable name (the path, else the row's location)."""
    if isinstance(data.features[column], datasets.Image):
        refs: Sequence[ImageRef | None] = _EncodedImages(data, column, root)
        keys = _image_keys(refs)
    else:
        refs = keys = [_ref(value, root) for value in data[column]]
    return refs, keys, [key if isinstance(key, str) else where[row] for row, key in enumerate(keys)]


def _read_table(config: DataConfig, split: str, column: str, default: str = "",
                fallbacks: Sequence[str] = ()) -> _Table:
    """Read `split` and check that it has rows, an image column and `column` (see `_column`)."""
    data, root, name, table_file = _load_split(config, split)
    if len(data) == 0:
        raise DataError(f"{name}: the data set is empty")
    image_column = _image_column(data, config, name)
    lines = _line_numbers(table_file, _separator(table_file, config)) if table_file is not None else None
    if lines is not None and len(lines) == len(data):
        where = [f"{name} line {line}" for line in lines]
    else:
        where = [f"{name} row {row}" for row in range(len(data))]
    return _Table(data, _column(data, column, default, fallbacks, name), *_refs(data, image_column, root, where),
                  where, name)


def _check_mode(config: DataConfig, n_rows: int) -> str:
    if config.check_data is not None:
        return config.check_data
    return "full" if n_rows <= _FULL_CHECK_MAX_ROWS else "fast"


def _image_problem(table: _Table, row: int, check: str) -> str | None:
    """Why row `row`'s image is not usable, or None. 'fast' only looks for it; JPEGs decode at 1/8 scale, which
    still finds truncation."""
    key = table.keys[row]
    if key is None:
        return "no image in this row"
    if check == "off":
        return None
    if isinstance(key, str) and (problem := _path_problem(Path(key))) is not None:
        return problem
    if check == "fast":
        return None
    return _decode_problem(table.refs[row])


def _decode_problem(ref: ImageRef) -> str | None:
    """Why encoded image `ref` cannot be decoded, or None. Only a check, its pixels unused: JPEGs decode at
    1/8 scale, about 6x faster, which still finds truncation and corrupt data."""
    try:
        with _open_image(ref) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except _DECODE_ERRORS as e:
        return f"cannot decode image: {e}"
    return None


def _validate(table: _Table, rows: list[int], row_problem: Callable[[int], str | None],
              skip: bool, check: str) -> tuple[list[int], int]:
    """The good ones of `rows` and the number of bad ones; raises on the first bad row unless `skip`."""
    good, bad, checked = [], 0, {}
    show = check == "full" and len(rows) > _PROGRESS_MIN_ROWS
    for row in tqdm(rows, desc="checking data", leave=False, disable=not show):
        key = table.keys[row] if table.keys[row] is not None else ("row", row)  # a shared image is checked once
        if key not in checked:
            checked[key] = _image_problem(table, row, check)
        problem = checked[key] or row_problem(row)
        if problem is None:
            good.append(row)
        elif skip:
            bad += 1
        else:
            where = f"{table.names[row]} ({table.where[row]})" if isinstance(key, str) else table.names[row]
            raise DataError(f"{where}: {problem} (pass --skip-bad-rows to drop such rows)")
    if rows and not good:
        raise DataError(f"{table.name}: every row is bad ({bad} skipped)")
    return good, bad


def _group_rows(keys: list[Any]) -> list[list[int]]:
    """Row numbers per distinct image, in order of first appearance: same path or same encoded bytes."""
    groups: dict[Any, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key if key is not None else ("row", row), []).append(row)
    return list(groups.values())


def _split_indices(n: int, config: DataConfig) -> tuple[list[int], list[int]]:
    """Seeded image-level split; the caps shrink each side without moving images between them."""
    order = list(range(n))
    random.Random(config.split_seed).shuffle(order)
    n_val = max(1, round(n * config.val_fraction)) if config.val_fraction > 0 else 0
    if n_val >= n:
        raise DataError(f"{config.source}: {n} image(s) are too few to hold out val_fraction={config.val_fraction}; "
                        f"use val_fraction=0 or a val_split")
    val, train = order[:n_val], order[n_val:]
    if config.max_images is not None:
        train = train[:config.max_images]
    val_limit = config.max_val_images
    if val_limit is None and config.max_images is not None and n_val:
        val_limit = max(1, round(len(train) * config.val_fraction / (1 - config.val_fraction)))
    return sorted(train), sorted(val[:val_limit])


def _cap_indices(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _held_out(config: DataConfig, load_sets: Callable[[DataConfig, str, _Select], list[T]]) -> T:
    """The held-out set alone: the named val_split, or the images `_train_val` holds out of the training split."""
    if config.source is None:
        raise DataError("no data source given (--source)")
    if config.val_split is None:
        (val,) = load_sets(config, config.split, lambda n: [_split_indices(n, config)[1]])
    else:
        (val,) = load_sets(config, config.val_split,
                           lambda n: [_cap_indices(n, config.max_val_images, config.split_seed)])
    return val


def _train_val(config: DataConfig, load_sets: Callable[[DataConfig, str, _Select], list[T]]) -> tuple[T, T]:
    """Both sets: the named val_split, or an image-level hold-out of the training split."""
    if config.source is None:
        raise DataError("no data source given (--source)")
    if config.val_split is None:
        train, val = load_sets(config, config.split, lambda n: _split_indices(n, config))
        return train, val
    (train,) = load_sets(config, config.split, lambda n: [_cap_indices(n, config.max_images, config.split_seed)])
    return train, _held_out(config, load_sets)


def _validated_sets(table: _Table, groups: list[list[int]], select: _Select, row_problem: Callable[[int], str | None],
                    config: DataConfig) -> list[tuple[list[list[int]], int]]:
    """Per set that `select` picks: the good rows of each chosen image (dropping images left with none), bad rows.

    Each set is checked as `config.check_data` says, by default fully when small (a held-out set usually is)."""
    sets = []
    for chosen in select(len(groups)):
        rows = sorted(row for i in chosen for row in groups[i])
        good, bad = _validate(table, rows, row_problem, config.skip_bad_rows, _check_mode(config, len(rows)))
        good = set(good)
        kept = [[row for row in groups[i] if row in good] for i in chosen]
        sets.append(([image_rows for image_rows in kept if image_rows], bad))
    return sets


def _pair_sets(config: DataConfig, split: str, select: _Select) -> list[PairSet]:
    """Group rows by image, choose images with `select`, then validate only the chosen images' rows."""
    table = _read_table(config, split, config.caption_column, _DEFAULT_CAPTION_COLUMN, _OPEN_CLIP_COLUMNS[1:])
    texts = table.data[table.column][:]  # a list: reading a datasets Column row by row costs ~1 ms a row
    return [PairSet(images=_take(table.refs, [rows[0] for rows in kept]), names=[table.names[rows[0]] for rows in kept],
                    captions=[[c.strip() for row in rows for c in _as_list(texts[row])] for rows in kept], skipped=bad)
            for kept, bad in _validated_sets(table, _group_rows(table.keys), select,
                                             lambda row: _caption_problem(texts[row]), config)]


def load_pairs(config: DataConfig) -> tuple[PairSet, PairSet]:
    """Validated (train, held-out) image–caption sets; rows sharing an image are grouped.

    Only the images kept (after the split and `max_images`) are checked, so quick runs on big sets stay quick.

    Args:
        config: the source, its columns and how to split it.

    >>> train, val = load_pairs(DataConfig(source="../shared/data/flickr8k-800/captions.csv"))  # doctest: +SKIP
    >>> len(train.captions[0])  # doctest: +SKIP
    5
    """
    return _train_val(config, _pair_sets)


def load_held_out_pairs(config: DataConfig) -> PairSet:
    """The validated held-out image–caption set alone, the same images `load_pairs` holds out.

    With `val_split` only that split is read, so a source holding nothing but a test split can be evaluated.

    >>> test = load_held_out_pairs(DataConfig(source="data/", val_split="test"))  # doctest: +SKIP
    """
    return _held_out(config, _pair_sets)


def _label_sets(config: DataConfig, split: str, select: _Select) -> list[LabelledSet]:
    """One image per row; labels from a ClassLabel feature (-1 means none), or the sorted distinct values."""
    table = _read_table(config, split, config.label_column)
    feature, raw = table.data.features[table.column], table.data[table.column][:]
    if isinstance(feature, datasets.ClassLabel):
        class_names, labels = list(feature.names), [v if v is not None and v >= 0 else None for v in raw]
    else:
        class_names = sorted({str(v) for v in raw if v is not None})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[str(v)] if v is not None else None for v in raw]
    return [LabelledSet(_take(table.refs, [r for (r,) in kept]), [labels[r] for (r,) in kept],
                        [table.names[r] for (r,) in kept], class_names, bad)
            for kept, bad in _validated_sets(table, [[row] for row in range(len(raw))], select,
                                             lambda row: None if labels[row] is not None else "no label", config)]


def load_labelled(config: DataConfig) -> tuple[LabelledSet, LabelledSet]:
    """Validated (train, held-out) labelled image sets, with class names from a ClassLabel or the values.

    >>> train, test = load_labelled(DataConfig(source="../shared/data/cifar10", val_split="test"))  # doctest: +SKIP
    """
    train, val = _train_val(config, _label_sets)
    if val.class_names != train.class_names:
        raise DataError(f"{config.source}: splits {config.split!r} and {config.val_split!r} have different classes")
    return train, val


def load_held_out_labelled(config: DataConfig) -> LabelledSet:
    """The validated held-out labelled set alone, as `load_labelled` holds it out (see `load_held_out_pairs`).

    >>> test = load_held_out_labelled(DataConfig(source="../shared/data/cifar10", val_split="test"))  # doctest: +SKIP
    """
    return _held_out(config, _label_sets)


def _file_stamp(path: Path, root: Path) -> str:
    """Name (relative to `root` where it is inside), size and modification time, or that it is missing."""
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        stat = path.stat()
    except OSError:
        return f"{name}\0missing\n"
    return f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n"


def _split_files(config: DataConfig, loaded: _Split) -> list[Path]:
    """The local files a split's rows come from: its table file(s) and the images its rows name by path; for a
    folder without a metadata file (class or split subfolders, parquet shards), every file under it."""
    if loaded.table_file is None:
        return [p for p in loaded.root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(loaded.root).parts)]
    files = sorted(loaded.table_file.parent.glob(loaded.table_file.name))
    column = _image_column(loaded.data, config, loaded.name)
    if not isinstance(loaded.data.features[column], datasets.Image):  # embedded images are in the table files
        files += [Path(p) if Path(p).is_absolute() else loaded.root / p
                  for p in set(loaded.data[column]) if isinstance(p, str)]
    return files


def _streamed_files(config: DataConfig) -> list[Path] | None:
    """The local files a streamed source reads (webdataset shards, streamed table files; a missing one by its
    name), or None for a map-style source."""
    from .streaming import shard_urls  # here: streaming imports this module

    if (urls := shard_urls(config.source)) is not None:
        return [Path(url) for url in urls]
    if not config.streaming:
        return None
    source = Path(config.source)
    return sorted(source.parent.glob(source.name)) or [source]


def _hub_revision(repo_id: str) -> str:
    """The commit a Hub dataset id's main branch is at: asked of the Hub (fetching only its README.md, as datasets
    does to pin the revision it streams), or offline or unreachable the one the local hub cache recorded."""
    from huggingface_hub import snapshot_download  # here: most runs never read from the Hub

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["README.md"])).name
    except OSError as e:
        raise DataError(f"{repo_id}: no such local path, and as a Hub dataset id its revision cannot be resolved "
                        f"(a resumed run compares it): {str(e).strip().splitlines()[0]}") from e


def source_fingerprint(config: DataConfig) -> str:
    """A hash of the data `config` reads, that changes when the data under the same source changes.

    Local sources: the names (relative to the source), sizes and modification times of the table files and of
    the images their rows name (for a folder without a metadata file, of every file in it); nothing is decoded.
    A Hub dataset id: the fingerprint `datasets` gives each split, which follows the cached revision (offline
    it reads the local cache); streamed, the commit its main branch resolves to (offline: the hub cache's), as no
    data is read up front. A resumed run compares it with the one its checkpoint recorded.

    Args:
        config: the source, its columns and the splits read (`split`, and `val_split` if set).

    >>> source_fingerprint(DataConfig(source="data/captions.csv"))  # doctest: +SKIP
    '3f0c...'
    """
    if config.source is None:
        raise DataError("no data source given (--source)")
    digest = hashlib.sha256()
    if (streamed := _streamed_files(config)) is not None:
        if streamed == [Path(config.source)] and _is_hub_id(config.source):
            digest.update(f"hub\0{config.source}\0{_hub_revision(config.source)}\n".encode())  # a Hub dataset id
        for path in streamed:
            digest.update(_file_stamp(path, Path(config.source).parent).encode())
        return digest.hexdigest()
    for split in dict.fromkeys(s for s in (config.split, config.val_split) if s is not None):
        loaded = _load_split(config, split)
        digest.update(f"split\0{split}\n".encode())
        if loaded.table_file is None and not Path(config.source).is_dir():  # a Hub dataset id
            digest.update(f"{loaded.data._fingerprint}\n".encode())
            continue
        for path in sorted(set(_split_files(config, loaded))):
            digest.update(_file_stamp(path, loaded.root).encode())
    return digest.hexdigest()


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped: one text per line, e.g. to embed.

    >>> read_texts("queries.txt")  # doctest: +SKIP
    ['a dog on a beach', 'two cats']
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read texts file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the first text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from e
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no texts (one per line)")
    return texts


class BadSamples:
    """Counts the training samples read and those skipped as unusable, across DataLoader workers.

    The counts live in shared memory that forked or spawned workers inherit, so the training process reads
    the total. Past `max_fraction` of the samples read (counted over at least 100) `add` raises a one-line
    DataError naming the sample.
    """

    def __init__(self, max_fraction: float = 0.01) -> None:
        self.max_fraction = max_fraction
        self._counts = multiprocessing.Array("q", 2)  # samples read, bad samples

    @property
    def count(self) -> int:
        """Bad samples skipped so far, in every worker."""
        return self._counts[1]

    def read(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def add(self, where: str, problem: str) -> None:
        """Count one bad sample (already `read`); raise if there are now too many."""
        with self._counts.get_lock():
            self._counts[1] += 1
            read, bad = self._counts[0], self._counts[1]
        if bad > self.max_fraction * max(read, _BAD_FRACTION_MIN_SAMPLES):
            raise DataError(f"{where}: {problem}; {bad} of {read} samples read were bad, more than "
                            f"max_bad_fraction={self.max_fraction} (raise --max-bad-fraction to skip more)")
        warnings.warn(f"skipped {where}: {problem}", stacklevel=2)


class _ImageDataset(Dataset):
    """Decodes and transforms images in DataLoader workers, with augmentation seeded per item.

    With `bad` (training sets), an item whose image cannot be decoded is counted and replaced by the next
    usable one, so batches keep their size; without it (evaluation) the DataError is raised.
    """

    def __init__(self, images: Sequence[ImageRef], names: list[str], transform: Callable, seed: int = 0,
                 bad: BadSamples | None = None) -> None:
        self.images, self.names, self.transform, self.seed, self.bad = images, names, transform, seed, bad
        self.epoch = 0

    def __getitem__(self, i: int) -> Any:
        if self.bad is None:
            return self.item(i)
        for j in range(i, i + len(self)):
            self.bad.read()
            try:
                return self.item(j % len(self))
            except DataError as e:
                self.bad.add(self.names[j % len(self)], str(e).removeprefix(f"{self.names[j % len(self)]}: "))
        raise DataError("every training image failed to decode")

    def item(self, i: int) -> Any:
        """Item `i`; raises DataError if its image cannot be decoded."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Change caption sampling and augmentation for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        image = decode_image(self.images[i], self.names[i])
        # Random augmentation becomes a function of (seed, epoch, item), the same in any worker.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(stable_seed(self.seed, self.epoch, i))
            return self.transform(image)


class TrainPairs(_ImageDataset):
    """(image tensor, token ids) with one caption per image, sampled anew each epoch.

    The caption of item i is a function of (seed, epoch, i), so it is the same in any worker or process.
    """

    def __init__(self, pairs: PairSet, transform: Callable, tokenizer: Callable, seed: int = 0,
                 max_bad_fraction: float = 0.01) -> None:
        super().__init__(pairs.images, pairs.names, transform, seed, BadSamples(max_bad_fraction))
        self.captions, self.tokenizer = pairs.captions, tokenizer

    def caption_index(self, i: int) -> int:
        """Which of image `i`'s captions this epoch uses."""
        return random.Random(stable_seed(self.seed, self.epoch, i)).randrange(len(self.captions[i]))

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(i), self.tokenizer([self.captions[i][self.caption_index(i)]])[0]


class LabelledImages(_ImageDataset):
    """(image tensor, label) pairs."""

    def __init__(self, data: LabelledSet, transform: Callable, seed: int = 0, max_bad_fraction: float = 0.01) -> None:
        super().__init__(data.images, data.names, transform, seed, BadSamples(max_bad_fraction))
        self.labels = data.labels

    def item(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), self.labels[i]


class EvalImages(_ImageDataset):
    """Image tensors only, for embedding a held-out set."""

    def __init__(self, data: PairSet | LabelledSet, transform: Callable) -> None:
        super().__init__(data.images, data.names, transform)

    def item(self, i: int) -> torch.Tensor:
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
