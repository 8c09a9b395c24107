"""Many adapters on one base: switching, disabling, merging, interpolating, exporting, and using them."""

from __future__ import annotations

import json
import random
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import peftclip.inference as inference
from peftclip.adapters.heads import CLASSIFIER_NAME, HeadConfig, classifier
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy, inner_model
from peftclip.inference import AdaptedCLIP
from peftclip.io import SAFETENSORS_WEIGHTS_NAME, AdapterError, load_adapter, save_adapter
from peftclip.models import BaseConfig, load_base
from tests.adapters.test_strategies import TEST_CASES as STRATEGY_CASES
from tests.conftest import image_batch, randomly_trained

TOL = 1e-5
MERGED_TOL = 1e-4  # (W + s·BA)x rounds differently from Wx + s·B(Ax); outputs are O(1), unnormalised
TEXTS = ["a red circle", "a blue square", "two green triangles", "a small yellow star"]
CLASS_NAMES = ["circle", "square", "triangle"]
SPECS = {name: spec for name, (spec, _) in STRATEGY_CASES.items()}
SPECS["head"] = AdapterSpec(head=HeadConfig(n_classes=3, init="random"))
SPECS["lora_and_head"] = AdapterSpec(lora=ClipLoraConfig(r=2, towers=["vision"]), head=HeadConfig(n_classes=3,
                                                                                               init="random"))
SPECS["second_lora"] = AdapterSpec(lora=ClipLoraConfig(r=4, towers=["vision"], target_modules=["q", "c_fc"]))


def _outputs(model, tokenize):
    """What an adapted model computes: image and text embeddings, logit scale, and head logits if any."""
    model.eval()
    images = image_batch(model, n=3)
    with torch.no_grad():
        out = {"image": model.encode_image(images), "text": model.encode_text(tokenize(TEXTS)),
               "scale": model.logit_scale.detach().clone()}
        if getattr(inner_model(model), CLASSIFIER_NAME, None) is not None:
            out["head"] = classifier(model)(images)
    return out


def _save(folder, name, seed):
    """An adapter of strategy `name` with random non-zero weights; returns its folder and outputs."""
    spec = SPECS[name]
    base, model, tokenize = randomly_trained(spec, seed)
    outputs = _outputs(model, tokenize)
    training = {"class_names": CLASS_NAMES} if spec.head else None
    return save_adapter(model, folder / name, base.info, spec.to_dict(), training=training), outputs


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    return {name: _save(folder, name, seed) for seed, name in enumerate(SPECS)}


def _close(got, want, atol=TOL):
    return got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=atol, rtol=0) for k in want)


def _attached(zoo, *names):
    clip = AdaptedCLIP(load_base())
    for name in names:
        clip.load_adapter(zoo[name][0], name)
    return clip


@pytest.fixture(scope="module")
def base_outputs():
    base = load_base()
    return _outputs(base.model, base.tokenizer)


def test_every_strategy_on_one_base_reproduces_its_own_outputs_in_any_order(zoo, base_outputs):
    clip = _attached(zoo, *SPECS)
    order = [*SPECS, None] * 2
    random.Random(0).shuffle(order)
    for name in order:
        with clip.using(name) as model:
            want = zoo[name][1] if name else base_outputs
            assert _close(_outputs(model, clip.tokenizer()), want), name


def test_using_restores_the_previous_adapter_and_set_adapter_none_is_the_base(zoo, base_outputs):
    clip = _attached(zoo, "lora", "text_prompt")
    assert clip.active_adapter == "text_prompt"  # the last one attached
    with clip.using("lora"):
        assert clip.active_adapter == "lora"
    assert clip.active_adapter == "text_prompt"
    clip.set_adapter(None)
    assert _close(_outputs(clip.model, clip.tokenizer()), base_outputs)


def test_per_call_adapter_choice_leaves_the_active_one(zoo):
    clip = _attached(zoo, "lora", "projections")
    images = image_batch(clip.model, n=3)
    got = clip.encode_images(images, adapter="lora", normalize=False)
    assert torch.allclose(got, zoo["lora"][1]["image"], atol=TOL)
    assert clip.active_adapter == "projections"
    texts = clip.encode_texts(TEXTS, adapter="projections", normalize=False)
    assert torch.allclose(texts, zoo["projections"][1]["text"], atol=TOL)


