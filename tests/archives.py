"""Small archives in the published formats (CIFAR binary, STL-10 binary, image folders, ILSVRC2012), built
from given arrays, for tests that cannot reach the real ones."""
import io
import tarfile
import zipfile

import numpy as np
from PIL import Image


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, members: dict) -> None:
    """members: name -> bytes (None: a directory)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                add_bytes(tar, name, data)


def cifar10_members(train: tuple, test: tuple, names=None) -> dict:
    """train/test: (uint8 images (N, 3, 32, 32), labels (N,)); train split into 5 batches."""
    def batch(images, labels):
        return np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1).tobytes()

    members = {"cifar-10-batches-bin": None}
    for index, part in enumerate(np.array_split(np.arange(len(train[0])), 5), start=1):
        members[f"cifar-10-batches-bin/data_batch_{index}.bin"] = batch(train[0][part], train[1][part])
    members["cifar-10-batches-bin/test_batch.bin"] = batch(*test)
    if names:
        members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
    return members


def cifar100_members(train: tuple, test: tuple, coarse_of, fine_names=None, coarse_names=None) -> dict:
    """Labels are the fine ones; coarse_of maps a fine label to its coarse one."""
    def records(images, fine):
        coarse = np.asarray([coarse_of(label) for label in fine], dtype=np.uint8)
        return np.concatenate([coarse[:, None], fine.astype(np.uint8)[:, None], images.reshape(len(images), -1)],
                              axis=1).tobytes()

    members = {"cifar-100-binary/train.bin": records(*train), "cifar-100-binary/test.bin": records(*test)}
    if fine_names:
        members["cifar-100-binary/fine_label_names.txt"] = "\n".join(fine_names).encode()
    if coarse_names:
        members["cifar-100-binary/coarse_label_names.txt"] = "\n".join(coarse_names).encode()
    return members


def stl10_members(train: tuple, test: tuple, unlabeled, names=None) -> dict:
    """Images (N, 3, 96, 96) stored column-major per channel as STL-10 does; labels 0..9 stored as 1..10."""
    def column_major(images):
        return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()

    members = {"stl10_binary/train_X.bin": column_major(train[0]),
               "stl10_binary/train_y.bin": (train[1] + 1).astype(np.uint8).tobytes(),
               "stl10_binary/test_X.bin": column_major(test[0]),
               "stl10_binary/test_y.bin": (test[1] + 1).astype(np.uint8).tobytes(),
               "stl10_binary/unlabeled_X.bin": column_major(unlabeled)}
    if names:
        members["stl10_binary/class_names.txt"] = "\n".join(names).encode()
    return members


def png_bytes(image: np.ndarray, image_format="PNG") -> bytes:
    """uint8 (C, H, W) with C 1 or 3 -> encoded bytes."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def image_folder_members(splits: dict, class_names, prefix="") -> dict:
    """splits: root -> (images (N, C, H, W), labels); files named by their index, so the reader's order
    (by file name) is the arrays' order."""
    members = {}
    for root, (images, labels) in splits.items():
        for index, (image, label) in enumerate(zip(images, labels)):
            members[f"{prefix}{root}/{class_names[label]}/{index:06d}.png"] = png_bytes(image)
    return members


def write_zip(path, members: dict) -> None:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)



def plain_tar_bytes(members: dict) -> bytes:
    """An uncompressed tar of name -> bytes, in that order (ILSVRC2012's tars are plain)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            add_bytes(tar, name, data)
    return buffer.getvalue()


def imagenet_files(train: dict, val: list, names: dict, jpeg=None) -> dict:
    """The four files of format imagenet, in ILSVRC2012's and Kaggle's layouts.
    train: wnid -> uint8 images (N, C, H, W), C 1 (greyscale JPEGs) or 3; val: [(wnid, image)], numbered
    ILSVRC2012_val_00000001... in that order; names: wnid -> synset name. jpeg: (member name -> bytes) to
    replace or add members, e.g. a corrupt image. Returns role -> (file name, bytes)."""
    jpeg = jpeg or {}

    def encoded(image):
        return png_bytes(image, image_format="JPEG")

    class_tars = {}
    for wnid, images in train.items():
        members = {f"{wnid}_{index + 1}.JPEG": encoded(image) for index, image in enumerate(images)}
        members.update({name.split("/", 1)[1]: data for name, data in jpeg.items() if name.startswith(f"{wnid}.tar/")})
        class_tars[f"{wnid}.tar"] = plain_tar_bytes(members)
    val_members = {f"ILSVRC2012_val_{index + 1:08d}.JPEG": encoded(image) for index, (_, image) in enumerate(val)}
    val_members.update({name: data for name, data in jpeg.items() if "/" not in name})
    # Kaggle's solution file lists the images in no particular order, each box repeating the wnid.
    rows = [f"ILSVRC2012_val_{index + 1:08d},{wnid} 1 2 30 40 {wnid} 5 6 20 24"
            for index, (wnid, _) in reversed(list(enumerate(val)))]
    return {"archive": ("ILSVRC2012_img_train.tar", plain_tar_bytes(class_tars)),
            "val_archive": ("ILSVRC2012_img_val.tar", plain_tar_bytes(val_members)),
            "val_labels": ("LOC_val_solution.csv", ("ImageId,PredictionString\n" + "\n".join(rows) + "\n").encode()),
            "synsets": ("LOC_synset_mapping.txt",
                        "".join(f"{wnid} {name}\n" for wnid, name in sorted(names.items())).encode())}

def main(argv=None) -> None:
    """Build the archives the figures of docs/getting-started.md were measured on:
    python -m tests.archives fashion-mnist-png OUT.tar.gz   (the real Fashion-MNIST as 70,000 PNGs)
    python -m tests.archives synthetic-cifar10 OUT.tar.gz   (2,000 + 200 random 32x32 RGB images)"""
    import argparse
    import gzip
    from pathlib import Path

    from ssl_pipeline.datasets.idx import parse_idx

    parser = argparse.ArgumentParser(prog="python -m tests.archives", description=main.__doc__)
    parser.add_argument("kind", choices=["fashion-mnist-png", "synthetic-cifar10"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "fashion-mnist-png":
        root = Path("/usr/share/datasets/fashion-mnist")

        def split(prefix):
            return (parse_idx(gzip.decompress((root / f"{prefix}-images-idx3-ubyte.gz").read_bytes()))[:, None],
                    parse_idx(gzip.decompress((root / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())))

        members = image_folder_members({"train": split("train"), "test": split("t10k")}, [str(i) for i in range(10)])
    else:
        rng = np.random.default_rng(0)
        members = cifar10_members((rng.integers(0, 256, (2000, 3, 32, 32), dtype=np.uint8), np.arange(2000) % 10),
                                  (rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8), np.arange(200) % 10))
    write_tar(args.out, members)


if __name__ == "__main__":
    main()
