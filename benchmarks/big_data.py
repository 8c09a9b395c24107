"""Data bigger than memory: peak RSS and time to first step of a short training run against set size.

    python -m benchmarks.big_data                      # 4k, 16k and 64k images, 0 and 2 workers
    python -m benchmarks.big_data --sizes 2048 --workers 0 --steps 2   # a smoke run

Generates 224x224 JPEG sets (embedded-image parquet, and webdataset shards of 1,000 samples) under
$PEFTCLIP_CACHE/bench-big-data, runs `recipes/lora_retrieval.py` on the tiny base for `--steps` steps in a child
process per (source, size, workers) and reads its peak RSS from the kernel (`benchmarks.process`), and the main
process's anonymous and file-backed RSS at the end (pages of a memory-mapped table it read count in the second).
Time to first step runs from the child's start to the end of its first optimiser step: imports, loading and
checking the data, evaluating the base on 64 held-out images, and the first batch.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

from benchmarks.process import REPO_ROOT, run_measured, thread_env

_POOL = 64  # distinct encoded images; a set's images are these plus a per-image suffix after the JPEG's end
_SHARD = 1000
_VAL = 64  # held-out images (the last webdataset shard; --max-val-images for parquet)

# The child: run the recipe, record when `train` starts; time to first step = that + the first step's time.
_CHILD = """
import json, sys, time
start = float(sys.argv[1])
from peftclip.recipes import lora_retrieval
real, seen = lora_retrieval.train, {}
def train(*args, **kwargs):
    seen["train_start"] = time.time()
    result = real(*args, **kwargs)
    seen["first_step"] = seen["train_start"] - start + result.step_seconds[0]
    return result
lora_retrieval.train = train
metrics = lora_retrieval.main(sys.argv[3:])
rss = {k: int(v.split()[0]) / 1024 for k, v in (x.split(":") for x in open("/proc/self/status")) if k.startswith("Rss")}
print("BENCH " + json.dumps({"first_step_s": seen["first_step"], "bad_samples": metrics["bad_samples"],
                             "end_anon_mb": rss["RssAnon"], "end_file_mb": rss["RssFile"]}))
"""


def _image_pool() -> list[bytes]:
    from PIL import Image, ImageFilter
    rng, pool = random.Random(0), []
    for _ in range(_POOL):
        image = Image.effect_noise((224, 224), 40).convert("RGB").filter(ImageFilter.GaussianBlur(2))
        image = Image.blend(image, Image.new("RGB", image.size, tuple(rng.randrange(256) for _ in range(3))), 0.5)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        pool.append(out.getvalue())
    return pool


def _samples(n: int) -> list[tuple[bytes, str]]:
    pool = _image_pool()
    return [(pool[i % _POOL] + i.to_bytes(4, "little"), f"sample {i} of colour {i % _POOL}") for i in range(n)]


def make_sets(root: Path, n: int) -> dict[str, str]:
    """An embedded-image parquet folder and webdataset shards of `n` training images (+ `_VAL` held out)."""
    import datasets
    import webdataset as wds
    parquet, shards = root / f"parquet-{n}", root / f"wds-{n}"
    n_shards = -(-n // _SHARD) + 1
    if not (shards / f"{n_shards - 1:05d}.tar").exists():
        samples = _samples(n + _VAL)
        parquet.mkdir(parents=True, exist_ok=True)
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        for first in range(0, len(samples), 4096):
            chunk = samples[first:first + 4096]
            datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in chunk],
                                        "caption": [c for _, c in chunk]}, features=features).to_parquet(
                str(parquet / f"train-{first // 4096:05d}.parquet"))
        shards.mkdir(parents=True, exist_ok=True)
        bounds = [*range(0, n, _SHARD), n, n + _VAL]
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            with wds.TarWriter(str(shards / f"{index:05d}.tar")) as sink:
                for i in range(start, end):
                    sink.write({"__key__": f"{i:09d}", "jpg": samples[i][0], "txt": samples[i][1]})
    return {"parquet": str(parquet), "webdataset": str(shards / f"{{00000..{n_shards - 1:05d}}}.tar")}


def run_training(source: str, kind: str, workers: int, steps: int, out: Path) -> dict:
    """Peak RSS and time to first step of one recipe run in its own process."""
    extra = ["--max-val-images", str(_VAL), "--val-fraction", str(_VAL / 4096)] if kind == "parquet" else \
        ["--train-num-samples", str(steps * 64)]
    argv = ["--source", source, "--output-dir", str(out), "--overwrite", "--max-steps", str(steps), "--batch-size",
            "64", "--num-workers", str(workers), "--cpu", "--no-feature-cache", "--eval-batch-size", "64", *extra]
    measured = run_measured([sys.executable, "-c", _CHILD, str(time.time()), "--", *argv], env=thread_env(2))
    if measured.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {measured.stderr[-2000:]}")
    line = next(x for x in measured.stdout.splitlines() if x.startswith("BENCH "))
    return {**json.loads(line[6:]), "peak_rss_mb": measured.max_rss_bytes / 2**20, "wall_s": measured.wall_seconds}


def _table(rows: list[dict]) -> str:
    lines = ["| source | images | workers | peak RSS (MB) | time to first step (s) | anon / file RSS at end (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['images']:,} | {r['workers']} | {r['peak_rss_mb']:.0f} | {r['first_step_s']:.1f} | "
              f"{r['end_anon_mb']:.0f} / {r['end_file_mb']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; write results/big_data.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results" / "big_data"))
    args = parser.parse_args(argv)
    from peftclip.utils import cache_root
    root, rows = cache_root() / "bench-big-data", []
    for n in args.sizes:
        sources = make_sets(root, n)
        for kind, source in sources.items():
            for workers in args.workers:
                rows.append({"kind": kind, "images": n, "workers": workers,
                             **run_training(source, kind, workers, args.steps, root / "out")})
                print(rows[-1], flush=True)
    report = {"runs": rows}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(report, indent=2))
    Path(args.results + ".md").write_text(_table(rows) + "\n")
    print(Path(args.results + ".md").read_text())
    return report


if __name__ == "__main__":
    main()
