#!/usr/bin/env python3
"""Write a dogImages-shaped synthetic set for throughput benchmarks.

dogImages itself (133 breeds, 6,680 train / 835 valid / 836 test JPEGs of ~500x375) cannot be
downloaded here, so this makes a set of the same shape from the real sample images: every file
is a deterministic random crop / flip / colour change of one sample image, re-encoded as a
~500x375 JPEG. Same seed, same bytes.

    python scripts/make_bench_data.py --out build/bench-data            # dogImages-sized
    python scripts/make_bench_data.py --out /tmp/tiny --classes 5 --train 40 --valid 10 --test 10
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import random
import sys
import zlib
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "dogs-sample"
SPLITS = ("train", "valid", "test")
MARKER = "bench-data.json"


def _sources(source: Path) -> list[Path]:
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no source images under {source}")
    return files


def _variant(source: Path, seed: int, size: tuple[int, int]) -> bytes:
    rng = random.Random(seed)
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    w, h = image.size
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    jitter = (size[0] + rng.randint(-40, 40), size[1] + rng.randint(-30, 30))
    image = image.resize(jitter, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(80, 95))
    return buffer.getvalue()


def _spread(total: int, classes: int) -> list[int]:
    base, extra = divmod(total, classes)
    return [base + (1 if i < extra else 0) for i in range(classes)]


def make(out: Path, classes: int, counts: dict[str, int], size: tuple[int, int], seed: int,
         source: Path, workers: int) -> dict:
    spec = {"classes": classes, "counts": counts, "size": list(size), "seed": seed,
            "source": hashlib.sha1("".join(p.name for p in _sources(source)).encode()).hexdigest()}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())  # already made with the same spec: reuse
    sources = _sources(source)
    jobs = []
    for split in SPLITS:
        for class_id, n in enumerate(_spread(counts[split], classes)):
            folder = out / split / f"{class_id + 1:03d}.Synthetic_breed_{class_id + 1:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # crc32, not hash(): str hashes are salted per process.
                item_seed = zlib.crc32(f"{seed}/{split}/{class_id}/{i}".encode())
                # Each class draws from one source image family, so classes stay distinct.
                src = sources[(class_id * 7 + i % 3) % len(sources)]
                jobs.append((folder / f"img_{i:05d}.jpg", src, item_seed))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        blobs = pool.map(_variant, [j[1] for j in jobs], [j[2] for j in jobs],
                         [size] * len(jobs), chunksize=32)
        total_bytes = 0
        for (path, _, _), blob in zip(jobs, blobs):
            path.write_bytes(blob)
            total_bytes += len(blob)
    summary = {"spec": spec, "images": len(jobs), "mean_kb": round(total_bytes / len(jobs) / 1024, 1)}
    marker.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--train", type=int, default=6680, help="train images in total")
    parser.add_argument("--valid", type=int, default=835)
    parser.add_argument("--test", type=int, default=836)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    args = parser.parse_args(argv)
    if min(args.train, args.valid) < args.classes:
        parser.error("--train and --valid need at least one image per class")
    summary = make(args.out, args.classes, {"train": args.train, "valid": args.valid, "test": args.test},
                   (args.width, args.height), args.seed, args.source, args.workers or None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
