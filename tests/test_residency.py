"""Where training data lives (config data.residency): sharded arrays read as one, their bad input, the same
weights from every residency, resume across residencies, auto's choice, and a pretraining process whose
peak resident memory stays under data.memory_limit while its dataset is over 4 times larger."""
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_pipeline.core import distributed
from ssl_pipeline.core.arrays import ArrayFileError, open_array, split_images_path
from ssl_pipeline.core.data import BatchOrder, device_generator
from ssl_pipeline.core.distributed import Ranks
from ssl_pipeline.core.residency import ImageData, choose_residency
from ssl_pipeline.core.resume import TrainingStopped
from ssl_pipeline.core.training import load_checkpoint
from ssl_pipeline.stages.evaluate import evaluate_classifier, evaluate_knn, evaluate_linear
from ssl_pipeline.stages.finetune import finetune
from ssl_pipeline.stages.preprocess import write_label_subset
from ssl_pipeline.stages.pretrain import pretrain, rank_rows
from tests.conftest import REPO
from tests.test_resume import assert_same_weights, read_curve, resume_at
from tests.test_training import CPU, FINETUNE, MODEL, PRETRAIN, data_dir  # noqa: F401 (fixture)

RESIDENCIES = ("device", "host", "disk")


# ---------------------------------------------------------------------------------------------------
# A sharded array, as preprocessing writes it
# ---------------------------------------------------------------------------------------------------

def write_sharded(index_path: Path, array: np.ndarray, counts: list) -> Path:
    """Write `array` as shards/<name>/<k>.npy beside `index_path` and the index file that lists them (the
    format of ssl_pipeline/core/arrays.py; the writer proper is preprocessing's)."""
    name = index_path.name[:-len(".index.json")]
    (index_path.parent / "shards" / name).mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for number, count in enumerate(counts):
        relative = f"shards/{name}/{number:05d}.npy"
        np.save(index_path.parent / relative, array[start:start + count])
        digest = hashlib.sha256((index_path.parent / relative).read_bytes()).hexdigest()
        shards.append({"file": relative, "count": count, "sha256": digest})
        start += count
    assert start == len(array)
    index_path.write_text(json.dumps({"format": "ssl_pipeline.sharded_array", "version": 1, "dtype": str(array.dtype),
                                      "shape": list(array.shape), "shards": shards}))
    return index_path


