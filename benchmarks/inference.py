"""Inference with adapters: switching adapters against reloading the model, and merged or unmerged
LoRA against the bare base.

    python benchmarks/inference.py                      # tiny base, seconds
    python benchmarks/inference.py --model ViT-B-32     # the ViT-B-32 structure, random weights

The base is written to a local safetensors file first, so "reload" is what a user without
`AdaptedCLIP` would do: load the base from disk, then the adapter. Switch times are the
median of many switches; images/s alternate the models round by round so that a busy
machine slows them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.process import median_seconds
from benchmarks.report import write_results
from peftclip.adapters import AdapterSpec, ClipLoraConfig, PartialConfig, apply_strategy
from peftclip.inference import AdaptedCLIP
from peftclip.io import load_adapter, save_adapter
from peftclip.models import BaseConfig, load_base

RESULTS = Path(__file__).parent / "results"
# The adapters switched between: two LoRA (attention + MLP, r=8, both towers) and a partial one.
ADAPTERS = {
    "lora_a": AdapterSpec(lora=ClipLoraConfig(r=8, lora_alpha=16.0)),
    "lora_b": AdapterSpec(lora=ClipLoraConfig(r=8, lora_alpha=16.0)),
    "projections_last2": AdapterSpec(partial=PartialConfig(projections=True, last_blocks=2)),
}
SWITCHES = (("lora_a", "lora_b"), ("lora_a", "projections_last2"), ("lora_a", None))


def _make_adapters(config: BaseConfig, folder: Path) -> dict[str, Path]:
    """Each adapter of ADAPTERS with random non-zero weights, saved under `folder`."""
    folders = {}
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        base = load_base(config)
        model, _ = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.01)
        folders[name] = save_adapter(model, folder / name, base.info, spec.to_dict())
    return folders


def measure_switching(config: BaseConfig, folders: dict[str, Path], repeats: int) -> dict:
    """Median seconds to switch between adapters on one loaded base, and to reload base + adapter."""
    clip = AdaptedCLIP(load_base(config))
    for name, folder in folders.items():
        clip.load_adapter(folder, name)
    switches = {}
    for first, second in SWITCHES:
        def switch_twice(first=first, second=second):
            clip.set_adapter(first)
            clip.set_adapter(second)
        switches[f"{first} <-> {second or 'base'}"] = median_seconds(switch_twice, repeats) / 2
    reload = median_seconds(lambda: load_adapter(load_base(config), folders["lora_a"]), max(repeats // 10, 3))
    return {"switch_seconds": switches, "reload_seconds": reload,
            "reload_over_switch": reload / max(switches.values())}


def measure_throughput(config: BaseConfig, folders: dict[str, Path], batch_size: int, rounds: int) -> dict:
    """Images/s of encode_image: the bare open_clip base, LoRA unmerged, and LoRA merged."""
    bare = load_base(config).model
    unmerged = AdaptedCLIP(load_base(config))
    unmerged.load_adapter(folders["lora_a"], "lora")
    merged = AdaptedCLIP(load_base(config))
    merged.load_adapter(folders["lora_a"], "lora")
    merged.merge("lora")
    models = {"base": bare, "unmerged": unmerged.model, "merged": merged.model}
    size = bare.visual.image_size
    images = torch.randn(batch_size, 3, *(size if isinstance(size, tuple) else (size, size)))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.encode_image(images)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model.encode_image(images)
                times[name].append(time.perf_counter() - start)
    ips = {name: batch_size / statistics.median(t) for name, t in times.items()}
    return {"images_per_second": ips, "merged_over_base": ips["merged"] / ips["base"],
            "unmerged_over_base": ips["unmerged"] / ips["base"]}


def run(model_name: str, batch_size: int, rounds: int, switch_repeats: int, threads: int) -> dict:
    """Every inference figure for one architecture (random weights written to a local file)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="peftclip-bench-") as tmp:
        weights = Path(tmp) / "base.safetensors"
        save_file({k: v.contiguous() for k, v in load_base(BaseConfig(model_name=model_name)).model
                   .state_dict().items()}, weights)
        config = BaseConfig(model_name=model_name, pretrained=str(weights))
        folders = _make_adapters(config, Path(tmp))
        result = {"model": model_name, "batch_size": batch_size, "threads": threads,
                  "base_file_bytes": weights.stat().st_size,
                  **measure_switching(config, folders, switch_repeats),
                  **measure_throughput(config, folders, batch_size, rounds)}
    return result


def format_table(result: dict) -> str:
    """Markdown tables of switch times and images/s."""
    lines = [f"Inference, {result['model']} (random weights), batch {result['batch_size']}, "
             f"{result['threads']} threads, CPU", "", "| switch | ms |", "|---|---:|"]
    lines += [f"| {name} | {1000 * s:.2f} |" for name, s in result["switch_seconds"].items()]
    lines += [f"| reload base + adapter from disk | {1000 * result['reload_seconds']:.0f} |", "",
              "| model | images/s | vs bare base |", "|---|---:|---:|"]
    base = result["images_per_second"]["base"]
    lines += [f"| {name} | {ips:.1f} | {ips / base:.3f} |" for name, ips in result["images_per_second"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="peftclip-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encode_image call")
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per model, interleaved")
    parser.add_argument("--switch-repeats", type=int, default=50, help="timed switches per pair")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    result = run(args.model, args.batch_size, args.rounds, args.switch_repeats, args.threads)
    write_results(args.out, f"inference-{args.model}", result, format_table(result))
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
