"""The `peftclip` command: train, evaluate, inspect, embed, search, merge and push adapters.

Thin over the library. Adapters are folders or Hugging Face Hub repo ids (namespace/name);
commands that take an adapter load the base it names, or the bare base from --model-name.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .recipes import RECIPES

# torch, open_clip, peft and datasets take seconds to import: each command imports what it needs,
# so `peftclip --help` and `peftclip train NAME --help` stay fast.
if TYPE_CHECKING:
    from .data import DataConfig
    from .inference import AdaptedCLIP
    from .models import BaseConfig

__all__ = ["build_parser", "main"]

ADAPTER = "adapter"  # the name commands attach their one adapter under
TASKS = ("retrieval", "classification")


def _base_config(metadata: dict[str, Any], pretrained: str | None) -> BaseConfig:
    """The base an adapter names; a weights file must be passed, since only its hash was recorded."""
    from .models import BaseConfig

    base = metadata["base"]
    if "weights_sha256" in base and pretrained is None:
        raise ValueError(f"the adapter was trained on weights file {base['pretrained']}; pass it with --pretrained")
    return BaseConfig(model_name=base["model_name"], pretrained=pretrained or base.get("pretrained"),
                      init_seed=base.get("init_seed", 0))


def _load(args: argparse.Namespace) -> tuple[AdaptedCLIP, dict[str, Any] | None]:
    """The base an adapter names with the adapter attached (and its metadata), or the bare base."""
    import torch

    from .hub import resolve_adapter
    from .inference import AdaptedCLIP
    from .io import read_metadata
    from .models import BaseConfig, load_base

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.adapter is None:
        if not args.model_name:
            raise ValueError("give an adapter, or --model-name (and --pretrained) for the bare base")
        return AdaptedCLIP(load_base(BaseConfig(model_name=args.model_name, pretrained=args.pretrained), device)), None
    folder = resolve_adapter(args.adapter, args.revision)
    metadata = _resolve_recorded_source(read_metadata(folder), folder)
    clip = AdaptedCLIP(load_base(_base_config(metadata, args.pretrained), device))
    clip.load_adapter(folder, ADAPTER)
    return clip, metadata


def cmd_info(args: argparse.Namespace) -> None:
    """Show an adapter's base, strategy, size and metrics.

    Reads JSON and checks checksums (hashlib) only, never importing torch, so it answers in well under a second.
    """
    from .hub import resolve_adapter
    from .io import METRICS_NAME, SAFETENSORS_WEIGHTS_NAME, read_metadata
    from .tracking import format_history, natural_key
    from .utils import human_size

    folder = resolve_adapter(args.adapter, args.revision)
    metadata = read_metadata(folder, check_strategy=False)
    size = (folder / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    print(f"adapter:    {folder}")
    print(f"base:       {', '.join(f'{k}={v}' for k, v in metadata['base'].items())}")
    for method, settings in metadata["strategy"].items():
        print(f"strategy:   {method}: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    if converted := metadata.get("converted_from"):  # a PiSSA/OLoRA adapter saved as plain LoRA (io.save_adapter)
        print(f"converted:  from init_lora={converted['init_lora']} (r={converted['r']}, "
              f"lora_alpha={converted['lora_alpha']}) to plain LoRA on the unmodified base")
    print(f"parameters: {metadata['trainable_parameters']:,} trainable, file {human_size(size)} "
          f"({metadata.get('save_dtype', 'fp32')})")
    metrics_file = folder / METRICS_NAME
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key in sorted(after, key=natural_key):
            print(f"metric:     {key}: {before.get(key, float('nan')):.2f} -> {after[key]:.2f}")
        if metrics.get("best"):
            best = metrics["best"]
            print(f"best:       {best['metric']} {best['value']:.2f} at step {best['step']} ({best['path']})")
        if metrics.get("history"):
            print(f"history:\n{format_history(metrics['history'])}")


def cmd_compare(args: argparse.Namespace) -> None:
    """A table of several adapters side by side (and a bar chart with --plot), reading JSON only."""
    from .hub import resolve_adapter
    from .tracking import compare_adapters, format_comparison, plot_comparison, save_figure

    rows = compare_adapters([resolve_adapter(adapter, None) for adapter in args.adapters])
    print(format_comparison(rows))
    if args.plot:
        print(f"plot written to {save_figure(plot_comparison(rows), args.plot)}")


def _resolve_recorded_source(metadata: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Metadata with its recorded data source found again (it is stored relative to the adapter folder)."""
    from .io import resolve_recorded_path

    data = metadata.get("training", {}).get("data", {})
    if isinstance(data.get("source"), str):
        data["source"] = resolve_recorded_path(data["source"], folder)
    return metadata


