"""Preprocessing throughput, one job against parallel shard jobs (`make bench-preprocess`):

    python -m ssl_pipeline.tools.preprocess_benchmark [--images 20000] [--side 128] [--cores 2]
                                                       [--out results/performance/preprocess.json]

It writes a synthetic archive of JPEGs in class folders (format image_folder, .jpg members: learnable
colour patterns plus noise, so the JPEGs are of a realistic size), then runs the real workflow's
preprocessing twice in copies of this checkout, with `snakemake --cores N`: once as the single
preprocess job (config preprocess.shard_images null), once with shards of half the training images, so
that N = 2 shard jobs decode at a time. The download is run and excluded from the timing. The figure is
the images of every split (train, val, test) over the wall time of the preprocessing jobs; the shard
jobs' own rates (from their logs) come with it.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "envs", "profiles", "ssl_pipeline"]
CLASSES = 10
TARGET = ["--", "results/data/card.json"]
ARCHIVE = "jpegs.tar.gz"


def jpeg_archive(path: Path, train: int, test: int, side: int, seed: int = 0) -> int:
    """A tar.gz of train/<class>/<n>.jpg and test/<class>/<n>.jpg; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, side)
    with tarfile.open(path, "w:gz") as tar:
        for root, count in (("train", train), ("test", test)):
            for index in range(count):
                label = index % CLASSES
                # A class-dependent colour gradient and stripe frequency, plus noise: (H, W, 3).
                stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (label + 1) * grid[None, :] + grid[:, None] * 3)
                colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256]) / 255.0
                pixels = 255 * (0.6 * stripes[:, :, None] * colour + 0.4 * rng.random((side, side, 3)))
                buffer = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{root}/class{label}/{index:06d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    return path.stat().st_size


def workflow_copy(destination: Path, mirror: Path, shard_images) -> Path:
    destination.mkdir(parents=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / part)
    digest = hashlib.sha256((mirror / ARCHIVE).read_bytes()).hexdigest()
    config = {"dataset": {"name": "synthetic-jpeg", "format": "image_folder", "class_names": [],
                          "mirrors": [str(mirror)], "archive": {"name": ARCHIVE, "sha256": digest},
                          "image_folder": {"mode": "RGB"}},
              "preprocess": {"shard_images": shard_images}}
    (destination / "bench.yaml").write_text(yaml.safe_dump(config))
    return destination


def snakemake(workdir: Path, *args) -> float:
    """Run the workflow's Snakemake; return its wall seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "bench.yaml", *args], cwd=workdir,
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed in {workdir}:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def shard_rates(workdir: Path) -> dict:
    """Each shard job's decode rate, as its log reports it."""
    rates = {}
    for log in sorted((workdir / "results" / "logs" / "preprocess_shard").rglob("*.log")):
        match = re.search(r"shard (\w+) (\d+): decoded (\d+) images in ([\d.]+) s: (\d+) images/s", log.read_text())
        if match:
            rates[f"{match.group(1)}/{match.group(2)}"] = {"images": int(match.group(3)),
                                                          "seconds": float(match.group(4)),
                                                          "images_per_second": int(match.group(5))}
    return rates


def measure(workdir: Path, cores: int, images: int) -> dict:
    snakemake(workdir, "--cores", "1", "--", f"results/raw/{ARCHIVE}")  # the download, untimed
    seconds = snakemake(workdir, "--cores", str(cores), *TARGET)
    shard_logs = workdir / "results" / "logs" / "preprocess_shard"
    jobs = len(list(shard_logs.rglob("*.log"))) if shard_logs.is_dir() else 1
    return {"wall_seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1), "decode_jobs": jobs,
            "shards": shard_rates(workdir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_pipeline.tools.preprocess_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="training images (the test split adds 10%%)")
    parser.add_argument("--side", type=int, default=128, help="image side in pixels")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores for both runs")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "performance" / "preprocess.json")
    args = parser.parse_args(argv)
    test = args.images // 10
    with tempfile.TemporaryDirectory(prefix="preprocess-benchmark-") as scratch:
        scratch = Path(scratch)
        (scratch / "mirror").mkdir()
        size = jpeg_archive(scratch / "mirror" / ARCHIVE, args.images, test, args.side)
        total = args.images + test
        # Half the training split per shard: with the validation split taken out, 2 train shards, 1 val, 1 test.
        runs = {"one_job": None, "shards": args.images // 2}
        results = {name: measure(workflow_copy(scratch / name, scratch / "mirror", shard_images),
                                 args.cores, total)
                   for name, shard_images in runs.items()}
        for name in runs:
            data = scratch / name / "results" / "data"
            results[name]["card_counts"] = {split: entry["count"] for split, entry in
                                            json.loads((data / "card.json").read_text())["splits"].items()}
    report = {"images": total, "image": f"3x{args.side}x{args.side} JPEG", "archive_bytes": size,
              "cores": args.cores, "shard_images": runs["shards"], **results,
              "speedup": round(results["shards"]["images_per_second"] / results["one_job"]["images_per_second"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{total} images ({report['image']}, archive {size / 1e6:.1f} MB), snakemake --cores {args.cores}:")
    for name in runs:
        print(f"  {name:8s} {results[name]['wall_seconds']:7.1f} s  {results[name]['images_per_second']:8.1f} images/s"
              f"  ({results[name]['decode_jobs']} decode jobs)")
    print(f"  speedup {report['speedup']}x; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
