"""Preprocessing in shards (config preprocess.shard_images): real Snakemake runs on a small synthetic PNG
archive served over loopback HTTP give the unsharded run's arrays byte for byte; each shard is its own DVC
output, so a changed image moves its shard alone; bad shards and bad images fail with the file named and
nothing written after them."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssl_pipeline.core.arrays import open_array
from ssl_pipeline.datasets import DatasetFormatError
from ssl_pipeline.stages.preprocess import normalization_statistics, preprocess
from ssl_pipeline.stages.preprocess_shards import (chunk_sums, combined_statistics, images_per_shard, plan_shards,
                                                   write_indexes, write_shard)
from ssl_pipeline.tools.preprocess_benchmark import shard_rates
from ssl_pipeline.tools.versioning import VersioningError, build_dvc_yaml
from tests.archives import image_folder_members, png_bytes, write_tar
from tests.conftest import REPO, SMOKE, copy_workflow, snakemake, synthetic_images, write_synthetic_idx
from tests.test_dvc import VERSIONED_PARTS, dvc, run, versioning

SPLITS = ("train", "val", "test", "unlabeled")
CLASSES = ["a", "b", "c"]
# 45 training images (36 train, 9 val), 16 test, 10 unlabeled; 7 per shard leaves every last shard short.
SHARD = 7


def synthetic_members(changed_train_image=None, corrupt_train_image=None) -> dict:
    train_labels, test_labels = np.arange(45) % 3, np.arange(16) % 3
    train = synthetic_images(train_labels, 8, seed=1)[:, None]
    if changed_train_image is not None:
        train[changed_train_image] = 255 - train[changed_train_image]
    members = image_folder_members({"train": (train, train_labels),
                                    "test": (synthetic_images(test_labels, 8, seed=2)[:, None], test_labels)}, CLASSES)
    for index, image in enumerate(synthetic_images(np.arange(10) % 3, 8, seed=3)[:, None]):
        members[f"pool/{index:03d}.png"] = png_bytes(image)
    if corrupt_train_image is not None:
        members[f"train/{CLASSES[corrupt_train_image % 3]}/{corrupt_train_image:06d}.png"] = b"\x89PNG not an image"
    return members


def dataset_config(routes, directory: Path, name: str, members: dict) -> dict:
    """The config's dataset section for the archive, served at /data/<name>, with its unlabeled pool."""
    path = directory / name
    write_tar(path, members)
    routes.table[f"/data/{name}"] = ("ok", path.read_bytes())
    archive = {"name": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"name": "synthetic", "format": "image_folder", "class_names": [], "archive": archive,
            "unlabeled": {"format": "image_folder", "archive": archive, "root": "pool"}}


def workflow_with(tmp_path: Path, name: str, url: str, dataset: dict, shard_images) -> Path:
    workdir = copy_workflow(tmp_path / name)
    config = {"dataset": {**dataset, "mirrors": [f"{url}/data"]}, "data": {"validation_fraction": 0.2},
              "preprocess": {"shard_images": shard_images}}
    (workdir / "data.yaml").write_text(yaml.safe_dump(config))
    return workdir


def preprocess_with_snakemake(workdir: Path, check=True):
    return snakemake(workdir, "--cores", "2", *SMOKE, "data.yaml", "--", "results/data/card.json", check=check)


def logical_array(index_path: Path) -> np.ndarray:
    """A sharded array read independently of the project's reader: the index's shards, checked, in order."""
    index = json.loads(index_path.read_text())
    assert {key: index[key] for key in ("format", "version", "dtype")} == {
        "format": "ssl_pipeline.sharded_array", "version": 1, "dtype": "uint8"}
    parts = []
    for shard in index["shards"]:
        path = index_path.parent / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"], path
        parts.append(np.load(path))
        assert len(parts[-1]) == shard["count"], path
    array = np.concatenate(parts) if parts else np.zeros(index["shape"], dtype=np.uint8)
    assert list(array.shape) == index["shape"] and array.dtype == np.uint8
    return array


# ---------------------------------------------------------------------------------------------------
# Sharded = unsharded, through Snakemake
# ---------------------------------------------------------------------------------------------------

