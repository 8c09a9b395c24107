"""Turn the suite's results into target checks, Markdown tables, a plot, and the README's section."""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftclip.utils import human_size

__all__ = ["check_targets", "render_markdown", "render_plot", "replace_section", "update_readme", "write_results"]

MB = 1_000_000
# Strategies whose training reads cached image features, not images through the data pipeline.
_CACHED_IMAGE_STRATEGIES = ("text_prompt",)
_LORA_SHARE = 0.95  # issue 16: LoRA's own bar is 95% of its floor; the other strategies' is 90%


def check_targets(result: dict) -> list[dict]:
    """Each target of the suite with the measured value and whether it is met (those whose strategies ran)."""
    training = result["training"]
    rows, comparisons = training["strategies"], training["comparisons"]
    lora_vs_full = [row for name, row in comparisons.items() if name.startswith("LoRA")]
    targets = [_target("LoRA training vs open_clip's full fine-tune", ">= 1.4x", row["ratio"], 1.4)
               for row in lora_vs_full]
    for strategy, row in rows.items():
        share = _LORA_SHARE if strategy == "lora" else 0.9
        targets.append(_target(f"{strategy}: share of the compute floor", f">= {100 * share:.0f}%",
                               row["images_per_second"] / row["floor_images_per_second"], share, percent=True))
    if "lora" in rows:
        targets.append(_target("lora: peak memory vs its floor", "<= 110%",
                               rows["lora"]["max_rss_bytes"] / rows["lora"]["floor_max_rss_bytes"], 1.1,
                               percent=True, at_most=True))
    for strategy in ("lora", "lora_grad_checkpointing", "lora_grad_checkpointing_release_memory"):
        if strategy in rows and "full" in rows:
            goal, bound = ("< 100%", 1.0) if strategy == "lora" else ("<= 45%", 0.45)
            targets.append(_target(f"{strategy}: peak memory vs full fine-tune", goal,
                                   rows[strategy]["max_rss_bytes"] / rows["full"]["max_rss_bytes"], bound,
                                   percent=True, at_most=True))
    if "lora" in rows:
        targets.append(_target("LoRA r=8 qkv+out+MLP adapter, fp32 (MB)", "< 8", rows["lora"]["artifact_bytes"] / MB,
                               8, at_most=True))
        targets.append(_target("LoRA r=8 qkv+out+MLP adapter, bf16 (MB)", "< 4",
                               rows["lora"]["artifact_bytes_bf16"] / MB, 4, at_most=True))
    for strategy, row in result["feature_cache"]["strategies"].items():
        targets.append(_target(f"feature cache, {strategy}: epoch speed-up", ">= 10x", row["speedup"], 10))
    targets.append(_target("merged LoRA inference vs bare base", ">= 99%",
                           result["inference"]["merged_over_base"], 0.99, percent=True))
    loading = [row["images_per_second"] for s, row in rows.items() if s not in _CACHED_IMAGE_STRATEGIES]
    if loading:
        targets.append(_target("data pipeline vs fastest image-loading training", ">= 3x",
                               result["loader"]["images_per_second"] / max(loading), 3))
    return targets


def _target(name: str, goal: str, value: float, bound: float, percent: bool = False, at_most: bool = False) -> dict:
    shown = f"{100 * value:.1f}%" if percent else f"{value:.2f}"
    return {"target": name, "goal": goal, "value": value, "shown": shown,
            "met": value <= bound if at_most else value >= bound}


def _header(result: dict) -> list[str]:
    s = result["settings"]
    where = result["machine"].get("gpu") or result["machine"]["processor"]
    return [f"Model **{s['model']}** (random weights), batch {s['batch_size']}, {s['steps']} steps per run "
            f"(first 2 not timed), {s['repeats']} run(s) per tool alternating, {s['threads']} threads, "
            f"{s['workers']} loader worker(s), {s['precision']}, {s.get('device', 'cpu')}, on {where} "
            f"(torch {result['machine']['torch']}). Data: `{Path(result['data']).name}`.", "",
            f"Command: `{result['command']}`", ""] + ([
                f"Strategies run: {', '.join(result['training']['strategies'])} only; the other rows are in the "
                f"whole suite's section.", ""] if result.get("subset") else [])


