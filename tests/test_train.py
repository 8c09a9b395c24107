"""The training loop: it learns, checkpoints hold only trainable tensors, resume is exact, guards work."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.checkpoint import ResumeError, find_latest_checkpoint
from peftclip.losses import contrastive_step
from peftclip.models import load_base
from peftclip.train import (
    TrainConfig,
    TrainingError,
    create_accelerator,
    images_per_second,
    train,
)

N_PAIRS = 32


def _setup(tmp_path, **overrides):
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2, lora_dropout=0.1))
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(N_PAIRS, 3, 32, 32, generator=generator)
    texts = base.tokenizer([f"pair number {i}" for i in range(N_PAIRS)])
    settings = {"output_dir": str(tmp_path / "run"), "batch_size": 8, "epochs": 2, "lr": 1e-2, "warmup_steps": 2,
                "num_workers": 0, "cpu": True}
    config = TrainConfig(**{**settings, **overrides})
    return model, TensorDataset(images, texts), config


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_goes_down(tmp_path):
    model, data, config = _setup(tmp_path, epochs=6)
    losses = train(model, data, config, create_accelerator(config)).losses
    assert len(losses) == 6 * N_PAIRS // 8
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_checkpoints_hold_only_trainable_tensors_and_keep_the_last_k(tmp_path):
    model, data, config = _setup(tmp_path, checkpoint_every_steps=2, keep_checkpoints=2)
    train(model, data, config, create_accelerator(config))
    root = tmp_path / "run-checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000008"]
    latest = find_latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000008"
    stored = load_file(latest / "trainable_0.safetensors")
    assert stored.keys() == _trainable(model).keys()
    assert not (latest / "model.safetensors").exists()


def test_resume_from_a_middle_checkpoint_ends_bitwise_equal(tmp_path):
    model, data, config = _setup(tmp_path, checkpoint_every_steps=3, keep_checkpoints=5)
    full = train(model, data, config, create_accelerator(config))
    expected = _trainable(model)
    middle = tmp_path / "run-checkpoints" / "step-00000003"  # mid-epoch: epoch 0, batch 3 of 4
    resumed_model, data, config = _setup(tmp_path, checkpoint_every_steps=3, keep_checkpoints=5,
                                         resume=str(middle))
    resumed = train(resumed_model, data, config, create_accelerator(config))
    assert resumed.resumed_from == str(middle)
    assert resumed.losses == full.losses
    for name, tensor in _trainable(resumed_model).items():
        assert torch.equal(tensor, expected[name]), name


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    model, data, config = _setup(tmp_path, checkpoint_every_steps=4)
    train(model, data, config, create_accelerator(config), fingerprint={"lora.r": 2, "train.lr": 0.01})
    model, data, config = _setup(tmp_path, resume="latest")
    with pytest.raises(ResumeError, match=r"differs in lora.r: checkpoint 2, now 4"):
        train(model, data, config, create_accelerator(config), fingerprint={"lora.r": 4, "train.lr": 0.01})


def test_resume_latest_without_checkpoint_is_an_error(tmp_path):
    model, data, config = _setup(tmp_path, resume="latest")
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        train(model, data, config, create_accelerator(config))


class _NanAtStep:
    """The contrastive objective, turned NaN on one call."""

    def __init__(self, bad_call: int) -> None:
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, model, batch):
        self.calls += 1
        value = contrastive_step(model, batch)
        return value * math.nan if self.calls == self.bad_call else value


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    model, data, config = _setup(tmp_path, checkpoint_every_steps=2)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 .*last good checkpoint: .*step-00000002"):
        train(model, data, config, create_accelerator(config), compute_loss=_NanAtStep(3))


def test_nonfinite_step_is_skipped_and_counted_when_asked(tmp_path):
    model, data, config = _setup(tmp_path, skip_nonfinite=True)
    result = train(model, data, config, create_accelerator(config), compute_loss=_NanAtStep(2))
    assert result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in _trainable(model).values())


class _Marker:
    """An object a graph node holds, so a weak reference tells whether that graph is still alive."""


class _HoldInGraph(torch.autograd.Function):
    """The identity, whose graph node keeps `marker` (as any node keeps what its backward needs)."""

    @staticmethod
    def forward(ctx, x, marker):
        ctx.marker = marker
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GraphWatch:
    """The contrastive objective, noting on each call whether the previous step's graph is still alive."""

    def __init__(self) -> None:
        self.previous, self.alive = None, []

    def __call__(self, model, batch):
        if self.previous is not None:
            self.alive.append(self.previous() is not None)
        marker = _Marker()
        self.previous = weakref.ref(marker)
        return _HoldInGraph.apply(contrastive_step(model, batch), marker)