@pytest.mark.workflow
def test_sharded_preprocessing_gives_the_unsharded_arrays_byte_for_byte(tmp_path, http_server):
    """Two real runs of the preprocessing rules (about 10 s on 2 cores): one job, then 7 images per shard
    (6 + 2 + 3 + 2 shard jobs, each split's last one short)."""
    url, routes = http_server
    dataset = dataset_config(routes, tmp_path, "synthetic.tar.gz", synthetic_members())
    single = workflow_with(tmp_path, "single", url, dataset, None)
    sharded = workflow_with(tmp_path, "sharded", url, dataset, SHARD)
    preprocess_with_snakemake(single)
    preprocess_with_snakemake(sharded)
    one, many = single / "results" / "data", sharded / "results" / "data"

    for split in SPLITS:
        expected = np.load(one / f"{split}_images.npy")
        assert logical_array(many / f"{split}_images.index.json").tobytes() == expected.tobytes(), split
        assert not (many / f"{split}_images.npy").exists()
    for split in ("train", "val", "test"):
        assert (many / f"{split}_labels.npy").read_bytes() == (one / f"{split}_labels.npy").read_bytes(), split
    index = json.loads((many / "train_images.index.json").read_text())
    assert [shard["count"] for shard in index["shards"]] == [7, 7, 7, 7, 7, 1]
    assert index["shards"][1]["file"] == "shards/train_images/00001.npy"

    card_one, card_many = (json.loads((d / "card.json").read_text()) for d in (one, many))
    for key in ("splits", "num_classes", "class_names", "unlabeled", "validation", "raw_sha256", "image_shape"):
        assert card_many[key] == card_one[key], key
    assert card_many["shards"] == {"images_per_shard": 7, "count": {"train": 6, "val": 2, "test": 3, "unlabeled": 2}}
    norm_one, norm_many = (json.loads((d / "normalization.json").read_text()) for d in (one, many))
    assert norm_many["image_shape"] == norm_one["image_shape"] == [1, 8, 8]
    assert norm_many["mean"] == pytest.approx(norm_one["mean"], rel=1e-12)
    assert norm_many["std"] == pytest.approx(norm_one["std"], rel=1e-12)

    log = (sharded / "results" / "logs" / "preprocess_shard" / "train" / "00005.log").read_text()
    assert "shard train 00005: decoded 1 images in" in log and "images/s" in log
    rates = shard_rates(sharded)  # what `make bench-preprocess` reads off the logs
    assert len(rates) == 13 and rates["test/00002"]["images"] == 2 and rates["val/00000"]["images_per_second"] > 0
    # The rules downstream read the index files.
    plan = snakemake(sharded, "-n", "-p", "--cores", "1", *SMOKE, "data.yaml").stdout
    assert "--train-images results/data/train_images.index.json" in plan
    assert "--unlabeled-images results/data/unlabeled_images.index.json" in plan


@pytest.mark.workflow
def test_a_corrupt_image_fails_its_shard_naming_archive_and_member_and_writes_no_index(tmp_path, http_server):
    url, routes = http_server
    dataset = dataset_config(routes, tmp_path, "synthetic.tar.gz", synthetic_members(corrupt_train_image=44))
    workdir = workflow_with(tmp_path, "workflow", url, dataset, SHARD)
    result = preprocess_with_snakemake(workdir, check=False)
    assert result.returncode != 0
    data = workdir / "results" / "data"
    log = (workdir / "results" / "logs" / "preprocess_shard" / "train" / "00005.log").read_text()
    assert "synthetic.tar.gz: member 'train/c/000044.png' does not decode as an image" in log
    assert not (data / "shards" / "train_images" / "00005.npy").exists()
    assert not list(data.glob("*.index.json")) and not (data / "card.json").exists()


# ---------------------------------------------------------------------------------------------------
# The stage functions: the generic fallback (IDX), normalisation, bad shards
# ---------------------------------------------------------------------------------------------------

def sharded_idx(tmp_path, shard_images=50):
    raw_dir = tmp_path / "raw"
    files = write_synthetic_idx(raw_dir, num_classes=3, size=10, train_per_class=40, compress=False)
    raw = {role: raw_dir / spec["name"] for role, spec in files.items()}
    data = tmp_path / "sharded"
    plan = plan_shards(raw, data, "synthetic", 0.25, 0, shard_images, data_format="idx")
    for split, entry in plan["splits"].items():
        for number in range(len(entry["files"])):
            write_shard(raw, data, split, f"{number:05d}", "idx")
    return raw, data, plan


