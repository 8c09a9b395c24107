"""Classification with an open_clip model: zero-shot evaluation → adaptation → evaluation.

Supports every strategy of the retrieval recipe plus a linear head (`--head`, a linear
probe when nothing else trains), three objectives (`--objective ce`: cross-entropy on the
head, or on text-derived class logits as CoOp does when there is no head; `--objective
flyp`: contrastive against class prompts), class-folder images, parquet with a ClassLabel
(e.g. ../shared/data/cifar10), and an offline built-in default (colour+shape classes).
Reports top-1, top-5 and mean per-class accuracy before and after. The few-shot protocol of CoOp and
CLIP-LoRA: `--shots K` trains on K images per class, drawn with the seeds; `--seeds 1 2 3` runs once per
seed (adapters in <output-dir>-seed<S>) and reports top-1's mean ± std.

    python recipes/classify.py
    python recipes/classify.py --source ../shared/data/cifar10 --val-split test --max-images 2000
    python recipes/classify.py --source ../shared/data/cifar10 --val-split test --shots 16 --seeds 1 2 3
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from peftclip.adapters import (
    AdapterSpec,
    StrategyConfig,
    apply_strategy,
)
from peftclip.adapters.cocoop import CoCoOpClassifier
from peftclip.adapters.heads import (
    DEFAULT_TEMPLATES,
    HeadConfig,
    classifier,
    zero_shot_weights,
)
from peftclip.adapters.strategy import method_sections
from peftclip.adapters.tip_adapter import (
    TIP_ADAPTER_NAME,
    TipAdapterClassifier,
    create_tip_adapter,
    search_alpha_beta,
    set_tip_adapter,
)
from peftclip.cache import FeatureCache, cache_image_tower
from peftclip.data import DataConfig, EvalImages, LabelledImages, load_labelled
from peftclip.evaluate import classification_accuracy
from peftclip.fewshot import few_shot_indices, select_shots
from peftclip.io import check_output_dir, save_adapter
from peftclip.losses import contrastive_step, cross_entropy_step
from peftclip.models import BaseConfig, load_base
from peftclip.recipe import finish_run, recipe_parser, run_recipe
from peftclip.synthetic import default_data_dir, make_shapes_dataset
from peftclip.tracking import TrainingMonitor
from peftclip.train import (
    TrainConfig,
    TrainResult,
    embed_dataset,
    images_per_second,
    result_fingerprint,
    train,
)
from peftclip.utils import ConfigMixin, cache_root, inner_model, stable_seed

OBJECTIVES = ("ce", "flyp")


@dataclass
class ClassifyConfig(ConfigMixin):
    """What the classifier is trained for."""

    section: ClassVar[str] = "classify"

    objective: str = field(default="ce", metadata={"help": f"Training objective, one of {OBJECTIVES}."})
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES),
                                 metadata={"help": "Prompt templates with {} for the class name."})
    shots: int | None = field(default=None, metadata={
        "help": "Train on this many images per class (few-shot), drawn with --split-seed and the run's seed."})
    seeds: list[int] | None = field(default=None, metadata={
        "help": "Run once per seed (training and shot draw), adapters in <output-dir>-seed<S>; reports top-1's "
                "mean ± std."})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; choose from {OBJECTIVES}")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots={self.shots}: must be at least 1")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: each seed once")
        for template in self.templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no {{}} for the class name")


SECTIONS = {"base": BaseConfig, "data": DataConfig, "classify": ClassifyConfig, "strategy": StrategyConfig,
            **method_sections(), "train": TrainConfig}
# A head learns from image features alone, so LoRA goes on the image tower by default.
DEFAULTS = {"strategy": {"head": True}, "lora": {"towers": ["vision"]}, "data": {"label_column": "label"},
            "train": {"epochs": 20, "lr": 3e-3, "batch_size": 64, "output_dir": "outputs/classify"}}


def _text_classifier(model, tokenize, class_names, templates):
    """images -> logits against the (maybe adapted) text tower's class embeddings, with gradients.

    Goes through the model's forward, so a prepared (DDP, autocast) model works as it trains.
    """
    def logits(images):
        texts = tokenize([t.format(c) for c in class_names for t in templates]).to(images.device)
        image_features, text_features, logit_scale = model(images, texts)[:3]  # normalised; scale is exp'd
        weights = F.normalize(text_features.view(len(class_names), len(templates), -1).mean(1), dim=-1)
        return logit_scale * image_features @ weights.T
    return logits


def _cocoop_classifier(model, tokenize, class_names, templates):
    """images -> logits with each image's own CoCoOp class prompts (every template, averaged)."""
    tokens = tokenize([t.format(c) for c in class_names for t in templates])
    return CoCoOpClassifier(model, tokens.to(next(inner_model(model).parameters()).device), len(templates))


