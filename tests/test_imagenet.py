"""Format imagenet on small synthetic archives in ILSVRC2012's exact layout (a plain tar of per-class plain
tars of JPEGs, the flat validation tar) with Kaggle's label files: the reader, its cheap index/decode pair,
bad input named by file and member with nothing written, and each ImageNet experiment's whole DAG over
loopback HTTP."""
import gzip
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from ssl_pipeline.core.raw_files import RawFilesError, dataset_files, raw_paths
from ssl_pipeline.datasets import DatasetFormatError, format_options, read_dataset
from ssl_pipeline.datasets import imagenet
from ssl_pipeline.datasets.archive import ArchiveError
from ssl_pipeline.stages.preprocess import preprocess
from ssl_pipeline.stages.preprocess_shards import plan_shards, write_indexes, write_shard
from tests.archives import imagenet_files, plain_tar_bytes, png_bytes
from tests.conftest import copy_workflow, snakemake
from tests.test_formats_dag import SMALL, colour_images, experiment, merged
from tests.test_workflow import assert_complete_report

# Real ILSVRC2012 wnids and names (the first four of the sorted list).
NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
         "n01491361": "tiger shark, Galeocerdo cuvieri"}
WNIDS = sorted(NAMES)
OPTIONS = {"classes": None, "image_size": 16}


def flat(value, height, width):
    """uint8 (3, H, W) of one colour, so that JPEG and resizing keep it recognisable."""
    return np.broadcast_to(np.asarray(value, dtype=np.uint8)[:, None, None], (3, height, width)).copy()


def write_files(directory, train, val, jpeg=None, edit=None) -> dict:
    """Write imagenet_files(...) to `directory` (edit: role -> function of the bytes); role -> path."""
    files = imagenet_files(train, val, NAMES, jpeg)
    paths = {}
    for role, (name, data) in files.items():
        paths[role] = directory / name
        paths[role].write_bytes(edit[role](data) if edit and role in edit else data)
    return paths


def small_archive(directory, **changes):
    """Classes in unsorted tar order, 3, 2, 4 and 1 images of distinct colours and sizes; 2 test images each."""
    counts = {"n01484850": 4, "n01440764": 3, "n01491361": 1, "n01443537": 2}
    train = {wnid: [flat((40 * WNIDS.index(wnid) + 10, 20 * k + 30, 200), 24 + 4 * k, 32) for k in range(count)]
             for wnid, count in counts.items()}
    val = [(wnid, flat((40 * WNIDS.index(wnid) + 10, 250, 60), 20, 28)) for _ in range(2) for wnid in reversed(WNIDS)]
    return write_files(directory, train, val, **changes), train, val


def colours(images):
    return images.reshape(len(images), 3, -1).mean(axis=2)


# ---- reading ----------------------------------------------------------------------------------------

def test_classes_are_sorted_wnids_named_by_the_mapping_and_val_labels_come_from_the_solution_file(tmp_path):
    paths, train, val = small_archive(tmp_path)
    data = read_dataset("imagenet", paths, OPTIONS)
    assert data.class_names == [NAMES[wnid] for wnid in WNIDS]
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert data.train_images.shape == (10, 3, 16, 16) and data.train_images.dtype == np.uint8
    expected = np.concatenate([colours(np.stack([image[:, :24, :24] for image in train[wnid]])) for wnid in WNIDS])
    assert np.abs(colours(data.train_images) - expected).max() < 8  # each image where its class and name put it
    assert data.test_labels.tolist() == [WNIDS.index(wnid) for wnid, _ in val]  # by image name, not CSV order
    assert np.abs(colours(data.test_images) - colours(np.stack([image for _, image in val]))).max() < 8