def uneven_counts(total: int, size: int) -> list:
    return [size] * (total // size) + ([total % size] if total % size else [])


@pytest.fixture(scope="module")
def sharded_dir(data_dir, tmp_path_factory):  # noqa: F811 (pytest fixture)
    """test_training's data with every split's images as shards of 50 (an uneven last one), no .npy."""
    directory = tmp_path_factory.mktemp("sharded")
    for path in data_dir.iterdir():
        if path.is_file() and not path.name.endswith("_images.npy"):
            (directory / path.name).write_bytes(path.read_bytes())
    for split in ("train", "val", "test"):
        images = np.load(data_dir / f"{split}_images.npy")
        write_sharded(directory / f"{split}_images.index.json", images, uneven_counts(len(images), 50))
    write_label_subset(directory / "train_labels.npy", directory / "card.json", 0.5, 0, directory / "half.npy")
    return directory


@pytest.fixture
def small_index(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    return write_sharded(tmp_path / "train_images.index.json", array, [16, 16, 16, 2]), array


def test_a_sharded_array_reads_as_the_array_it_was_cut_from(small_index, tmp_path):
    index, array = small_index
    logical = open_array(index)
    assert (logical.shape, logical.dtype, len(logical.shards)) == (array.shape, np.uint8, 4)
    np.testing.assert_array_equal(logical.load(), array)
    picks = np.array([49, 0, 17, 17, 32, 15, 16, 48])  # across every shard boundary, a repeat, unsorted
    np.testing.assert_array_equal(logical.take(picks), array[picks])
    np.testing.assert_array_equal(logical.take(picks, release=True), array[picks])
    np.testing.assert_array_equal(logical.rows(10, 40), array[10:40])
    assert split_images_path(tmp_path, "train") == index
    assert split_images_path(tmp_path, "val") == tmp_path / "val_images.npy"  # no index: the single .npy
    np.save(tmp_path / "val_images.npy", array)
    np.testing.assert_array_equal(open_array(tmp_path / "val_images.npy").take(picks), array[picks])


# ---------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the index and the shard
# ---------------------------------------------------------------------------------------------------

def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BAD_SHARDS = {
    "truncated": (lambda shard, index: truncate(shard, shard.stat().st_size - 5),
                  r"00001\.npy is truncated or overlong: \d+ bytes, but its header .* needs \d+"),
    "header cut": (lambda shard, index: truncate(shard, 20), r"00001\.npy is not a readable \.npy file"),
    "missing": (lambda shard, index: shard.unlink(), r"00001\.npy does not exist"),
    "other shape": (lambda shard, index: np.save(shard, np.zeros((16, 1, 4, 5), np.uint8)),
                    r"00001\.npy: the shard holds uint8 of shape \(16, 1, 4, 5\), but the index says uint8 of "
                    r"shape \(16, 1, 4, 4\)"),
    "other dtype": (lambda shard, index: np.save(shard, np.zeros((16, 1, 4, 4), np.int16)),
                    r"00001\.npy: the shard holds int16"),
    "counts": (lambda shard, index: index.write_text(index.read_text().replace("[50, 1, 4, 4]", "[51, 1, 4, 4]")),
               r"the shards' counts sum to 50, but the index's shape \(51, 1, 4, 4\) has 51 rows"),
}


@pytest.mark.parametrize("damage", sorted(BAD_SHARDS))
def test_a_damaged_shard_or_index_is_an_error_naming_the_file(small_index, damage):
    index, _ = small_index
    spoil, message = BAD_SHARDS[damage]
    spoil(index.parent / "shards/train_images/00001.npy", index)
    with pytest.raises(ArrayFileError, match=message) as raised:
        open_array(index)
    assert str(index) in str(raised.value)


def test_a_shard_with_a_wrong_checksum_fails_the_load_and_the_verification(small_index):
    index, array = small_index
    shard = index.parent / "shards/train_images/00002.npy"
    np.save(shard, array[32:48][::-1])  # same size, shape and dtype: only the checksum can tell
    logical = open_array(index)
    for read in (logical.load, logical.verify):
        with pytest.raises(ArrayFileError, match=rf"{index}: shard {shard} has sha256 [0-9a-f]{{64}}, but the index "
                                                 r"says [0-9a-f]{64}"):
            read()


@pytest.mark.parametrize("residency", ["device", "disk"])
def test_pretraining_on_a_corrupt_shard_fails_naming_it_and_writes_no_output(sharded_dir, tmp_path, residency):
    """device reads every byte before training; disk verifies in a thread while it trains and fails before
    writing an output. A resume state on disk (a stand-in here: under disk an earlier attempt may have
    written one before the damage was found; checkpoint_every 0 writes one after every step) is removed
    either way, since it may have been trained on the damaged bytes."""
    corrupt = tmp_path / "data"
    corrupt.mkdir()
    index = write_sharded(corrupt / "train_images.index.json", open_array(sharded_dir / "train_images.index.json")
                          .load(), [60, 60, 60])
    shard = corrupt / "shards/train_images/00001.npy"
    content = bytearray(shard.read_bytes())
    content[-1] ^= 0xFF
    shard.write_bytes(bytes(content))
    (tmp_path / "resume.pt").write_bytes(b"a state trained on the damaged bytes")
    with pytest.raises(ArrayFileError, match=rf"shard {shard} has sha256"):
        pretrain(index, sharded_dir / "normalization.json", tmp_path / "encoder.pt", tmp_path / "curve.csv",
                 PRETRAIN, MODEL, CPU, resume_at(tmp_path / "resume.pt", every=0), residency={"residency": residency})
    assert not (tmp_path / "encoder.pt").exists() and not (tmp_path / "curve.csv").exists()
    assert not (tmp_path / "resume.pt").exists()


# ---------------------------------------------------------------------------------------------------
# Every residency gives the same batches, so the same weights
# ---------------------------------------------------------------------------------------------------

def test_every_residency_gives_the_batches_of_the_device_across_epochs(sharded_dir, data_dir):  # noqa: F811
    rows = np.load(sharded_dir / "half.npy")
    expected = torch.from_numpy(np.load(data_dir / "train_images.npy"))[torch.from_numpy(rows)]
    seen = {}
    for residency in RESIDENCIES:
        images = ImageData([sharded_dir / "train_images.index.json"], residency, "cpu", rows)
        generator = device_generator(torch.device("cpu"), 5)
        order = BatchOrder(len(images), 16, generator, "cpu")
        batches = images.batches(order)
        seen[residency] = []
        for _ in range(3 * order.steps_per_epoch + 2):
            index, batch = batches.next()
            torch.testing.assert_close(batch, expected[index], rtol=0, atol=0)
            seen[residency].append(index)
            torch.rand(3, generator=generator)  # the step's augmentations draw in between
        batches.close()
        images.finish()
    for residency in ("host", "disk"):
        assert all(torch.equal(a, b) for a, b in zip(seen[residency], seen["device"]))


def test_each_data_parallel_rank_holds_the_images_distributed_shard_gives_it(data_dir, sharded_dir):  # noqa: F811
    """Under torchrun every residency holds a rank's rows of the train split and the unlabeled images, as
    distributed.shard cuts them from the concatenation."""
    paths = [data_dir / "train_images.npy", sharded_dir / "val_images.index.json"]  # two arrays, one after the other
    whole = torch.cat([torch.from_numpy(open_array(path).load()) for path in paths])
    for rank in range(3):
        ranks = Ranks(rank, 3)
        expected = distributed.shard(whole, ranks)
        for residency in RESIDENCIES:
            images = ImageData(paths, residency, "cpu", rank_rows(paths, ranks))
            held = torch.cat(list(images.chunks(16)))
            torch.testing.assert_close(held, expected, rtol=0, atol=0, msg=f"rank {rank}, {residency}")


def without_times(curve: list) -> list:
    return [{key: value for key, value in row.items() if key not in ("elapsed_seconds", "images_per_second")}
            for row in curve]


def test_pretraining_gives_the_same_weights_in_every_residency(data_dir, sharded_dir, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, "ssl_pipeline.core.residency")
    for residency in RESIDENCIES:
        images = (sharded_dir / "train_images.index.json" if residency == "disk" else data_dir / "train_images.npy")
        out = tmp_path / residency
        pretrain(images, data_dir / "normalization.json", out / "encoder.pt", out / "curve.csv", PRETRAIN, MODEL,
                 CPU, resume_at(out / "resume.pt", every=60), residency={"residency": residency})
    assert {f"kept on {where}: config data.residency is {residency}" in caplog.text
            for residency, where in zip(RESIDENCIES, ["the device (cpu)", "the host", "disk (memory-mapped)"])} == {True}
    device = load_checkpoint(tmp_path / "device" / "encoder.pt")
    for residency in ("host", "disk"):
        other = load_checkpoint(tmp_path / residency / "encoder.pt")
        assert_same_weights(other["encoder"], device["encoder"], residency)
        assert_same_weights(other["objective_head"], device["objective_head"], residency)
        assert without_times(read_curve(tmp_path / residency / "curve.csv")) == without_times(
            read_curve(tmp_path / "device" / "curve.csv"))


def test_fine_tuning_and_every_evaluation_agree_in_every_residency(data_dir, sharded_dir, tmp_path):  # noqa: F811
    """A half subset (the labeled rows are gathered from the array), validation in chunks, the test metrics,
    and the kNN and linear probes of one encoder, from the .npy files and from the shards."""
    encoder = tmp_path / "encoder.pt"
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", encoder, tmp_path / "pretrain.csv",
             {**PRETRAIN, "epochs": 2}, MODEL, CPU)
    settings = {**FINETUNE, "epochs": 4, "evaluations": 2}
    results = {}
    for residency in RESIDENCIES:
        source = sharded_dir if residency == "disk" else data_dir
        out, choice = tmp_path / residency, {"residency": residency}
        finetune(source, sharded_dir / "half.npy", encoder, out / "model.pt", out / "curve.csv", "pretrained", 0.5,
                 0, settings, MODEL, CPU, resume_at(out / "resume.pt", every=60), residency=choice)
        results[residency] = {
            "model": load_checkpoint(out / "model.pt")["model"], "curve": without_times(read_curve(out / "curve.csv")),
            "test": evaluate_classifier(source, out / "model.pt", out / "metrics.json", CPU, choice),
            "knn": evaluate_knn(source, encoder, out / "knn.json", {"knn_k": 5, "knn_temperature": 0.1, "knn_raw_pixels": True}, CPU, choice),
            "linear": evaluate_linear(source, encoder, out / "linear.json",
                                      {"weight_decay": 1e-3, "max_iterations": 50}, CPU, choice)}
    device = results["device"]
    assert device["model"]  # and a non-trivial fit: the checkpoint holds weights
    for residency in ("host", "disk"):
        assert_same_weights(results[residency]["model"], device["model"], residency)
        for key in ("curve", "test", "knn", "linear"):
            assert results[residency][key] == device[key], (residency, key)


def test_a_run_stopped_in_each_residency_resumes_to_the_weights_of_an_uninterrupted_one(
        data_dir, tmp_path, monkeypatch):  # noqa: F811
    """Stopped after steps 1, 2 and 3 (the Slurm deadline stops a job at its next step boundary), in disk, host
    and disk again, then finished on the device: the prefetcher's read-ahead must not move the saved position,
    also across the end of the first epoch (2 steps an epoch)."""
    whole = tmp_path / "whole"
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", whole / "encoder.pt",
             whole / "curve.csv", PRETRAIN, MODEL, CPU, resume_at(whole / "resume.pt", every=60))
    out = tmp_path / "stopped"
    run = (out / "encoder.pt", out / "curve.csv", PRETRAIN, MODEL, CPU, resume_at(out / "resume.pt", every=60))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 60))  # inside the 120 s margin
    for stop, residency in enumerate(["disk", "host", "disk"], start=1):  # one input: the resume file names it
        with pytest.raises(TrainingStopped, match=rf"epoch {(stop + 1) // 2}, step {2 - stop % 2} of 2"):
            pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", *run,
                     residency={"residency": residency})
    monkeypatch.delenv("SLURM_JOB_ID")
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", *run, residency={"residency": "device"})
    ours, theirs = load_checkpoint(out / "encoder.pt"), load_checkpoint(whole / "encoder.pt")
    assert_same_weights(ours["encoder"], theirs["encoder"], "encoder")
    assert_same_weights(ours["objective_head"], theirs["objective_head"], "objective")


