"""The loss each model was trained with: open_clip's formulas, the choice by `logit_bias`, the logit-scale
clamp, and equality of one process and two on the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import load_file

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.losses import ContrastiveLoss, clamp_logit_scale, contrastive_step, loss_for
from peftclip.models import BaseConfig, load_base
from tests import hf_cache

REPO = Path(__file__).resolve().parents[1]
tiny_hub = hf_cache.tiny_hub  # the fixture, for this module's tests


def _features(n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator), torch.randn(n, 8, generator=generator)


def test_softmax_loss_is_symmetric_cross_entropy_over_scaled_cosine_logits():
    images, texts = _features()
    scale = torch.tensor(7.0)
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ContrastiveLoss()(images, texts, scale), expected, atol=1e-6)


def test_sigmoid_loss_is_pairwise_logsigmoid_summed_per_image():
    images, texts = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T + bias
    signs = 2 * torch.eye(5) - 1  # +1 on matching pairs, -1 elsewhere
    expected = -F.logsigmoid(signs * logits).sum() / 5
    assert torch.allclose(ContrastiveLoss()(images, texts, scale, bias), expected, atol=1e-5)


# kind -> (open_clip reference loss, extra arguments)
REFERENCES = {
    "softmax": (ClipLoss(), ()),
    "sigmoid": (SigLipLoss(), (torch.tensor(-10.0),)),
}


@pytest.mark.parametrize("kind", list(REFERENCES))
def test_equals_open_clip_loss_on_the_same_normalised_features(kind):
    reference, extra = REFERENCES[kind]
    images, texts = _features(6, seed=1)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    expected = reference(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), scale, *extra)
    torch.testing.assert_close(ContrastiveLoss()(images, texts, scale, *extra), expected)


@pytest.mark.parametrize("bias", [None, torch.tensor(-10.0)])
def test_matched_pairs_give_lower_loss_than_shuffled(bias):
    features, _ = _features(6)
    loss, scale = ContrastiveLoss(), torch.tensor(10.0)
    assert loss(features, features, scale, bias) < loss(features, features.roll(1, 0), scale, bias)


def _lora(base):
    return apply_lora(base.model, ClipLoraConfig(r=2, towers=["text"]), init_lora_weights=False)


# model name -> the loss it was trained with
TRAINED_WITH = {"peftclip-tiny": ClipLoss, "peftclip-tiny-siglip": SigLipLoss, "peftclip-tiny-eva": ClipLoss}


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "peft"])
@pytest.mark.parametrize("name", list(TRAINED_WITH))
def test_loss_for_picks_by_logit_bias_through_peft(name, wrap, tiny_hub):
    base = load_base(BaseConfig(model_name=name))
    assert type(loss_for(_lora(base) if wrap else base.model)) is TRAINED_WITH[name]


@pytest.mark.parametrize("output_dict", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("name", ["peftclip-tiny", "peftclip-tiny-siglip"])
def test_contrastive_step_uses_the_models_own_loss(name, output_dict, tiny_hub):
    base = load_base(BaseConfig(model_name=name))
    base.model.output_dict = output_dict
    model = _lora(base)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = base.tokenizer(["a photo of a dog", "a red circle", "two cats", "the sunny street"])
    with torch.no_grad():
        image_features = base.model.encode_image(images, normalize=True)
        text_features = base.model.encode_text(texts, normalize=True)
        extra = () if base.model.logit_bias is None else (base.model.logit_bias,)
        expected = TRAINED_WITH[name]()(image_features, text_features, base.model.logit_scale.exp(), *extra)
        torch.testing.assert_close(contrastive_step(model, (images, texts)), expected)


class _FeaturesOnly(torch.nn.Module):
    """A wrapper whose forward drops the bias, as feature caches do; the bias is still the model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_base_model(self):
        return self.model

    def forward(self, images, texts):
        return self.model(images, texts)[:3]


