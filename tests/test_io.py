"""Adapter folders: exact save→load, base identity, checksums, and refusal of pickles."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.inference import AdaptedCLIP
from peftclip.io import (
    ADAPTER_CONFIG_NAME,
    METADATA_NAME,
    METRICS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterError,
    check_output_dir,
    load_adapter,
    lock_output_dir,
    read_metadata,
    resolve_recorded_path,
    save_adapter,
)
from peftclip.models import BaseConfig, file_sha256, load_base
from tests.conftest import image_batch, text_batch

CONFIG = ClipLoraConfig(r=2)


@pytest.fixture
def saved(tmp_path, tiny_base):
    """A tiny-base LoRA adapter with non-zero B, saved; returns (folder, trained model, base)."""
    model = apply_lora(tiny_base.model, CONFIG, init_lora_weights=False)
    out = save_adapter(model, tmp_path / "adapter", tiny_base.info, {"lora": CONFIG.to_dict()}, {"lr": 1e-3})
    return out, model, tiny_base


def test_folder_holds_only_peft_layout_and_metadata(saved):
    out, model, _ = saved
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME,
                                                            METADATA_NAME])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    metadata = read_metadata(out)
    assert metadata["base"] == {"model_name": "peftclip-tiny", "pretrained": None, "init_seed": 0}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert metadata["trainable_parameters"] == trainable
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["peft_type"] == "LORA"


def test_weights_file_is_under_one_percent_of_the_base(saved):
    out, model, _ = saved
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert (out / SAFETENSORS_WEIGHTS_NAME).stat().st_size < 0.01 * base_bytes


def test_load_onto_fresh_base_reproduces_outputs(saved):
    out, model, base = saved
    images, texts = image_batch(model), text_batch(base)
    loaded = load_adapter(load_base(BaseConfig()), out)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        assert torch.allclose(loaded.encode_text(texts), model.encode_text(texts), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_wrong_base_names_both_bases(saved):
    out, _, _ = saved
    with pytest.raises(AdapterError, match=r"trained on base .*init_seed=0.*loaded base is .*init_seed=1"):
        load_adapter(load_base(BaseConfig(init_seed=1)), out)


def test_truncated_weights_fail_the_checksum(saved):
    out, _, _ = saved
    weights = out / SAFETENSORS_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="checksum mismatch"):
        load_adapter(load_base(BaseConfig()), out)


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt"])
def test_pickle_files_are_refused(saved, name):
    out, _, _ = saved
    (out / SAFETENSORS_WEIGHTS_NAME).rename(out / name)
    with pytest.raises(AdapterError, match="pickle files are never loaded"):
        read_metadata(out)
    with pytest.raises(AdapterError, match="pickle files are never loaded as adapters"):
        read_metadata(out / name)


def test_saving_again_replaces_an_adapter_folder_whole(saved):
    out, model, base = saved
    (out / METRICS_NAME).write_text("{}")  # from the earlier run; the new save writes none
    save_adapter(model, out, base.info, {"lora": CONFIG.to_dict()})
    assert not (out / METRICS_NAME).exists()
    assert read_metadata(out)["trainable_parameters"] > 0


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["user_folder", "adapter_with_user_file", "file"])
def test_a_folder_or_file_peftclip_did_not_write_is_never_replaced(saved, tmp_path, target):
    out, model, base = saved
    path = tmp_path / "mine"
    if target == "file":
        path.write_text("my notes")
    elif target == "user_folder":
        path.mkdir()
        (path / "holiday.jpg").write_bytes(b"not yours")
    else:
        shutil.copytree(out, path)
        (path / "holiday.jpg").write_bytes(b"not yours")
    before = path.read_bytes() if path.is_file() else _tree(path)
    with pytest.raises(FileExistsError, match="mine"):
        save_adapter(model, path, base.info, {"lora": CONFIG.to_dict()})
    assert (path.read_bytes() if path.is_file() else _tree(path)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "mine"]  # no temporary folder left


@pytest.mark.parametrize("leftover", [".metrics.json.k3j2_x.tmp", ".training_curves.png.tmp-4242"])
def test_a_temporary_file_left_by_a_killed_write_keeps_the_folder_peftclips(saved, leftover):
    out, model, base = saved
    (out / leftover).write_text("half written")
    save_adapter(model, out, base.info, {"lora": CONFIG.to_dict()})
    assert not (out / leftover).exists()
    (out / ".notes.txt.tmp").write_text("not one of ours")
    with pytest.raises(FileExistsError, match=r"\.notes\.txt\.tmp"):
        save_adapter(model, out, base.info, {"lora": CONFIG.to_dict()})


def test_an_adapter_folder_is_replaced_only_with_overwrite(saved, tmp_path):
    out, model, base = saved
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(out, overwrite=False)
    assert check_output_dir(out, overwrite=True) == out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, overwrite=False) == empty


def test_an_unwritable_output_location_is_found_before_training(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; a path under a file is unwritable for everyone
        target = tmp_path / "a-file" / "adapter"
        (tmp_path / "a-file").write_text("x")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "adapter"
    with pytest.raises(OSError, match=f"cannot write {target}"):
        check_output_dir(target)


def test_a_second_run_on_one_output_folder_is_refused_with_the_first_ones_pid(tmp_path):
    with lock_output_dir(tmp_path / "out"):
        with pytest.raises(FileExistsError, match=f"in use by PID {os.getpid()}"):
            with lock_output_dir(tmp_path / "out"):
                pass
    with lock_output_dir(tmp_path / "out"):  # released: the next run may go
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the run


_FULL_DISK = """
import resource, signal, sys
from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.io import save_adapter
from peftclip.models import load_base
base = load_base()
model = apply_lora(base.model, ClipLoraConfig(r=2))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_adapter(model, sys.argv[1], base.info, {"lora": ClipLoraConfig(r=2).to_dict()})
except OSError as e:
    print(f"error: {e}")
    sys.exit(2)
