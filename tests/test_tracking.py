"""Watching a run: trackers (TensorBoard read back), evaluation history, best adapter, early stopping, curves,
`peftclip info`'s history and `peftclip compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from peftclip import cli, tracking
from peftclip.io import METRICS_NAME, SAFETENSORS_WEIGHTS_NAME
from peftclip.recipes import classify, lora_retrieval
from peftclip.tracking import CURVES_NAME, plot_curves, tracking_dir
from tests import test_recipes

STEPS, EVERY = 4, 2
shapes = test_recipes.shapes  # the generated shapes task, as a module fixture
_run = test_recipes._run  # later --max-steps flags override its 2


@pytest.fixture(scope="module")
def watched(tmp_path_factory, shapes) -> tuple[Path, dict]:
    """One short run logged to TensorBoard, evaluated every EVERY steps, keeping the best by R@1."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    metrics = _run(out, shapes, "--max-steps", str(STEPS), "--report-to", "tensorboard",
                   "--eval-every-steps", str(EVERY), "--save-best", "text_to_image_R@1")
    return out, metrics


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under `log_dir`: {tag: {step: value}}."""
    found: dict[str, dict[int, float]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return found


def test_tensorboard_holds_every_logged_scalar_at_its_step(watched):
    out, metrics = watched
    scalars = _scalars(tracking_dir(out))
    train_steps = set(range(1, STEPS + 1))
    for tag in ("train/loss", "train/grad_norm", "train/images_per_second", "train/logit_scale", "train/epoch",
                "lr/lora"):
        assert set(scalars[tag]) == train_steps, tag
    assert [scalars["train/loss"][s] for s in sorted(train_steps)] == pytest.approx(metrics["curves"]["loss"])
    assert scalars["train/logit_scale"][1] == pytest.approx(1 / 0.07, rel=1e-3)  # open_clip's init, clamped exp
    for key, value in metrics["after"].items():
        assert set(scalars[f"eval/{key}"]) == {0, *range(EVERY, STEPS + 1, EVERY)}
        assert scalars[f"eval/{key}"][STEPS] == pytest.approx(value)


def test_run_config_is_stored_as_hyperparameters(watched):
    out, _ = watched
    (hparams,) = tracking_dir(out).rglob("hparams.yml")
    text = hparams.read_text()
    assert "train.lr: 0.003" in text and "lora.r: 4" in text


def test_history_holds_every_evaluation_and_best_points_at_its_adapter(watched):
    out, metrics = watched
    saved = json.loads((out / METRICS_NAME).read_text())
    assert [entry["step"] for entry in saved["history"]] == [0, 2, 4]
    assert saved["history"][0]["metrics"] == saved["before"] and saved["history"][-1]["metrics"] == saved["after"]
    best = saved["best"]
    values = [entry["metrics"]["text_to_image_R@1"] for entry in saved["history"][1:]]
    assert best["value"] == max(values) and best["step"] == 2 + 2 * values.index(max(values))
    assert json.loads((out.with_name(best["path"]) / METRICS_NAME).read_text())["step"] == best["step"]


def test_training_curves_png_shows_every_series(watched):
    out, metrics = watched
    png = out / CURVES_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    loss_ax, lr_ax, eval_ax = plot_curves(metrics).axes
    assert [line.get_label() for line in loss_ax.lines] == ["loss"]
    assert list(loss_ax.lines[0].get_ydata()) == metrics["curves"]["loss"]
    assert [line.get_label() for line in lr_ax.lines] == ["lr/lora"]
    labels = {line.get_label() for line in eval_ax.lines}
    assert labels == {*metrics["after"], "best text_to_image_R@1"}
    assert list(eval_ax.lines[0].get_xdata()) == [0, 2, 4]


def test_info_prints_the_history_table(watched, capsys):
    out, _ = watched
    assert cli.main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("history:")
    assert lines[start + 1].startswith("| step | image_to_text_R@1 | image_to_text_R@5 | image_to_text_R@10 |")
    assert [line.split("|")[1].strip() for line in lines[start + 3:]] == ["0", "2", "4"]


def test_compare_prints_one_row_per_adapter(watched, shapes, tmp_path, capsys):
    out, _ = watched
    third = tmp_path / "third"
    _run(third, shapes, "--max-steps", "1", "--r", "2")
    capsys.readouterr()  # the run's own output
    plot = tmp_path / "compare.png"
    assert cli.main(["compare", str(out), f"{out}-best", str(third), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| adapter")]
    assert [row.split(" | ")[0][2:] for row in rows] == [str(out), f"{out}-best", str(third)]
    assert [row.split(" | ")[3] for row in rows] == ["18,432", "18,432", "9,216"]  # r=4, r=4, r=2
    assert plot.stat().st_size > 10_000


def test_compare_refuses_a_folder_that_is_no_adapter(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_early_stopping_keeps_the_adapter_of_the_best_evaluation(tmp_path, shapes, monkeypatch):
    """A metric that goes up then down: the best adapter is the one trained up to the best step."""
    sequence = iter([0.0, 10.0, 30.0, 20.0, 5.0, 5.0])  # before, steps 2, 4, 6, 8, after
    snapshots = []

    def fake_evaluate(accelerator, model, *args, **kwargs):
        snapshots.append({n.replace(".default", ""): p.detach().clone()
                          for n, p in model.named_parameters() if p.requires_grad})
        value = next(sequence)
        return {"text_to_image_R@1": value, "image_to_text_R@1": value}

    monkeypatch.setattr(lora_retrieval, "evaluate_retrieval", fake_evaluate)
    out = tmp_path / "adapter"
    metrics = _run(out, shapes, "--max-steps", "20", "--eval-every-steps", "2", "--save-best", "text_to_image_R@1",
                   "--early-stopping-patience", "2", "--weight-decay", "0")
    assert metrics["steps"] == 8 and metrics["stopped_early_at"] == 8
    assert metrics["best"] == {"metric": "text_to_image_R@1", "value": 30.0, "step": 4, "path": "adapter-best"}
    best = load_file(out.with_name("adapter-best") / SAFETENSORS_WEIGHTS_NAME)
    last = load_file(out / SAFETENSORS_WEIGHTS_NAME)
    step4, step8 = snapshots[2], snapshots[4]
    assert best.keys() == step4.keys()
    assert all(torch.equal(best[k], step4[k]) for k in best)
    assert not all(torch.equal(last[k], step4[k]) for k in last)
    assert all(torch.equal(last[k], step8[k]) for k in last)


@pytest.mark.parametrize("flags, message", [
    (["--report-to", "wandb"], "the 'wandb' package is not installed (pip install wandb)"),
    (["--report-to", "tensorboad"], "report_to='tensorboad'; choose from none, all, tensorboard"),
    (["--early-stopping-patience", "2"], "early_stopping_patience=2 needs --save-best METRIC"),
    (["--save-best", "top1"], "save_best='top1' is not a metric of this recipe; choose from image_to_text_R@1"),
])
def test_bad_tracking_flags_exit_2_with_one_line(tmp_path, shapes, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(tracking, "_installed", lambda package: package != "wandb")  # as where wandb is absent
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path / "out", shapes, "--max-steps", "1", *flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_classify_evaluates_every_epoch_into_its_history(tmp_path, shapes):
    """Classification's own evaluation (top-1, top-5, mean per class) runs after each epoch and at the end."""
    metrics = classify.main(["--source", str(shapes / "labels.csv"), "--output-dir", str(tmp_path / "out"),
                             "--max-steps", "4", "--batch-size", "16", "--num-workers", "0", "--cpu",
                             "--eval-every-epochs", "1", "--save-best", "top1"])
    batches_per_epoch = metrics["train_images"] // 16
    assert [entry["step"] for entry in metrics["history"]] == [0, batches_per_epoch, 4]
    assert set(metrics["history"][1]["metrics"]) == {"top1", "top5", "mean_per_class"}
    assert metrics["best"]["value"] == max(entry["metrics"]["top1"] for entry in metrics["history"][1:])


