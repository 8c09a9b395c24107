"""Crashes lose nothing: a killed run resumes to the same adapter, a killed writer leaves no partial folder."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftclip.io import (
    SAFETENSORS_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    read_metadata,
)
from peftclip.models import load_base
from peftclip.recipes import lora_retrieval

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _recipe(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", str(data), "--output-dir",
           str(out), "--batch-size", "8", "--max-steps", "12", "--checkpoint-every-steps", "3", "--num-workers", "0",
           "--cpu", "--lora-dropout", "0.1", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_once_written(process: subprocess.Popen, path: Path) -> None:
    """SIGKILL `process` as soon as `path` exists; fail if it ended first."""
    deadline = time.monotonic() + 300
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_adapter_bytes(tmp_path):
    from peftclip.synthetic import make_shapes_dataset
    data = make_shapes_dataset(tmp_path / "shapes", n_images=48)  # 43 training images: 5 steps per epoch
    full = _recipe(tmp_path / "full", data)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]

    killed = _recipe(tmp_path / "killed", data)
    kill_once_written(killed, tmp_path / "killed-checkpoints" / "step-00000006" / "trainer_state.json")
    assert not (tmp_path / "killed" / SAFETENSORS_WEIGHTS_NAME).exists()

    resumed = _recipe(tmp_path / "killed", data, "--resume", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    expected = (tmp_path / "full" / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    assert (tmp_path / "killed" / SAFETENSORS_WEIGHTS_NAME).read_bytes() == expected


def _complete_version(folder: Path) -> int:
    """The save number of a folder that passes every check; all its weights must carry that number."""
    metadata = read_metadata(folder)  # raises AdapterError on a missing file or a checksum mismatch
    version = metadata["training"]["version"]
    weights = load_file(folder / SAFETENSORS_WEIGHTS_NAME)
    assert {float(t.unique()) for t in weights.values()} == {float(version)}, f"{folder} mixes saves"
    return version


@pytest.mark.slow
def test_killing_the_writer_never_leaves_a_partial_adapter(tmp_path):
    out = tmp_path / "adapter"
    rng = random.Random(0)
    seen_versions = set()
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, str(REPO / "tests" / "atomic_writer.py"), str(out)], env=ENV,
                                  stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # at least one complete save happened
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        seen_versions.add(_complete_version(out))  # the adapter path always holds one complete save
        load_adapter(load_base(), out)
        for leftover in tmp_path.glob(".adapter.*"):  # a half-built save, or the old folder swapped out
            try:
                _complete_version(leftover)
            except AdapterError:
                continue  # incomplete, and refused
    assert len(seen_versions) > 1


def _in_process(out: Path, data: Path, *extra: str) -> dict:
    return lora_retrieval.main(["--source", str(data), "--output-dir", str(out), "--batch-size", "8", "--max-steps",
                                "4", "--checkpoint-every-steps", "2", "--num-workers", "0", "--cpu", *extra])


def _recording_train(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make the recipe's `train` keep each TrainResult, to see whether a run resumed and from where."""
    results = []

    def recorded(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    real = lora_retrieval.train
    monkeypatch.setattr(lora_retrieval, "train", recorded)
    return results


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, list]:
    """A 4-step run that checkpointed at steps 2 and 4: its data, its output folder and its TrainResult."""
    root = tmp_path_factory.mktemp("resume")
    from peftclip.synthetic import make_shapes_dataset
    data = make_shapes_dataset(root / "shapes", n_images=40)
    with pytest.MonkeyPatch.context() as monkeypatch:
        results = _recording_train(monkeypatch)
        _in_process(root / "run", data)
    assert sorted(p.name for p in (root / "run-checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    return data, root / "run", results


@pytest.mark.parametrize(("flags", "difference"), [
    (["--r", "8"], "lora.r: checkpoint 4, now 8"),
    (["--lr", "5e-3"], "train.lr: checkpoint 0.003, now 0.005"),
    (["--towers", "vision"], "lora.towers: checkpoint ['vision', 'text'], now ['vision']"),
    (["--seed", "1"], "train.seed: checkpoint 0, now 1"),
])
def test_resume_with_a_changed_setting_exits_2_naming_the_field(finished, capsys, flags, difference):
    data, out, _ = finished
    adapter = (out / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        _in_process(out, data, "--resume", "latest", *flags)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot resume from {out}-checkpoints/step-00000004: the config differs in ")
    assert line.endswith(difference), line
    assert (out / SAFETENSORS_WEIGHTS_NAME).read_bytes() == adapter  # the finished adapter is left as it was


def test_resume_with_the_same_settings_continues_to_the_same_adapter(finished, tmp_path, monkeypatch):
    data, out, (first,) = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.copytree(f"{out}-checkpoints", f"{copy}-checkpoints")
    shutil.rmtree(f"{copy}-checkpoints/step-00000004")  # as if the run had died between steps 2 and 4
    (copy / SAFETENSORS_WEIGHTS_NAME).unlink()
    results = _recording_train(monkeypatch)
    # Settings outside the result fingerprint may change on resume.
    _in_process(copy, data, "--resume", "latest", "--eval-batch-size", "7", "--keep-checkpoints", "3")
    (resumed,) = results
    assert resumed.resumed_from == f"{copy}-checkpoints/step-00000002"
    assert resumed.losses[:2] == first.losses[:2] and len(resumed.step_seconds) == 2  # only steps 3 and 4 ran
    assert resumed.losses == pytest.approx(first.losses, abs=1e-6)
    assert (copy / SAFETENSORS_WEIGHTS_NAME).read_bytes() == (out / SAFETENSORS_WEIGHTS_NAME).read_bytes()