def test_merge_then_unmerge_round_trips(zoo):
    clip = _attached(zoo, "projections_last2_lora", "lora")
    clip.set_adapter("projections_last2_lora")  # its own copy of the last blocks' weights is now in place
    layer = clip.model.get_base_model().visual.transformer.resblocks[0].attn.q_proj
    original = layer.base_layer.weight.detach().clone()
    clip.merge()
    assert not torch.allclose(layer.base_layer.weight, original)  # the update now lives in W
    assert _close(_outputs(clip.model, clip.tokenizer()), zoo["projections_last2_lora"][1], MERGED_TOL)
    with pytest.raises(ValueError, match="is merged; unmerge"):
        clip.set_adapter("lora")
    clip.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=TOL, rtol=0)
    assert _close(_outputs(clip.model, clip.tokenizer()), zoo["projections_last2_lora"][1])
    clip.set_adapter("lora")
    assert _close(_outputs(clip.model, clip.tokenizer()), zoo["lora"][1])


@pytest.mark.parametrize("name", ["lora", "full", "projections_last2_lora"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_interpolation_endpoints(zoo, base_outputs, name, alpha):
    clip = _attached(zoo, name)
    clip.set_scale(name, alpha)
    assert _close(_outputs(clip.model, clip.tokenizer()), base_outputs if alpha == 0 else zoo[name][1])


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_interpolation_midpoint_of_unfrozen_weights_is_the_weight_average(zoo, alpha):
    clip = _attached(zoo, "full")
    clip.set_scale("full", alpha)
    base, trained = load_base().model, load_adapter(load_base(), zoo["full"][0])
    for name in ("logit_scale", "visual.proj", "transformer.resblocks.1.mlp.c_fc.weight", "visual.conv1.weight"):
        want = base.get_parameter(name) + alpha * (trained.get_parameter(name) - base.get_parameter(name))
        assert not torch.allclose(want, trained.get_parameter(name), atol=1e-4), name
        assert torch.allclose(clip.model.get_parameter(name), want, atol=1e-6), name


def test_interpolated_lora_layer_adds_half_its_scaled_update(zoo):
    clip = _attached(zoo, "lora")
    clip.set_scale("lora", 0.5)
    name = "visual.transformer.resblocks.0.mlp.c_fc"
    plain = load_base().model.get_submodule(name)  # W and b, never touched by an adapter
    tensors = load_file(zoo["lora"][0] / SAFETENSORS_WEIGHTS_NAME)
    a, b = (tensors[f"base_model.model.{name}.lora_{m}.weight"] for m in "AB")
    s = SPECS["lora"].lora.lora_alpha / SPECS["lora"].lora.r
    x = torch.randn(5, plain.in_features, generator=torch.Generator().manual_seed(0))
    update = s * (x @ a.T @ b.T)  # (W + s·B·A)x − Wx
    assert update.abs().max() > 1e-2
    clip.model.eval()
    with torch.no_grad():
        got = clip.model.get_base_model().get_submodule(name)(x)
    assert torch.allclose(got, F.linear(x, plain.weight, plain.bias) + 0.5 * update, atol=TOL)


@pytest.mark.parametrize("name", ["text_prompt", "head", "new_proj_dim"])
def test_interpolation_and_export_refuse_what_has_no_base_counterpart(zoo, tmp_path, name):
    clip = _attached(zoo, name)
    with pytest.raises(ValueError, match="cannot be interpolated"):
        clip.set_scale(name, 0.5)
    with pytest.raises(ValueError, match="no place in one"):
        clip.export_merged(name, tmp_path / "merged.safetensors")


@pytest.mark.parametrize("name", ["lora", "projections_last2_lora", "full"])
def test_merged_export_loads_with_plain_open_clip(zoo, tmp_path, name):
    clip = _attached(zoo, name, "second_lora")
    clip.set_scale(name, 1.0)
    path = clip.export_merged(name, tmp_path / "merged.safetensors")
    plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(path))
    tokenizer = open_clip.get_tokenizer("peftclip-tiny")
    assert _close(_outputs(plain, tokenizer), zoo[name][1], MERGED_TOL)
    assert clip.merged is None and clip.active_adapter == "second_lora"  # the export left the live model as it was


def test_encode_images_accepts_tensors_paths_and_pil_in_batches(zoo, tmp_path):
    clip = _attached(zoo, "lora")
    paths = []
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    stacked = torch.stack([clip.base.preprocess_val(Image.open(p)) for p in paths])
    whole = clip.encode_images(stacked, batch_size=5)
    assert whole.shape == (5, 64) and torch.allclose(whole.norm(dim=-1), torch.ones(5), atol=1e-5)
    for images in (stacked, paths, [str(p) for p in paths], [Image.open(p) for p in paths], list(stacked)):
        assert torch.allclose(clip.encode_images(images, batch_size=2), whole, atol=TOL)


def test_encode_texts_uses_the_text_prompt_tokenizer(zoo):
    clip = _attached(zoo, "text_prompt", "lora")
    got = clip.encode_texts(TEXTS, adapter="text_prompt", batch_size=3, normalize=False)
    assert torch.allclose(got, zoo["text_prompt"][1]["text"], atol=TOL)


def test_zero_shot_classify_is_softmax_of_scaled_cosines(zoo):
    clip = _attached(zoo, "projections_and_scale")
    images = image_batch(clip.model, n=4)
    probs = clip.classify(images, CLASS_NAMES, templates=["a photo of a {}.", "a {}."], batch_size=3)
    texts = F.normalize(clip.encode_texts([t.format(c) for c in CLASS_NAMES for t in ("a photo of a {}.", "a {}.")])
                        .view(3, 2, -1).mean(1), dim=-1)
    want = (clip.model.logit_scale.exp() * clip.encode_images(images) @ texts.T).softmax(-1)
    assert probs.shape == (4, 3) and torch.allclose(probs, want, atol=1e-5)
    assert not torch.allclose(clip.classify(images, CLASS_NAMES, adapter=None), probs, atol=1e-3)


def test_classify_uses_a_trained_head_for_its_classes(zoo):
    clip = _attached(zoo, "lora_and_head")
    images = image_batch(clip.model, n=3)
    want = zoo["lora_and_head"][1]["head"].softmax(-1)
    assert torch.allclose(clip.classify(images), want, atol=TOL)
    assert torch.allclose(clip.classify(images, CLASS_NAMES), want, atol=TOL)
    other = clip.classify(images, ["dog", "cat"])  # other classes: zero-shot through the text tower
    assert other.shape == (3, 2)
    with pytest.raises(ValueError, match="give class_names"):
        clip.classify(images, adapter=None)


def test_classify_defaults_to_the_classes_and_templates_an_adapter_was_trained_with(zoo, tmp_path):
    folder = tmp_path / "coop"
    shutil.copytree(zoo["text_prompt"][0], folder)
    metadata = json.loads((folder / "peftclip_config.json").read_text())
    metadata["training"] = {"class_names": CLASS_NAMES, "classify": {"templates": ["a {} shape."]}}
    del metadata["metadata_sha256"]  # hand-edited, as a folder from before metadata checksums
    (folder / "peftclip_config.json").write_text(json.dumps(metadata))
    clip = _attached(zoo)
    clip.load_adapter(folder, "coop")
    images = image_batch(clip.model, n=2)
    want = clip.classify(images, CLASS_NAMES, templates=["a {} shape."])
    assert torch.allclose(clip.classify(images), want, atol=1e-6)
    assert not torch.allclose(clip.classify(images, CLASS_NAMES, templates=["a photo of a {}."]), want, atol=1e-4)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}-{colour}.png")
    (images / "notes.txt").write_text("not an image")
    return images


