"""`make gpu-bundle`: everything the GPU check needs that an offline GPU node lacks, in one folder.

    python -m ssl_pipeline.tools.gpu_bundle [--out gpu-bundle] [--python-version 3.12] [--platform ...]

The node (docs/performance-gpu.md, "On an offline GPU node") has a preinstalled PyTorch and no
package index, no dataset host, no project environment. The bundle holds:
- wheels/: one wheel per pin of requirements-gpu-node.txt, for the target Python and platform (default: the
  node's CPython 3.12, manylinux x86_64). Packages that PyPI has only as an sdist are built into wheels here
  (they must come out pure Python: a wheel built for this machine's interpreter would not fit the node);
- data/: the raw files of the default config's dataset, as a local mirror holds them;
- run: the one command to type there (`gpu-bundle/run`, from the checkout the bundle sits in);
- manifest.json: sha256 and size of every file above, checked before anything is installed there.
It is written to a sibling folder and renamed into place, so a failed build leaves nothing behind, and it
refuses to exceed --max-mib (default 60: the node takes 64 MiB of carried files in all).
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ssl_pipeline.core.artifacts import file_digest
from ssl_pipeline.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-gpu-node.txt"
MANIFEST = "manifest.json"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MIB = 2 ** 20
RUN_SCRIPT = """#!/bin/sh
# The GPU check from this bundle: run it from anywhere; it works in the checkout this folder sits in.
# Extra arguments go to python -m ssl_pipeline.tools.gpu_check (--budget SECONDS, --steps ..., --device ...).
# PYTHON: the interpreter with the node's PyTorch (default: python3 on PATH).
set -e
bundle=$(cd "$(dirname "$0")" && pwd)
checkout=$(dirname "$bundle")
if [ ! -f "$checkout/ssl_pipeline/tools/gpu_check.py" ]; then
    echo "gpu-bundle/run: $checkout is not a checkout of the pipeline: copy this folder into its top level" >&2
    exit 2