def test_index_decodes_nothing_and_decode_reads_only_its_positions(tmp_path):
    (tmp_path / "clean").mkdir()
    whole = read_dataset("imagenet", small_archive(tmp_path / "clean")[0], OPTIONS)
    corrupt = {"n01443537.tar/n01443537_2.JPEG": b"\xff\xd8\xff\xe0 not really a JPEG"}
    paths, _, _ = small_archive(tmp_path, jpeg=corrupt)
    found = imagenet.index(paths, OPTIONS)  # lists the corrupt image, decodes none
    assert found.train_labels.tolist() == whole.train_labels.tolist()
    assert found.test_labels.tolist() == whole.test_labels.tolist() and found.class_names == whole.class_names
    assert np.array_equal(imagenet.decode(paths, OPTIONS, "train", [0, 2, 3, 9]), whole.train_images[[0, 2, 3, 9]])
    assert np.array_equal(imagenet.decode(paths, OPTIONS, "test", [1, 7]), whole.test_images[[1, 7]])
    with pytest.raises(DatasetFormatError, match=r"ILSVRC2012_img_train.tar: member 'n01443537.tar/n01443537_2.JPEG' "
                                                 r"does not decode as an image"):
        imagenet.decode(paths, OPTIONS, "train", [4])


def test_a_class_subset_is_renumbered_in_sorted_order_and_filters_the_validation_images(tmp_path):
    paths, _, val = small_archive(tmp_path)
    data = read_dataset("imagenet", paths, {**OPTIONS, "classes": ["n01491361", "n01443537"]})
    assert data.class_names == [NAMES["n01443537"], NAMES["n01491361"]]
    assert data.train_labels.tolist() == [0, 0, 1]
    assert data.test_labels.tolist() == [1, 0, 1, 0]  # val order: n01491361, n01484850, n01443537, ... twice


def jpeg_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_greyscale_and_cmyk_jpegs_become_rgb_and_the_centre_square_is_kept(tmp_path):
    bands = np.zeros((30, 90, 3), dtype=np.uint8)  # left red, centre green, right blue: H 30, W 90
    bands[:, :30, 0] = bands[:, 30:60, 1] = bands[:, 60:, 2] = 255
    extra = {"n01440764.tar/n01440764_7.JPEG": jpeg_of(Image.new("L", (40, 50), 90)),
             "n01440764.tar/n01440764_8.JPEG": jpeg_of(Image.new("RGB", (50, 40), (200, 40, 90)).convert("CMYK")),
             "n01440764.tar/n01440764_9.JPEG": jpeg_of(Image.fromarray(bands))}
    paths, _, _ = small_archive(tmp_path, jpeg=extra)
    images = imagenet.decode(paths, OPTIONS, "train", [3, 4, 5])  # after tench's _1 .. _3
    grey, cmyk, centre = colours(images)
    assert np.abs(grey - 90).max() < 3 and np.ptp(images[0].astype(int), axis=0).max() < 2
    assert np.abs(cmyk - [200, 40, 90]).max() < 8
    assert centre[1] > 240 and centre[0] < 15 and centre[2] < 15  # shorter side to 16, then the middle 16x16


def test_jpeg_draft_decoding_stays_close_to_a_full_decode(tmp_path):
    """draft() decodes a large JPEG at a reduced DCT scale before the resize: the result must stay within
    JPEG noise of resizing the fully decoded image."""
    rows, cols = np.mgrid[0:480, 0:640]  # a smooth photo-like 480 x 640 image: gradients of three frequencies
    smooth = np.stack([128 + 100 * np.sin(rows / 40), 128 + 100 * np.cos(cols / 55), (rows + cols) / 4.5],
                      axis=2).astype(np.uint8)
    data = jpeg_of(Image.fromarray(smooth))
    drafted = imagenet.decode_image("a.tar", "a.JPEG", data, 60).astype(int)
    with Image.open(io.BytesIO(data)) as image:
        full = np.asarray(imagenet.resize_and_crop(image.convert("RGB"), (60, 60))).transpose(2, 0, 1).astype(int)
    assert np.abs(drafted - full).mean() < 2 and np.abs(drafted - full).max() < 16


# ---- bad input: named by file and member, nothing written -------------------------------------------

