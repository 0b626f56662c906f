import json

import numpy as np
import pytest

from ssl_pipeline.datasets import DatasetFormatError
from ssl_pipeline.datasets.idx import encode_idx
from ssl_pipeline.stages.preprocess import (labeled_subset, preprocess, stratified_validation_split,
                                     write_label_subset)
from tests.conftest import write_synthetic_idx


def raw_paths(directory, files):
    return {role: directory / spec["name"] for role, spec in files.items()}


@pytest.fixture
def raw(tmp_path):
    directory = tmp_path / "raw"
    files = write_synthetic_idx(directory, num_classes=3, size=12, train_per_class=60, compress=False)
    return raw_paths(directory, files)


def test_splits_are_uint8_nchw_and_stratified(raw, tmp_path):
    card = preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=3)
    data = tmp_path / "data"
    train = np.load(data / "train_images.npy")
    val_labels = np.load(data / "val_labels.npy")
    assert train.dtype == np.uint8 and train.shape == (135, 1, 12, 12)
    assert card["image_shape"] == [1, 12, 12] and card["num_classes"] == 3
    assert card["splits"]["val"]["per_class"] == [15, 15, 15]
    assert card["splits"]["train"]["per_class"] == [45, 45, 45]
    assert np.bincount(val_labels).tolist() == [15, 15, 15]
    assert card["splits"]["test"]["count"] == 60


def test_validation_split_is_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    train_a, val_a = stratified_validation_split(labels, 4, 0.2, seed=0)
    train_b, val_b = stratified_validation_split(labels, 4, 0.2, seed=0)
    _, val_c = stratified_validation_split(labels, 4, 0.2, seed=1)
    assert not set(train_a) & set(val_a)
    assert len(train_a) + len(val_a) == 200
    np.testing.assert_array_equal(val_a, val_b)
    assert not np.array_equal(val_a, val_c)


def test_normalisation_uses_the_training_split_only(raw, tmp_path):
    preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=0)
    stats = json.loads((tmp_path / "data" / "normalization.json").read_text())
    train = np.load(tmp_path / "data" / "train_images.npy") / 255.0
    everything = np.concatenate([train, np.load(tmp_path / "data" / "val_images.npy") / 255.0])
    assert stats["mean"][0] == pytest.approx(train.mean())
    assert stats["std"][0] == pytest.approx(train.std())
    assert stats["mean"][0] != pytest.approx(everything.mean(), abs=1e-9)


def test_card_records_checksums_of_inputs_and_outputs(raw, tmp_path):
    card = preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=0)
    import hashlib

    assert card["raw_sha256"]["train_labels"] == hashlib.sha256(raw["train_labels"].read_bytes()).hexdigest()
    saved = (tmp_path / "data" / "test_images.npy").read_bytes()
    assert card["sha256"]["test_images.npy"] == hashlib.sha256(saved).hexdigest()
    assert json.loads((tmp_path / "data" / "card.json").read_text()) == card


def test_label_subsets_are_stratified_and_nested():
    labels = np.repeat(np.arange(5), 200)
    np.random.default_rng(0).shuffle(labels)
    previous = set()
    for fraction in (0.01, 0.1, 0.5, 1.0):
        subset = labeled_subset(labels, 5, fraction, seed=7)
        counts = np.bincount(labels[subset], minlength=5)
        assert counts.tolist() == [max(1, round(fraction * 200))] * 5
        assert previous <= set(subset.tolist())
        previous = set(subset.tolist())
    assert previous == set(range(1000))


def test_label_subsets_differ_between_seeds():
    labels = np.repeat(np.arange(3), 100)
    assert not np.array_equal(labeled_subset(labels, 3, 0.1, 0), labeled_subset(labels, 3, 0.1, 1))


def test_write_label_subset_reads_classes_from_the_card(raw, tmp_path):
    preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=0)
    out = tmp_path / "data" / "subsets" / "seed0" / "fraction0.2.npy"
    count = write_label_subset(tmp_path / "data" / "train_labels.npy", tmp_path / "data" / "card.json",
                               0.2, 0, out)
    assert count == 27 and len(np.load(out)) == 27
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        write_label_subset(tmp_path / "data" / "train_labels.npy", tmp_path / "data" / "card.json", 1.5, 0, out)


# ---- bad input: a clear error naming file and problem, nothing written ------------------------------

def break_file(raw, role, array):
    raw[role].write_bytes(encode_idx(array))


@pytest.mark.parametrize(
    "role, array, message",
    [
        ("train_labels", np.zeros(10, dtype=np.uint8), "holds 180 images but .* holds 10 labels"),
        ("test_labels", np.full(60, 7, dtype=np.uint8), "label 7 is out of range; .* classes 0..2"),
        ("train_images", np.zeros((180, 12), dtype=np.uint8), "must have 3 dimensions"),
        ("train_labels", np.zeros((180, 2), dtype=np.uint8), "must have 1 dimension"),
        ("test_images", np.zeros((60, 10, 10), dtype=np.uint8), r"images are \(1, 10, 10\)"),
        ("train_labels", np.repeat(np.array([0, 2], dtype=np.uint8), 90), r"classes \[1\] have no example"),
    ],
)
def test_inconsistent_files_are_rejected_before_anything_is_written(raw, tmp_path, role, array, message):
    break_file(raw, role, array)
    with pytest.raises(DatasetFormatError, match=message) as error:
        preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=0)
    assert str(raw[role]) in str(error.value)
    assert not (tmp_path / "data").exists()


def test_class_names_must_match_the_data(raw, tmp_path):
    with pytest.raises(ValueError, match="dataset.class_names lists 2 names, the data has 3 classes"):
        preprocess(raw, tmp_path / "data", "synthetic", 0.25, split_seed=0, class_names=["a", "b"])


def test_labels_stay_uint8_up_to_256_classes_and_widen_to_uint16_for_imagenets_1000():
    from ssl_pipeline.stages.preprocess import label_dtype

    assert label_dtype(10, "x") is np.uint8 and label_dtype(256, "x") is np.uint8
    assert label_dtype(257, "x") is np.uint16 and label_dtype(1000, "x") is np.uint16
    with pytest.raises(DatasetFormatError, match="train.tar: 70000 classes; labels are stored as uint16"):
        label_dtype(70000, "train.tar")
