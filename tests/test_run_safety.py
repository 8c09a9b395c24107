"""A run protects what it writes over, stops cleanly on signals, and resumes only on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.io import lock_output_dir
from peftclip.models import load_base
from peftclip.recipes import lora_retrieval
from peftclip.synthetic import make_shapes_dataset
from peftclip.train import TrainConfig, create_accelerator, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
QUICK = ["--batch-size", "8", "--num-workers", "0", "--cpu"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=40)


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """The recipe's exit status and its last stderr line."""
    try:
        lora_retrieval.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-grad-norm", "-1"], "max_grad_norm=-1.0: must be positive"),
    (["--max-grad-norm", "0"], "max_grad_norm=0.0: must be positive"),
    (["--keep-checkpoints", "0"], "keep_checkpoints=0: must be at least 1"),
    (["--val-fraction", "0"], "val_fraction=0.0 and no val_split"),
])
def test_out_of_range_numbers_are_refused_before_training(shapes, tmp_path, capsys, flags, message):
    code, line = _run(capsys, ["--source", str(shapes), "--output-dir", str(tmp_path / "out"), *QUICK, *flags])
    assert code == 2 and message in line, line
    assert not (tmp_path / "out").exists()


def test_a_users_folder_is_refused_before_any_training(shapes, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    started = time.monotonic()
    code, line = _run(capsys, ["--source", str(shapes), "--output-dir", str(mine), *QUICK])
    assert code == 2 and "holds files peftclip did not write (holiday.jpg)" in line
    assert [p.name for p in mine.iterdir()] == ["holiday.jpg"] and (mine / "holiday.jpg").read_bytes() == b"precious"
    assert time.monotonic() - started < 5, "the check must come before loading and training"


def test_an_earlier_adapter_is_replaced_only_with_overwrite(shapes, tmp_path, capsys):
    argv = ["--source", str(shapes), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *QUICK]
    assert _run(capsys, argv)[0] == 0
    first = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    code, line = _run(capsys, [*argv, "--seed", "1"])
    assert code == 2 and "holds an adapter already; pass --overwrite" in line
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == first
    assert _run(capsys, [*argv, "--seed", "1", "--overwrite"])[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() != first


def test_a_second_run_on_the_same_output_is_refused_with_the_first_ones_pid(shapes, tmp_path, capsys):
    with lock_output_dir(tmp_path / "out"):  # as a first run holds it
        code, line = _run(capsys, ["--source", str(shapes), "--output-dir", str(tmp_path / "out"), *QUICK])
    assert code == 2 and f"in use by PID {os.getpid()}" in line


def _start(out: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """A recipe run in a subprocess, and the list its stderr is collected into as it comes."""
    cmd = [sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", str(data), "--output-dir",
           str(out), *QUICK, "--max-steps", "400", "--epochs", "1000", *extra]
    run = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chunks: list[str] = []
    threading.Thread(target=lambda: chunks.extend(iter(lambda: run.stderr.read(1), "")), daemon=True).start()
    return run, chunks


def _wait_for_training(run: subprocess.Popen, chunks: list[str], timeout: float = 120) -> None:
    """Until the progress bar shows a finished step."""
    deadline = time.monotonic() + timeout
    while "train:" not in "".join(chunks) or "/400" not in "".join(chunks).split("train:")[-1]:
        assert run.poll() is None, "".join(chunks)
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "checkpoints"), [(signal.SIGINT, 130, True),
                                                               (signal.SIGTERM, 143, True),
                                                               (signal.SIGTERM, 143, False)])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_a_resume_hint(shapes, tmp_path, signum, status,
                                                                         checkpoints):
    out = tmp_path / "out"
    run, chunks = _start(out, shapes, *(["--checkpoint-every-steps", "1000"] if checkpoints else []))
    _wait_for_training(run, chunks)
    run.send_signal(signum)
    run.wait(timeout=120)
    time.sleep(0.2)
    stderr = "".join(chunks)
    assert run.returncode == status, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step "), last
    step = int(last.removeprefix("interrupted at step ").split(";")[0])
    assert 1 <= step < 400
    if checkpoints:
        assert last.endswith("; resume with --resume latest"), last
        assert (Path(f"{out}-checkpoints") / f"step-{step:08d}" / "trainer_state.json").is_file()
    else:
        assert "no checkpoint was written" in last
    assert not out.exists(), "an interrupted run writes no adapter"


def test_resume_on_changed_data_is_refused_and_more_steps_may_be_added(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", n_images=40)
    argv = ["--source", str(data), "--output-dir", str(tmp_path / "out"), *QUICK, "--checkpoint-every-steps", "2"]
    assert _run(capsys, [*argv, "--max-steps", "2"])[0] == 0
    assert _run(capsys, [*argv, "--max-steps", "4", "--resume", "latest"])[0] == 0  # more steps on resume
    assert (tmp_path / "out-checkpoints" / "step-00000004").is_dir()
    csv = data / "metadata.csv"
    csv.write_text(csv.read_text().replace("circle", "disc", 1))
    code, line = _run(capsys, [*argv, "--max-steps", "6", "--resume", "latest"])
    assert code == 2 and "the config differs in data.fingerprint" in line, line


def test_resume_reports_where_it_resumed_from(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", n_images=40)
    argv = ["--source", str(data), "--output-dir", str(tmp_path / "out"), *QUICK, "--checkpoint-every-steps", "2"]
    lora_retrieval.main([*argv, "--max-steps", "2"])
    capsys.readouterr()
    lora_retrieval.main([*argv, "--max-steps", "3", "--resume", "latest"])
    assert f"resumed from step 2 of {tmp_path / 'out-checkpoints' / 'step-00000002'}" in capsys.readouterr().out


def test_fp16_overflow_steps_are_skipped_by_the_scaler_not_fatal(tmp_path):
    """With a GradScaler (fp16), overflowing steps are normal: skipped and counted, and the run goes on."""
    base = load_base()
    model = apply_lora(base.model, ClipLoraConfig(r=2))
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images, base.tokenizer([f"pair {i}" for i in range(16)]))
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=8, max_steps=8, num_workers=0, cpu=True,
                         warmup_steps=0, skip_nonfinite=True)
    accelerator = create_accelerator(config)
    # Accelerate makes no GradScaler on the CPU; a huge initial scale makes the first steps overflow.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, data, config, accelerator)
    assert len(result.losses) == 8 and 1 <= result.skipped_steps < 8
    assert accelerator.scaler.get_scale() < 2.0 ** 127
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
