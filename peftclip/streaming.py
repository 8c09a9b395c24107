"""Streaming image–caption sources: webdataset tar shards and `datasets` streaming sets, for data bigger than memory.

A streaming set is read shard by shard, never held in memory. Shards are split across processes and DataLoader
workers by the libraries' own splitters (webdataset's `split_by_node`/`split_by_worker`, datasets'
`split_dataset_by_node` and its worker sharding). An epoch is a fixed number of batches (`train_num_samples`
over the global batch, as open_clip_train counts it), the same on every process; a worker that runs out of
samples starts another pass over its shards. Everything is a function of (seed, epoch, position), so a run
resumed mid-epoch reads the same batches as one that was never stopped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import torch
import webdataset as wds
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset, get_worker_info

from .data import (
    BadSamples,
    DataConfig,
    DataError,
    PairSet,
    _caption_problem,
    _decode_problem,
    _image_column,
    _ref,
    decode_image,
    load_held_out_pairs,
)
from .utils import stable_seed

__all__ = ["IMAGE_EXTENSIONS", "StreamingPairs", "is_streaming", "load_stream", "shard_urls"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar members read as the image, first found wins
_CAPTION_EXTENSIONS = ("txt", "json")
_Sample = tuple[str, Any, Any]  # (where: "<shard> <key>", image bytes or path or None, caption value)


def shard_urls(source: str) -> list[str] | None:
    """The tar shards a webdataset source names (braces expanded, as open_clip_train's --train-data), or None
    when `source` is not a webdataset source. Every shard must exist."""
    if ".tar" not in source:
        return None
    urls = wds.shardlists.expand_urls(source)
    if not all(url.endswith(".tar") for url in urls):
        return None
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise DataError(f"{source}: shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def is_streaming(config: DataConfig) -> bool:
    """Whether `config` trains from a stream: webdataset shards, or `streaming=True`."""
    return config.source is not None and (config.streaming or shard_urls(config.source) is not None)


def _rank() -> tuple[int, int]:
    """This process's rank and the number of processes, as the libraries' node splitters see them."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


class _TarShards:
    """Samples of local webdataset shards; this process's and worker's share, in a seeded shard order."""

    too_few = "shards"  # what a worker got none of

    def __init__(self, urls: list[str], caption_key: str, split: bool = True) -> None:
        self.urls, self.caption_key = urls, caption_key
        self.split = split  # False: every process and worker reads every shard (a held-out set)

    def samples(self, seed: int, shuffle_buffer: int) -> Iterator[_Sample]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls, seed=seed),  # the same order on every rank, then split
            *([wds.split_by_node, wds.split_by_worker] if self.split else []),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        )
        for sample in pipeline:
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            yield f"{sample['__url__']} {sample['__key__']}", image, self._caption(sample)

    def _caption(self, sample: dict[str, Any]) -> Any:
        """The `.json` member's caption (a text or a list, as `peftclip data to-wds` writes all of them), else
        the `.txt` member."""
        if "json" in sample:
            try:
                caption = json.loads(sample["json"]).get(self.caption_key)
            except (ValueError, AttributeError):
                caption = None
            if caption is not None:
                return caption
        return sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None


class _HubStream:
    """Rows of `datasets.load_dataset(..., streaming=True)`; `split_dataset_by_node` gives each DataLoader worker of
    each process its share at once: whole files where they divide evenly between all workers, else every Nth row
    of the (identically seeded) shuffled stream, so a single file feeds any number of workers."""

    too_few = "samples"  # what a worker got none of

    def __init__(self, config: DataConfig) -> None:
        source = config.source
        kwargs: dict[str, Any] = {}
        if Path(source).is_file() or "*" in source:
            kwargs = {"path": Path(source).suffix.lstrip(".") or "parquet", "data_files": {config.split: source}}
        try:
            data = datasets.load_dataset(kwargs.pop("path", source), split=config.split, streaming=True, **kwargs)
        except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
            raise DataError(f"cannot stream split {config.split!r} of {source}: {str(e).strip().splitlines()[0]}") \
                from e
        self.name, self.root = source, Path(source).parent if Path(source).exists() else Path(".")
        self.image_column = _image_column(data, config, source)
        self.caption_column = config.caption_column
        if data.features is not None and self.caption_column not in data.features:
            raise DataError(f"{source}: no column {self.caption_column!r}; columns are: {', '.join(data.features)}")
        if isinstance((data.features or {}).get(self.image_column), datasets.Image):
            data = data.cast_column(self.image_column, datasets.Image(decode=False))
        self.data = data

    def samples(self, seed: int, shuffle_buffer: int) -> Iterator[_Sample]:
        rank, world_size, worker, workers = wds.utils.pytorch_worker_info()
        # datasets' own worker split hands out whole files and stops the workers beyond `n_shards` (one file: one
        # busy worker); splitting by (process, worker) here lets its "auto" strategy fall back to rows.
        data = split_dataset_by_node(self.data.shuffle(seed=seed, buffer_size=shuffle_buffer),
                                     rank * workers + worker, world_size * workers)
        # `iter` reads the split as given; plain iteration inside a DataLoader worker would split it again.
        rows = (dict(zip(batch, values)) for batch in data.iter(batch_size=64) for values in zip(*batch.values()))
        for i, row in enumerate(rows):
            where = f"{self.name} rank {rank} worker {worker} sample {i}"
            yield where, _ref(row.get(self.image_column), self.root), row.get(self.caption_column)


