"""open_clip's own trainer runs on the tiny base through the benchmark wrapper and is timed."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from benchmarks.open_clip_trainer import run_open_clip_train


def _tiny_captions_csv(folder: Path, n: int = 10) -> Path:
    """A CSV of ``n`` small solid-colour images with relative paths, as open_clip's CSVs have."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 40), (25 * i, 255 - 25 * i, 90)).save(folder / "images" / f"{i}.png")
        rows.append((f"images/{i}.png", f"a square of colour {i}, plain"))
    path = folder / "captions.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("file_name", "caption"), *rows])
    return path


def test_open_clip_train_times_each_step_on_the_tiny_base(tmp_path):
    workdir = tmp_path / "run"
    # One thread: two busy-waiting OpenMP threads on a shared 2-core machine run ~40x slower.
    result = run_open_clip_train(
        "peftclip-tiny", _tiny_captions_csv(tmp_path / "data"), batch_size=4, steps=3, threads=1, workdir=workdir
    )
    assert len(result["step_seconds"]) == 3 and all(s > 0 for s in result["step_seconds"])
    assert result["images_per_second"] > 0
    assert result["max_rss_bytes"] > 50e6
    assert not list(workdir.rglob("*.pt")), "open_clip_train saved a checkpoint"