def _objective(config, model, tokenize, class_names, weights):
    """(module to train, compute_loss(prepared, batch)) for the chosen objective.

    The loss runs the prepared module's forward once per batch, with every trainable parameter
    used inside it, as DDP needs: a head is trained as part of a classifier module.
    """
    templates = config["classify"].templates
    if config["classify"].objective == "flyp":
        def flyp(prepared, batch):
            images, labels = batch
            texts = tokenize([templates[0].format(class_names[i]) for i in labels.tolist()]).to(images.device)
            return contrastive_step(prepared, (images, texts))
        return model, flyp
    module = _method_classifier(config["strategy"], model, tokenize, class_names, templates, weights)
    if module is not None:
        return module, cross_entropy_step
    return model, lambda prepared, batch: cross_entropy_step(
        _text_classifier(prepared, tokenize, class_names, templates), batch)


def _method_classifier(strategy, model, tokenize, class_names, templates, weights):
    """The images -> logits module of a method that brings its own (head, CoCoOp, Tip-Adapter), else None:
    the logits then come from the class names' text features."""
    if strategy.head:
        return classifier(model)
    if strategy.cocoop:
        return _cocoop_classifier(model, tokenize, class_names, templates)
    if strategy.tip_adapter:
        return TipAdapterClassifier(model, weights)
    return None


def _trains_head_only_on_images(config: dict) -> bool:
    """Whether the objective is cross-entropy on the head, which gives the text tower no gradient."""
    return config["strategy"].head and config["classify"].objective == "ce"


def _leaves_parameters_unused(config: dict) -> bool:
    """Whether some trainable parameter gets no gradient (DDP must be told): a head trained with
    cross-entropy leaves the text tower out, and Tip-Adapter-F trains the cache keys, never its values."""
    return _trains_head_only_on_images(config) or (config["strategy"].tip_adapter and config["tip_adapter"].fine_tune)


def _check_text_tower_trains(config: dict) -> None:
    """Refuse text-side methods that the objective would leave untrained (and save as dead weight)."""
    if _trains_head_only_on_images(config) and config["strategy"].lora and "text" in config["lora"].towers:
        raise ValueError("lora.towers includes 'text', but a head trained with objective 'ce' gives the text "
                         "tower no gradient: use --towers vision, or --objective flyp, or --no-head")
    if config["strategy"].cocoop and (config["strategy"].head or config["classify"].objective != "ce"):
        # FLYP's texts are one per image: a prompt conditioned on its own image would give the answer away.
        raise ValueError("--cocoop classifies through its image-conditioned class prompts with objective 'ce': "
                         "pass --no-head (on by default) and no --objective flyp")


def _check_tip_adapter(config: dict, spec: AdapterSpec) -> None:
    """Tip-Adapter caches the frozen base's features: alone, and searching only with shots to hold out."""
    others = sorted(set(spec.to_dict()) - {"tip_adapter"})
    if spec.tip_adapter is None:
        return
    if others:
        raise ValueError(f"--tip-adapter caches the frozen base's image features, so it runs alone; also on: "
                         f"{others} (pass --no-lora --no-head, both on by default, and no other method)")
    if spec.tip_adapter.search and not config["classify"].shots:
        raise ValueError("--search picks alpha and beta on as many held-out shots again per class: give --shots")