def drop_last_line(data: bytes) -> bytes:
    return b"\n".join(data.rstrip(b"\n").split(b"\n")[:-1]) + b"\n"


def with_foreign_class_tar(data: bytes) -> bytes:
    """The train tar with one more class tar, n09999999.tar, which the synset list does not name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar}
    members["n09999999.tar"] = plain_tar_bytes({"n09999999_1.JPEG": png_bytes(flat((1, 2, 3), 20, 20), "JPEG")})
    return plain_tar_bytes(members)


BAD = {
    "corrupt JPEG in a class tar": (
        {"jpeg": {"n01484850.tar/n01484850_3.JPEG": b"\xff\xd8\xff\xe0\x00\x10JFIF truncated"}}, OPTIONS,
        r"ILSVRC2012_img_train.tar: member 'n01484850.tar/n01484850_3.JPEG' does not decode as an image"),
    "validation labels of another length": (
        {"edit": {"val_labels": drop_last_line}}, OPTIONS,
        r"LOC_val_solution.csv: 7 entries for the 8 images of .*ILSVRC2012_img_val.tar"),
    "class tar not in the synset list": (
        {"edit": {"archive": with_foreign_class_tar}}, OPTIONS,
        r"ILSVRC2012_img_train.tar: member 'n09999999.tar' is the class tar of n09999999, which is not in the "
        r"synset list .*LOC_synset_mapping.txt"),
    "a class the archive lacks": (
        {}, {**OPTIONS, "classes": ["n01440764", "n01530575"]},
        r"config key dataset.imagenet.classes names 1 classes without a class tar in .*ILSVRC2012_img_train.tar: "
        r"n01530575"),
    "a compressed train tar": (
        {"edit": {"archive": gzip.compress}}, OPTIONS,
        r"ILSVRC2012_img_train.tar: not a plain \(uncompressed\) tar"),
    "a link in a class tar": (
        {"edit": {"archive": lambda data: with_link(data)}}, OPTIONS,
        r"class tar n01440764.tar: member 'n01440764_9.JPEG' is a link \(to '/etc/passwd'\)"),
    "a mapping line without a name": (
        {"edit": {"synsets": lambda data: data + b"n01530575\n"}}, OPTIONS,
        r"LOC_synset_mapping.txt: line 5 is 'n01530575', not '<wnid> <name>'"),
}


def with_link(data: bytes) -> bytes:
    """The train tar with a symbolic link added to the first class tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar}
    inner = io.BytesIO(members["n01440764.tar"])
    with tarfile.open(fileobj=inner, mode="a") as tar:
        info = tarfile.TarInfo("n01440764_9.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    members["n01440764.tar"] = inner.getvalue()
    return plain_tar_bytes(members)


def preprocess_in_shards(paths, data, options) -> None:
    """The sharded rules' three steps in order (workflow/rules/preprocess_shards.smk), in shards of 2 images."""
    data.mkdir()
    plan = plan_shards(paths, data, "imagenet", 0.25, 0, 2, data_format="imagenet", options=options)
    for split, entry in plan["splits"].items():
        for shard in range(len(entry["files"])):
            write_shard(paths, data, split, shard, "imagenet", options)
    write_indexes(data)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named_and_leaves_nothing_behind(tmp_path, case):
    changes, options, message = BAD[case]
    (tmp_path / "raw").mkdir()
    paths, _, _ = small_archive(tmp_path / "raw", **changes)
    with pytest.raises((DatasetFormatError, ArchiveError), match=message):
        preprocess(paths, tmp_path / "data", "imagenet", 0.25, 0, None, "imagenet", options)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_the_plan_or_its_own_shard_in_sharded_preprocessing(tmp_path, case):
    """config preprocess.shard_images, as both experiments set it: the plan job checks what the labels and
    member lists tell before it writes anything; a JPEG that does not decode fails its own shard's job,
    which writes no shard file, and no index is written."""
    changes, options, message = BAD[case]
    (tmp_path / "raw").mkdir()
    paths, _, _ = small_archive(tmp_path / "raw", **changes)
    data = tmp_path / "data"
    with pytest.raises((DatasetFormatError, ArchiveError), match=message):
        preprocess_in_shards(paths, data, options)
    written = sorted(path.relative_to(data).as_posix() for path in data.rglob("*") if path.is_file())
    if case == "corrupt JPEG in a class tar":  # the plan and the shards before the bad one, each complete
        shards = [name for name in written if name.startswith("shards/")]
        assert shards and all(name.removesuffix(".npy") + ".json" in shards
                              for name in shards if name.endswith(".npy"))
        assert not [name for name in written if name.endswith(".index.json") or name == "card.json"]
    else:
        assert written == []


# ---- config: the four files, and the experiments ----------------------------------------------------

def imagenet_dataset(**imagenet_changes) -> dict:
    spec = {"name": "ILSVRC2012_img_train.tar", "md5": "1d675b47d978889d74fa0da5fadfb00e"}
    files = {"val_archive": {"name": "ILSVRC2012_img_val.tar", "md5": "29b22e2961454d5413ddabcf34fc5622"},
             "val_labels": {"name": "LOC_val_solution.csv", "sha256": "0" * 64},
             "synsets": {"name": "LOC_synset_mapping.txt", "sha256": "1" * 64}}
    return {"format": "imagenet", "archive": spec, "imagenet": {**files, "classes": None, "image_size": 224,
                                                                **imagenet_changes}}


def test_the_download_fetches_four_files_by_role():
    dataset = imagenet_dataset()
    assert list(dataset_files(dataset)) == ["archive", "val_archive", "val_labels", "synsets"]
    assert raw_paths(dataset, "results/raw")["dataset"]["val_labels"].as_posix() == "results/raw/LOC_val_solution.csv"
    assert format_options(dataset)["image_size"] == 224
    with pytest.raises(RawFilesError, match=r"config key dataset.imagenet.val_labels must name the validation labels"):
        dataset_files(imagenet_dataset(val_labels=None))
    with pytest.raises(RawFilesError, match=r"config keys dataset.archive and dataset.imagenet name the same file"):
        dataset_files(imagenet_dataset(synsets={"name": "LOC_val_solution.csv", "sha256": "1" * 64}))


def test_imagenet100_lists_cmcs_100_classes():
    classes = experiment("imagenet100")["dataset"]["imagenet"]["classes"]
    assert len(classes) == len(set(classes)) == 100 and all(imagenet.WNID.fullmatch(wnid) for wnid in classes)
    # CMC's imagenet100.txt (Tian et al. 2019), in its order: its sha256 with one wnid per line.
    assert hashlib.sha256(("\n".join(classes) + "\n").encode()).hexdigest() == CMC_SHA256
    assert experiment("imagenet")["dataset"]["imagenet"]["classes"] is None


CMC_SHA256 = "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"


# ---- each experiment's whole DAG over loopback HTTP --------------------------------------------------

def serve_imagenet(routes, directory, wnids, train_per_class, test_per_class) -> dict:
    """Synthetic ILSVRC2012 files of learnable 40x48 colour JPEGs, served at /data/<name>; their config specs."""
    labels = np.repeat(np.arange(len(wnids)), train_per_class)
    images = colour_images(labels, 48, 1)[:, :, 4:44, :]  # (N, 3, 40, 48): not square, so it is resized
    train = {wnid: images[labels == index] for index, wnid in enumerate(wnids)}
    test_labels = np.tile(np.arange(len(wnids)), test_per_class)
    val = list(zip([wnids[label] for label in test_labels], colour_images(test_labels, 48, 2)[:, :, 4:44, :]))
    specs = {}
    for role, (name, data) in imagenet_files(train, val, {wnid: f"class {wnid}" for wnid in wnids}).items():
        routes.table[f"/data/{name}"] = ("ok", data)
        specs[role] = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "md5": None, "size": len(data)}
    return specs


