"""LoRA retrieval fine-tuning of an open_clip model on image–caption pairs.

Supports: CPU, one GPU, or many processes (negatives gathered across processes),
mixed precision (fp16/bf16), gradient accumulation, a YAML/JSON config with
command-line overrides. With no arguments it adapts the tiny built-in base to a
generated shapes task, offline, in a couple of minutes on 2 CPU cores.

    accelerate launch recipes/lora_retrieval.py
    python recipes/lora_retrieval.py --config recipes/configs/flickr8k.yaml
"""

from __future__ import annotations

import argparse
import sys

from peftclip.data import DataConfig, EvalImages, TrainPairs, eval_texts, load_pairs
from peftclip.synthetic import default_data_dir, make_shapes_dataset

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.config import add_config_arguments, parse_config
from peftclip.io import save_adapter, save_metrics
from peftclip.models import BaseConfig, load_base
from peftclip.train import (
    TrainConfig,
    create_accelerator,
    evaluate_retrieval,
    format_metrics_table,
    result_fingerprint,
    train,
)

SECTIONS = {"base": BaseConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}
# The built-in default: tiny random base, generated shapes task (see peftclip/synthetic.py).
DEFAULTS = {
    "data": {"source": None},
    "train": {"epochs": 12, "lr": 3e-3, "batch_size": 64, "output_dir": "outputs/lora_retrieval"},
}


def get_datasets(base, data_config: DataConfig, seed: int):
    """Training pairs (one sampled caption per image) and the held-out images and captions."""
    train_pairs, val_pairs = load_pairs(data_config)
    train_set = TrainPairs(train_pairs, base.preprocess_train, base.tokenizer, seed=seed)
    captions, text_to_image = eval_texts(val_pairs)
    return train_set, EvalImages(val_pairs, base.preprocess_val), captions, text_to_image, train_pairs.skipped


def training_function(config: dict, accelerator) -> dict:
    """Load base → apply LoRA → evaluate → train → evaluate → save. Returns the metrics."""
    train_config: TrainConfig = config["train"]
    base = load_base(config["base"], device=accelerator.device)
    with accelerator.main_process_first():
        train_set, val_images, captions, text_to_image, skipped = get_datasets(
            base, config["data"], train_config.seed)
    accelerator.print(f"data: {len(train_set)} training images, {len(val_images)} held-out images, "
                      f"{len(captions)} held-out captions" + (f", {skipped} bad rows skipped" if skipped else ""))
    model = apply_lora(base.model, config["lora"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"LoRA: {trainable:,} trainable parameters "
                      f"({100 * trainable / sum(p.numel() for p in model.parameters()):.2f}% of the model)")

    def evaluate():
        return evaluate_retrieval(accelerator, model, val_images, captions, text_to_image, base.tokenizer,
                                  train_config.eval_batch_size, train_config.num_workers)

    before = evaluate()
    result = train(model, train_set, train_config, accelerator,
                               fingerprint=result_fingerprint(config, base.info))
    after = evaluate()
    metrics = {"before": before, "after": after, "steps": len(result.losses), "final_loss": result.losses[-1],
               "skipped_rows": skipped, "skipped_steps": result.skipped_steps}
    accelerator.print(format_metrics_table(before, after))
    if accelerator.is_main_process:
        out = save_adapter(accelerator.unwrap_model(model), train_config.output_dir, base.info,
                           strategy={"lora": config["lora"].to_dict()},
                           training={"train": train_config.to_dict(), "data": vars(config["data"])})
        save_metrics(out, metrics)
        accelerator.print(f"adapter saved to {out}")
    accelerator.wait_for_everyone()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file with base/data/lora/train sections; flags override it.")
    for section, cls in SECTIONS.items():
        add_config_arguments(parser, section, cls)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = parse_config(args, SECTIONS, DEFAULTS)
        if config["data"].source is None:
            config["data"].source = str(make_shapes_dataset(default_data_dir()))
        accelerator = create_accelerator(config["train"])
        return training_function(config, accelerator)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