def _eval_data(args: argparse.Namespace, metadata: dict[str, Any] | None) -> DataConfig:
    """The held-out data: the adapter's own training data and split, with any flag given overriding it."""
    from .data import DataConfig

    recorded = dict((metadata or {}).get("training", {}).get("data", {}))
    flags = {"source": args.source, "image_column": args.image_column, "caption_column": args.caption_column,
             "label_column": args.label_column, "val_split": args.val_split, "val_fraction": args.val_fraction,
             "max_val_images": args.max_images, "split_seed": args.split_seed}
    config = DataConfig.from_dict({**recorded, **{k: v for k, v in flags.items() if v is not None}})
    if config.source is None:
        raise ValueError("give --source: the adapter records no training data to hold images out of")
    if args.source is None and "/" not in config.source and not Path(config.source).exists():
        raise ValueError(f"the adapter records its data source by name only ({config.source!r}: it was outside the "
                         f"working directory when training); give --source")
    return config


def cmd_eval(args: argparse.Namespace) -> None:
    """Retrieval recall or classification accuracy of the base, and of base + adapter, on held-out data."""
    from .adapters.heads import DEFAULT_TEMPLATES
    from .data import EvalImages, eval_texts, load_held_out_labelled, load_held_out_pairs
    from .evaluate import classification_accuracy, retrieval_recall

    clip, metadata = _load(args)
    data = _eval_data(args, metadata)
    training = (metadata or {}).get("training", {})
    task = args.task or ("classification" if "class_names" in training else "retrieval")
    columns = {"base": None, **({"adapted": ADAPTER} if metadata else {})}
    if task == "retrieval":
        pairs = load_held_out_pairs(data)
        images, (captions, owners) = EvalImages(pairs, clip.base.preprocess_val), eval_texts(pairs)
        print(f"{len(images)} images, {len(captions)} captions")
        results = {column: retrieval_recall(clip.encode_images(images, adapter, args.batch_size),
                                            clip.encode_texts(captions, adapter, args.batch_size), owners)
                   for column, adapter in columns.items()}
    else:
        test = load_held_out_labelled(data)
        images = EvalImages(test, clip.base.preprocess_val)
        templates = args.templates or training.get("classify", {}).get("templates") or DEFAULT_TEMPLATES
        print(f"{len(images)} images, {len(test.class_names)} classes")
        results = {column: classification_accuracy(clip.classify(images, test.class_names, templates, adapter,
                                                                 args.batch_size), test.labels, len(test.class_names))
                   for column, adapter in columns.items()}
    print("| metric | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for key in results["base"]:
        print(f"| {key} | " + " | ".join(f"{results[c][key]:.2f}" for c in columns) + " |")


def cmd_embed(args: argparse.Namespace) -> None:
    """Embed a folder of images and/or a file of texts (one per line) into one safetensors file."""
    from .data import read_texts
    from .index import list_images
    from .utils import write_safetensors_atomic

    if not args.images and not args.texts:
        raise ValueError("give --images FOLDER and/or --texts FILE")
    clip, _ = _load(args)
    tensors, metadata = {}, {}
    if args.images:
        files = list_images(args.images)
        tensors["image_embeddings"] = clip.encode_images(files, batch_size=args.batch_size)
        metadata["image_files"] = json.dumps([p.name for p in files])
    if args.texts:
        texts = read_texts(args.texts)
        tensors["text_embeddings"] = clip.encode_texts(texts, batch_size=args.batch_size)
        metadata["texts"] = json.dumps(texts)
    write_safetensors_atomic(tensors, args.out, metadata=metadata)
    print(", ".join(f"{len(v)} {k.removesuffix('_embeddings')}" for k, v in tensors.items())
          + f" embedded ({next(iter(tensors.values())).shape[1]} dims) -> {args.out}")


def cmd_search(args: argparse.Namespace) -> None:
    """Text-to-image search over a folder, with an index kept on disk and reused while unchanged."""
    clip, _ = _load(args)
    for rank, (path, score) in enumerate(clip.search(args.query, args.images, args.top_k, args.index), start=1):
        print(f"{rank}. {path}  {score:.4f}")


def cmd_merge(args: argparse.Namespace) -> None:
    """Write base + adapter merged as a plain open_clip checkpoint."""
    from .models import MODEL_CONFIG_DIR

    clip, _ = _load(args)
    if args.alpha != 1.0:
        clip.set_scale(ADAPTER, args.alpha)
    path = clip.export_merged(ADAPTER, args.out)
    name = clip.base.info["model_name"]
    # open_clip knows peftclip's own configs (peftclip-tiny, ...) only once peftclip.models has registered them
    modules = "open_clip, peftclip.models" if (MODEL_CONFIG_DIR / f"{name}.json").is_file() else "open_clip"
    print(f"merged checkpoint -> {path}; load it with import {modules}; open_clip.create_model_and_transforms("
          f"{name!r}, pretrained={str(path)!r})")


def cmd_push(args: argparse.Namespace) -> None:
    """Upload an adapter folder with a generated model card."""
    from .hub import push_to_hub

    url = push_to_hub(args.adapter, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.message, license=args.license)
    print(f"pushed {args.adapter} -> {url}")


def cmd_import_peft(args: argparse.Namespace) -> None:
    """Turn a LoRA folder saved by PEFT's `save_pretrained` into a peftclip adapter folder on the named base."""
    from .interop import import_peft_adapter
    from .models import BaseConfig, load_base

    base = load_base(BaseConfig(model_name=args.model_name, pretrained=args.pretrained))
    print(f"imported {args.peft_dir} -> {import_peft_adapter(args.peft_dir, base, args.out)}")


def cmd_data(args: argparse.Namespace) -> None:
    """Convert a CSV / JSONL / image-folder set into size-bounded webdataset or parquet shards."""
    from .data import DataConfig
    from .shards import write_parquet_shards, write_webdataset_shards

    if args.max_shard_mb <= 0:
        raise ValueError(f"--max-shard-mb={args.max_shard_mb}: must be positive")
    config = DataConfig(source=args.source, image_column=args.image_column, caption_column=args.caption_column,
                        skip_bad_rows=args.skip_bad_rows)
    write = write_webdataset_shards if args.action == "to-wds" else write_parquet_shards
    shards = write(config, args.out, int(args.max_shard_mb * 2**20))
    print(f"wrote {len(shards)} shard(s) to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Run a recipe shipped in `peftclip.recipes` (by name) or a recipe file with the arguments after it."""
    name = args.recipe.removesuffix(".py")
    if name in RECIPES:
        module = importlib.import_module(f"peftclip.recipes.{name}")
    else:
        path = Path(args.recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {args.recipe} (give a recipe file, or one of "
                                    f"{', '.join(RECIPES)})")
        spec = importlib.util.spec_from_file_location(f"peftclip_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    from .recipe import recipe_prog

    with recipe_prog(f"peftclip train {args.recipe}"):
        module.main(args.args)


def _model_arguments(parser: argparse.ArgumentParser, bare_base: bool = True) -> None:
    """The adapter (or bare base) a command runs, and where."""
    help_text = "adapter folder or Hub repo id (namespace/name)"
    if bare_base:
        parser.add_argument("adapter", nargs="?", help=help_text + "; leave out for the bare base")
        parser.add_argument("--model-name", help="open_clip model of the bare base (e.g. ViT-B-32)")
    else:
        parser.add_argument("adapter", help=help_text)
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id")
    parser.add_argument("--pretrained", help="base weights: a file the adapter was trained on, or the bare base's "
                                             "pretrained tag or file")
    parser.add_argument("--device", help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images or texts per batch (default: 64)")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--task", choices=TASKS, help="default: classification for adapters trained with "
                        "class names, else retrieval")
    parser.add_argument("--source", help="data (any source the recipes accept); default: the adapter's own")
    parser.add_argument("--image-column", help="column of image paths (default: the adapter's, or file_name)")
    parser.add_argument("--caption-column", help="column of captions, for retrieval (default: caption)")
    parser.add_argument("--label-column", help="column of labels, for classification (default: label)")
    parser.add_argument("--val-split", help="split to evaluate on (e.g. test); otherwise a held-out share")
    parser.add_argument("--val-fraction", type=float, help="held-out share of images (default: as in training)")
    parser.add_argument("--split-seed", type=int, help="seed of the held-out split (default: as in training)")
    parser.add_argument("--max-images", type=int, help="evaluate on at most this many held-out images")
    parser.add_argument("--templates", nargs="+", help="zero-shot prompt templates with {} for the class name")


def build_parser() -> argparse.ArgumentParser:
    """The `peftclip` argument parser with one subcommand per task."""
    parser = argparse.ArgumentParser(prog="peftclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a recipe; flags after the recipe go to it (see RECIPE --help)",
                           description="Run a training recipe. Everything after the recipe's name goes to the "
                           "recipe: `peftclip train lora_retrieval --help` lists its flags.")
    train.add_argument("recipe", help=f"a shipped recipe ({', '.join(RECIPES)}) or a recipe file")
    train.add_argument("args", nargs=argparse.REMAINDER, help="the recipe's own flags")
    info = sub.add_parser("info", help="show an adapter's base, strategy, size and metrics")
    info.add_argument("adapter", help="adapter folder or Hub repo id (namespace/name)")
    info.add_argument("--revision", help="Hub revision of a repo id")
    compare = sub.add_parser("compare", help="put several adapters' metrics, bases, strategies and sizes side by side")
    compare.add_argument("adapters", nargs="+", help="adapter folders or Hub repo ids")
    compare.add_argument("--plot", help="also write a bar chart of their metrics to this PNG file")
    _eval_arguments(sub.add_parser("eval", help="retrieval or classification metrics of the base and base + adapter"))
    embed = sub.add_parser("embed", help="embed a folder of images and/or a file of texts into a safetensors file")
    _model_arguments(embed)
    embed.add_argument("--images", help="folder of images (rows in file-name order)")
    embed.add_argument("--texts", help="text file, one text per line")
    embed.add_argument("--out", required=True, help="output .safetensors file")
    search = sub.add_parser("search", help="text-to-image search over a folder of images")
    _model_arguments(search)
    search.add_argument("--images", required=True, help="folder of images")
    search.add_argument("--query", required=True, help="the text to search for")
    search.add_argument("--top-k", type=int, default=5, help="how many images to list (default: 5)")
    search.add_argument("--index", help="index file (default: under $PEFTCLIP_CACHE/search)")
    merge = sub.add_parser("merge", help="write base + adapter as a plain open_clip checkpoint")
    _model_arguments(merge, bare_base=False)
    merge.add_argument("--out", required=True, help="output .safetensors checkpoint")
    merge.add_argument("--alpha", type=float, default=1.0,
                       help="WiSE-FT interpolation: 0 is the base, 1 the adapter (default: 1)")
    push = sub.add_parser("push", help="upload an adapter folder to the Hugging Face Hub with a model card")
    push.add_argument("adapter", help="adapter folder")
    push.add_argument("repo_id", help="Hub repo id, namespace/name")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--license", default="apache-2.0", help="license for the model card (default: apache-2.0)")
    import_peft = sub.add_parser("import-peft", help="make a peftclip adapter folder from a PEFT save_pretrained one")
    import_peft.add_argument("peft_dir", help="folder with PEFT's adapter_config.json and adapter_model.safetensors")
    import_peft.add_argument("--model-name", required=True, help="open_clip model the adapter was trained on")
    import_peft.add_argument("--pretrained", help="its pretrained tag or weights file (default: random weights)")
    import_peft.add_argument("--out", required=True, help="peftclip adapter folder to write")
    data = sub.add_parser("data", help="convert a CSV / image folder into webdataset or parquet shards")
    data.add_argument("action", choices=["to-wds", "to-parquet"], help="webdataset .tar shards, or parquet files")
    data.add_argument("source", help="the set to convert (any map-style source the recipes accept)")
    data.add_argument("out", help="new or empty folder for the shards")
    data.add_argument("--max-shard-mb", type=float, default=256, help="images per shard, in MB (default: 256)")
    data.add_argument("--image-column", default="file_name", help="column of image paths (default: file_name)")
    data.add_argument("--caption-column", default="caption", help="column of captions (default: caption)")
    data.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows instead of stopping")
    return parser


COMMANDS = {"train": cmd_train, "info": cmd_info, "compare": cmd_compare, "eval": cmd_eval, "embed": cmd_embed,
            "search": cmd_search, "merge": cmd_merge, "push": cmd_push, "import-peft": cmd_import_peft,
            "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftclip` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader stopped early (`peftclip info X | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush would raise again
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
