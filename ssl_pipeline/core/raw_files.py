"""Which raw files a dataset config names, and where the download puts them. Shared by the download and
preprocess rules (their outputs and inputs) and by the stages themselves. Standard library only: the
download stage runs in an env without numpy."""
from pathlib import Path


class RawFilesError(ValueError):
    pass


# Format imagenet's files beside dataset.archive (the train tar), under config dataset.imagenet.
IMAGENET_FILES = {"val_archive": "the validation tar ILSVRC2012_img_val.tar",
                  "val_labels": "the validation labels LOC_val_solution.csv",
                  "synsets": "the synset mapping LOC_synset_mapping.txt"}


def dataset_files(dataset: dict) -> dict:
    """role -> {name, sha256 or md5} of the labeled dataset: the four IDX files, or the one archive
    (imagenet: and the validation tar, its labels and the synset mapping)."""
    if dataset["format"] == "idx":
        return dict(dataset["files"])
    if not dataset.get("archive"):
        raise RawFilesError(f"config key dataset.archive must name the archive of format {dataset['format']!r} "
                            "({name, sha256 or md5})")
    if dataset["format"] == "imagenet":
        return imagenet_files(dataset)
    return {"archive": dataset["archive"]}


def imagenet_files(dataset: dict) -> dict:
    """The train tar and three more files, each its own spec: the download installs each by role."""
    options = dataset.get("imagenet") or {}
    files = {"archive": dataset["archive"]}
    for role, what in IMAGENET_FILES.items():
        if not options.get(role):
            raise RawFilesError(f"config key dataset.imagenet.{role} must name {what} ({{name, sha256 or md5}})")
        files[role] = options[role]
    names = [spec["name"] for spec in files.values()]
    if len(set(names)) != len(names):
        raise RawFilesError(f"config keys dataset.archive and dataset.imagenet name the same file twice: {names}")
    return files


def unlabeled_files(dataset: dict):
    """role -> spec of config dataset.unlabeled's own files; {} when it reads the dataset's own files;
    None without an unlabeled source."""
    unlabeled = dataset.get("unlabeled")
    if not unlabeled:
        return None
    if unlabeled.get("archive"):
        return {"archive": unlabeled["archive"]}
    if unlabeled.get("files"):
        return dict(unlabeled["files"])
    if unlabeled["format"] != "stl10_binary" or dataset["format"] != "stl10_binary":
        # Any other format would read the labeled images themselves, test split included, as unlabeled.
        raise RawFilesError("config key dataset.unlabeled names neither an archive nor files; only STL-10 "
                            "(format stl10_binary) has an unlabeled split in the dataset's own archive")
    return {}


def raw_paths(dataset: dict, raw_dir) -> dict:
    """{"dataset": role -> path, "unlabeled": role -> path or None}; the unlabeled source's own files go
    to <raw_dir>/unlabeled/ (their names may clash with the dataset's)."""
    raw_dir = Path(raw_dir)
    labeled = {role: raw_dir / spec["name"] for role, spec in dataset_files(dataset).items()}
    own = unlabeled_files(dataset)
    if own is None:
        unlabeled = None
    elif own:
        unlabeled = {role: raw_dir / "unlabeled" / spec["name"] for role, spec in own.items()}
    else:
        unlabeled = labeled
    return {"dataset": labeled, "unlabeled": unlabeled}


def all_raw_paths(dataset: dict, raw_dir) -> list:
    """Every raw file, the labeled dataset's first (so the first one's directory is raw_dir)."""
    paths = raw_paths(dataset, raw_dir)
    unlabeled = paths["unlabeled"] if paths["unlabeled"] is not paths["dataset"] else None
    return [str(path) for path in [*paths["dataset"].values(), *(unlabeled or {}).values()]]
