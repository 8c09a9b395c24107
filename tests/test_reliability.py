"""Crashes lose nothing: a killed run resumes to the same adapter, a killed writer leaves no partial folder."""

from __future__ import annotations

import os
import random
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

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _recipe(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", str(data), "--output-dir",
           str(out), "--batch-size", "8", "--max-steps", "12", "--checkpoint-every-steps", "3", "--num-workers", "0",
           "--cpu", "--lora-dropout", "0.1", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_adapter_bytes(tmp_path):
    from peftclip.synthetic import make_shapes_dataset
    data = make_shapes_dataset(tmp_path / "shapes", n_images=48)  # 43 training images: 5 steps per epoch
    full = _recipe(tmp_path / "full", data)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]

    killed = _recipe(tmp_path / "killed", data)
    checkpoint = tmp_path / "killed-checkpoints" / "step-00000006" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
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