# ---------------------------------------------------------------------------------------------------
# auto, and memory
# ---------------------------------------------------------------------------------------------------

def test_auto_takes_the_device_when_the_arrays_fit_and_the_disk_past_the_memory_limit():
    cpu = torch.device("cpu")
    assert choose_residency("auto", 10 ** 6, cpu)[0] == "device"
    residency, why = choose_residency("auto", 10 ** 6, cpu, memory_limit=10 ** 5)
    assert residency == "disk" and "data.memory_limit (0.00 GB)" in why
    assert choose_residency("auto", 10 ** 15, cpu)[0] == "disk"  # a petabyte fits no free memory
    assert choose_residency("host", 10 ** 15, cpu) == ("host", "config data.residency is host")
    with pytest.raises(ValueError, match="data.residency must be auto or one of"):
        choose_residency("gpu", 1, cpu)


def rss_file_bytes() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssFile"].split()[0]) * 1024


def test_reading_through_the_memory_map_does_not_keep_the_pages_resident(tmp_path):
    """Every row of a 64 MiB file read in batches: released, the mapped pages do not add up in the process's
    resident set (they stay in the page cache); unreleased, they would."""
    np.save(tmp_path / "big.npy", np.ones((1 << 16, 1024), np.uint8))
    grown = {}
    for release in (True, False):
        array, before = open_array(tmp_path / "big.npy"), rss_file_bytes()
        for start in range(0, len(array), 4096):
            array.take(np.arange(start, start + 4096), release=release)
        grown[release] = rss_file_bytes() - before
    assert grown[True] < 4 * 2 ** 20 < 48 * 2 ** 20 < grown[False]