def test_a_step_graph_is_freed_before_the_next_forward(tmp_path):
    model, data, config = _setup(tmp_path, epochs=1)
    watch = _GraphWatch()
    train(model, data, config, create_accelerator(config), compute_loss=watch)
    assert watch.alive == [False] * (N_PAIRS // 8 - 1)


def test_same_seed_gives_same_weights(tmp_path):
    runs = []
    for _ in range(2):
        model, data, config = _setup(tmp_path)
        train(model, data, config, create_accelerator(config))
        runs.append(_trainable(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_parameter_groups_get_their_own_lr_and_no_decay_on_biases_and_scale():
    from peftclip.adapters import AdapterSpec, PartialConfig, apply_strategy
    from peftclip.train import create_optimizer

    base = load_base()
    model, _ = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig(r=2),
                                                      partial=PartialConfig(projections=True, logit_scale=True,
                                                                            last_blocks=1)))
    config = TrainConfig(lr=1e-3, weight_decay=0.1, group_lr={"lora": 5e-3, "projections": 2e-2},
                         group_weight_decay={"blocks": 0.3})
    groups = {(g["name"], g["weight_decay"] > 0): g for g in create_optimizer(model, config).param_groups}
    assert groups[("lora", True)]["lr"] == 5e-3 and groups[("lora", True)]["weight_decay"] == 0.1
    assert groups[("projections", True)]["lr"] == 2e-2
    assert groups[("blocks", True)]["lr"] == 1e-3 and groups[("blocks", True)]["weight_decay"] == 0.3
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = [names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]]
    assert any(n.endswith("logit_scale") for n in undecayed)
    assert all(n.endswith(("bias", "logit_scale")) or "ln_" in n for n in undecayed)


@pytest.mark.parametrize(("kwargs", "message"), [({"group_lr": {"heads": 1.0}}, "unknown parameter group 'heads'"),
                                                 ({"group_lr": {"lora": -1.0}}, "lora=-1.0"),
                                                 ({"lr": -0.1}, "lr=-0.1")])
def test_invalid_train_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


# Runs under the recipe shell, so its error handling turns the failure into one line and exit 2. The address-space
# limit is set after torch and the data are in memory: 256 MiB more is ample for a batch of 16 (tens of MiB) and far
# from the ~3 GiB a batch of 4096 needs, so the allocator itself fails, as it would on a real machine.
OOM_SCRIPT = """
import dataclasses, resource, sys
import torch
from torch.utils.data import TensorDataset
from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.models import load_base
from peftclip.recipe import recipe_parser, run_recipe
from peftclip.recipes import lora_retrieval
from peftclip.train import train

def training_function(config, accelerator):
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2))
    n = config["train"].batch_size
    data = TensorDataset(torch.zeros(n, 3, 32, 32), base.tokenizer(["a pair"] * n))
    size = next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]
    resource.setrlimit(resource.RLIMIT_AS, (int(size) * 1024 + 256 * 2**20, resource.RLIM_INFINITY))
    train(model, data, dataclasses.replace(config["train"], batch_size=16), accelerator)
    print("a batch of 16 fits", flush=True)
    train(model, data, config["train"], accelerator)

parser = recipe_parser("", lora_retrieval.SECTIONS)
run_recipe(sys.argv[1:], parser, lora_retrieval.SECTIONS, {}, lambda: "unused", training_function)
"""


def test_a_real_out_of_memory_exits_2_with_a_one_line_hint(tmp_path):
    done = subprocess.run([sys.executable, "-c", OOM_SCRIPT, "--batch-size", "4096", "--max-steps", "1", "--cpu",
                           "--num-workers", "0", "--output-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert "a batch of 16 fits" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    # One error line; it is read from "error:" on because train() leaves tqdm's bar open when a step fails, so the
    # message starts on the bar's unfinished line.
    assert [line[line.index("error:"):] for line in done.stderr.splitlines() if "error:" in line] == [
        "error: out of memory at batch_size=4096: try a smaller --batch-size, --grad-accum-steps, "
        "--grad-checkpointing, or on the CPU --release-memory"]


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    runs = []
    for checkpointing in (False, True):
        model, data, config = _setup(tmp_path, grad_checkpointing=checkpointing, epochs=1)
        runs.append(train(model, data, config, create_accelerator(config)).losses)
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)


def test_every_optimiser_step_is_timed(tmp_path):
    model, data, config = _setup(tmp_path, epochs=1, grad_accum_steps=2)
    result = train(model, data, config, create_accelerator(config))
    assert len(result.step_seconds) == len(result.losses) == N_PAIRS // 16
    assert all(seconds > 0 for seconds in result.step_seconds)


@pytest.mark.parametrize(("steps", "expected"), [([9.0, 5.0, 1.0, 2.0, 3.0], 8 / 2.0), ([4.0, 2.0], 8 / 3.0),
                                                 ([], None)])
def test_images_per_second_leaves_out_the_warm_up_steps(steps, expected):
    assert images_per_second(steps, 8) == expected


_FRAGMENT = """
import sys, psutil, torch
from peftclip.train import release_freed_memory
if sys.argv[1] == "release":
    release_freed_memory()
big = torch.ones(32 << 20, dtype=torch.uint8)  # a large free, as training makes, raises glibc's mmap threshold
del big
buffers = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(100)]  # 2 MB each, touched
before = psutil.Process().memory_info().rss
del buffers[::2]  # free every other one, leaving holes between live buffers
print((before - psutil.Process().memory_info().rss) >> 20)
"""


def test_release_memory_returns_freed_buffers_between_live_ones():
    import subprocess
    import sys

    def freed_mb(mode):
        done = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    released, default = freed_mb("release"), freed_mb("default")
    assert released >= 90 and released - default >= 60, (released, default)
