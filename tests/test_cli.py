"""The peftclip command: help, each subcommand end to end, and adapter errors as exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.cli import COMMANDS, main
from peftclip.config import parse_config
from peftclip.inference import AdaptedCLIP
from peftclip.io import SAFETENSORS_WEIGHTS_NAME, save_adapter, save_metrics
from peftclip.models import BaseConfig, load_base
from peftclip.recipes import RECIPES
from peftclip.synthetic import make_shapes_dataset
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=40)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Two local weights files for the tiny architecture, with different values."""
    folder = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (0, 1):
        state = load_base(BaseConfig(init_seed=seed)).model.state_dict()
        path = folder / f"tiny-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        paths.append(path)
    return paths


@pytest.fixture
def adapter(tmp_path, weights_files):
    """A LoRA adapter trained (well, set) on the base loaded from the first weights file."""
    base = load_base(BaseConfig(pretrained=str(weights_files[0])))
    model = apply_lora(base.model, ClipLoraConfig(r=2), init_lora_weights=False)
    out = save_adapter(model, tmp_path / "adapter", base.info, {"lora": ClipLoraConfig(r=2).to_dict()})
    save_metrics(out, {"before": {"top1": 10.0}, "after": {"top1": 42.0}})
    return out


def test_base_from_a_local_weights_file_loads_those_weights(weights_files):
    base = load_base(BaseConfig(pretrained=str(weights_files[1])))
    reference = load_base(BaseConfig(init_seed=1)).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in base.model.state_dict().items())
    assert base.info["pretrained"] == "tiny-1.safetensors" and len(base.info["weights_sha256"]) == 64


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in ("train", "info", "eval", "embed", "search",
                                                                          "merge", "push"))])
def test_help_explains_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: peftclip" in text
    if argv[0] in ("eval", "search", "embed"):
        assert "--images" in text or "--source" in text


RECIPE_FLAGS = {"lora_retrieval": ["--r", "--lora-alpha", "--release-memory", "--source"],
                "classify": ["--objective", "--templates", "--head", "--release-memory"]}