def test_a_model_with_logit_bias_gets_the_sigmoid_loss_when_its_forward_drops_the_bias(tiny_hub):
    base = load_base(BaseConfig(model_name="peftclip-tiny-siglip"))
    images, texts = torch.randn(3, 3, 32, 32), base.tokenizer(["a dog", "a cat", "the snow"])
    with torch.no_grad():
        assert contrastive_step(_FeaturesOnly(base.model), (images, texts)) == \
            contrastive_step(base.model, (images, texts))


# initial logit_scale, trainable, wrapped in PEFT -> logit_scale after the clamp
CLAMP_CASES = {
    "above ln 100": (10.0, True, False, math.log(100)),
    "below 0": (-1.0, True, False, 0.0),
    "inside": (2.0, True, False, 2.0),
    "frozen": (10.0, False, False, 10.0),
    "through PEFT": (10.0, True, True, math.log(100)),
}


@pytest.mark.parametrize("case", list(CLAMP_CASES))
def test_clamp_logit_scale(case):
    start, trainable, wrap, expected = CLAMP_CASES[case]
    base = load_base()
    model = _lora(base) if wrap else base.model  # PEFT freezes all but LoRA: set the scale after wrapping
    base.model.logit_scale.data.fill_(start)
    base.model.logit_scale.requires_grad_(trainable)
    clamp_logit_scale(model)
    assert base.model.logit_scale.item() == pytest.approx(expected)


def _run_worker(out_dir: Path, processes: int, model_name: str, towers: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = [str(REPO / "tests" / "distributed_worker.py"), str(out_dir), model_name, towers]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", "29517", *worker]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "result.json").read_text())


# model name -> (LoRA towers, the open_clip loss it trains with)
DISTRIBUTED_CASES = {
    "peftclip-tiny": ("vision,text", "ClipLoss"),
    "peftclip-tiny-siglip": ("text", "SigLipLoss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISTRIBUTED_CASES))
def test_two_processes_match_one_process_on_the_global_batch(name, tmp_path, tiny_hub):
    towers, loss_class = DISTRIBUTED_CASES[name]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single, double = _run_worker(one, 1, name, towers), _run_worker(two, 2, name, towers)
    assert single["world_size"] == 1 and not single["distributed"]
    assert double["world_size"] == 2 and double["distributed"]
    assert double["ranks"] == [0, 1] and len(set(double["pids"])) == 2, "two separate processes must have run"
    assert single["loss_class"] == double["loss_class"] == loss_class
    assert double["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert double["loop_loss"] == pytest.approx(single["loop_loss"], abs=1e-5)
    grads_one, grads_two = load_file(one / "grads.safetensors"), load_file(two / "grads.safetensors")
    assert grads_one.keys() == grads_two.keys() and grads_one
    for key, grad in grads_one.items():
        # Two processes sum the same terms in another order: float32 noise of a few 1e-6 of the
        # tensor's scale, where a missing gather or a wrong average would differ by order one.
        torch.testing.assert_close(grads_two[key], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=lambda message: f"{key}: {message}")


@pytest.mark.slow
def test_the_retrieval_recipe_trains_a_siglip_model_with_the_sigmoid_loss(tmp_path, tiny_hub, monkeypatch):
    from peftclip.recipes import lora_retrieval
    from peftclip.synthetic import make_shapes_dataset

    calls = []

    class RecordingSigLipLoss(SigLipLoss):
        def forward(self, *args, **kwargs):
            calls.append(self.world_size)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr("peftclip.losses.SigLipLoss", RecordingSigLipLoss)
    source = make_shapes_dataset(tmp_path / "shapes", n_images=40)
    # Default flags: LoRA on both towers (the timm trunk included), the feature cache on.
    metrics = lora_retrieval.main(["--source", str(source), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                                   "--batch-size", "16", "--num-workers", "0", "--cpu", "--model-name",
                                   "peftclip-tiny-siglip"])
    assert metrics["steps"] == 2 and calls == [1, 1]