def _training_tables(result: dict) -> list[str]:
    training = result["training"]
    lines = ["| comparison | peftclip images/s | open_clip_train images/s | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['peftclip_images_per_second']:.2f} | {row['open_clip_images_per_second']:.2f} "
              f"| {row['ratio']:.2f}x |" for name, row in training["comparisons"].items()]
    rows, base_bytes = training["strategies"], result["inference"]["base_file_bytes"]
    full_rss = rows["full"]["max_rss_bytes"] if "full" in rows else None
    lines += ["", "| strategy | peftclip images/s | floor images/s | share of floor | peak RSS (floor's) "
              "| vs full FT | adapter file | vs base checkpoint |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for strategy, row in rows.items():
        vs_full = f"{100 * row['max_rss_bytes'] / full_rss:.0f}%" if full_rss else "-"  # full FT not run
        lines.append(f"| {strategy} | {row['images_per_second']:.2f} | {row['floor_images_per_second']:.2f} "
                     f"| {100 * row['images_per_second'] / row['floor_images_per_second']:.0f}% "
                     f"| {human_size(row['max_rss_bytes'])} ({human_size(row['floor_max_rss_bytes'])}) | {vs_full} "
                     f"| {human_size(row['artifact_bytes'])} | {100 * row['artifact_bytes'] / base_bytes:.2f}% |")
    if "lora" in rows:
        lines.append(f"\nLoRA adapter saved in bf16: {human_size(rows['lora']['artifact_bytes_bf16'])}; "
                     f"base checkpoint (fp32 safetensors): {human_size(base_bytes)}.")
    return lines


def _other_tables(result: dict) -> list[str]:
    infer, loader = result["inference"], result["loader"]
    lines = ["", "| inference | value |", "|---|---:|"]
    lines += [f"| switch {name} | {1000 * s:.2f} ms |" for name, s in infer["switch_seconds"].items()]
    lines += [f"| reload base + adapter from disk | {1000 * infer['reload_seconds']:.0f} ms |"]
    lines += [f"| encode_image, {name} | {ips:.1f} images/s |" for name, ips in infer["images_per_second"].items()]
    lines += ["", f"Data pipeline alone: {loader['images_per_second']:.1f} images/s "
              f"({loader['workers']} worker(s), batch {loader['batch_size']}).", "",
              "| feature cache | uncached s/epoch | cached s/epoch | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['uncached_s_per_epoch']:.3f} | {row['cached_s_per_epoch']:.4f} "
              f"| {row['speedup']:.1f}x |" for name, row in result["feature_cache"]["strategies"].items()]
    return lines


def render_markdown(result: dict, plot: str | None = None) -> str:
    """The suite's report: settings, tables, targets, and the plot if given."""
    lines = _header(result) + _training_tables(result) + _other_tables(result)
    if result["targets"]:
        lines += ["", "| target | goal | measured | met |", "|---|---|---:|:---:|"]
        lines += [f"| {t['target']} | {t['goal']} | {t['shown']} | {'yes' if t['met'] else '**no**'} |"
                  for t in result["targets"]]
    else:
        lines += ["", "No target verdicts: runs this short are dominated by start-up noise, so their ratios "
                  "and shares of the floor say nothing; run the full suite (`python -m benchmarks.run`) for them."]
    if plot:
        lines += ["", f"![throughput and memory per strategy]({plot})"]
    return "\n".join(lines)


def render_plot(result: dict, path: Path) -> Path:
    """A PNG: training images/s (peftclip, floor, open_clip) and peak memory per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, open_clip = result["training"]["strategies"], result["training"]["open_clip"]
    strategies = list(rows)
    x = range(len(strategies))
    mode_of = {"full": "full", "lora": "full", "freeze_vision": "lock_image"}  # open_clip_train's run per row
    theirs = {s: open_clip[mode] for s, mode in mode_of.items() if mode in open_clip}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    left.bar([i - width for i in x], [rows[s]["images_per_second"] for s in strategies], width, label="peftclip")
    left.bar(list(x), [rows[s]["floor_images_per_second"] for s in strategies], width, label="compute floor")
    left.bar([i + width for i in x], [theirs.get(s, 0) for s in strategies], width,
             label="open_clip_train (full FT for LoRA)")
    left.set_ylabel("training images/s")
    right.bar([i - width / 2 for i in x], [rows[s]["max_rss_bytes"] / 2**30 for s in strategies], width,
              label="peftclip")
    right.bar([i + width / 2 for i in x], [rows[s]["floor_max_rss_bytes"] / 2**30 for s in strategies], width,
              label="compute floor")
    right.legend(fontsize=8)
    right.set_ylabel("peak RSS (GiB)")
    for axis in (left, right):
        axis.set_xticks(list(x), [s.replace("_", " ") for s in strategies], rotation=30, ha="right", fontsize=8)
    left.legend(fontsize=8)
    fig.suptitle(f"{result['settings']['model']}, batch {result['settings']['batch_size']}, "
                 f"{result['settings']['threads']} threads, {result['settings']['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_section(readme: Path, name: str, report: str, heading: str) -> None:
    """Replace the README's text between `<!-- name:begin -->` and `<!-- name:end -->` with `report`.

    A README without the markers gets them appended under `## heading`.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{report}\n{end}"
    text = readme.read_text()
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{section}\n"
    readme.write_text(text)


def update_readme(readme: Path, mode: str, report: str) -> None:
    """Replace the README's section for the suite's `mode` (between its markers) with `report`, or append one."""
    replace_section(readme, f"suite-{mode}", report, heading=f"Suite: {mode}")


def write_results(out: Path, stem: str, result: dict, table: str) -> None:
    """Write `result` as `<out>/<stem>.json` and `table` as `<out>/<stem>.md`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