def _held_out_shards(urls: list[str], config: DataConfig) -> PairSet:
    """The held-out webdataset shards read into a (small) map-style set, its first `max_val_images` samples each
    checked as `--check-data full` checks a map-style set."""
    images, captions, names = [], [], []
    for where, image, caption in _TarShards(urls, config.caption_column, split=False).samples(0, 1):
        if len(images) == config.max_val_images:
            break
        problem = _caption_problem(caption) if image is not None else "no image member"
        if problem is not None or (problem := _decode_problem(image)) is not None:
            raise DataError(f"{where}: {problem}")
        images.append(image)
        captions.append([c.strip() for c in ([caption] if isinstance(caption, str) else caption)])
        names.append(where)
    if not images:
        raise DataError(f"{', '.join(urls)}: the held-out shards hold no samples")
    return PairSet(images, captions, names)


def load_stream(config: DataConfig) -> tuple[_TarShards | _HubStream, PairSet]:
    """The training stream of `config.source` and its fixed, map-style held-out set.

    The held-out set is `val_source` (its `val_split`, else all of it) if given; else for webdataset shards the
    last `val_shards` shards, and for a streamed parquet/Hub set the named `val_split`, memory-mapped.

    >>> stream, val = load_stream(DataConfig(source="shards/{00000..00009}.tar"))  # doctest: +SKIP
    """
    urls = shard_urls(config.source)
    if config.val_source is not None:
        split = config.val_split or "train"
        val = load_held_out_pairs(replace(config, source=config.val_source, split=split, val_split=split,
                                          streaming=False))
    elif urls is not None:
        if len(urls) <= config.val_shards:
            raise DataError(f"{config.source}: {len(urls)} shard(s) leave none to train on after holding out "
                            f"val_shards={config.val_shards}; give more shards or --val-source")
        urls, held_out = urls[:-config.val_shards], urls[-config.val_shards:]
        val = _held_out_shards(held_out, config)
    elif config.val_split is not None:
        val = load_held_out_pairs(replace(config, streaming=False))
    else:
        raise DataError(f"{config.source}: a streamed source needs --val-source or --val-split to evaluate on")
    stream = _TarShards(urls, config.caption_column) if urls is not None else _HubStream(config)
    return stream, val


class StreamingPairs(IterableDataset):
    """Batches of (image tensors, token ids) from a stream, one caption per sample, bad samples counted and skipped.

    `train` calls `configure` with the per-process batch size and the batches in one epoch, and `set_epoch`
    before each epoch; the DataLoader then takes `batch_size=None`. Worker w of W yields batches w, w + W, ...
    of the epoch, the order the DataLoader takes them in; a resumed epoch reads its first batches again.
    """

    def __init__(self, stream: _TarShards | _HubStream, transform: Callable, tokenizer: Callable, seed: int = 0,
                 config: DataConfig | None = None) -> None:
        config = config or DataConfig()
        self.stream, self.transform, self.tokenizer, self.seed = stream, transform, tokenizer, seed
        self.num_samples, self.shuffle_buffer = config.train_num_samples, config.shuffle_buffer
        self.bad = BadSamples(config.max_bad_fraction)
        self.epoch = 0
        self.batch_size = self.batches_per_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shard order, shuffling and augmentation of a new epoch."""
        self.epoch = epoch

    def configure(self, batch_size: int, batches_per_epoch: int) -> None:
        """Yield batches of `batch_size` samples, `batches_per_epoch` of them per epoch in each process."""
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch

    def _sample(self, where: str, image: Any, caption: Any) -> tuple[torch.Tensor, str] | None:
        """The transformed image and its chosen caption, or None (counted) when the sample is unusable."""
        self.bad.read()
        problem = ("missing image member" if image is None else "missing caption member" if caption is None
                   else _caption_problem(caption))
        if problem is None:
            try:
                decoded = decode_image(image, where)
            except DataError as e:
                problem = str(e).removeprefix(f"{where}: ")
        if problem is not None:
            self.bad.add(where, problem)
            return None
        seed = stable_seed(self.seed, self.epoch, where)  # caption and augmentation: functions of the sample alone
        text = (caption if isinstance(caption, str) else caption[random.Random(seed).randrange(len(caption))]).strip()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.transform(decoded), text

    def _batches(self, worker: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of this worker's share: pass after pass over its shards, each shuffled anew. A batch's
        captions are tokenized in one call, as the worker collates it."""
        images, texts = [], []
        for pass_ in range(1_000_000):
            read = 0
            for where, image, caption in self.stream.samples(stable_seed(self.seed, self.epoch, pass_),
                                                             self.shuffle_buffer):
                read += 1
                if (sample := self._sample(where, image, caption)) is None:
                    continue
                images.append(sample[0])
                texts.append(sample[1])
                if len(images) == self.batch_size:
                    yield torch.stack(images), self.tokenizer(texts)
                    images, texts = [], []
            if read == 0:
                rank, world_size = _rank()
                raise DataError(f"no samples reach rank {rank} worker {worker}: a stream needs at least as many "
                                f"{self.stream.too_few} as processes x DataLoader workers ({world_size} x {workers}); "
                                f"use fewer --num-workers or more {self.stream.too_few}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.batch_size:
            raise RuntimeError("StreamingPairs.configure must be called before iterating")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        quota = len(range(worker, self.batches_per_epoch, workers))
        if quota == 0:
            return
        for index, batch in enumerate(self._batches(worker, workers)):
            yield batch
            if index + 1 == quota:
                return