def _base_features(accelerator, base, data, config) -> torch.Tensor:
    """The frozen base's normalised image features of labelled `data`, unaugmented."""
    with torch.no_grad():
        return embed_dataset(accelerator, lambda x: base.model.encode_image(x, normalize=True),
                             LabelledImages(data, base.preprocess_val), config.eval_batch_size, config.num_workers)


def _build_tip_cache(accelerator, base, model, train_data, spec, config) -> None:
    """Fill the model's Tip-Adapter with the normalised features and one-hot labels of `train_data` (no step)."""
    features = _base_features(accelerator, base, train_data, config["train"])
    adapter = create_tip_adapter(features, train_data.labels, spec.tip_adapter.n_classes, spec.tip_adapter)
    set_tip_adapter(inner_model(model), adapter.to(features.device))


def _search_tip_adapter(accelerator, base, model, pool, weights, config) -> dict:
    """Set the Tip-Adapter's (α, β) best on `shots` more images per class of `pool`, none of them in the cache."""
    shots, seed = config["classify"].shots, stable_seed(config["data"].split_seed, config["train"].seed)
    cached = set(few_shot_indices(pool.labels, shots, seed, pool.class_names))
    rest = [i for i in range(len(pool.labels)) if i not in cached]
    held = [rest[i] for i in few_shot_indices([pool.labels[i] for i in rest], shots, seed + 1, pool.class_names)]
    held_out = replace(pool, images=[pool.images[i] for i in held], labels=[pool.labels[i] for i in held],
                       names=[pool.names[i] for i in held])
    features = _base_features(accelerator, base, held_out, config["train"])
    zero_shot = base.model.logit_scale.exp().detach() * features @ weights.T
    alpha, beta, accuracy = search_alpha_beta(getattr(inner_model(model), TIP_ADAPTER_NAME), features, zero_shot,
                                              held_out.labels)
    return {"alpha": alpha, "beta": beta, "held_out_top1": 100.0 * accuracy, "held_out_images": len(held)}


def _accuracy(accelerator, predict, images, labels, n_classes, config):
    model_logits = embed_dataset(accelerator, predict, images, config.eval_batch_size, config.num_workers)
    return classification_accuracy(model_logits, labels, n_classes)