RECIPE_ENTRY_POINTS = {
    "script": lambda name: runpy.run_path(str(REPO / "recipes" / f"{name}.py"), run_name="__main__"),
    "module": lambda name: runpy.run_module(f"peftclip.recipes.{name}", run_name="__main__", alter_sys=True),
    "peftclip_train": lambda name: main(["train", name, "--help"]),
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("entry", list(RECIPE_ENTRY_POINTS))
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: the test imported it already
def test_recipe_help_lists_its_own_flags(entry, name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        RECIPE_ENTRY_POINTS[entry](name)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in RECIPE_FLAGS[name]), text
    assert "{train,info" not in text  # the recipe's help, not peftclip's


def test_train_help_lists_the_shipped_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "usage: peftclip train" in text and all(name in text for name in RECIPES) and "--lora-alpha" not in text


def test_cli_and_its_help_do_not_import_torch():
    code = ("import sys\nfrom peftclip.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'open_clip', 'peft', 'datasets') if m in sys.modules]\n"
            "print(heavy, file=sys.stderr); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_random_base_loads_without_the_expected_warning_and_keeps_others(caplog):
    with caplog.at_level(logging.WARNING):
        load_base()
        assert not caplog.records
        logging.warning("No pretrained weights loaded (a real one, outside load_base)")
    assert len(caplog.records) == 1


def test_console_script_is_installed():
    done = subprocess.run([Path(sys.executable).with_name("peftclip"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "{" + ",".join(COMMANDS) + "}" in done.stdout and "compare" in COMMANDS


def test_info_shows_base_strategy_size_and_metrics(adapter, capsys):
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "model_name=peftclip-tiny" in text and "pretrained=tiny-0.safetensors" in text
    assert "lora: blocks=all" in text and "r=2" in text and "KB" in text
    assert "top1: 10.00 -> 42.00" in text


def test_output_into_a_closed_pipe_is_not_an_error(adapter):
    """`peftclip info X | head -1`: the reader leaves early; no 'error: Broken pipe', a zero exit."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    done = subprocess.run([Path(sys.executable).with_name("peftclip"), "info", str(adapter)], stdout=write,
                          stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr


def test_info_orders_recall_by_k(adapter, capsys):
    save_metrics(adapter, {"before": {f"R@{k}": float(k) for k in (1, 10, 5)},
                           "after": {f"R@{k}": float(k) for k in (10, 1, 5)}})
    assert main(["info", str(adapter)]) == 0
    keys = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("metric:")]
    assert keys == ["R@1:", "R@5:", "R@10:"]


def test_eval_reports_base_and_adapted_recall(adapter, shapes, weights_files, capsys):
    argv = ["eval", str(adapter), "--source", str(shapes), "--pretrained", str(weights_files[0])]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 images, ") and any(line.startswith("| image_to_text_R@1 |") for line in lines)


def test_train_runs_a_recipe_by_name(tmp_path, shapes, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["train", "lora_retrieval", "--source", str(shapes), "--output-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--batch-size", "8", "--num-workers", "0"]
    assert main(argv) == 0
    assert (tmp_path / "out" / SAFETENSORS_WEIGHTS_NAME).is_file()


def test_train_reads_config_paths_from_the_config_folder(tmp_path, monkeypatch):
    """The shipped config, with its placeholder set to the shared data as a path relative to the config's folder."""
    configs, run = tmp_path / "configs", tmp_path / "run"
    configs.mkdir(), run.mkdir()
    relative = os.path.relpath(SHARED_DATA / "flickr8k-800" / "captions.csv", configs)
    text = (REPO / "recipes" / "configs" / "flickr8k.yaml").read_text()
    assert "source: ./flickr8k/captions.csv" in text
    (configs / "flickr8k.yaml").write_text(text.replace("./flickr8k/captions.csv", relative))
    monkeypatch.chdir(run)
    argv = ["train", "lora_retrieval", "--config", "../configs/flickr8k.yaml", "--max-steps", "2", "--epochs", "1",
            "--batch-size", "8", "--num-workers", "0", "--max-val-images", "16"]
    assert main(argv) == 0
    assert (run / "outputs" / "lora_flickr8k" / SAFETENSORS_WEIGHTS_NAME).is_file()  # output_dir: from the cwd


CONFIG_PATHS = {  # value in a config at tmp/configs/ -> what the field becomes (None: kept as given)
    "./data.csv": "configs/data.csv",
    "../data.csv": "configs/../data.csv",
    "here.csv": "configs/here.csv",  # exists beside the config
    "user/dataset": None,  # a Hub id
    "/abs/data.csv": None,
}


@pytest.mark.parametrize("value", list(CONFIG_PATHS))
def test_config_paths_are_relative_to_the_config_file(value, tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "here.csv").write_text("file_name,caption\n")
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(f"data: {{source: {value}}}\nbase: {{pretrained: openai}}\ntrain: {{output_dir: out}}\n")
    from peftclip.data import DataConfig
    from peftclip.train import TrainConfig
    parsed = parse_config(argparse.Namespace(config=str(config)),
                          {"data": DataConfig, "base": BaseConfig, "train": TrainConfig})
    expected = CONFIG_PATHS[value]
    assert parsed["data"].source == (str(tmp_path / expected) if expected else value)
    assert parsed["base"].pretrained == "openai" and parsed["train"].output_dir == "out"


def _break(adapter: Path, kind: str) -> None:
    weights = adapter / SAFETENSORS_WEIGHTS_NAME
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif kind == "pickle":
        weights.rename(adapter / "adapter_model.bin")


CLI_ERRORS = {
    "wrong_base": (None, "was trained on base", True),
    "truncated": ("truncated", "checksum mismatch (file is truncated or altered)", False),
    "pickle": ("pickle", "pickle files are never loaded", False),
    "weights_file_not_given": (None, "pass it with --pretrained", False),
    "missing_adapter": (None, "adapter folder not found", False),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_adapter_errors_exit_2_with_one_line(case, adapter, shapes, weights_files, capsys):
    kind, message, other_base = CLI_ERRORS[case]
    if kind:
        _break(adapter, kind)
    folder = adapter.parent / "nowhere" if case == "missing_adapter" else adapter
    argv = ["eval", str(folder), "--source", str(shapes)]
    if case != "weights_file_not_given":
        argv += ["--pretrained", str(weights_files[1 if other_base else 0])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.fixture
def tiny_adapter(tmp_path):
    """A LoRA adapter on the default tiny base (random init, seed 0)."""
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2), init_lora_weights=False)
    return save_adapter(model, tmp_path / "tiny-adapter", base.info, {"lora": ClipLoraConfig(r=2).to_dict()})


def test_embed_writes_one_row_per_image_and_text(tiny_adapter, shapes, tmp_path, capsys):
    out, texts = tmp_path / "embeddings.safetensors", tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square\n")
    argv = ["embed", str(tiny_adapter), "--images", str(shapes / "images"), "--texts", str(texts), "--out", str(out)]
    assert main(argv) == 0
    assert "40 image, 2 text embedded (64 dims)" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        images, text_rows = f.get_tensor("image_embeddings"), f.get_tensor("text_embeddings")
        assert json.loads(f.metadata()["image_files"])[:2] == ["00000.png", "00001.png"]
        assert json.loads(f.metadata()["texts"]) == ["a red circle", "a blue square"]
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(tiny_adapter, "a")
    assert torch.allclose(images[:3], clip.encode_images(sorted((shapes / "images").iterdir())[:3]), atol=1e-5)
    assert torch.allclose(text_rows, clip.encode_texts(["a red circle", "a blue square"]), atol=1e-5)


def test_search_lists_the_top_k_and_reuses_the_index(tiny_adapter, shapes, tmp_path, capsys, monkeypatch):
    index = tmp_path / "index.safetensors"
    argv = ["search", str(tiny_adapter), "--images", str(shapes / "images"), "--query", "a red circle",
            "--top-k", "3", "--index", str(index)]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split(".")[0] for line in first] == ["1", "2", "3"] and all(".png" in line for line in first)
    scores = [float(line.split()[-1]) for line in first]
    assert scores == sorted(scores, reverse=True) and index.is_file()
    monkeypatch.setattr(AdaptedCLIP, "encode_images", lambda *a, **k: pytest.fail("index was not reused"))
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == first


def test_search_rebuilds_the_index_when_the_folder_changes(tiny_adapter, shapes, tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    argv = ["search", str(tiny_adapter), "--images", str(images), "--query", "a blue square", "--top-k", "40"]
    assert main(argv) == 0
    assert "00000.png" in capsys.readouterr().out
    (images / "00000.png").unlink()
    assert main(argv) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 39 and not any("00000.png" in line for line in listed)


def test_a_damaged_index_in_the_cache_is_rebuilt(tiny_adapter, shapes, tmp_path, capsys, monkeypatch):
    from peftclip.index import default_index_path
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "cache"))
    argv = ["search", str(tiny_adapter), "--images", str(shapes / "images"), "--query", "a red circle"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    index = default_index_path(shapes / "images")
    index.write_bytes(index.read_bytes()[:100])  # truncated, as by a crash or a full disk
    for _ in range(2):  # rebuilt once, then reused
        assert main(argv) == 0
        assert capsys.readouterr().out == first
    assert index.stat().st_size > 100


@pytest.mark.parametrize("content", [b"my notes, not an index", None])
def test_an_index_flag_naming_a_file_that_is_not_an_index_is_refused_and_kept(tiny_adapter, shapes, tmp_path,
                                                                              capsys, content):
    index = tmp_path / "notes.safetensors"
    if content is None:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, index)  # safetensors, but not peftclip's
        content = index.read_bytes()
    else:
        index.write_bytes(content)
    assert main(["search", str(tiny_adapter), "--images", str(shapes / "images"), "--query", "a red circle",
                 "--index", str(index)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {index} is not a peftclip search index") and err.count("\n") == 1
    assert index.read_bytes() == content


_LIMITED_WRITES = """
import resource, signal, sys
from peftclip.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
sys.exit(main(sys.argv[1:]))
"""


def test_embed_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_adapter, shapes, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "out" / "emb.safetensors"
    done = subprocess.run([sys.executable, "-c", _LIMITED_WRITES, "embed", str(tiny_adapter), "--images",
                           str(shapes / "images"), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"error: cannot write {out}: File too large (free some space or write " \
                                           f"elsewhere)"
    assert "Traceback" not in done.stderr and list(out.parent.iterdir()) == []


def test_top_k_below_one_is_refused(tiny_adapter, shapes, capsys):
    assert main(["search", str(tiny_adapter), "--images", str(shapes / "images"), "--query", "x",
                 "--top-k", "-3"]) == 2
    assert capsys.readouterr().err == "error: top_k=-3: must be at least 1\n"


@pytest.mark.parametrize("command", ["info", "embed"])
def test_metadata_without_a_base_is_a_one_line_error(tiny_adapter, tmp_path, capsys, command):
    import json
    import shutil
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    metadata = json.loads((folder / "peftclip_config.json").read_text())
    del metadata["base"], metadata["metadata_sha256"]
    (folder / "peftclip_config.json").write_text(json.dumps(metadata))
    extra = ["--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e.safetensors")] if command == "embed" else []
    (tmp_path / "t.txt").write_text("a red circle\n")
    assert main([command, str(folder), *extra]) == 2
    want = f"error: {folder / 'peftclip_config.json'}: field 'base' is missing or not a dict\n"
    assert capsys.readouterr().err == want


def test_merge_writes_a_plain_open_clip_checkpoint(tiny_adapter, tmp_path, capsys):
    import open_clip

    from peftclip.io import load_adapter
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tiny_adapter), "--out", str(out)]) == 0
    hint = capsys.readouterr().out.split("load it with ")[1]
    done = subprocess.run([sys.executable, "-c", hint], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # the printed hint runs as is in a fresh interpreter
    plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(out))
    adapted = load_adapter(load_base(), tiny_adapter)
    images = torch.randn(2, 3, 32, 32)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(images), adapted.encode_image(images), atol=1e-5)


def test_push_calls_the_hub_with_the_card(tiny_adapter, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # push refuses up front when offline or logged out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: seen.update(repo=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: seen.update(files=sorted(os.listdir(kw["folder_path"]))) or "url://c")
    assert main(["push", str(tiny_adapter), "someone/tiny", "--private"]) == 0
    assert seen["repo"] == "someone/tiny" and "README.md" in seen["files"]
    assert "url://c" in capsys.readouterr().out


def test_bare_base_needs_a_model_name(shapes, capsys):
    assert main(["embed", "--images", str(shapes / "images"), "--out", "x.safetensors"]) == 2
    assert "give an adapter, or --model-name" in capsys.readouterr().err


def _table(text: str) -> dict[str, list[float]]:
    """{metric: [value per column]} from the Markdown table `eval` prints."""
    return {cells[0]: [float(c) for c in cells[1:]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| metric")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


@pytest.mark.parametrize("recipe", ["lora_retrieval", "classify"])
def test_eval_defaults_to_the_adapters_own_held_out_data_and_reproduces_its_metrics(recipe, shapes, tmp_path,
                                                                                    tmp_path_factory, capsys,
                                                                                    monkeypatch):
    from peftclip.recipes import classify, lora_retrieval
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # the project folder holding data and adapter
    module, source = {"lora_retrieval": (lora_retrieval, shapes), "classify": (classify, shapes / "labels.csv")}[recipe]
    out = tmp_path / "adapter"
    metrics = module.main(["--source", str(source), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8",
                           "--num-workers", "0", "--cpu"])
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    rows = _table(capsys.readouterr().out)
    assert set(rows) == set(metrics["after"])
    for key in rows:
        assert rows[key] == pytest.approx([metrics["before"][key], metrics["after"][key]], abs=0.01), key


def test_eval_names_a_source_recorded_by_name_only(shapes, tmp_path, capsys):
    from peftclip.recipes import lora_retrieval
    out = tmp_path / "adapter"  # the working directory (the repository) does not hold the data
    lora_retrieval.main(["--source", str(shapes), "--output-dir", str(out), "--max-steps", "1", "--batch-size", "8",
                         "--num-workers", "0", "--cpu"])
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "records its data source by name only ('shapes':" in capsys.readouterr().err


def test_eval_of_the_bare_base_has_one_column(shapes, capsys):
    assert main(["eval", "--model-name", "peftclip-tiny", "--source", str(shapes), "--max-images", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 images, ") and "| metric | base |\n" in text
    assert all(len(values) == 1 for values in _table(text).values()) and "text_to_image_R@10" in _table(text)


def test_eval_without_data_names_the_flag(tiny_adapter, capsys):
    assert main(["eval", str(tiny_adapter)]) == 2
    assert "give --source" in capsys.readouterr().err


def test_merge_at_alpha_zero_is_the_base(tiny_adapter, tmp_path):
    import open_clip
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tiny_adapter), "--out", str(out), "--alpha", "0"]) == 0
    plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(out))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval().encode_image(images), load_base().model.encode_image(images), atol=1e-5)


@pytest.mark.parametrize(("argv", "message"), [
    (["embed", "--model-name", "peftclip-tiny", "--out", "x.safetensors"], "give --images FOLDER and/or --texts"),
    (["embed", "--model-name", "peftclip-tiny", "--images", "/nonexistent", "--out", "x.safetensors"],
     "image folder not found: /nonexistent"),
    (["search", "--model-name", "peftclip-tiny", "--images", "/nonexistent", "--query", "x"],
     "image folder not found: /nonexistent"),
    (["info", "someone/not-cached"], "not in the local Hugging Face cache"),
])
def test_bad_input_exits_2_naming_the_value(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.safetensors").exists()