"""


def test_a_full_disk_at_save_is_one_line_and_leaves_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip().splitlines() == [done.stdout.strip()]
    assert f"cannot write {tmp_path / 'out'}: File too large" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_saved_metadata_names_no_absolute_path_and_finds_its_data_again(tmp_path, tiny_base, monkeypatch):
    project, elsewhere, cache = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "cache"
    for folder, name in ((project / "data", "captions.csv"), (elsewhere, "pairs.csv"), (cache / "data", "s.csv")):
        folder.mkdir(parents=True)
        (folder / name).write_text("file_name,caption\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PEFTCLIP_CACHE", str(cache))
    model = apply_lora(tiny_base.model, CONFIG)
    for source, recorded, found in (
            (project / "data" / "captions.csv", "../data/captions.csv", project / "data" / "captions.csv"),
            (cache / "data" / "s.csv", "$PEFTCLIP_CACHE/data/s.csv", cache / "data" / "s.csv"),
            (elsewhere / "pairs.csv", "pairs.csv", "pairs.csv"), ("user/hub-set", "user/hub-set", "user/hub-set")):
        out = save_adapter(model, project / "out", tiny_base.info, {"lora": CONFIG.to_dict()},
                           {"data": {"source": str(source)}, "train": {"output_dir": str(project / "out")}})
        text = (out / METADATA_NAME).read_text()
        assert str(tmp_path) not in text
        assert json.loads(text)["training"]["data"]["source"] == recorded
        assert resolve_recorded_path(recorded, out) == str(found)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["training"].update(lr=1.0), "metadata was edited"),
    (lambda m: m.pop("base"), "field 'base' is missing"),
    (lambda m: m["base"].pop("model_name"), "'base.model_name' is missing"),
])
def test_edited_or_incomplete_metadata_is_refused(saved, edit, message):
    out, _, _ = saved
    metadata = json.loads((out / METADATA_NAME).read_text())
    edit(metadata)
    (out / METADATA_NAME).write_text(json.dumps(metadata))
    with pytest.raises(AdapterError, match=message):
        read_metadata(out)


@pytest.mark.parametrize(("content", "message"), [("{not json", "not valid JSON"),
                                                  ('{"peft_type": "LORA", "r": 99}', "adapter_config.json: checksum"),
                                                  ('{"peft_type": "IA3"}', "not a PEFT LORA config, which .*lora")])
def test_a_broken_or_altered_peft_config_is_refused_by_both_readers(saved, content, message):
    out, _, base = saved
    (out / ADAPTER_CONFIG_NAME).write_text(content)
    with pytest.raises(AdapterError, match=message):
        load_adapter(load_base(BaseConfig()), out)
    with pytest.raises(AdapterError, match=message):
        AdaptedCLIP(load_base(BaseConfig())).load_adapter(out, "a")


def test_missing_lora_tensors_are_refused_by_both_readers(saved):
    out, _, _ = saved
    weights = out / SAFETENSORS_WEIGHTS_NAME
    tensors = load_safetensors_file(weights)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, weights)
    metadata = json.loads((out / METADATA_NAME).read_text())
    metadata["weights_sha256"] = file_sha256(weights)
    del metadata["metadata_sha256"]
    (out / METADATA_NAME).write_text(json.dumps(metadata))
    with pytest.raises(AdapterError, match="LoRA tensors do not match its config"):
        load_adapter(load_base(BaseConfig()), out)
    clip = AdaptedCLIP(load_base(BaseConfig()))
    with pytest.raises(AdapterError, match="LoRA tensors do not match its config"):
        clip.load_adapter(out, "a")
    assert clip.adapters == [] and not isinstance(clip.model, peft.PeftModel)  # nothing half-attached


@pytest.mark.parametrize(("save_dtype", "dtype", "tol"), [("bf16", torch.bfloat16, 5e-2), ("fp16", torch.float16,
                                                                                             5e-3)])
def test_half_precision_file_is_half_the_size_and_loads_into_fp32(saved, tmp_path, save_dtype, dtype, tol):
    out, model, base = saved
    half = save_adapter(model, tmp_path / save_dtype, base.info, {"lora": CONFIG.to_dict()}, save_dtype=save_dtype)
    def data_bytes(folder):  # a safetensors file: 8-byte header length, the JSON header, then the data
        raw = (folder / SAFETENSORS_WEIGHTS_NAME).read_bytes()
        return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]

    assert data_bytes(out) == 4 * read_metadata(out)["trainable_parameters"] == 2 * data_bytes(half)
    assert {t.dtype for t in load_safetensors_file(half / SAFETENSORS_WEIGHTS_NAME).values()} == {dtype}
    loaded = load_adapter(load_base(BaseConfig()), half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images = image_batch(model)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=tol, rtol=0)


def test_unknown_save_dtype_is_refused_before_writing(saved, tmp_path):
    out, model, base = saved
    with pytest.raises(ValueError, match="save_dtype='fp8'"):
        save_adapter(model, tmp_path / "x", base.info, {"lora": CONFIG.to_dict()}, save_dtype="fp8")
    assert not (tmp_path / "x").exists()


_ORPHAN = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, (sys.argv[2] + "\\n").encode(), 0)  # the run that took the lock, which has died
print("locked", flush=True)
time.sleep(2)  # as a killed run's DataLoader worker holds the inherited lock until it notices
"""


def test_a_lock_left_to_a_dead_runs_workers_is_waited_for_not_refused(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(tmp_path / ".out.lock"), str(dead.pid)],
                              stdout=subprocess.PIPE, text=True)
    assert orphan.stdout.readline() == "locked\n"
    with lock_output_dir(tmp_path / "out"):
        assert orphan.poll() is not None  # the lock came free only when the orphan exited
    orphan.wait()
