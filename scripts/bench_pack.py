#!/usr/bin/env python3
"""Packing benchmark: what ``artifacts.pack`` costs after a training job, and why it deflates
the way it does. Prints JSON.

    python scripts/bench_pack.py                     # ResNet18 and MobileNetV2, 133 classes
    python scripts/bench_pack.py --archs resnet50 --repeats 1

Per architecture it writes a model dir as training does (``bench_serve.make_artifact``: random
weights, whose bytes deflate like trained ones, both float32 tensors; 133 classes; its graph
exported and checked), then times, median of ``--repeats``:

- ``digest_s``: the sha256 of model.pt and model.onnx that lets ``pack`` trust training's check;
- ``check_s``: the graph check ``pack`` runs when the files are not the checked ones (ONNX
  Runtime against PyTorch on fixed inputs; torch and the runtime already imported);
- ``pack_s`` / ``archive_mb`` / ``unpack_s`` for the deflate ``pack`` uses (Huffman coding only)
  against tarfile's default (``w:gz``, zlib level 9) and an uncompressed (stored) gzip.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_serve import make_artifact  # scripts/ is sys.path[0] when this script runs

from dogbreed import artifacts, onnx_export

IMAGE_SIZE = 64  # the graph's input size; the weights, and so the files, do not depend on it


def timed(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def tarfile_gzip(level: int) -> Callable[[Path, Path], None]:
    def pack(directory: Path, archive: Path) -> None:
        with tarfile.open(archive, "w:gz", compresslevel=level) as tar:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
    return pack


def bench(arch: str, root: Path, repeats: int) -> dict:
    directory = make_artifact(arch, IMAGE_SIZE, root)  # as training writes it (graph checked)
    result: dict = {"arch": arch, "model_dir_mb": round(sum(p.stat().st_size for p in directory.iterdir()) / 1e6, 1),
                    "digest_s": timed(lambda: artifacts.checked_files_digest(directory), repeats),
                    "check_s": timed(lambda: onnx_export.check_model_dir(directory), repeats)}
    packers = {"pack_huffman_only": artifacts.pack,
               "tarfile_default_level_9": tarfile_gzip(9), "stored_level_0": tarfile_gzip(0)}
    for name, packer in packers.items():
        archive = root / arch / f"{name}.tar.gz"
        pack_s = timed(functools.partial(packer, directory, archive), repeats)
        unpack_s = timed(lambda archive=archive: artifacts.safe_extract(archive, Path(tempfile.mkdtemp(dir=root))),
                         repeats)
        result[name] = {"pack_s": pack_s, "archive_mb": round(archive.stat().st_size / 1e6, 1), "unpack_s": unpack_s}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet18,mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        results = [bench(arch, Path(tmp), args.repeats) for arch in args.archs.split(",")]
    json.dump({"torch_threads": torch.get_num_threads(), "results": results}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
