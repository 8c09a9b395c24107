"""The classify recipe with CoCoOp and Tip-Adapter: what trains, step counts, reloading to the same predictions."""

from __future__ import annotations

import pytest
import torch

from peftclip.adapters.cocoop import cocoop_logits
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.strategy import AdapterSpec
from peftclip.data import DataConfig, EvalImages, load_labelled
from peftclip.evaluate import classification_accuracy
from peftclip.inference import AdaptedCLIP
from peftclip.io import load_adapter, read_metadata, save_adapter
from peftclip.models import load_base
from peftclip.recipes import classify, lora_retrieval
from tests.conftest import randomly_trained, shared_data

COMMON = ["--max-steps", "2", "--batch-size", "16", "--num-workers", "0", "--val-fraction", "0.25",
          "--weight-decay", "0", "--no-lora", "--no-head"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from peftclip.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=60) / "labels.csv"


@pytest.fixture
def trained(monkeypatch) -> list[dict]:
    """Each `train` call of the recipe: the trainable tensors before and after."""
    runs = []

    def watched(model, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = real(model, *args, **kwargs)
        runs.append({n: (t, dict(model.named_parameters())[n].detach()) for n, t in before.items()})
        return result

    real = classify.train
    monkeypatch.setattr(classify, "train", watched)
    return runs


def _held_out(source, base):
    _, test = load_labelled(DataConfig(source=str(source), label_column="label", val_fraction=0.25))
    images = EvalImages(test, base.preprocess_val)
    return torch.stack([images[i] for i in range(len(images))]), test.labels


@pytest.fixture(scope="module")
def cocoop_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("cocoop") / "adapter"
    return out, classify.main(["--source", str(shapes), "--output-dir", str(out), "--cocoop", "--n-ctx", "2",
                               *COMMON])


def test_cocoop_trains_its_context_and_meta_network_only(shapes, tmp_path, trained):
    classify.main(["--source", str(shapes), "--output-dir", str(tmp_path / "out"), "--cocoop", *COMMON])
    (run,) = trained
    changed = {n.split("peftclip_text_prompt.")[-1] for n, (a, b) in run.items() if not torch.equal(a, b)}
    assert all("peftclip_text_prompt." in n for n in run)
    assert {"ctx", "meta_net.0.weight", "meta_net.2.weight"} <= changed


def test_cocoop_reloads_to_the_recipes_predictions(shapes, cocoop_run):
    out, metrics = cocoop_run
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(out, "cocoop")
    images, labels = _held_out(shapes, clip.base)
    probs = clip.classify(images)
    assert classification_accuracy(probs, labels)["top1"] == pytest.approx(metrics["after"]["top1"])
    model = load_adapter(load_base(), out)
    prompt = model.peftclip_text_prompt
    templates = list(classify.DEFAULT_TEMPLATES)
    tokens = prompt.tokenize([t.format(c) for c in metrics["class_names"] for t in templates])
    with torch.no_grad():
        want = cocoop_logits(model, prompt, images, tokens, len(templates)).softmax(-1)
        unconditioned = clip._zero_shot(images, metrics["class_names"], templates, 64).softmax(-1)
    assert torch.allclose(probs, want, atol=1e-5)
    assert not torch.allclose(probs, unconditioned, atol=1e-4), "classify ignored the image-conditioned prompts"


@pytest.mark.parametrize("recipe,flags,message", [
    (classify, ["--cocoop"], "--cocoop classifies through its image-conditioned class prompts"),
    (classify, ["--cocoop", "--no-head", "--objective", "flyp"], "and no --objective flyp"),
    (lora_retrieval, ["--cocoop", "--no-lora"], "--cocoop needs class names"),
    (lora_retrieval, ["--tip-adapter", "--no-lora"], "--tip-adapter caches labelled few-shot images"),
])
def test_cocoop_refusals_name_why(shapes, tmp_path, capsys, recipe, flags, message):
    source = shapes if recipe is classify else shapes.parent
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--source", str(source), "--output-dir", str(tmp_path / "out"), "--num-workers", "0", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CIFAR = ["--val-split", "test", "--max-val-images", "40", "--shots", "16", "--num-workers", "0", "--no-lora",
         "--no-head", "--tip-adapter", "--weight-decay", "0"]


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    base, model, _ = randomly_trained(AdapterSpec(lora=ClipLoraConfig(r=2)), seed=3)
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "lora", base.info, {"lora": {"r": 2}})


def test_tip_adapter_takes_no_step_and_reloads_to_the_same_predictions(tmp_path, optimizer_steps, lora_folder,
                                                                        capsys):
    source, out = shared_data("cifar10"), tmp_path / "tip"
    metrics = classify.main(["--source", str(source), "--output-dir", str(out), "--search", *CIFAR])
    assert optimizer_steps == [] and metrics["steps"] == 0
    printed = capsys.readouterr().out
    assert "0 training steps" in printed and "nan" not in printed  # no throughput of steps that never ran
    search = metrics["tip_adapter_search"]
    saved = read_metadata(out)["strategy"]["tip_adapter"]
    assert (saved["alpha"], saved["beta"], saved["cache_size"]) == (search["alpha"], search["beta"], 160)
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(lora_folder, "lora")
    clip.load_adapter(out, "tip")
    images, labels = _held_out_split(source, clip.base)
    names = metrics["class_names"]
    got = {a: clip.classify(images, class_names=names, adapter=a) for a in ("tip", "lora", "tip")}
    assert classification_accuracy(got["tip"], labels)["top1"] == pytest.approx(metrics["after"]["top1"])
    assert not torch.allclose(got["lora"], got["tip"], atol=1e-4)
    with clip.using(None):
        zero_shot = clip.classify(images, class_names=names)
    assert not torch.allclose(zero_shot, got["tip"], atol=1e-4), "classify ignored the cache"
    assert torch.equal(clip.classify(images, adapter="tip"), got["tip"])


def _held_out_split(source, base):
    _, test = load_labelled(DataConfig(source=str(source), label_column="label", val_split="test",
                                       max_val_images=40))
    images = EvalImages(test, base.preprocess_val)
    return torch.stack([images[i] for i in range(len(images))]), test.labels


def test_tip_adapter_f_trains_only_the_cache_keys(tmp_path, optimizer_steps, trained):
    metrics = classify.main(["--source", str(shared_data("cifar10")), "--output-dir", str(tmp_path / "tipf"),
                             "--fine-tune", "--max-steps", "2", "--batch-size", "32", *CIFAR])
    (run,) = trained
    changed = {n for n, (a, b) in run.items() if not torch.equal(a, b)}
    assert changed == {n for n in run if n.endswith("peftclip_tip_adapter.cache_keys")} and len(changed) == 1
    assert metrics["steps"] == 2 and len(optimizer_steps) == 2


def test_tip_adapter_with_another_method_is_refused(shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        classify.main(["--source", str(shapes), "--output-dir", str(tmp_path / "out"), "--num-workers", "0",
                       "--tip-adapter", "--no-head"])
    assert exit_info.value.code == 2
    assert "--tip-adapter caches the frozen base's image features, so it runs alone; also on: ['lora']" in \
        capsys.readouterr().err
