"""The whole DAG of each ready-made experiment (config/experiments/{cifar10,cifar100,stl10,mnist}.yaml) on
a small synthetic archive in exactly its format, served over loopback HTTP at smoke size: colour images
and a ResNet-18 small-image stem, CIFAR-100's coarse labels, STL-10's unlabeled split, MNIST's md5s;
and the real Fashion-MNIST as PNG folders, whose results must equal the IDX run's."""
import gzip
import hashlib
import json

import numpy as np
import pytest
import yaml

from ssl_pipeline.datasets.idx import encode_idx, parse_idx
from tests.archives import cifar10_members, cifar100_members, image_folder_members, stl10_members, write_tar
from tests.conftest import DEBIAN_FASHION_MNIST, REPO, SMOKE, copy_workflow, snakemake, synthetic_images
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


def run_experiment(tmp_path, url, name: str, dataset: dict):
    """The experiment file's whole DAG at smoke size, its mirrors pointed at the loopback server and its
    checksums at the synthetic files."""
    workdir = copy_workflow(tmp_path / "workflow")
    override = merged(SMALL, {"dataset": {"mirrors": [f"{url}/data"], **dataset}})
    (workdir / "format.yaml").write_text(yaml.safe_dump(override))
    snakemake(workdir, "--cores", "2", "--configfile", f"config/experiments/{name}.yaml",
              "config/experiments/smoke.yaml", "format.yaml")
    card = json.loads((workdir / "results" / "data" / "card.json").read_text())
    assert_complete_report(workdir, expected_runs=2, fractions=[1.0])
    return workdir, card


def experiment(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / "experiments" / f"{name}.yaml").read_text())


def archive_of(name: str, routes, directory, members) -> dict:
    """The experiment's archive, in its format and under its name, with the synthetic file's md5."""
    spec = experiment(name)["dataset"]["archive"]
    return {"archive": serve_archive(routes, directory, spec["name"], members, checksum="md5")}


def test_cifar10_experiment_with_colour_and_a_resnet18_small_stem(tmp_path, http_server):
    url, routes = http_server
    train_labels, test_labels = np.arange(80) % 10, np.arange(20) % 10
    members = cifar10_members((colour_images(train_labels, 32, 1), train_labels),
                              (colour_images(test_labels, 32, 2), test_labels), [f"class{i}" for i in range(10)])
    workdir, card = run_experiment(tmp_path, url, "cifar10", archive_of("cifar10", routes, tmp_path, members))
    assert card["image_shape"] == [3, 32, 32] and card["num_classes"] == 10 and card["format"] == "cifar_binary"
    assert card["class_names"][:2] == ["class0", "class1"]
    log = (workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log").read_text()
    assert "encoder resnet18 (small-image stem): 11,168,832 parameters, 512 features, 1.11 GFLOP per 3x32x32 image" in log
    assert routes.count("/data/cifar-10-binary.tar.gz") == 1


def test_cifar100_experiment_with_coarse_labels(tmp_path, http_server):
    url, routes = http_server
    fine_train, fine_test = (np.arange(60) % 20) * 5, (np.arange(40) % 20) * 5  # every coarse class, few images
    members = cifar100_members((colour_images(fine_train, 32, 1), fine_train), (colour_images(fine_test, 32, 2), fine_test),
                               lambda fine: fine // 5, [f"fine{i}" for i in range(100)], [f"c{i}" for i in range(20)])
    dataset = {**archive_of("cifar100", routes, tmp_path, members), "cifar_binary": {"labels": "coarse"}}
    _, card = run_experiment(tmp_path, url, "cifar100", dataset)
    assert card["num_classes"] == 20 and card["class_names"] == [f"c{i}" for i in range(20)]
    assert card["splits"]["test"]["per_class"] == [2] * 20


def test_stl10_experiment_pretrains_on_its_unlabeled_split_too(tmp_path, http_server):
    url, routes = http_server
    train_labels, test_labels = np.arange(40) % 10, np.arange(20) % 10
    unlabeled = colour_images(np.arange(50) % 10, 96, 3)
    members = stl10_members((colour_images(train_labels, 96, 1), train_labels),
                            (colour_images(test_labels, 96, 2), test_labels), unlabeled)
    workdir, card = run_experiment(tmp_path, url, "stl10", archive_of("stl10", routes, tmp_path, members))
    assert card["image_shape"] == [3, 96, 96] and card["unlabeled"]["count"] == 50
    assert card["splits"]["train"]["count"] == 30
    log = (workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log").read_text()
    assert "adding 50 unlabeled images to the 30 training images" in log
    assert "pretraining simclr on 80 images" in log
    knn = json.loads((workdir / "results" / "evaluate" / "knn" / "simclr" / "base" / "seed0.json").read_text())
    assert knn["memory_bank_size"] == 30  # the labeled train split only, never the unlabeled images
    assert routes.count("/data/stl10_binary.tar.gz") == 1  # one archive serves both


def test_mnist_experiment_checks_the_gz_files_by_md5(tmp_path, http_server):
    url, routes = http_server
    files = {}
    for role, spec in experiment("mnist")["dataset"]["files"].items():
        labels = np.arange(100 if role.startswith("train") else 40) % 10
        array = labels.astype(np.uint8) if role.endswith("labels") else synthetic_images(labels, 12, seed=len(role))
        compressed = gzip.compress(encode_idx(array), mtime=0)
        routes.table[f"/data/{spec['name']}.gz"] = ("ok", compressed)
        files[role] = {"name": spec["name"], "md5": hashlib.md5(compressed).hexdigest()}
    workdir, card = run_experiment(tmp_path, url, "mnist", {"files": files})
    assert card["num_classes"] == 10 and card["class_names"][3] == "3"
    log = (workdir / "results" / "logs" / "download.log").read_text()
    assert f"(md5 {files['train_images']['md5']})" in log


def fashion_mnist_split(images_file, labels_file):
    images = parse_idx(gzip.decompress((DEBIAN_FASHION_MNIST / images_file).read_bytes()))
    labels = parse_idx(gzip.decompress((DEBIAN_FASHION_MNIST / labels_file).read_bytes()))
    return images[:, None], labels


def test_fashion_mnist_as_png_folders_gives_the_idx_run_results(tmp_path, http_server, real_smoke_run):
    """The real training and test images written as 70,000 PNGs in class folders: preprocessing gives
    byte-identical arrays, so the smoke DAG gives the IDX run's results to the last digit. Over 60 s (118 s
    in the clean-clone CI run, 2-core AMD EPYC, 2026-12-02): 70,000 PNGs are encoded, served and decoded, then the
    whole smoke DAG runs, as issue 9
    asks ("the smoke DAG on Fashion-MNIST as PNG folders equals the IDX run")."""
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
