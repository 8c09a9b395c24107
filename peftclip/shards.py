"""Convert a CSV / JSONL / image-folder set into size-bounded webdataset or parquet shards, the fast path for
data that has outgrown memory (`peftclip data to-wds`, `peftclip data to-parquet`)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import datasets
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .data import DataConfig, DataError, load_pairs

__all__ = ["DEFAULT_SHARD_BYTES", "write_parquet_shards", "write_webdataset_shards"]

DEFAULT_SHARD_BYTES = 256 * 2**20  # open_clip's img2dataset shards hold about 10k images, a few hundred MB
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the members peftclip.streaming reads


def _encoded(config: DataConfig) -> Iterator[tuple[bytes, str, list[str]]]:
    """Each image of the source as its file's own bytes (never re-encoded when the format is a shard member's),
    its member extension, and its captions; the whole source, checked as `check_data` says."""
    pairs, _ = load_pairs(replace(config, val_fraction=0.0, val_split=None))
    for ref, name, captions in tqdm(zip(pairs.images, pairs.names, pairs.captions), total=len(pairs.images),
                                    desc="writing shards", unit="image"):
        data = Path(ref).read_bytes() if isinstance(ref, str) else ref
        with Image.open(io.BytesIO(data)) as image:
            ext = _FORMATS.get(image.format or "")
            if ext is None:  # e.g. BMP or TIFF: stored as PNG, losslessly
                out = io.BytesIO()
                image.save(out, "PNG")
                data, ext = out.getvalue(), "png"
        yield data, ext, captions


def _new_folder(out: Path) -> None:
    """Shards go into a new or empty folder: never among files peftclip did not write."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; give a new folder for the shards")
    out.mkdir(parents=True, exist_ok=True)


def write_webdataset_shards(config: DataConfig, out: str | Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write `config.source` as webdataset tar shards `out/00000.tar`, ... of at most `max_bytes` each.

    Each sample is the image (`.jpg`/`.png`/`.webp`), its first caption as `.txt` (what open_clip_train reads)
    and all its captions as `.json` {"caption": [...]}. Train on them with `--source 'out/{00000..NNNNN}.tar'`.

    >>> write_webdataset_shards(DataConfig(source="captions.csv"), "shards")  # doctest: +SKIP
    [PosixPath('shards/00000.tar')]
    """
    out = Path(out)
    _new_folder(out)
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=10**9, maxsize=max_bytes, verbose=0) as sink:
        for i, (data, ext, captions) in enumerate(_encoded(config)):
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": captions[0],
                        "json": json.dumps({"caption": captions}).encode()})
    return sorted(out.glob("*.tar"))


def write_parquet_shards(config: DataConfig, out: str | Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write `config.source` as parquet files `out/train-00000.parquet`, ... of about `max_bytes` of images each,
    with the images embedded (an Image feature) and a `caption` list per image. `--source out` then reads them
    memory-mapped, or with `--streaming`.

    >>> write_parquet_shards(DataConfig(source="captions.csv"), "parquet")  # doctest: +SKIP
    [PosixPath('parquet/train-00000.parquet')]
    """
    out = Path(out)
    _new_folder(out)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    rows: dict[str, list] = {"image": [], "caption": []}
    size, paths = 0, []

    def flush() -> None:
        paths.append(out / f"train-{len(paths):05d}.parquet")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(paths[-1]))
        rows["image"], rows["caption"] = [], []

    for data, _, captions in _encoded(config):
        rows["image"].append({"bytes": data, "path": None})
        rows["caption"].append(captions)
        size += len(data)
        if size >= max_bytes:
            flush()
            size = 0
    if rows["image"]:
        flush()
    return paths
