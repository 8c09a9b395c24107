"""Embeddings of a folder of images, kept on disk in safetensors and reused while nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .utils import cache_root, write_safetensors_atomic

__all__ = ["IMAGE_SUFFIXES", "default_index_path", "image_index", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def default_index_path(folder: str | os.PathLike) -> Path:
    """Where the index of `folder` is kept unless told otherwise: under `cache_root()/search`."""
    folder = Path(folder)
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "search" / f"{folder.name}-{digest}.safetensors"


def _folder_signature(files: list[Path]) -> str:
    """Changes when any image is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, in file-name order (a subfolder named like an image is not one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _read_index(index_path: Path, signature: str, owned: bool) -> torch.Tensor | None:
    """The embeddings an index holds for `signature`; None when it must be (re)built.

    A damaged index is rebuilt where peftclip owns the path (`owned`); a file at a path the
    user named is replaced only when it is a peftclip index, never when it is something else.
    """
    try:
        with safe_open(str(index_path), "pt") as f:
            metadata = f.metadata() or {}
            if "signature" not in metadata and not owned:
                raise ValueError("its header has no peftclip signature")
            return f.get_tensor("embeddings") if metadata.get("signature") == signature else None
    except (SafetensorError, OSError, ValueError) as e:  # not safetensors, truncated, a folder
        if owned and index_path.is_file():
            return None
        raise ValueError(f"{index_path} is not a peftclip search index ({e}); pass another --index "
                         f"(peftclip never overwrites a file it did not write)") from e


def image_index(folder: str | os.PathLike, index_path: str | os.PathLike, identity: str,
                encode: Callable[[list[Path]], torch.Tensor], owned: bool = True) -> tuple[list[Path], torch.Tensor]:
    """Embeddings of every image in `folder` (file-name order), kept in `index_path` and reused while
    neither the files nor `identity` (the model) changed; `encode(paths)` makes them otherwise.

    `owned`: `index_path` is peftclip's own (under the cache), so a damaged index there is rebuilt.
    """
    files, index_path = list_images(folder), Path(index_path)
    signature = hashlib.sha256(f"{_folder_signature(files)}\0{identity}".encode()).hexdigest()
    if index_path.exists():
        embeddings = _read_index(index_path, signature, owned)
        if embeddings is not None and len(embeddings) == len(files):
            return files, embeddings
    embeddings = encode(files)
    write_safetensors_atomic({"embeddings": embeddings.contiguous()}, index_path,
                       metadata={"signature": signature, "files": json.dumps([p.name for p in files])})
    return files, embeddings