def test_a_format_without_index_and_decode_shards_through_the_fallback(tmp_path):
    raw, data, plan = sharded_idx(tmp_path)
    card = write_indexes(data)
    preprocess(raw, tmp_path / "single", "synthetic", 0.25, 0)
    for split in ("train", "val", "test"):
        assert logical_array(data / f"{split}_images.index.json").tobytes() == \
            np.load(tmp_path / "single" / f"{split}_images.npy").tobytes()
    assert plan["splits"]["train"]["files"] == [f"shards/train_images/{k:05d}.npy" for k in range(2)]
    assert json.loads((data / "unlabeled_images.index.json").read_text())["shape"] == [0, 1, 10, 10]
    assert card["splits"]["train"]["count"] == 90
    # The training stages' reader agrees: checksums, and the same rows.
    for split in SPLITS:
        array = open_array(data / f"{split}_images.index.json")
        array.verify()
        assert array.load().tobytes() == logical_array(data / f"{split}_images.index.json").tobytes()


def test_normalisation_of_whole_chunks_is_exactly_the_unsharded_one():
    images = np.random.default_rng(0).integers(0, 256, (37, 3, 5, 5), dtype=np.uint8)
    expected = normalization_statistics(images, chunk=4)

    def sharded(per_shard):
        pieces = [piece for start in range(0, len(images), per_shard)
                  for piece in chunk_sums(images[start:start + per_shard], start, chunk=4)]
        return combined_statistics(pieces, len(images), images.shape[1:])

    assert sharded(8) == expected  # shards of whole chunks: the same additions in the same order
    cut = sharded(6)
    assert cut["mean"] == pytest.approx(expected["mean"], rel=1e-12) and cut["std"] == pytest.approx(expected["std"])


def test_auto_takes_about_a_gibibyte_per_shard_in_whole_chunks():
    assert images_per_shard("auto", (3, 224, 224)) == 4096  # 7,133 images of 150,528 bytes, down to whole chunks
    assert images_per_shard("auto", (3, 32, 32)) == 348160  # 349,525 down to a multiple of 4,096
    assert images_per_shard(500, (1, 28, 28)) == 500


@pytest.mark.parametrize("damage, message", [
    ("truncate", "shard is truncated or damaged"),
    ("reshape", r"holds uint8 \(50, 1, 10, 9\) .* say uint8 \(50, 1, 10, 10\)"),
])
def test_a_shard_that_disagrees_with_its_statistics_fails_the_index_and_writes_nothing(tmp_path, damage, message):
    _, data, _ = sharded_idx(tmp_path)
    shard = data / "shards" / "train_images" / "00000.npy"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        np.save(shard, np.load(shard)[:, :, :, :9])
    with pytest.raises(DatasetFormatError, match=message) as error:
        write_indexes(data)
    assert str(shard) in str(error.value)
    assert not list(data.glob("*.index.json")) and not (data / "card.json").exists()
    assert not (data / "normalization.json").exists()


def test_images_of_another_size_in_another_shard_fail_the_index_with_the_fix(tmp_path):
    """Each shard job sees its own images only: the index job compares the shards' sizes."""
    train_labels, test_labels = np.arange(12) % 3, np.arange(6) % 3
    members = image_folder_members({"train": (synthetic_images(train_labels, 8, 1)[:, None], train_labels),
                                    "test": (synthetic_images(test_labels, 9, 2)[:, None], test_labels)}, CLASSES)
    archive = tmp_path / "sizes.tar.gz"
    write_tar(archive, members)
    raw, options = {"archive": archive}, {"train_root": "train", "test_root": "test", "mode": "L", "convert": False}
    data = tmp_path / "data"
    plan = plan_shards(raw, data, "sizes", 0.25, 0, 4, data_format="image_folder", options=options)
    for split, entry in plan["splits"].items():
        for number in range(len(entry["files"])):
            write_shard(raw, data, split, f"{number:05d}", "image_folder", options)
    with pytest.raises(DatasetFormatError, match=r"shard shards/test_images/00000.npy are \(1, 9, 9\) \(C, H, W\), "
                                                 r"those of shards/train_images/00000.npy \(1, 8, 8\); set config key "
                                                 "dataset.image_folder.image_size") as error:
        write_indexes(data)
    assert f"{archive}: test" in str(error.value)
    assert not list(data.glob("*.index.json"))


