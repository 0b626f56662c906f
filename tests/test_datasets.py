"""Dataset formats: each reader on a small archive in the published layout, the same arrays whatever the
format, and bad input rejected with the archive and member named and nothing written."""
import tarfile

import numpy as np
import pytest

from ssl_pipeline.datasets import DatasetFormatError, read_dataset, read_unlabeled
from ssl_pipeline.datasets.archive import ArchiveError, Limits, read_members
from ssl_pipeline.datasets.idx import encode_idx
from ssl_pipeline.stages.preprocess import preprocess
from ssl_pipeline.core.raw_files import RawFilesError, raw_paths
from tests.archives import (cifar10_members, cifar100_members, image_folder_members, png_bytes, stl10_members,
                            write_tar, write_zip)

FOLDER = {"train_root": "train", "test_root": "test", "mode": "L", "convert": False, "image_size": None}
NAMES = ["ant", "bee", "cat"]


def images(count, channels, side, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, channels, side, side), dtype=np.uint8)


def labels(count, classes=3):
    return np.arange(count) % classes


# ---- each format reads what was written ------------------------------------------------------------

def test_cifar10_binary_reads_images_labels_and_names(tmp_path):
    train, test = (images(10, 3, 32), labels(10)), (images(4, 3, 32, seed=1), labels(4))
    write_tar(tmp_path / "c10.tar.gz", cifar10_members(train, test, NAMES))
    data = read_dataset("cifar_binary", {"archive": tmp_path / "c10.tar.gz"}, {})
    assert np.array_equal(data.train_images, train[0]) and np.array_equal(data.train_labels, train[1])
    assert np.array_equal(data.test_images, test[0]) and np.array_equal(data.test_labels, test[1])
    assert data.class_names == NAMES


@pytest.mark.parametrize("which", ["fine", "coarse"])
def test_cifar100_binary_reads_fine_or_coarse_labels(tmp_path, which):
    train, test = (images(8, 3, 32), labels(8, 4)), (images(4, 3, 32, seed=1), labels(4, 4))
    write_tar(tmp_path / "c100.tar.gz", cifar100_members(train, test, lambda fine: fine // 2, ["a", "b", "c", "d"],
                                                         ["ab", "cd"]))
    data = read_dataset("cifar_binary", {"archive": tmp_path / "c100.tar.gz"}, {"labels": which})
    expected = train[1] if which == "fine" else train[1] // 2
    assert np.array_equal(data.train_labels, expected) and np.array_equal(data.train_images, train[0])
    assert data.class_names == (["a", "b", "c", "d"] if which == "fine" else ["ab", "cd"])


def test_stl10_binary_turns_column_major_images_and_reads_the_unlabeled_split(tmp_path):
    train, test, unlabeled = (images(3, 3, 96), labels(3)), (images(3, 3, 96, seed=1), labels(3)), images(5, 3, 96, 2)
    write_tar(tmp_path / "stl.tar.gz", stl10_members(train, test, unlabeled, NAMES))
    paths = {"archive": tmp_path / "stl.tar.gz"}
    data = read_dataset("stl10_binary", paths, {})
    assert np.array_equal(data.train_images, train[0]) and np.array_equal(data.test_labels, test[1])
    assert np.array_equal(read_unlabeled("stl10_binary", paths, {}), unlabeled)


@pytest.mark.parametrize("writer", [write_tar, write_zip])
def test_image_folders_give_the_arrays_they_were_made_from(tmp_path, writer):
    train, test = (images(9, 1, 8), labels(9)), (images(6, 1, 8, seed=1), labels(6))
    archive = tmp_path / "folders.archive"
    writer(archive, image_folder_members({"train": train, "test": test}, NAMES))
    data = read_dataset("image_folder", {"archive": archive}, FOLDER)
    assert np.array_equal(data.train_images, train[0]) and np.array_equal(data.train_labels, train[1])
    assert np.array_equal(data.test_images, test[0]) and data.class_names == NAMES


def test_idx_and_png_folders_of_the_same_images_preprocess_to_identical_bytes(tmp_path):
    train, test = (images(60, 1, 10), labels(60)), (images(15, 1, 10, seed=1), labels(15))
    raw = {}
    for role, array in {"train_images": train[0][:, 0], "train_labels": train[1].astype(np.uint8),
                        "test_images": test[0][:, 0], "test_labels": test[1].astype(np.uint8)}.items():
        raw[role] = tmp_path / role
        raw[role].write_bytes(encode_idx(array))
    write_tar(tmp_path / "png.tar.gz", image_folder_members({"train": train, "test": test}, NAMES))
    preprocess(raw, tmp_path / "idx", "same", 0.2, split_seed=0)
    preprocess({"archive": tmp_path / "png.tar.gz"}, tmp_path / "png", "same", 0.2, 0, None, "image_folder", FOLDER)
    for name in ["train_images.npy", "train_labels.npy", "val_images.npy", "test_images.npy", "test_labels.npy",
                 "unlabeled_images.npy", "normalization.json"]:
        assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "png" / name).read_bytes(), name


def test_files_that_are_not_images_make_no_class(tmp_path):
    members = {**good_folders(), "train/.DS_Store": b"junk", "train/labels.csv": b"a,b", "train/ant/notes.txt": b"x"}
    write_tar(tmp_path / "extra.tar.gz", members)
    data = read_dataset("image_folder", {"archive": tmp_path / "extra.tar.gz"}, FOLDER)
    assert data.class_names == NAMES and len(data.train_images) == 6


