"""Bad input, tried on purpose: a one-line error naming the culprit, exit status 2, nothing written."""

from __future__ import annotations

import pytest
from PIL import Image

from peftclip.recipes import lora_retrieval


@pytest.fixture
def folder(tmp_path):
    """A valid six-image folder with metadata.csv."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    rows = []
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "data" / "images" / f"{i}.jpg")
        rows.append(f"images/{i}.jpg,picture number {i}\n")
    (tmp_path / "data" / "metadata.csv").write_text("file_name,caption\n" + "".join(rows))
    return tmp_path / "data"


def _break(folder, kind):
    if kind == "missing_image":
        (folder / "images" / "2.jpg").unlink()
    elif kind == "zero_byte_image":
        (folder / "images" / "2.jpg").write_bytes(b"")
    elif kind == "text_named_jpg":
        (folder / "images" / "2.jpg").write_text("hello")
    elif kind == "truncated_jpeg":
        data = (folder / "images" / "2.jpg").read_bytes()
        (folder / "images" / "2.jpg").write_bytes(data[: len(data) // 2])
    elif kind == "whitespace_caption":
        text = (folder / "metadata.csv").read_text().replace("picture number 2", "   ")
        (folder / "metadata.csv").write_text(text)
    elif kind == "empty_data_set":
        (folder / "metadata.csv").write_text("file_name,caption\n")


BAD_DATA = {
    "missing_image": "2.jpg (metadata.csv line 4): image file not found",
    "zero_byte_image": "2.jpg (metadata.csv line 4): image file is empty (0 bytes)",
    "text_named_jpg": "2.jpg (metadata.csv line 4): cannot decode image",
    "truncated_jpeg": "2.jpg (metadata.csv line 4): cannot decode image",
    "whitespace_caption": "2.jpg (metadata.csv line 4): empty caption",
    "empty_data_set": "metadata.csv: the data set is empty",
}

BAD_FLAGS = {
    "wrong_column": (["--caption-column", "captoin"], "no column 'captoin'; columns are: file_name, caption"),
    "unknown_model": (["--model-name", "ViT-Q-99"], "unknown open_clip model 'ViT-Q-99'"),
    "unknown_tag": (["--model-name", "ViT-B-32", "--pretrained", "no_such_tag"],
                    "pretrained tag 'no_such_tag' does not exist for ViT-B-32"),
    "missing_weights": (["--pretrained", "/nowhere/weights.safetensors"],
                        "pretrained weights file not found: /nowhere/weights.safetensors"),
    "rank_zero": (["--r", "0"], "r=0: the LoRA rank must be a positive integer"),
    "negative_lr": (["--lr", "-0.1"], "lr=-0.1: the learning rate must be positive"),
    "unknown_target": (["--target-modules", "q", "qk"], "unknown LoRA target 'qk'"),
    "block_out_of_range": (["--blocks", "0,7"], "block index 7 is out of range for the vision tower"),
    "unknown_tower": (["--towers", "audio"], "unknown tower 'audio'"),
    "full_and_freeze": (["--no-lora", "--full", "--freeze", "vision"], "--full and --freeze contradict each other"),
    "full_and_lora": (["--full"], "--full and LoRA contradict each other: --full trains every base weight"),
    "cocoop_in_retrieval": (["--no-lora", "--cocoop"], "--cocoop needs class names to condition on each image"),
    "freeze_and_lora": (["--freeze", "vision"], "--freeze vision and LoRA on the vision tower contradict"),
    "freeze_and_blocks": (["--no-lora", "--freeze", "text", "--last-blocks", "1"],
                          "--freeze text and --last-blocks on the text tower contradict"),
    "resume_without_checkpoint": (["--resume", "latest", "--batch-size", "4"], "no complete checkpoint"),
    "missing_config_file": (["--config", "/nowhere/run.yaml"], "cannot read config file /nowhere/run.yaml"),
}


def _expect_exit(capsys, argv, message, out):
    with pytest.raises(SystemExit) as exit_info:
        lora_retrieval.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert not out.exists(), "an output folder was left behind"


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_stops_with_the_file_and_row(folder, tmp_path, capsys, kind):
    _break(folder, kind)
    out = tmp_path / "out"
    _expect_exit(capsys, ["--source", str(folder), "--output-dir", str(out), "--num-workers", "0"],
                 BAD_DATA[kind], out)


@pytest.mark.parametrize("kind", list(BAD_FLAGS))
def test_bad_settings_name_the_value(folder, tmp_path, capsys, kind):
    flags, message = BAD_FLAGS[kind]
    out = tmp_path / "out"
    _expect_exit(capsys, ["--source", str(folder), "--output-dir", str(out), "--num-workers", "0", *flags],
                 message, out)


def test_skip_bad_rows_trains_and_counts(folder, tmp_path):
    _break(folder, "text_named_jpg")
    metrics = lora_retrieval.main(["--source", str(folder), "--output-dir", str(tmp_path / "out"), "--skip-bad-rows",
                                   "--max-steps", "1", "--batch-size", "4", "--num-workers", "0",
                                   "--val-fraction", "0.2"])
    assert metrics["skipped_rows"] == 1


def test_long_captions_are_truncated_and_counted(folder, tmp_path):
    text = (folder / "metadata.csv").read_text().replace("picture number 3", " ".join(["word"] * 40))
    (folder / "metadata.csv").write_text(text)
    metrics = lora_retrieval.main(["--source", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                                   "--batch-size", "4", "--num-workers", "0", "--val-fraction", "0.2"])
    assert metrics["truncated_captions"] == 1  # the tiny model's context is 24 tokens