def test_resume_continues_the_history_best_and_patience(tmp_path, shapes, monkeypatch):
    """A resumed run carries on the interrupted one's evaluations: no restart of history, best or patience."""
    values = iter([0.0, 10.0, 5.0, 5.0,  # first run: before, steps 2 and 4, after
                   0.0, 3.0, 3.0])  # resumed run: before (replaced by the checkpoint's), step 6, after

    def fake_evaluate(*args, **kwargs):
        value = next(values)
        return {"text_to_image_R@1": value, "image_to_text_R@1": value}

    monkeypatch.setattr(lora_retrieval, "evaluate_retrieval", fake_evaluate)
    out = tmp_path / "adapter"
    flags = ("--eval-every-steps", "2", "--save-best", "text_to_image_R@1", "--early-stopping-patience", "2",
             "--checkpoint-every-steps", "2")
    first = _run(out, shapes, "--max-steps", "4", *flags)
    resumed = _run(out, shapes, "--max-steps", "12", "--resume", "latest", "--overwrite", *flags)
    assert [entry["step"] for entry in resumed["history"]] == [0, 2, 4, 6]
    assert resumed["history"][:3] == first["history"]
    assert resumed["best"]["step"] == 2  # not step 6, which a restarted best would have taken
    assert resumed["stopped_early_at"] == 6  # the second evaluation without improvement across the resume
    assert resumed["curves"]["loss"][:4] == first["curves"]["loss"] and len(resumed["curves"]["loss"]) == 6
