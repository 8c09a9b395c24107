"""Data bigger than memory: lazy parquet, webdataset shards, datasets streaming, bad samples, sharding, resume."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
import webdataset as wds
from PIL import Image

from peftclip.cli import main as cli_main
from peftclip.data import DataConfig, DataError, TrainPairs, decode_image, load_pairs
from peftclip.io import SAFETENSORS_WEIGHTS_NAME
from peftclip.recipes import lora_retrieval
from peftclip.streaming import StreamingPairs, _TarShards, load_stream
from peftclip.train import TrainConfig, _create_loader, create_accelerator
from tests.test_reliability import kill_once_written

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BAD_JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"


def _jpeg(i: int, size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(out, "JPEG")
    return out.getvalue()


def _write_shards(folder: Path, n_shards: int, per_shard: int, bad: dict[int, dict] | None = None) -> str:
    """Shards 00000.tar... of samples with keys 0, 1, ... and caption the key; `bad` replaces some samples' members."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                sample = {"__key__": f"{i:06d}", "jpg": _jpeg(i), "txt": str(i)}
                sink.write({k: v for k, v in {**sample, **(bad or {}).get(i, {})}.items() if v is not None})
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def _write_parquet(path: Path, n: int, bad_rows: tuple[int, ...] = (), first: int = 0) -> Path:
    """Rows `first`, ... of embedded JPEGs captioned "colour <row>"."""
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    images = [{"bytes": BAD_JPEG if i in bad_rows else _jpeg(i), "path": None} for i in range(first, first + n)]
    datasets.Dataset.from_dict({"image": images, "caption": [f"colour {i}" for i in range(first, first + n)]},
                               features=features).to_parquet(str(path))
    return path


def test_embedded_parquet_images_stay_in_the_table(tmp_path):
    source = _write_parquet(tmp_path / "set.parquet", 40)
    train, val = load_pairs(DataConfig(source=str(source), val_fraction=0.25))
    image_bytes = sum(len(_jpeg(i)) for i in range(40))
    assert len(pickle.dumps(train.images)) < image_bytes / 4, "image bytes were copied out of the table"
    assert len(train.images) == 30 and len(val.images) == 10
    assert train.images[0] in {_jpeg(i) for i in range(40)}


