"""Retrieval fine-tuning of an open_clip model on image–caption pairs; LoRA by default.

Supports: CPU, one GPU, or many processes (negatives gathered across processes),
mixed precision (fp16/bf16), gradient accumulation, checkpoints and --resume,
every strategy (LoRA, partial unfreezing, text/visual prompts, combined), and a
YAML/JSON config with command-line overrides. With no arguments it adapts the tiny
built-in base to a generated shapes task, offline, in a few minutes on 2 CPU cores.

    accelerate launch recipes/lora_retrieval.py
    python recipes/lora_retrieval.py --config recipes/configs/flickr8k.yaml
    torchrun --nproc_per_node 2 recipes/lora_retrieval.py --cpu     # two CPU processes
"""

from __future__ import annotations

import sys

from peftclip.adapters import (
    AdapterSpec,
    StrategyConfig,
    apply_strategy,
)
from peftclip.adapters.strategy import method_sections
from peftclip.cache import FeatureCache, cache_frozen_towers
from peftclip.data import (
    DataConfig,
    EvalImages,
    TrainPairs,
    count_truncated,
    eval_texts,
    load_pairs,
)
from peftclip.io import save_adapter
from peftclip.models import BaseConfig, load_base
from peftclip.recipe import finish_run, recipe_parser, run_recipe
from peftclip.streaming import StreamingPairs, is_streaming, load_stream
from peftclip.synthetic import default_data_dir, make_shapes_dataset
from peftclip.tracking import TrainingMonitor
from peftclip.train import (
    TrainConfig,
    evaluate_retrieval,
    images_per_second,
    result_fingerprint,
    train,
)
from peftclip.utils import cache_root

# A head and Tip-Adapter are for classification: every other method's section comes from the method registry.
SECTIONS = {"base": BaseConfig, "data": DataConfig, "strategy": StrategyConfig,
            **method_sections(exclude=("head", "tip_adapter")),
            "train": TrainConfig}
# The built-in default: tiny random base, LoRA, the generated shapes task (peftclip/synthetic.py).
DEFAULTS = {"train": {"epochs": 40, "lr": 3e-3, "batch_size": 64, "warmup_steps": 20,
                      "output_dir": "outputs/lora_retrieval"}}


def get_datasets(base, data_config: DataConfig, tokenize, reserved_tokens: int, seed: int):
    """Training pairs (one caption sampled per image and epoch, or a stream of them), the held-out images and
    captions, and counts (a stream's captions are not counted ahead)."""
    transform = base.preprocess_train if data_config.augment else base.preprocess_val
    if is_streaming(data_config):
        stream, val_pairs = load_stream(data_config)
        train_set, train_pairs = StreamingPairs(stream, transform, tokenize, seed, data_config), None
    else:
        train_pairs, val_pairs = load_pairs(data_config)
        train_set = TrainPairs(train_pairs, transform, tokenize, seed=seed,
                               max_bad_fraction=data_config.max_bad_fraction)
    captions, text_to_image = eval_texts(val_pairs)
    counts = {"skipped_rows": (train_pairs.skipped if train_pairs else 0) + val_pairs.skipped,
              "truncated_captions": count_truncated((train_pairs.captions if train_pairs else []) + val_pairs.captions,
                                                    base.tokenizer, reserved_tokens)}
    return train_set, EvalImages(val_pairs, base.preprocess_val), captions, text_to_image, counts


def training_function(config: dict, accelerator) -> dict:
    """Load base → apply the strategy → evaluate → train → evaluate → save. Returns the metrics."""
    train_config: TrainConfig = config["train"]
    if config["strategy"].cocoop:
        # Conditioning a caption on its own image gives the pairing away, and on every image would run the
        # text tower B² times a batch (and N_images times per caption at retrieval): CoCoOp is for class names.
        raise ValueError("--cocoop needs class names to condition on each image; image-caption retrieval has none "
                         "(use peftclip train classify --cocoop, or --text-prompt for CoOp here)")
    if config["strategy"].tip_adapter:
        raise ValueError("--tip-adapter caches labelled few-shot images for classification; use peftclip train "
                         "classify --tip-adapter")
    base = load_base(config["base"], device=accelerator.device)
    spec = AdapterSpec.from_sections(config["strategy"], config)
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer)
    with accelerator.main_process_first():
        train_set, val_images, captions, text_to_image, counts = get_datasets(
            base, config["data"], tokenize, spec.text_prompt.n_ctx if spec.text_prompt else 0, train_config.seed)
    size = f"{len(train_set)} training images" if isinstance(train_set, TrainPairs) else "a training stream"
    accelerator.print(f"data: {size}, {len(val_images)} held-out images with "
                      f"{len(captions)} captions; {counts['skipped_rows']} bad rows skipped; "
                      f"{counts['truncated_captions']} captions truncated to the context length")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    accelerator.print(f"strategy {', '.join(spec.to_dict())}: {trainable:,} trainable parameters "
                      f"({100 * trainable / total:.2f}% of {total:,})")

    def evaluate():
        return evaluate_retrieval(accelerator, model, val_images, captions, text_to_image, tokenize,
                                  train_config.eval_batch_size, train_config.num_workers)

    def save(output_dir):
        return save_adapter(accelerator.unwrap_model(model), output_dir, base.info, spec.to_dict(),
                            training={"train": train_config.to_dict(), "data": config["data"].to_dict()},
                            save_dtype=train_config.save_dtype)

    before = evaluate()
    train_model, train_data = model, train_set
    if train_config.feature_cache and isinstance(train_set, TrainPairs):  # a stream is never cached
        cache = FeatureCache(cache_root() / "features")
        train_model, train_data = cache_frozen_towers(model, train_set, base.info, config["data"].augment, cache,
                                                      accelerator.device)
        if train_model is not model:
            accelerator.print(f"feature cache: {train_model.modes}")
    with TrainingMonitor.from_config(accelerator, train_config, evaluate, save) as monitor:
        monitor.start(config, before)
        result = train(train_model, train_data, train_config, accelerator,
                       fingerprint=result_fingerprint(config, base.info), monitor=monitor)
        after = evaluate()
        metrics = {"before": before, "after": after, "steps": len(result.losses), "final_loss": result.losses[-1],
                   "skipped_steps": result.skipped_steps, "bad_samples": train_set.bad.count, **counts,
                   "train_images_per_second": images_per_second(result.step_seconds, monitor.images_per_step),
                   **monitor.finish(len(result.losses), after)}
    return finish_run(accelerator, metrics, save, train_config.output_dir)


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; bad input exits with status 2 and a one-line error."""
    parser = recipe_parser(__doc__, SECTIONS)
    return run_recipe(argv, parser, SECTIONS, DEFAULTS, lambda: str(make_shapes_dataset(default_data_dir())),
                      training_function)


if __name__ == "__main__":
    main()
    sys.exit(0)
