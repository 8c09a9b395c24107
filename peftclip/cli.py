"""The `peftclip` command: train, evaluate, inspect, embed, search, merge and push adapters.

Thin over the library. Adapters are folders or Hugging Face Hub repo ids (namespace/name).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .data import DataConfig, EvalImages, eval_texts, load_pairs
from .evaluate import retrieval_recall
from .hub import push_to_hub, resolve_adapter
from .inference import AdaptedCLIP, image_index
from .io import SAFETENSORS_WEIGHTS_NAME, load_adapter, read_metadata
from .models import BaseConfig, load_base

__all__ = ["main"]


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _base_config(metadata: dict[str, Any], pretrained: str | None) -> BaseConfig:
    """The base an adapter names; a weights file must be passed, since only its hash was recorded."""
    base = metadata["base"]
    if "weights_sha256" in base and pretrained is None:
        raise ValueError(f"the adapter was trained on weights file {base['pretrained']}; pass it with --pretrained")
    return BaseConfig(model_name=base["model_name"], pretrained=pretrained or base.get("pretrained"),
                      init_seed=base.get("init_seed", 0))


def cmd_info(args: argparse.Namespace) -> None:
    """Show an adapter's base, strategy, size and metrics."""
    folder = resolve_adapter(args.adapter, args.revision)
    metadata = read_metadata(folder)
    size = (folder / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    print(f"adapter:    {folder}")
    print(f"base:       {', '.join(f'{k}={v}' for k, v in metadata['base'].items())}")
    for method, settings in metadata["strategy"].items():
        print(f"strategy:   {method}: {', '.join(f'{k}={v}' for k, v in settings.items())}")
    print(f"parameters: {metadata['trainable_parameters']:,} trainable, file {_human(size)}")
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key in after:
            print(f"metric:     {key}: {before.get(key, float('nan')):.2f} -> {after[key]:.2f}")


@torch.no_grad()
def _recall(model: torch.nn.Module, images: EvalImages, captions: list[str], owners: list[int],
            tokenize: Callable, batch_size: int) -> dict[str, float]:
    model.eval()
    image_features = torch.cat([model.encode_image(torch.stack([images[i] for i in range(s, min(s + batch_size,
                                                                                                 len(images)))]))
                                for s in range(0, len(images), batch_size)])
    text_features = torch.cat([model.encode_text(tokenize(captions[s:s + batch_size]))
                               for s in range(0, len(captions), batch_size)])
    return retrieval_recall(image_features, text_features, owners)


def cmd_eval(args: argparse.Namespace) -> None:
    """Retrieval recall of the base and of base + adapter on held-out pairs."""
    args.adapter = resolve_adapter(args.adapter, args.revision)
    metadata = read_metadata(args.adapter)
    config = _base_config(metadata, args.pretrained)
    data = DataConfig(source=args.source, image_column=args.image_column, caption_column=args.caption_column,
                      val_fraction=args.val_fraction, max_val_images=args.max_images, split_seed=args.split_seed)
    _, pairs = load_pairs(data)
    base = load_base(config)
    images = EvalImages(pairs, base.preprocess_val)
    captions, owners = eval_texts(pairs)
    before = _recall(base.model, images, captions, owners, base.tokenizer, args.batch_size)
    model = load_adapter(base, args.adapter)
    tokenize = getattr(getattr(base.model, "peftclip_text_prompt", None), "tokenize", base.tokenizer)
    after = _recall(model, images, captions, owners, tokenize, args.batch_size)
    print(f"{len(images)} images, {len(captions)} captions")
    print("| metric | base | adapted |\n|---|---:|---:|")
    for key in before:
        print(f"| {key} | {before[key]:.2f} | {after[key]:.2f} |")


def _adapted(args: argparse.Namespace) -> tuple[AdaptedCLIP, str]:
    """The base an adapter names, with the adapter attached (or the bare base with --base-only)."""
    if args.adapter is None:
        if not args.model_name:
            raise ValueError("give an adapter, or --model-name (and --pretrained) for the bare base")
        base = load_base(BaseConfig(model_name=args.model_name, pretrained=args.pretrained))
        return AdaptedCLIP(base), json.dumps(base.info, sort_keys=True)
    folder = resolve_adapter(args.adapter, args.revision)
    metadata = read_metadata(folder)
    clip = AdaptedCLIP(load_base(_base_config(metadata, args.pretrained)))
    clip.add_adapter("adapter", folder)
    return clip, metadata["weights_sha256"]


def cmd_embed(args: argparse.Namespace) -> None:
    """Embed every image of a folder into a safetensors file (rows in file-name order)."""
    clip, identity = _adapted(args)
    files, embeddings = image_index(clip.model, clip.base.preprocess_val, args.images, args.out, identity)
    print(f"{len(files)} images embedded ({embeddings.shape[1]} dims) -> {args.out}")


def cmd_search(args: argparse.Namespace) -> None:
    """Text-to-image search over a folder, with an index kept beside it and reused while unchanged."""
    clip, identity = _adapted(args)
    index = Path(args.index or Path(args.images) / ".peftclip-index.safetensors")
    files, embeddings = image_index(clip.model, clip.base.preprocess_val, args.images, index, identity)
    tokenize = getattr(getattr(clip.model.get_base_model() if clip.adapters else clip.model,
                               "peftclip_text_prompt", None), "tokenize", clip.base.tokenizer)
    with torch.no_grad():
        query = clip.model.encode_text(tokenize([args.query]), normalize=True).float()
    scores = (query @ embeddings.T)[0]
    for rank, i in enumerate(scores.topk(min(args.top_k, len(files))).indices.tolist(), start=1):
        print(f"{rank}. {files[i]}  {scores[i]:.4f}")


def cmd_merge(args: argparse.Namespace) -> None:
    """Write base + LoRA adapter merged as a plain open_clip checkpoint."""
    clip, _ = _adapted(args)
    path = clip.export_merged("adapter", args.out)
    print(f"merged checkpoint -> {path}; load it with open_clip.create_model_and_transforms("
          f"{clip.base.info['model_name']!r}, pretrained={str(path)!r})")


def cmd_push(args: argparse.Namespace) -> None:
    """Upload an adapter folder with a generated model card."""
    url = push_to_hub(args.adapter, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.message, license=args.license)
    print(f"pushed {args.adapter} -> {url}")


def cmd_train(args: argparse.Namespace, rest: list[str]) -> None:
    """Run a recipe file (or a name under ./recipes) with the remaining arguments."""
    path = Path(args.recipe)
    if not path.is_file():
        path = Path("recipes") / f"{args.recipe.removesuffix('.py')}.py"
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {args.recipe} (give a recipe file, or a name in ./recipes)")
    spec = importlib.util.spec_from_file_location(f"peftclip_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(rest)


def _adapter_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    help_text = "adapter folder or Hub repo id (namespace/name)"
    if optional:
        parser.add_argument("adapter", nargs="?", help=help_text + "; leave out for the bare base")
        parser.add_argument("--model-name", help="open_clip model, for the bare base")
    else:
        parser.add_argument("adapter", help=help_text)
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id")
    parser.add_argument("--pretrained", help="base weights file, when the adapter was trained on one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a recipe; flags after the recipe go to it (see RECIPE --help)")
    train.add_argument("recipe", help="recipe file, or a name in ./recipes (e.g. lora_retrieval, classify)")
    info = sub.add_parser("info", help="show an adapter's base, strategy, size and metrics")
    info.add_argument("adapter", help="adapter folder or Hub repo id (namespace/name)")
    info.add_argument("--revision", help="Hub revision of a repo id")
    evaluate = sub.add_parser("eval", help="retrieval recall of the base and base + adapter")
    _adapter_arguments(evaluate)
    evaluate.add_argument("--source", required=True, help="image–caption data (any source the recipes accept)")
    evaluate.add_argument("--image-column", default="file_name", help="column of image paths (default: file_name)")
    evaluate.add_argument("--caption-column", default="caption", help="column of captions (default: caption)")
    evaluate.add_argument("--val-fraction", type=float, default=0.1,
                          help="held-out share of images, as in training (default: 0.1)")
    evaluate.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default: 0)")
    evaluate.add_argument("--max-images", type=int, help="evaluate on at most this many held-out images")
    evaluate.add_argument("--batch-size", type=int, default=128, help="embedding batch size (default: 128)")
    embed = sub.add_parser("embed", help="embed a folder of images into a safetensors file")
    _adapter_arguments(embed, optional=True)
    embed.add_argument("--images", required=True, help="folder of images")
    embed.add_argument("--out", required=True, help="output .safetensors file (embeddings in file-name order)")
    search = sub.add_parser("search", help="text-to-image search over a folder of images")
    _adapter_arguments(search, optional=True)
    search.add_argument("--images", required=True, help="folder of images")
    search.add_argument("--query", required=True, help="the text to search for")
    search.add_argument("--top-k", type=int, default=5, help="how many images to list (default: 5)")
    search.add_argument("--index", help="index file (default: .peftclip-index.safetensors in the image folder)")
    merge = sub.add_parser("merge", help="write base + LoRA adapter as a plain open_clip checkpoint")
    _adapter_arguments(merge)
    merge.add_argument("--out", required=True, help="output .safetensors checkpoint")
    push = sub.add_parser("push", help="upload an adapter folder to the Hugging Face Hub with a model card")
    push.add_argument("adapter", help="adapter folder")
    push.add_argument("repo_id", help="Hub repo id, namespace/name")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--license", default="apache-2.0", help="license for the model card (default: apache-2.0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftclip` console script; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "train":
            cmd_train(args, rest)
        else:
            commands = {"info": cmd_info, "eval": cmd_eval, "embed": cmd_embed, "search": cmd_search,
                        "merge": cmd_merge, "push": cmd_push}
            commands[args.command](args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