def _file_backed_rss() -> int:
    """Bytes of mapped files resident in this process (counted in its RSS)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def test_grouping_embedded_images_leaves_the_table_out_of_rss(tmp_path):
    image_bytes = [os.urandom(40_000) for _ in range(1000)]  # 40 MB, unique: hashed, never decoded (check off)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in image_bytes],
                                "caption": [f"row {i}" for i in range(1000)]},
                               features=features).to_parquet(str(tmp_path / "set.parquet"))
    before = _file_backed_rss()
    train, _ = load_pairs(DataConfig(source=str(tmp_path / "set.parquet"), val_fraction=0.0, check_data="off"))
    assert len(train.images) == 1000
    assert _file_backed_rss() - before < 10e6, "the hashing pass left the memory-mapped images resident"


@pytest.mark.parametrize(("check", "loads"), [("full", False), ("fast", True), ("off", True)])
def test_check_data_decides_whether_bad_images_stop_loading(tmp_path, check, loads):
    source = _write_parquet(tmp_path / "set.parquet", 20, bad_rows=(3,))
    config = DataConfig(source=str(source), val_fraction=0.0, check_data=check)
    if not loads:
        with pytest.raises(DataError, match=r"set.parquet row 3: cannot decode image"):
            load_pairs(config)
        return
    train, _ = load_pairs(config)
    assert len(train.images) == 20


def test_undecodable_image_while_training_is_counted_and_replaced(tmp_path, tiny_base):
    base = tiny_base
    source = _write_parquet(tmp_path / "set.parquet", 20, bad_rows=(3,))
    train, _ = load_pairs(DataConfig(source=str(source), val_fraction=0.0, check_data="fast"))
    pairs = TrainPairs(train, base.preprocess_val, base.tokenizer, max_bad_fraction=0.5)
    image, tokens = pairs[3]
    assert torch.equal(image, pairs[4][0]) and pairs.bad.count == 1
    strict = TrainPairs(train, base.preprocess_val, base.tokenizer, max_bad_fraction=0.0)
    with pytest.raises(DataError, match=r"set.parquet row 3: cannot decode image.*max_bad_fraction=0.0"):
        strict[3]


def _stream(source: str, **config) -> StreamingPairs:
    """Samples of `source` whose one token is the number ending their caption (the shard key, or parquet row)."""
    data_config = DataConfig(source=source, **config)
    stream, _ = load_stream(data_config)
    return StreamingPairs(stream, lambda image: torch.zeros(1),
                          lambda texts: torch.tensor([[int(text.split()[-1])] for text in texts]),
                          config=data_config)


def _keys(pairs: StreamingPairs, batch_size: int, batches: int) -> list[int]:
    pairs.configure(batch_size, batches)
    return [int(t) for _, tokens in pairs for t in tokens[:, 0]]


BAD_MEMBERS = {5: {"jpg": BAD_JPEG}, 6: {"txt": " "}, 7: {"txt": None}, 9: {"jpg": None}}


def test_bad_stream_samples_are_counted_and_skipped(tmp_path):
    pairs = _stream(_write_shards(tmp_path / "shards", 3, 8, bad=BAD_MEMBERS), max_bad_fraction=0.5,
                    shuffle_buffer=1)
    keys = _keys(pairs, 4, 3)  # 12 good training samples in the first two shards
    assert sorted(keys) == [k for k in range(16) if k not in BAD_MEMBERS]
    assert pairs.bad.count == len(BAD_MEMBERS)


def test_too_many_bad_stream_samples_stop_naming_shard_and_key(tmp_path):
    pairs = _stream(_write_shards(tmp_path / "shards", 3, 8, bad=BAD_MEMBERS), max_bad_fraction=0.0,
                    shuffle_buffer=1)
    with pytest.raises(DataError, match=r"0000[01].tar 00000[59]: .*max_bad_fraction=0.0"):
        _keys(pairs, 4, 3)


def test_a_worker_tokenizes_each_batch_in_one_call(tmp_path):
    pairs = _stream(_write_shards(tmp_path / "shards", 3, 8), shuffle_buffer=1)
    tokenize, calls = pairs.tokenizer, []
    pairs.tokenizer = lambda texts: calls.append(len(texts)) or tokenize(texts)
    assert sorted(_keys(pairs, 4, 3)) == list(range(12)) and calls == [4, 4, 4]


@pytest.mark.parametrize("orientation", [None, 6])
def test_decoding_a_stream_image_copies_no_pixels(monkeypatch, orientation):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 10, 10)).save(out, "JPEG", exif=exif)
    monkeypatch.setattr(Image.Image, "copy", lambda self: pytest.fail("decode_image copied the decoded image"))
    image = decode_image(out.getvalue())
    assert image.mode == "RGB" and image.size == ((16, 20) if orientation else (20, 16))


@pytest.mark.parametrize(("bad_key", "loads"), [(17, True), (16, False)])
def test_held_out_shards_check_only_the_images_kept(tmp_path, bad_key, loads):
    config = DataConfig(source=_write_shards(tmp_path / "shards", 3, 8, bad={bad_key: {"jpg": BAD_JPEG}}),
                        max_val_images=1)
    if loads:
        assert [name.split()[-1] for name in load_stream(config)[1].names] == ["000016"]
    else:
        with pytest.raises(DataError, match=r"00002.tar 000016: cannot decode image"):
            load_stream(config)


@pytest.mark.parametrize("files", [1, 2])
def test_streamed_parquet_feeds_two_workers_every_row_once(tmp_path, files):
    rows = [_write_parquet(tmp_path / f"set-{i}.parquet", 16, first=16 * i) for i in range(files)]
    source = str(tmp_path / "set-*.parquet")
    pairs = _stream(source, streaming=True, val_source=str(rows[0]), shuffle_buffer=4)
    pairs.configure(4, 4 * files)  # one epoch: every row, two batches per worker per file
    batches = list(torch.utils.data.DataLoader(pairs, batch_size=None, num_workers=2))
    assert sorted(int(k) for _, tokens in batches for k in tokens[:, 0]) == list(range(16 * files))


def test_stream_epochs_repeat_passes_and_reshuffle(tmp_path):
    pairs = _stream(_write_shards(tmp_path / "shards", 3, 4), shuffle_buffer=8)
    epoch = _keys(pairs, 2, 6)  # 12 samples from 8: a second pass over the shards
    assert sorted(epoch[:8]) == list(range(8)) and len(epoch) == 12
    assert _keys(pairs, 2, 6) == epoch, "an epoch is not a function of its number"
    pairs.set_epoch(1)
    assert _keys(pairs, 2, 6) != epoch


def _run(out: Path, source: str, *extra: str) -> dict:
    return lora_retrieval.main(["--source", source, "--output-dir", str(out), "--max-steps", "2", "--batch-size",
                                "8", "--num-workers", "0", "--cpu", *extra])


@pytest.mark.parametrize("kind", ["webdataset", "streamed_parquet", "lazy_parquet"])
def test_retrieval_recipe_trains_from_each_big_data_source(tmp_path, kind):
    parquet = str(_write_parquet(tmp_path / "set.parquet", 40))
    sources = {"webdataset": [_write_shards(tmp_path / "shards", 4, 8)],
               "streamed_parquet": [parquet, "--streaming", "--val-source", parquet, "--max-val-images", "8"],
               "lazy_parquet": [parquet, "--check-data", "fast"]}
    metrics = _run(tmp_path / "out", *sources[kind])
    assert metrics["steps"] == 2 and metrics["bad_samples"] == 0
    assert (tmp_path / "out" / SAFETENSORS_WEIGHTS_NAME).is_file()


def test_a_stream_needs_an_epoch_length(tmp_path):
    pairs = _stream(_write_shards(tmp_path / "shards", 2, 4))
    accelerator = create_accelerator(TrainConfig(cpu=True, batch_size=4))
    with pytest.raises(ValueError, match="--train-num-samples"):
        _create_loader(pairs, TrainConfig(cpu=True, batch_size=4), accelerator, torch.Generator())


WORKER = """
import json, sys, torch
from peftclip.data import DataConfig
from peftclip.streaming import StreamingPairs, _TarShards, load_stream
from peftclip.train import TrainConfig, _create_loader, create_accelerator
from tests.test_reliability import kill_once_written
config = TrainConfig(cpu=True, batch_size=8, num_workers=2)
accelerator = create_accelerator(config)
data = DataConfig(source=sys.argv[1], train_num_samples=32, shuffle_buffer=4, **json.loads(sys.argv[3]))
stream, _ = load_stream(data)
pairs = StreamingPairs(stream, lambda image: torch.zeros(1),
                       lambda t: torch.tensor([[int(x.split()[-1])] for x in t]), config=data)
