"""Seconds per epoch with and without the frozen-tower feature cache, per strategy.

    python benchmarks/feature_cache.py                       # tiny base, generated shapes task
    python benchmarks/feature_cache.py --model ViT-B-32 --images 128

Writes benchmarks/results/feature_cache-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.report import write_results
from peftclip.adapters import AdapterSpec, PartialConfig, TextPromptConfig, apply_strategy
from peftclip.cache import FeatureCache, cache_frozen_towers
from peftclip.data import DataConfig, TrainPairs, load_pairs
from peftclip.models import BaseConfig, load_base
from peftclip.synthetic import default_data_dir, make_shapes_dataset
from peftclip.train import TrainConfig, create_accelerator, train

STRATEGIES = {
    "projections": AdapterSpec(partial=PartialConfig(projections=True)),
    "logit_scale": AdapterSpec(partial=PartialConfig(logit_scale=True)),
    "freeze_vision": AdapterSpec(partial=PartialConfig(freeze="vision")),
    "text_prompt": AdapterSpec(text_prompt=TextPromptConfig(n_ctx=4)),
}
RESULTS = Path(__file__).parent / "results"


def _seconds_per_epoch(model_name: str, spec: AdapterSpec, pairs, epochs: int, cached: bool) -> tuple[float, float]:
    """(seconds per training epoch, seconds to build the cache) for one strategy."""
    base = load_base(BaseConfig(model_name=model_name))
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer)
    data = TrainPairs(pairs, base.preprocess_val, tokenize)
    build = 0.0
    if cached:
        start = time.perf_counter()
        model, data = cache_frozen_towers(model, data, base.info, augment=False, cache=FeatureCache())
        build = time.perf_counter() - start
    config = TrainConfig(output_dir="/tmp/peftclip-bench", epochs=epochs, batch_size=32, num_workers=0, cpu=True)
    start = time.perf_counter()
    train(model, data, config, create_accelerator(config))
    return (time.perf_counter() - start) / epochs, build


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="peftclip-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=512, help="training images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    source = make_shapes_dataset(default_data_dir())
    pairs, _ = load_pairs(DataConfig(source=str(source), max_images=args.images, val_fraction=0.1))
    rows = {}
    for name, spec in STRATEGIES.items():
        plain, _ = _seconds_per_epoch(args.model, spec, pairs, args.epochs, cached=False)
        cached, build = _seconds_per_epoch(args.model, spec, pairs, args.epochs, cached=True)
        rows[name] = {"uncached_s_per_epoch": plain, "cached_s_per_epoch": cached, "cache_build_s": build,
                      "speedup": plain / cached}
        print(f"{name}: {plain:.3f} s/epoch uncached, {cached:.4f} s/epoch cached "
              f"(built in {build:.2f} s): {plain / cached:.1f}x", flush=True)
    result = {"model": args.model, "images": len(pairs.images), "epochs": args.epochs,
              "threads": torch.get_num_threads(), "strategies": rows}
    lines = [f"Feature cache, {args.model} (random weights), {len(pairs.images)} images, batch 32, "
             f"{torch.get_num_threads()} threads, CPU", "",
             "| strategy | uncached s/epoch | cached s/epoch | cache build s | speed-up |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['uncached_s_per_epoch']:.3f} | {r['cached_s_per_epoch']:.4f} | {r['cache_build_s']:.2f} "
              f"| {r['speedup']:.1f}x |" for n, r in rows.items()]
    write_results(args.out, f"feature_cache-{args.model}", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