def run_imagenet_experiment(tmp_path, http_server, name, wnids, classes, preprocess=None):
    """The experiment file's DAG at smoke size and 32 px, its files the synthetic ones, its classes ours;
    preprocess: config keys of preprocessing over the experiment's (which shards with shard_images: auto)."""
    url, routes = http_server
    specs = serve_imagenet(routes, tmp_path, wnids, train_per_class=12, test_per_class=3)
    archive = specs.pop("archive")
    override = merged(SMALL, {"dataset": {"mirrors": [f"{url}/data"], "archive": archive,
                                          "imagenet": {**specs, "classes": classes, "image_size": 32}},
                              "preprocess": preprocess or {}, "finetune": {"min_steps": 6},
                              # bf16 autocast, which auto picks on CPUs with AVX512-BF16, ran ResNet-50's
                              # steps 3x slower than fp32 on our 2-core AMD EPYC.
                              "compute": {"precision": "fp32"}})
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "synthetic.yaml").write_text(yaml.safe_dump(override))
    snakemake(workdir, "--cores", "2", "--configfile", f"config/experiments/{name}.yaml",
              "config/experiments/smoke.yaml", "synthetic.yaml")
    assert_complete_report(workdir, expected_runs=2, fractions=[1.0])
    assert routes.count("/data/ILSVRC2012_img_train.tar") == 1
    # The experiments leave out the kNN probe's raw-pixel baseline (float32 copies of both splits).
    knn = json.loads((workdir / "results" / "evaluate" / "knn" / "simclr" / "base" / "seed0.json").read_text())
    assert knn["raw_pixel_accuracy"] is None and knn["encoder_accuracy"] is not None
    return workdir, json.loads((workdir / "results" / "data" / "card.json").read_text())