# The command line's main() in a process of its own, which prints its peak resident set (VmHWM) once training
# has stopped and written its state, then leaves without the interpreter's shutdown: there torch pages in
# 0.1 to 0.4 GB of its libraries' code, which is not training's memory.
MAIN_THEN_PEAK = """
import os, sys
from ssl_pipeline.__main__ import main
status = main(sys.argv[1:])
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")), file=sys.stderr, flush=True)
os._exit(status)
"""


def test_pretraining_on_4_times_its_memory_limit_stays_under_the_limit(tmp_path):
    """`python -m ssl_pipeline pretrain`'s main() with data.residency auto and data.memory_limit 1.25 GB, on a
    sharded array of 5.3 GB (4.2 times the limit): auto must choose the disk, and the process's peak resident
    set (VmHWM: anonymous memory, torch's libraries, and the mapped data pages it held at once) from its start
    until it has trained and written its state stays under the limit. The limit bounds the whole process,
    torch included (about 0.85 GB here), which is stricter than the arrays alone. It trains for 2 s, then
    SIGTERM stops it as a preemption would (an epoch is 6,750 steps). The 18 shards are hard links of one
    295 MB file, so that the test writes and hashes 295 MB, not 5.3 GB; the reader maps each shard as a file
    of its own. That reading many batches does not add up in the resident set is the test above."""
    limit, shards, images_per_shard = 1_250_000_000, 18, 24_000  # 3 x 64 x 64 uint8: 12,288 bytes each
    data = tmp_path / "data"
    (data / "shards/train_images").mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (images_per_shard, 3, 64, 64), dtype=np.uint8)
    first = data / "shards/train_images/00000.npy"
    np.save(first, images)
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    for number in range(1, shards):
        os.link(first, data / f"shards/train_images/{number:05d}.npy")
    (data / "train_images.index.json").write_text(json.dumps({
        "format": "ssl_pipeline.sharded_array", "version": 1, "dtype": "uint8",
        "shape": [shards * images_per_shard, 3, 64, 64],
        "shards": [{"file": f"shards/train_images/{n:05d}.npy", "count": images_per_shard, "sha256": digest}
                   for n in range(shards)]}))
    assert open_array(data / "train_images.index.json").nbytes > 4 * limit
    (data / "normalization.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.29] * 3,
                                                         "image_shape": [3, 64, 64]}))
    settings = {"pretrain": {**PRETRAIN, "processes": 1}, "model": MODEL, "compute": {**CPU, "compile": False}}
    log = tmp_path / "pretrain.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", MAIN_THEN_PEAK, "pretrain", "--train-images", str(data / "train_images.index.json"),
             "--normalization", str(data / "normalization.json"), "--settings", json.dumps(settings),
             "--threads", "1", "--resume-file", str(tmp_path / "resume.pt"), "--checkpoint-every", "60",
             "--stop-margin-seconds", "120", "--resume", "off", "--residency", "auto", "--memory-limit", str(limit),
             "--checkpoint", str(tmp_path / "encoder.pt"), "--curve", str(tmp_path / "curve.csv")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "pretraining simclr on" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75, log.read_text()  # stopped by SIGTERM, its state written
    text = log.read_text()
    assert "kept on disk (memory-mapped): 5.31 GB of images exceed" in text and "data.memory_limit (1.25 GB)" in text
    steps = int(text.split("stopped by SIGTERM at epoch 1, step ")[1].split()[0])
    peak = int(text.split("VmHWM:")[1].split()[0]) * 1024
    print(f"peak resident memory {peak / 1e9:.3f} GB after {steps} steps; limit {limit / 1e9:.2f} GB")
    assert steps >= 2 and peak < limit