# ---------------------------------------------------------------------------------------------------
# DVC: one stage per shard
# ---------------------------------------------------------------------------------------------------

def test_dvc_yaml_needs_the_plan_and_says_how_to_make_it(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "data.yaml").write_text(yaml.safe_dump({"preprocess": {"shard_images": 1000}}))
    with pytest.raises(VersioningError, match=r"checkpoint preprocess_plan .* run `snakemake --cores 1 --configfile "
                                              r"config/experiments/smoke.yaml --configfile data.yaml -- "
                                              r"results/data/train_labels.npy"):
        build_dvc_yaml(workdir, [SMOKE[1], "data.yaml"])


def locked_md5s(workdir: Path) -> dict:
    stages = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


@pytest.mark.workflow
def test_dvc_versions_each_shard_so_a_changed_image_moves_its_shard_alone(tmp_path, http_server):
    """Real Snakemake, git and DVC (25 to 40 s on 2 shared cores: three runs of the preprocessing rules): dvc.yaml has a stage per shard; after one training image
    changes, the shards' recorded checksums differ in that image's shard only."""
    url, routes = http_server
    dataset = dataset_config(routes, tmp_path, "synthetic.tar.gz", synthetic_members())
    workdir = workflow_with(tmp_path, "repo", url, dataset, 12)  # train 3 shards, val 1, test 2, unlabeled 1
    for part in VERSIONED_PARTS:
        (workdir / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / part, workdir / part)
    run("git", "init", "-q", cwd=workdir)
    preprocess_with_snakemake(workdir)
    versioning("dvc-yaml", *SMOKE, "--configfile", "data.yaml", cwd=workdir)
    stages = yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"]
    assert set(stages["preprocess_shard"]["foreach"]) == {"train-00000", "train-00001", "train-00002", "val-00000",
                                                          "test-00000", "test-00001", "unlabeled-00000"}
    assert stages["preprocess_shard"]["do"]["outs"] == ["results/data/shards/${item.split}_images/${item.shard}.npy",
                                                        "results/data/shards/${item.split}_images/${item.shard}.json"]
    assert "results/data/shards/train_images/00002.npy" in stages["preprocess_index"]["deps"]
    preprocessing = ["download", "preprocess_plan", "preprocess_shard", "preprocess_index"]
    dvc("commit", "--force", "--quiet", *preprocessing, cwd=workdir)
    before = locked_md5s(workdir)
    assert "Data and pipelines are up to date" in dvc("status", *preprocessing, cwd=workdir).stdout

    # The first image of the train split, raw position positions["train"][0], is in train shard 00000.
    first = int(np.load(workdir / "results" / "data" / "shards" / "positions.npz")["train"][0])
    changed = dataset_config(routes, tmp_path, "synthetic.tar.gz", synthetic_members(changed_train_image=first))
    config = yaml.safe_load((workdir / "data.yaml").read_text())
    config["dataset"] = {**changed, "mirrors": config["dataset"]["mirrors"]}
    (workdir / "data.yaml").write_text(yaml.safe_dump(config))
    # A first run fetches the new archive and stops there: the raw files are ancient inputs, and Snakemake
    # compares no params of a job after one that reruns (rule preprocess behaves the same way). The second
    # reruns the plan for its changed params; its plan.json names the archive's new sha256, so every shard
    # job reruns, and each writes the same bytes unless its images changed.
    preprocess_with_snakemake(workdir)
    assert preprocess_with_snakemake(workdir).stderr.count("(Rule: preprocess_shard)") == 7
    versioning("dvc-yaml", *SMOKE, "--configfile", "data.yaml", cwd=workdir)
    dvc("commit", "--force", "--quiet", *preprocessing, cwd=workdir)
    after = locked_md5s(workdir)
    shards = [path for path in after if Path(path).parent.parent == Path("results/data/shards")]
    assert len(shards) == 2 * 7 and set(shards) == {path for path in before if path in shards}
    moved = {path for path in shards if after[path] != before[path]}
    assert moved == {"results/data/shards/train_images/00000.npy", "results/data/shards/train_images/00000.json"}
