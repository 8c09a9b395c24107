"""Loader throughput on webdataset shards: peftclip's `StreamingPairs` against open_clip_train's `get_wds_dataset`.

    python -m benchmarks.wds_loader                    # 16 shards of 1,000 224x224 JPEGs, 2 workers, batch 64
    python -m benchmarks.wds_loader --quick            # 4 tiny shards: both loaders run and deliver an epoch

Both read the same training shards with the same DataLoader worker count and batch size, through the same
transform (the train preprocess of `open_clip.create_model_and_transforms`) and tokenizer; each runs in its own
process, killed after `--timeout` seconds, and times one epoch of every training sample from creating its loader
to the last batch (worker start-up included). The ratio is peftclip's images/s over open_clip_train's.

Set-up before that is timed apart (`setup_seconds`): each loader's imports and, for peftclip, `load_stream`, which
also reads and checks the held-out shard into the evaluation set. open_clip_train's training loader never reads a
held-out set (its `--val-data` loader is built elsewhere), so counting that read would time work only one side does.

open_clip_train's webdataset epoch is `with_epoch(batches per worker)` over a pipeline that repeats forever, so a
worker whose shards never fill one batch (fewer samples than `batch_size` in its shards, or none left after
`filter_no_caption_or_no_image`) loops without yielding and the loader hangs; without `--dataset-resampled` it
also needs at least as many shards as workers. The benchmark refuses such a layout up front.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.big_data import _samples
from benchmarks.process import REPO_ROOT, run_measured, thread_env

_LOADERS = ("peftclip", "open_clip_train")


def make_shards(folder: Path, n_shards: int, per_shard: int) -> dict[str, str]:
    """`n_shards` training shards of `per_shard` samples (jpg + txt, as img2dataset writes them) and one more that
    peftclip's webdataset source holds out; the shard pattern each loader is given, the same training shards."""
    import webdataset as wds
    if not (folder / f"{n_shards:05d}.tar").exists():
        folder.mkdir(parents=True, exist_ok=True)
        samples = _samples((n_shards + 1) * per_shard)
        for shard in range(n_shards + 1):
            with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
                for i in range(shard * per_shard, (shard + 1) * per_shard):
                    sink.write({"__key__": f"{i:09d}", "jpg": samples[i][0], "txt": samples[i][1]})
    return {"peftclip": str(folder / f"{{00000..{n_shards:05d}}}.tar"),
            "open_clip_train": str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")}


def _transforms(model: str):
    import open_clip

    from peftclip.models import MODEL_CONFIG_DIR
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _, preprocess_train, _ = open_clip.create_model_and_transforms(model)
    return preprocess_train, open_clip.get_tokenizer(model)


def _open_clip_train_loader(shards: str, samples: int, args: argparse.Namespace, preprocess,
                            tokenizer) -> Callable[[], Iterable]:
    """A function creating open_clip_train's training loader of `shards`."""
    from open_clip_train.data import get_wds_dataset
    train_args = argparse.Namespace(  # the fields get_wds_dataset reads, as open_clip_train's parser sets them
        train_data=shards, val_data=None, dataset_resampled=False, train_data_upsampling_factors=None,
        train_num_samples=samples, batch_size=args.batch_size, workers=args.workers, world_size=1, seed=0)
    return lambda: get_wds_dataset(train_args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


def _peftclip_loader(shards: str, samples: int, args: argparse.Namespace, preprocess,
                     tokenizer) -> Callable[[], Iterable]:
    """A function creating peftclip's training loader of `shards`, after `load_stream` has read the held-out one."""
    from torch.utils.data import DataLoader

    from peftclip.data import DataConfig
    from peftclip.streaming import StreamingPairs, load_stream
    config = DataConfig(source=shards, train_num_samples=samples)
    stream, _ = load_stream(config)

    def create() -> DataLoader:
        pairs = StreamingPairs(stream, preprocess, tokenizer, seed=0, config=config)
        pairs.configure(args.batch_size, samples // args.batch_size)  # as peftclip.train does for one process
        return DataLoader(pairs, batch_size=None, num_workers=args.workers)
    return create


def _child(args: argparse.Namespace) -> None:
    """Time one epoch of `args.child`'s loader; print its images, distinct captions (one per sample), seconds and
    set-up seconds."""
    preprocess, tokenizer = _transforms(args.model)
    make = _peftclip_loader if args.child == "peftclip" else _open_clip_train_loader
    setup = time.perf_counter()
    create = make(args.shards, args.samples, args, preprocess, tokenizer)
    start = time.perf_counter()
    images, batches, texts = 0, 0, set()
    for image, text in create():
        images, batches = images + image.shape[0], batches + 1
        texts.update(tuple(row) for row in text.tolist())
    seconds = time.perf_counter() - start
    print("BENCH " + json.dumps({"images": images, "distinct": len(texts), "batches": batches, "seconds": seconds,
                                 "setup_seconds": start - setup}))


def _check_layout(n_shards: int, per_shard: int, workers: int, batch_size: int) -> None:
    if n_shards < max(1, workers):
        raise ValueError(f"{n_shards} shards for {workers} workers: open_clip_train needs a shard per worker")
    if per_shard * (n_shards // max(1, workers)) < batch_size:
        raise ValueError(f"a worker's {n_shards // max(1, workers)} shard(s) of {per_shard} samples never fill a "
                         f"batch of {batch_size}: open_clip_train's loader would loop forever")


def run_loader(loader: str, shards: str, samples: int, args: argparse.Namespace) -> dict:
    """One loader's epoch in its own process; images/s and peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.wds_loader", "--child", loader, "--shards", shards, "--samples",
           str(samples), "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--model", args.model]
    try:
        measured = run_measured(cmd, env=thread_env(args.threads), cwd=REPO_ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{loader} loader did not finish an epoch in {args.timeout} s") from e
    if measured.returncode != 0:
        raise RuntimeError(f"{loader} loader failed: {measured.stderr[-2000:]}")
    result = json.loads(next(x for x in measured.stdout.splitlines() if x.startswith("BENCH "))[6:])
    return {**result, "images_per_second": result["images"] / result["seconds"],
            "peak_rss_mb": measured.max_rss_bytes / 2**20}


def _table(report: dict) -> str:
    lines = ["| loader | images | batches | set-up (s) | seconds | images/s | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['images']:,} | {r['batches']} | {r['setup_seconds']:.2f} | {r['seconds']:.1f} | "
              f"{r['images_per_second']:.0f} | {r['peak_rss_mb']:.0f} |" for name, r in report["loaders"].items()]
    return "\n".join(lines) + f"\n\npeftclip / open_clip_train images/s: {report['ratio']:.2f}\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; write `--results`.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 shards of 16 samples, batch 8: a smoke run")
    parser.add_argument("--shards-count", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="peftclip-tiny")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a loader's process is killed")
    parser.add_argument("--root", default=None, help="where to write the shards (default: $PEFTCLIP_CACHE)")
    parser.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results" / "wds_loader"))
    parser.add_argument("--child", choices=_LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    if args.quick:
        args.shards_count, args.per_shard, args.batch_size = 4, 16, 8
    _check_layout(args.shards_count, args.per_shard, args.workers, args.batch_size)
    from peftclip.utils import cache_root
    root = Path(args.root) if args.root else cache_root() / "bench-wds-loader"
    folder = root / f"wds-{args.shards_count}x{args.per_shard}"
    shards = make_shards(folder, args.shards_count, args.per_shard)
    samples = args.shards_count * args.per_shard
    loaders = {name: run_loader(name, shards[name], samples, args) for name in _LOADERS}
    report = {"shards": args.shards_count, "per_shard": args.per_shard, "workers": args.workers,
              "batch_size": args.batch_size, "model": args.model, "samples": samples, "loaders": loaders,
              "ratio": loaders["peftclip"]["images_per_second"] / loaders["open_clip_train"]["images_per_second"]}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(report, indent=2))
    Path(args.results + ".md").write_text(_table(report))
    print(Path(args.results + ".md").read_text())
    return report


if __name__ == "__main__":
    main()
