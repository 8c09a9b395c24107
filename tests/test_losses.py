"""The contrastive loss: its formula, and equality of one process and two on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftclip.losses import ContrastiveLoss

REPO = Path(__file__).resolve().parents[1]


def test_loss_is_symmetric_cross_entropy_over_scaled_cosine_logits():
    torch.manual_seed(0)
    images, texts, scale = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(7.0)
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ContrastiveLoss()(images, texts, scale), expected, atol=1e-6)


def test_matched_pairs_give_lower_loss_than_shuffled():
    torch.manual_seed(0)
    features = torch.randn(6, 8)
    loss = ContrastiveLoss()
    assert loss(features, features, torch.tensor(10.0)) < loss(features, features.roll(1, 0), torch.tensor(10.0))


def _run_worker(out_dir: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        cmd = [sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(out_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", "29517", str(REPO / "tests" / "distributed_worker.py"), str(out_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single, double = _run_worker(one, 1), _run_worker(two, 2)
    assert single["world_size"] == 1 and not single["distributed"]
    assert double["world_size"] == 2 and double["distributed"]
    assert double["ranks"] == [0, 1] and len(set(double["pids"])) == 2, "two separate processes must have run"
    assert double["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert double["loop_loss"] == pytest.approx(single["loop_loss"], abs=1e-5)
    grads_one, grads_two = load_file(one / "grads.safetensors"), load_file(two / "grads.safetensors")
    assert grads_one.keys() == grads_two.keys() and grads_one
    for name, grad in grads_one.items():
        # Two processes sum the same terms in another order: float32 noise of a few 1e-6 of the
        # tensor's scale, where a missing gather or a wrong average would differ by order one.
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=lambda message: f"{name}: {message}")