def training_function(config: dict, accelerator) -> dict:
    """Zero-shot evaluation → apply the strategy → train → evaluate → save. Returns the metrics."""
    _check_text_tower_trains(config)
    base = load_base(config["base"], device=accelerator.device)
    with accelerator.main_process_first():
        train_data, test_data = load_labelled(config["data"])
    pool = train_data
    if config["classify"].shots:
        train_data = select_shots(train_data, config["classify"].shots,
                                  stable_seed(config["data"].split_seed, config["train"].seed))
    names, templates, n_classes = train_data.class_names, config["classify"].templates, len(train_data.class_names)
    accelerator.print(f"data: {len(train_data.images)} training and {len(test_data.images)} test images, "
                      f"{n_classes} classes")
    test_images = EvalImages(test_data, base.preprocess_val)
    weights = zero_shot_weights(base.model, base.tokenizer, names, templates)
    with torch.no_grad():
        before = _accuracy(accelerator, lambda x: base.model.encode_image(x, normalize=True) @ weights.T,
                           test_images, test_data.labels, n_classes, config["train"])
    sections = {**config, "head": HeadConfig(n_classes=n_classes, init=config["head"].init),
                "text_prompt": replace(config["text_prompt"], n_classes=n_classes),
                "tip_adapter": replace(config["tip_adapter"], n_classes=n_classes, cache_size=len(train_data.labels))}
    spec = AdapterSpec.from_sections(config["strategy"], sections)
    _check_tip_adapter(config, spec)
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer, head_weights=weights)
    if spec.tip_adapter is not None:
        _build_tip_cache(accelerator, base, model, train_data, spec, config)
    augment = config["data"].augment
    train_set = LabelledImages(train_data, base.preprocess_train if augment else base.preprocess_val,
                               seed=config["train"].seed, max_bad_fraction=config["data"].max_bad_fraction)
    train_model = model
    if config["train"].feature_cache and config["classify"].objective == "ce":
        cache = FeatureCache(cache_root() / "features")
        train_model, train_set = cache_image_tower(model, train_set, base.info, augment, cache, accelerator.device)
        if train_model is not model:
            accelerator.print(f"feature cache: {train_model.modes}")
    train_module, compute_loss = _objective(config, train_model, tokenize, names, weights)

    def evaluate():
        was_training = model.training
        model.eval()
        predict = _method_classifier(config["strategy"], model, tokenize, names, templates, weights)
        if predict is None:
            predict = _text_classifier(model, tokenize, names, templates)
        with torch.no_grad():
            accuracy = _accuracy(accelerator, predict, test_images, test_data.labels, n_classes, config["train"])
        model.train(was_training)
        return accuracy

    def save(output_dir):
        return save_adapter(accelerator.unwrap_model(model), output_dir, base.info, spec.to_dict(),
                            training={"train": config["train"].to_dict(), "data": config["data"].to_dict(),
                                      "classify": config["classify"].to_dict(), "class_names": names},
                            save_dtype=config["train"].save_dtype)

    with TrainingMonitor.from_config(accelerator, config["train"], evaluate, save) as monitor:
        monitor.start(config, before)
        if spec.tip_adapter is not None and not spec.tip_adapter.fine_tune:
            result = TrainResult(losses=[])  # the cache is the adapter: no step
        else:
            result = train(train_module, train_set, config["train"], accelerator, compute_loss,
                           fingerprint=result_fingerprint(config, base.info), monitor=monitor)
        searched = {}
        if spec.tip_adapter is not None and spec.tip_adapter.search:
            search = _search_tip_adapter(accelerator, base, model, pool, weights, config)
            spec.tip_adapter.alpha, spec.tip_adapter.beta = search["alpha"], search["beta"]  # saved in the spec
            searched["tip_adapter_search"] = search
        after = evaluate()
        metrics = {**searched, "before": before, "after": after, "steps": len(result.losses), "class_names": names,
                   "train_images": len(train_data.images), "skipped_rows": train_data.skipped + test_data.skipped,
                   "train_images_per_second": images_per_second(result.step_seconds, monitor.images_per_step),
                   **monitor.finish(len(result.losses), after)}
    return finish_run(accelerator, metrics, save, config["train"].output_dir)


def run_seeds(config: dict, accelerator) -> dict:
    """`training_function` once per `--seeds` value, each adapter in <output_dir>-seed<S>; top-1's mean ± std.

    Without --seeds, one run as configured.
    """
    seeds, train_config = config["classify"].seeds, config["train"]
    if not seeds:
        return training_function(config, accelerator)
    runs = {}
    for seed in seeds:
        output_dir = f"{train_config.output_dir}-seed{seed}"
        check_output_dir(output_dir, overwrite=train_config.overwrite)
        set_seed(seed)
        runs[seed] = training_function({**config, "train": replace(train_config, seed=seed, output_dir=output_dir)},
                                       accelerator)
    top1 = [metrics["after"]["top1"] for metrics in runs.values()]
    summary = {"seeds": runs, "top1_mean": statistics.mean(top1), "top1_std": statistics.pstdev(top1)}
    accelerator.print(f"top-1 over seeds {', '.join(map(str, seeds))}: "
                      f"{summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; bad input exits with status 2 and a one-line error."""
    parser = recipe_parser(__doc__, SECTIONS, skip=frozenset({"n_classes", "cache_size"}))  # the data gives these
    # A head objective leaves the text tower's trainable parameters (e.g. text_projection) without a
    # gradient: DDP must be told, or it waits for them.
    return run_recipe(argv, parser, SECTIONS, DEFAULTS,
                      lambda: str(make_shapes_dataset(default_data_dir()) / "labels.csv"), run_seeds,
                      find_unused_parameters=_leaves_parameters_unused)


if __name__ == "__main__":
    main()
    sys.exit(0)