def test_search_ranks_by_similarity_and_reuses_its_index(zoo, folder, tmp_path, monkeypatch):
    clip = _attached(zoo, "lora")
    index = tmp_path / "index.safetensors"
    hits = clip.search("a red thing", folder, top_k=4, index_path=index)
    files = sorted(folder.glob("*.png"))
    scores = (clip.encode_texts(["a red thing"]) @ clip.encode_images(files).T)[0]
    assert [p for p, _ in hits] == [files[i] for i in scores.topk(4).indices]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    monkeypatch.setattr(clip, "encode_images", lambda *a, **k: pytest.fail("the index was not reused"))
    assert clip.search("a red thing", folder, top_k=4, index_path=index) == hits


@pytest.mark.parametrize("change", ["remove_image", "other_adapter", "other_scale"])
def test_search_rebuilds_its_index_when_folder_or_model_changes(zoo, folder, tmp_path, change):
    clip = _attached(zoo, "lora", "full")
    index = tmp_path / "index.safetensors"
    clip.search("blue", folder, index_path=index, adapter="lora")
    calls = []
    encode = clip.encode_images
    clip.encode_images = lambda paths, **kw: calls.append(len(paths)) or encode(paths, **kw)
    adapter = "lora"
    if change == "remove_image":
        (folder / "0-red.png").unlink()
    elif change == "other_adapter":
        adapter = "full"
    else:
        clip.set_scale("lora", 0.5)
    hits = clip.search("blue", folder, top_k=10, index_path=index, adapter=adapter)
    assert calls == [len(hits)] and len(hits) == len(list(folder.glob("*.png")))


