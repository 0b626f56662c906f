"""The whole DAG on each dataset format, fetched over loopback HTTP: CIFAR-10 binary with colour images
and a ResNet-18 small-image stem, CIFAR-100 binary with coarse labels, STL-10 binary with its unlabeled
split, and the real Fashion-MNIST as PNG folders, whose results must equal the IDX run's."""
import gzip
import hashlib
import json

import numpy as np
import pytest
import yaml

from ssl_pipeline.datasets.idx import parse_idx
from tests.archives import cifar10_members, cifar100_members, image_folder_members, stl10_members, write_tar
from tests.conftest import DEBIAN_FASHION_MNIST, SMOKE, copy_workflow, snakemake, synthetic_images
from tests.test_workflow import assert_complete_report, read_summary

pytestmark = pytest.mark.workflow
# One fine-tuning fraction and seed: the point is the data path, not the label-efficiency curve.
SMALL = {"finetune": {"label_fractions": [1.0], "seeds": [0], "min_steps": 10, "batch_size": 16},
         "pretrain": {"batch_size": 16}, "data": {"validation_fraction": 0.25}}


def colour_images(labels, side, seed):
    """Learnable colour images: the synthetic bar pattern in a class-dependent mix of the channels."""
    grey = synthetic_images(labels, side, seed).astype(np.float32)
    weights = np.array([[1.0, 0.5, 0.2], [0.2, 1.0, 0.5], [0.5, 0.2, 1.0]])[labels % 3]  # (N, 3)
    return (grey[:, None] * weights[:, :, None, None]).astype(np.uint8)


def serve_archive(routes, directory, name, members, checksum="sha256") -> dict:
    """Write the archive, serve it at /data/<name>, and return its config spec."""
    path = directory / name
    write_tar(path, members)
    routes.table[f"/data/{name}"] = ("ok", path.read_bytes())
    return {"name": name, checksum: hashlib.new(checksum, path.read_bytes()).hexdigest()}


def merged(base: dict, override: dict) -> dict:
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def run_dag(tmp_path, url, dataset: dict, extra=None):
    workdir = copy_workflow(tmp_path / "workflow")
    override = merged(SMALL, {"dataset": {"mirrors": [f"{url}/data"], "class_names": [], **dataset}, **(extra or {})})
    (workdir / "format.yaml").write_text(yaml.safe_dump(override))
    snakemake(workdir, "--cores", "2", *SMOKE, "format.yaml")
    card = json.loads((workdir / "results" / "data" / "card.json").read_text())
    assert_complete_report(workdir, expected_runs=2, fractions=[1.0])
    return workdir, card


def test_cifar10_binary_with_colour_and_a_resnet18_small_stem(tmp_path, http_server):
    url, routes = http_server
    train_labels, test_labels = np.arange(80) % 10, np.arange(20) % 10
    members = cifar10_members((colour_images(train_labels, 32, 1), train_labels),
                              (colour_images(test_labels, 32, 2), test_labels), [f"class{i}" for i in range(10)])
    archive = serve_archive(routes, tmp_path, "cifar-10-binary.tar.gz", members, checksum="md5")
    workdir, card = run_dag(tmp_path, url, {"name": "cifar10-synthetic", "format": "cifar_binary", "archive": archive},
                            {"model": {"architecture": "resnet18", "small_images": True}})
    assert card["image_shape"] == [3, 32, 32] and card["num_classes"] == 10 and card["format"] == "cifar_binary"
    assert card["class_names"][:2] == ["class0", "class1"]
    log = (workdir / "results" / "logs" / "pretrain" / "simclr.log").read_text()
    assert "encoder resnet18 (small-image stem): 11,168,832 parameters, 512 features, 1.11 GFLOP per 3x32x32 image" in log
    assert routes.count("/data/cifar-10-binary.tar.gz") == 1