fi
cd "$checkout"
exec "${PYTHON:-python3}" -m ssl_pipeline.tools.gpu_check --bundle "$bundle" "$@"
"""


class BundleError(RuntimeError):
    pass


def read_pins(path: Path) -> list:
    """(name, version) of every `name==version` line; anything else (ranges, URLs) is an error."""
    pins = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator or not name.strip() or not version.strip():
            raise BundleError(f"{path}:{number}: {line!r} is not pinned as name==version")
        pins.append((name.strip(), version.strip()))
    return pins


def normalised(name: str) -> str:
    """A distribution name as wheel file names and pip compare it (PEP 503, with underscores)."""
    return name.lower().replace("-", "_").replace(".", "_")


def pip(*arguments, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, cwd=cwd)


def download_wheels(pins: list, wheels: Path, python_version: str, platforms) -> None:
    """Wheels for the target interpreter, in one pip call; an sdist comes only where PyPI has no wheel for
    it (pip prefers binaries), and is then built into a wheel here, which must come out pure Python."""
    fetched = pip("download", "--no-deps", "--prefer-binary", "--python-version", python_version,
                  "--implementation", "cp", *[argument for platform in platforms for argument in ("--platform", platform)],
                  "-d", str(wheels), *[f"{name}=={version}" for name, version in pins])
    if fetched.returncode != 0:
        raise BundleError(f"pip download for CPython {python_version} on {', '.join(platforms)} failed:\n"
                          f"{fetched.stderr.strip()}")
    for sdist in sorted(path for path in wheels.iterdir() if not path.name.endswith(".whl")):
        before = set(wheels.glob("*.whl"))
        built = pip("wheel", "--no-deps", "-w", str(wheels), str(sdist))
        if built.returncode != 0:
            raise BundleError(f"{sdist.name}: PyPI has only an sdist, and building its wheel failed:\n"
                              f"{built.stderr.strip()}")
        sdist.unlink()
        for wheel in set(wheels.glob("*.whl")) - before:
            if not wheel.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")):
                raise BundleError(f"{sdist.name}: PyPI has only an sdist, and it built {wheel.name}, which is not "
                                  f"pure Python: a wheel for this machine's interpreter, not for CPython {python_version}")


def check_wheels(pins: list, wheels: Path) -> None:
    """Exactly one wheel per pin, of the pinned version."""
    found = {}
    for wheel in wheels.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        found.setdefault(normalised(name), []).append(version)
    for name, version in pins:
        if found.get(normalised(name)) != [version]:
            raise BundleError(f"wheels/: expected one wheel of {name} {version}, found {found.get(normalised(name))}")


def copy_data(config: dict, data: Path) -> list:
    """The dataset's raw IDX files from a local mirror (or the download rule's results/raw), checked against the config's
    sha256 of the decompressed content (the download rule's test), copied as the mirror holds them."""
    from ssl_pipeline.stages.download import is_local, local_directory  # noqa: PLC0415 (only the bundle needs it)

    dataset = config["dataset"]
    if dataset["format"] != "idx":
        raise BundleError(f"config dataset.format is {dataset['format']!r}: the bundle carries the default "
                          "config's IDX files only")
    directories = [REPO / "results" / "raw"] + [local_directory(m) for m in dataset["mirrors"] if is_local(m)]
    copied = []
    for role, spec in dataset["files"].items():
        # Compressed first, wherever it is: the bundle must stay small.
        candidates = [directory / (spec["name"] + suffix) for suffix in (".gz", "") for directory in directories]
        source = next((path for path in candidates if path.is_file()), None)
        if source is None:
            raise BundleError(f"dataset.files.{role}: no {spec['name']}[.gz] in results/raw or a local directory "
                              "of dataset.mirrors; install Debian's dataset-fashion-mnist or run the download rule")
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != spec["sha256"]:
            raise BundleError(f"{source}: sha256 of its content is {digest}, config dataset.files.{role} says "
                              f"{spec['sha256']}")
        shutil.copyfile(source, data / source.name)
        copied.append(source)
    return copied


def write_manifest(bundle: Path, python_version: str, platforms) -> dict:
    files = {str(path.relative_to(bundle)): {"sha256": file_digest(path), "bytes": path.stat().st_size}
             for path in sorted(bundle.rglob("*")) if path.is_file()}
    manifest = {"python_version": python_version, "platforms": list(platforms),
                "requirements": REQUIREMENTS.name, "files": files,
                "total_bytes": sum(entry["bytes"] for entry in files.values())}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build(out: Path, python_version: str, platforms, requirements: Path, configfiles, max_mib: float) -> dict:
    pins = read_pins(requirements)
    config = load_config(REPO / "config" / "config.yaml", [Path(f) for f in configfiles],
                         REPO / "workflow" / "schemas" / "config.schema.yaml")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / "wheels").mkdir(parents=True)
        (partial / "data").mkdir()
        download_wheels(pins, partial / "wheels", python_version, platforms)
        check_wheels(pins, partial / "wheels")
        copy_data(config, partial / "data")
        (partial / "run").write_text(RUN_SCRIPT)
        os.chmod(partial / "run", 0o755)
        manifest = write_manifest(partial, python_version, platforms)
        size_mib = (manifest["total_bytes"] + (partial / MANIFEST).stat().st_size) / MIB
        if size_mib > max_mib:
            raise BundleError(f"the bundle would be {size_mib:.1f} MiB, over --max-mib {max_mib:g}")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    manifest["mib"] = round(size_mib, 1)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.tools.gpu_bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the node's Python (default %(default)s)")
    parser.add_argument("--platform", dest="platforms", nargs="+", default=list(PLATFORMS),
                        help="wheel platform tags the node accepts (default: manylinux x86_64)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    parser.add_argument("--configfile", action="append", default=[],
                        help="override file merged over config/config.yaml: whose dataset to carry")
    parser.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        manifest = build(args.out, args.python_version, args.platforms, args.requirements, args.configfile,
                         args.max_mib)
    except BundleError as error:
        print(f"gpu-bundle: {error}", file=sys.stderr)
        return 1
    wheels = sum(name.startswith("wheels/") for name in manifest["files"])
    print(f"gpu-bundle: {args.out}: {wheels} wheels, {len(manifest['files']) - wheels - 1} data files, "
          f"{manifest['mib']} MiB; copy it into the checkout's top level on the node and run gpu-bundle/run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