def test_the_benchmark_drops_a_file_from_the_page_cache_and_reads_it_back(tmp_path):
    """The cold-cache figure of `python -m ssl_pipeline.benchmark residency` starts from a file that is really
    out of the page cache: mincore says so."""
    from ssl_pipeline.benchmark.residency import cached_share, drop_from_page_cache, warm_page_cache

    path = tmp_path / "images.npy"
    np.save(path, np.ones((2048, 4096), np.uint8))
    assert cached_share(path) > 0.9  # just written
    assert drop_from_page_cache(path) < 0.1
    assert warm_page_cache(path) > 0.9


def test_the_card_decides_between_a_sharded_and_a_single_array_left_side_by_side(tmp_path):
    """An earlier run in the other mode leaves its files in the same results/data: the mode that wrote the
    card last wins, so stale images are never read beside fresh labels."""
    from ssl_pipeline.core.arrays import split_images_path

    for name in ("train_images.npy", "train_images.index.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "card.json").write_text(json.dumps({"splits": {}}))
    assert split_images_path(tmp_path, "train") == tmp_path / "train_images.npy"
    (tmp_path / "card.json").write_text(json.dumps({"splits": {}, "shards": {"images_per_shard": 7}}))
    assert split_images_path(tmp_path, "train") == tmp_path / "train_images.index.json"
    (tmp_path / "train_images.index.json").unlink()
    assert split_images_path(tmp_path, "train") == tmp_path / "train_images.npy"


def test_a_sharded_array_fills_a_tensor_piece_by_piece_with_each_checksum_verified(tmp_path):
    """The device and host residencies fill one tensor from pieces of at most PIECE_BYTES (no second copy
    on the host), with every shard's checksum checked; a subset of rows comes out in its own order."""
    from ssl_pipeline.core.arrays import open_array

    images = np.random.default_rng(0).integers(0, 256, (23, 1, 4, 4), dtype=np.uint8)
    index = write_sharded(tmp_path / "train_images.index.json", images, [10, 10, 3])
    pieces = list(open_array(index).pieces(piece_bytes=4 * 16))
    assert [(start, len(piece)) for start, piece in pieces][:4] == [(0, 4), (4, 4), (8, 2), (10, 4)]
    assert np.array_equal(np.concatenate([piece for _, piece in pieces]), images)
    rows = np.array([22, 0, 11, 5])
    data = ImageData([index], "host", "cpu", rows=rows)
    assert torch.equal(data.tensor, torch.from_numpy(images[rows]))


def test_many_shards_raise_the_open_file_limit_or_fail_naming_the_array(tmp_path):
    """Every memory-mapped shard holds a file handle: under a soft limit of 64 open files, 100 shards
    raise it (towards the hard limit); under a hard limit of 64, the error names the array."""
    images = np.zeros((100, 1, 2, 2), dtype=np.uint8)
    index = write_sharded(tmp_path / "train_images.index.json", images, [1] * 100)
    script = ("import resource, sys; from ssl_pipeline.core.arrays import open_array, ArrayFileError\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if sys.argv[2] == 'hard' else hard))\n"
              "try:\n    print(len(open_array(sys.argv[1]).shards))\n"
              "except ArrayFileError as error:\n    print(error)\n")
    for kind, expected in (("soft", "100"), ("hard", "100 shards need as many open files, beyond this process's "
                                                      "hard limit of 64")):
        result = subprocess.run([sys.executable, "-c", script, str(index), kind], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert expected in result.stdout, result.stdout + result.stderr
        assert str(index) in result.stdout or kind == "soft"