def test_cifar100_binary_with_coarse_labels(tmp_path, http_server):
    url, routes = http_server
    fine_train, fine_test = np.arange(48) % 6, np.arange(18) % 6
    members = cifar100_members((colour_images(fine_train, 32, 1), fine_train), (colour_images(fine_test, 32, 2), fine_test),
                               lambda fine: fine // 2, [f"fine{i}" for i in range(6)], ["c0", "c1", "c2"])
    archive = serve_archive(routes, tmp_path, "cifar-100-binary.tar.gz", members)
    _, card = run_dag(tmp_path, url, {"name": "cifar100-synthetic", "format": "cifar_binary", "archive": archive,
                                      "cifar_binary": {"labels": "coarse"}})
    assert card["num_classes"] == 3 and card["class_names"] == ["c0", "c1", "c2"]
    assert card["splits"]["test"]["per_class"] == [6, 6, 6]


def test_stl10_binary_pretrains_on_its_unlabeled_split_too(tmp_path, http_server):
    url, routes = http_server
    train_labels, test_labels = np.arange(40) % 10, np.arange(20) % 10
    unlabeled = colour_images(np.arange(50) % 10, 96, 3)
    members = stl10_members((colour_images(train_labels, 96, 1), train_labels),
                            (colour_images(test_labels, 96, 2), test_labels), unlabeled)
    archive = serve_archive(routes, tmp_path, "stl10_binary.tar.gz", members, checksum="md5")
    workdir, card = run_dag(tmp_path, url, {"name": "stl10-synthetic", "format": "stl10_binary", "archive": archive,
                                            "unlabeled": {"format": "stl10_binary"}})
    assert card["image_shape"] == [3, 96, 96] and card["unlabeled"]["count"] == 50
    assert card["splits"]["train"]["count"] == 30
    log = (workdir / "results" / "logs" / "pretrain" / "simclr.log").read_text()
    assert "adding 50 unlabeled images to the 30 training images" in log
    assert "pretraining simclr on 80 images" in log
    knn = json.loads((workdir / "results" / "evaluate" / "knn" / "simclr.json").read_text())
    assert knn["memory_bank_size"] == 30  # the labeled train split only, never the unlabeled images
    assert routes.count("/data/stl10_binary.tar.gz") == 1  # one archive serves both


def fashion_mnist_split(images_file, labels_file):
    images = parse_idx(gzip.decompress((DEBIAN_FASHION_MNIST / images_file).read_bytes()))
    labels = parse_idx(gzip.decompress((DEBIAN_FASHION_MNIST / labels_file).read_bytes()))
    return images[:, None], labels


def test_fashion_mnist_as_png_folders_gives_the_idx_run_results(tmp_path, http_server, real_smoke_run):
    """The real training and test images written as 70,000 PNGs in class folders: preprocessing gives
    byte-identical arrays, so the smoke DAG gives the IDX run's results to the last digit."""
    url, routes = http_server
    idx_workdir, _ = real_smoke_run
    train = fashion_mnist_split("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test = fashion_mnist_split("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    names = [f"{index}" for index in range(10)]
    archive = serve_archive(routes, tmp_path, "fashion-mnist-png.tar.gz",
                            image_folder_members({"train": train, "test": test}, names))
    workdir = copy_workflow(tmp_path / "workflow")
    override = {"dataset": {"format": "image_folder", "archive": archive, "mirrors": [f"{url}/data"]}}
    (workdir / "png.yaml").write_text(yaml.safe_dump(override))
    snakemake(workdir, "--cores", "2", *SMOKE, "png.yaml")
    for name in ["train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy", "test_images.npy",
                 "test_labels.npy", "normalization.json"]:
        assert (workdir / "results" / "data" / name).read_bytes() == \
            (idx_workdir / "results" / "data" / name).read_bytes(), name
    key = lambda row: (row["init"], row["label_fraction"], row["seed"])
    ours, theirs = sorted(read_summary(workdir), key=key), sorted(read_summary(idx_workdir), key=key)
    assert [(key(row), row["test_accuracy"]) for row in ours] == [(key(row), row["test_accuracy"]) for row in theirs]