WORKFLOW = pytest.mark.workflow
SYNTHETIC_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


@WORKFLOW
def test_imagenet100_experiment_reads_its_class_subset(tmp_path, http_server):
    """Three of the archive's four classes, numbered in sorted-wnid order whatever the list's order, and
    preprocessed in shards of 10 images. About 37 s on our 2-core AMD EPYC (97 s under a load of 5): the
    whole DAG, each job importing torch; the data are the smallest the ImageNet stem takes (32 px)."""
    workdir, card = run_imagenet_experiment(tmp_path, http_server, "imagenet100", SYNTHETIC_WNIDS,
                                            ["n01491361", "n01440764", "n01484850"], {"shard_images": 10})
    assert card["format"] == "imagenet" and card["num_classes"] == 3 and card["image_shape"] == [3, 32, 32]
    assert card["class_names"] == ["class n01440764", "class n01484850", "class n01491361"]
    assert card["splits"]["test"]["per_class"] == [3, 3, 3]  # the fourth class's validation images left out
    assert card["splits"]["train"]["count"] + card["splits"]["val"]["count"] == 36
    # Preprocessed in shards of 10 images, one job each, read as one array through the index.
    index = json.loads((workdir / "results" / "data" / "train_images.index.json").read_text())
    assert [shard["count"] for shard in index["shards"]] == [10, 10, 7] and index["shape"] == [27, 3, 32, 32]
    assert not (workdir / "results" / "data" / "train_images.npy").exists()
    log = (workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log").read_text()
    assert "encoder resnet18" in log


@WORKFLOW
def test_imagenet_experiment_trains_a_resnet50_on_every_class(tmp_path, http_server):
    """About 39 s on our 2-core AMD EPYC (133 s under a load of 5): 11 jobs, and a ResNet-50 step on 16
    images of 32 px takes about a second there; fine-tuning runs 6 steps per init."""
    workdir, card = run_imagenet_experiment(tmp_path, http_server, "imagenet", SYNTHETIC_WNIDS, None)
    assert card["num_classes"] == 4 and card["splits"]["test"]["count"] == 12
    log = (workdir / "results" / "logs" / "pretrain" / "simclr" / "base" / "seed0.log").read_text()
    assert "encoder resnet50" in log and "2048 features" in log