def test_default_index_lives_in_the_cache_not_the_image_folder(zoo, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "cache"))
    clip = _attached(zoo, "lora")
    clip.search("green", folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["0-red.png", "1-green.png", "2-blue.png", "3-yellow.png", "4-purple.png", "5-orange.png", "notes.txt"])
    assert len(list((tmp_path / "cache" / "search").glob("images-*.safetensors"))) == 1


def test_delete_adapter_frees_its_name_and_keeps_the_others(zoo):
    clip = _attached(zoo, "lora", "second_lora", "projections")
    clip.delete_adapter("lora")
    assert clip.adapters == ["second_lora", "projections"]
    clip.load_adapter(zoo["lora"][0], "lora")
    for name in ("lora", "second_lora", "projections"):
        with clip.using(name) as model:
            assert _close(_outputs(model, clip.tokenizer()), zoo[name][1]), name


def test_second_adapter_for_another_base_is_refused(zoo, tmp_path):
    clip = _attached(zoo, "lora")
    base = load_base(BaseConfig(init_seed=5))
    model, _ = apply_strategy(base.model, SPECS["lora"])
    out = save_adapter(model, tmp_path / "other", base.info, SPECS["lora"].to_dict())
    with pytest.raises(AdapterError, match="trained on base"):
        clip.load_adapter(out, "other")


@pytest.mark.parametrize("name", ["", "lora", inference.ACTIVE])
def test_bad_or_taken_names_are_refused(zoo, name):
    clip = _attached(zoo, "lora")
    with pytest.raises(ValueError, match="empty, reserved or attached already"):
        clip.load_adapter(zoo["projections"][0], name)


@pytest.mark.parametrize("donor", ["projections", "lora", "text_prompt"])
def test_tensors_that_do_not_fit_the_strategy_are_refused_and_leave_the_model_usable(zoo, tmp_path, donor,
                                                                                     base_outputs):
    """A folder whose weights belong to another strategy (checksum rewritten to match) is refused."""
    import json
    import shutil

    from peftclip.models import file_sha256
    victim = tmp_path / "victim"
    shutil.copytree(zoo["logit_scale"][0], victim)
    shutil.copy(zoo[donor][0] / SAFETENSORS_WEIGHTS_NAME, victim / SAFETENSORS_WEIGHTS_NAME)
    metadata = json.loads((victim / "peftclip_config.json").read_text())
    metadata["weights_sha256"] = file_sha256(victim / SAFETENSORS_WEIGHTS_NAME)
    del metadata["metadata_sha256"]  # as a folder from before metadata checksums
    (victim / "peftclip_config.json").write_text(json.dumps(metadata))
    clip = _attached(zoo, "second_lora")
    with pytest.raises(AdapterError, match="do not match the strategy"):
        clip.load_adapter(victim, "victim")
    assert clip.adapters == ["second_lora"] and clip.active_adapter == "second_lora"
    assert _close(_outputs(clip.model, clip.tokenizer()), zoo["second_lora"][1])
    clip.set_adapter(None)
    assert _close(_outputs(clip.model, clip.tokenizer()), base_outputs)


def test_threads_switching_adapters_each_get_their_own_adapters_outputs(zoo):
    """Two threads calling with different adapters never see each other's adapter mid-call."""
    import threading

    clip = _attached(zoo, "lora", "projections")
    images = image_batch(clip.model, n=2)
    want = {name: clip.encode_images(images, adapter=name) for name in ("lora", "projections", None)}
    wrong: list[str | None] = []

    def work(names):
        for _ in range(60):
            for name in names:
                if not torch.equal(clip.encode_images(images, adapter=name), want[name]):
                    wrong.append(name)

    threads = [threading.Thread(target=work, args=(names,)) for names in (("lora", None), ("projections", "lora"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert clip.active_adapter == "projections"  # the last attached, as before the threads ran