loader, batches = _create_loader(pairs, config, accelerator, torch.Generator())
seen = {}
for epoch in (0, 1):
    pairs.set_epoch(epoch)
    seen[epoch] = [[int(t) for t in tokens[:, 0]] for _, tokens in loader]
(__import__("pathlib").Path(sys.argv[2]) / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["webdataset", "one_streamed_parquet_file"])
def test_two_processes_with_two_workers_see_every_sample_once_per_epoch(tmp_path, kind):
    if kind == "webdataset":
        source, extra = _write_shards(tmp_path / "shards", 9, 4), {}  # the last shard is held out: 32 to train on
    else:  # fewer files than processes x workers: split by rows
        source = str(_write_parquet(tmp_path / "set.parquet", 32))
        extra = {"streaming": True, "val_source": source}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(script), source, str(tmp_path), json.dumps(extra)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        assert [len(rank[epoch]) for rank in ranks] == [4, 4]  # the same number of steps on every rank
        assert all(len(batch) == 4 for rank in ranks for batch in rank[epoch])
        assert sorted(k for rank in ranks for batch in rank[epoch] for k in batch) == list(range(32))
    assert ranks[0]["0"] != ranks[0]["1"], "the second epoch was not reshuffled"


def _recipe(out: Path, source: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "recipes" / "lora_retrieval.py"), "--source", source, "--output-dir", str(out),
           "--batch-size", "4", "--train-num-samples", "24", "--epochs", "2", "--checkpoint-every-steps", "3",
           "--num-workers", "2", "--cpu", "--lora-dropout", "0.1", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_stream_then_resume_gives_the_same_adapter_bytes(tmp_path):
    source = _write_shards(tmp_path / "shards", 5, 8)
    full = _recipe(tmp_path / "full", source)
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]
    killed = _recipe(tmp_path / "killed", source)
    kill_once_written(killed, tmp_path / "killed-checkpoints" / "step-00000009" / "trainer_state.json")  # epoch 2
    resumed = _recipe(tmp_path / "killed", source, "--resume", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    expected = (tmp_path / "full" / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    assert (tmp_path / "killed" / SAFETENSORS_WEIGHTS_NAME).read_bytes() == expected


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from peftclip.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=30)


def _caption_sets(pairs) -> list[list[str]]:
    return sorted(sorted(captions) for captions in pairs.captions)


def test_data_to_wds_writes_bounded_shards_that_stream_every_caption(tmp_path, shapes):
    out = tmp_path / "wds"
    assert cli_main(["data", "to-wds", str(shapes), str(out), "--max-shard-mb", "0.003"]) == 0
    shards = sorted(out.glob("*.tar"))
    payloads = [[member.size for member in tarfile.open(p)] for p in shards]
    largest_sample = 3 * max(max(sizes) for sizes in payloads)
    assert len(shards) > 2 and all(sum(sizes) < 0.003 * 2**20 + largest_sample for sizes in payloads)
    source = DataConfig(source=str(shapes), val_fraction=0.0)
    expected = _caption_sets(load_pairs(source)[0])
    stream = _TarShards([str(p) for p in shards], "caption", split=False)
    assert sorted(sorted(c) for _, _, c in stream.samples(0, 1)) == expected


def test_data_to_parquet_round_trips_images_and_captions(tmp_path, shapes):
    out = tmp_path / "parquet"
    assert cli_main(["data", "to-parquet", str(shapes), str(out), "--max-shard-mb", "0.003"]) == 0
    assert len(list(out.glob("*.parquet"))) > 1
    original, _ = load_pairs(DataConfig(source=str(shapes), val_fraction=0.0))
    converted, _ = load_pairs(DataConfig(source=str(out), val_fraction=0.0))
    assert _caption_sets(converted) == _caption_sets(original)
    assert sorted(Path(p).read_bytes() for p in original.images) == sorted(converted.images)


def test_data_conversion_refuses_a_folder_with_other_files(tmp_path, shapes, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert cli_main(["data", "to-wds", str(shapes), str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"