def test_an_unlabeled_source_without_files_must_be_stl10():
    dataset = {"format": "image_folder", "archive": {"name": "a.zip", "md5": "0" * 32},
               "unlabeled": {"format": "image_folder"}}
    with pytest.raises(RawFilesError, match="only STL-10 .* has an unlabeled split in the dataset's own archive"):
        raw_paths(dataset, "results/raw")


def test_image_size_resizes_only_the_images_of_another_size(tmp_path):
    small, exact = images(1, 3, 12), images(1, 3, 8, seed=1)
    members = {"train/a/0.png": png_bytes(small[0]), "train/a/1.png": png_bytes(exact[0]),
               "test/a/0.png": png_bytes(exact[0])}
    write_tar(tmp_path / "sizes.tar.gz", members)
    options = {**FOLDER, "mode": "RGB", "image_size": [8, 8]}
    data = read_dataset("image_folder", {"archive": tmp_path / "sizes.tar.gz"}, options)
    assert data.train_images.shape == (2, 3, 8, 8)
    assert np.array_equal(data.train_images[1], exact[0])  # the right size already: untouched


def test_unlabeled_image_folder_needs_no_class_folders(tmp_path):
    pool = images(4, 1, 8)
    write_zip(tmp_path / "pool.zip", {f"pool/deep/{i}.png": png_bytes(image) for i, image in enumerate(pool)})
    found = read_unlabeled("image_folder", {"archive": tmp_path / "pool.zip"}, {**FOLDER, "root": "pool"})
    assert np.array_equal(found, pool)


# ---- bad input ---------------------------------------------------------------------------------------

def good_folders():
    return image_folder_members({"train": (images(6, 1, 8), labels(6)), "test": (images(3, 1, 8), labels(3))}, NAMES)


def symlink_tar(path):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("train/ant/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)


def broken_archive(case, path):
    members = good_folders()
    if case == "dotdot":
        members["train/../../escape.png"] = members["train/ant/000000.png"]
    elif case == "absolute":
        members["/tmp/absolute.png"] = members["train/ant/000000.png"]
    elif case == "symlink":
        return symlink_tar(path)
    elif case == "empty class":
        members["train/dog"] = None
    elif case == "test class missing from train":
        members["test/dog/0.png"] = members["test/ant/000000.png"]
    elif case == "undecodable":
        members["train/bee/000001.png"] = b"not a png at all"
    elif case == "mixed sizes":
        members["train/bee/000001.png"] = png_bytes(images(1, 1, 9)[0])
    elif case == "rgb given to a grayscale config":
        members["train/bee/000001.png"] = png_bytes(images(1, 3, 8)[0])
    write_tar(path, members)


BAD = {
    "dotdot": r"member 'train/../../escape.png' contains '..'",
    "absolute": r"member '/tmp/absolute.png' has an absolute path",
    "symlink": r"member 'train/ant/link.png' is a link \(to '/etc/passwd'\)",
    "empty class": r"class folder train/dog holds no PNG or JPEG image",
    "test class missing from train": r"test classes \['dog'\] .* missing from the training classes",
    "undecodable": r"member 'train/bee/000001.png' does not decode as an image",
    "mixed sizes": r"member 'train/bee/000001.png' is 9x9 pixels, but .* set config key dataset.image_folder.image_size",
    "rgb given to a grayscale config": r"member 'train/bee/000001.png' has mode RGB, but config key dataset.image_folder.mode is L",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archives_are_named_and_leave_nothing_behind(tmp_path, case):
    archive = tmp_path / "bad.tar.gz"
    broken_archive(case, archive)
    with pytest.raises((DatasetFormatError, ArchiveError), match=BAD[case]) as error:
        preprocess({"archive": archive}, tmp_path / "data", "bad", 0.2, 0, None, "image_folder", FOLDER)
    assert str(archive) in str(error.value)
    assert not (tmp_path / "data").exists()


def test_an_archive_that_expands_past_the_limit_is_stopped_at_the_member_that_crosses_it(tmp_path):
    write_tar(tmp_path / "big.tar.gz", {"a.bin": b"\0" * 600, "b.bin": b"\0" * 600})
    with pytest.raises(ArchiveError, match=r"expands past the limit of 1,000 bytes at member 'b.bin'"):
        list(read_members(tmp_path / "big.tar.gz", limits=Limits(member_bytes=800, total_bytes=1000)))
    with pytest.raises(ArchiveError, match=r"member 'a.bin' is 600 bytes, over the limit of 500 per member"):
        list(read_members(tmp_path / "big.tar.gz", limits=Limits(member_bytes=500)))


def test_a_truncated_cifar_record_is_named(tmp_path):
    members = cifar10_members((images(10, 3, 32), labels(10)), (images(2, 3, 32), labels(2)))
    members["cifar-10-batches-bin/data_batch_3.bin"] = members["cifar-10-batches-bin/data_batch_3.bin"][:-7]
    write_tar(tmp_path / "c10.tar.gz", members)
    with pytest.raises(DatasetFormatError, match=r"member 'cifar-10-batches-bin/data_batch_3.bin' is 6,139 bytes, "
                                                 r"not a whole number of 3,073-byte records"):
        preprocess({"archive": tmp_path / "c10.tar.gz"}, tmp_path / "data", "c10", 0.2, 0, None, "cifar_binary", {})
    assert not (tmp_path / "data").exists()
