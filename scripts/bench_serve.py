#!/usr/bin/env python3
"""Serving benchmark: the real server (HTTP front + MMS + Java + handler) against in-process.

    python scripts/bench_serve.py                  # ResNet18 + MobileNetV2 at 224 px, prints JSON
    python scripts/bench_serve.py --image-size 64 --requests 100

For each architecture it writes a model artifact with its ONNX graph, as training does (random
weights: serving cost does not depend on their values; ``--model NAME=DIR`` uses a trained one
instead), starts one multi-model server on 127.0.0.1 and measures, with a 500x375 JPEG:

- first, a warm-up of the server itself (``--no-server-warmup`` skips it): a throwaway model
  loaded and unloaded, then invoked through both paths, until MMS's Java paths are compiled
  (:data:`SERVER_WARMUP_INVOKES`); an endpoint that has served a while is in that state;
- cold load: ``POST /models`` with the unpacked dir (what SageMaker sends) until the first
  answer, and the same from ``model.tar.gz`` (adds the safe unpack); ``--cold-loads`` times
  each under fresh names (median, min, max);
- batch-1 latency p50/p99, after ``--warmup`` requests per path (the JVM's JIT compiles MMS's
  request path in the first few hundred), through HTTP (keep-alive, one client, on the engine
  the server chose: ``engine``), through MMS's own socket without the front, and the same
  decode+forward in this process (``inference.input_fn`` / ``predict_fn`` / ``output_fn`` with
  the same thread count) on each engine: PyTorch eager (``in_process_torch``) and ONNX Runtime
  (``in_process_onnxruntime``), interleaved in rounds so a noisy machine hits all paths alike;
  the ratios server/in-process (same engine) and server/PyTorch eager;
- requests/s with 4 concurrent clients (bounded by count and time), on one worker per model
  (the server's default) and again on a server with ``--throughput-workers`` workers per model
  (default: one per vCPU, the README's workers x threads = vCPUs rule for throughput);
- cold loads again on a server without the zygote (``DOGBREED_SERVE_ZYGOTE=0``: MMS starts a
  plain Python worker per load), ``--cold-loads-without-zygote`` times per model;
- ``explain=gradcam``: its own p50, and plain requests' p50 on the same worker
  before any explain request (Captum not yet imported) and after them (``--explain-requests``),
  interleaved over rounds; the "with the feature's code present or not" comparison is this
  script run on the commits before and after (``server.p50_ms`` of both);
- ``dogbreed batch --local`` throughput (``--batch-images`` files, the sample test photos
  repeated): images/s through the served path (single-model server, ``--batch-workers``
  workers and concurrent requests, :func:`dogbreed.launcher.local.batch.served_batch`) against the
  in-process ceiling (:func:`~dogbreed.launcher.local.batch.in_process_predictor`, same threads).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from dogbreed import artifacts, data, models, onnx_export
from dogbreed.launcher.local import batch
from dogbreed.serve import ENGINE_ENV, TORCH_THREADS_ENV, inference
from dogbreed.serve.client import ServeClient
from dogbreed.serve.server import ModelServer

SAMPLE_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dogs-sample"
IMAGE_SIZE = (500, 375)
NUM_CLASSES = 133  # the dogImages breeds
# Targets: batch-1 p50 through the server within 1.15x of the same engine in-process, and (ONNX
# Runtime on CPU) within these fractions of PyTorch eager in-process; 4-client throughput at
# least these requests/s (1.3x and 2x of the PyTorch-served figures before the graph: 20.1 and
# 51.6 on the reference machine); POST /models -> first answer from a model dir within these.
P50_RATIO_MAX = 1.15
P50_VS_TORCH_EAGER_MAX = {"resnet18": 0.80, "mobilenet_v2": 0.55}
THROUGHPUT_MIN = {"resnet18": round(1.3 * 20.1, 1), "mobilenet_v2": round(2 * 51.6, 1)}
COLD_LOAD_DIR_MAX_S = {"resnet18": 0.35}
# MMS's frontend is Java: its request and management paths run interpreted until the JIT has
# compiled them, after some thousands of requests. Measured here (MobileNetV2, 224 px, first
# model of a fresh server): 5 warm-up invokes -> server p50 49.4 ms, 11 ms over in-process; 400
# -> 40.2 ms, 3 ms over. An endpoint that has served a while lives in the second state, so the
# benchmark first warms the server (SERVER_WARMUP_*: loads, unloads and invokes of a throwaway
# 32 px model with the same JPEG, through the front and MMS's socket), then measures each model.
# Empty-body invokes (refused in ~2 ms) were not enough: the first model measured still paid
# 13-17 ms over in-process, the second 2-4 ms, whichever order.
WARMUP_REQUESTS = 100  # per path and model, before its latency rounds
SERVER_WARMUP_LOADS = 3
SERVER_WARMUP_INVOKES = 1000  # per path; ~8 ms each on the 32 px model
SERVER_WARMUP_IMAGE_SIZE = 32
COLD_LOAD_MAX_S = 0.5


def make_jpeg() -> bytes:
    """A 500x375 photo (a sample dog, resized), JPEG quality 90; noise if there is no sample."""
    samples = sorted(SAMPLE_DATA.rglob("*.jpg")) if SAMPLE_DATA.is_dir() else []
    if samples:
        image = Image.open(samples[0]).convert("RGB").resize(IMAGE_SIZE, Image.Resampling.LANCZOS)
    else:
        noise = torch.randint(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=torch.uint8)
        image = Image.fromarray(noise.numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_artifact(arch: str, image_size: int, root: Path) -> Path:
    torch.manual_seed(0)
    model = models.build_model(arch, NUM_CLASSES, models.WEIGHTS_NONE).eval()
    metadata = artifacts.ModelMetadata(
        arch=arch, class_names=[f"{i + 1:03d}.Breed_{i + 1}" for i in range(NUM_CLASSES)],
        image_size=image_size, resize_size=data.resize_size_for(image_size),
        mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD),
        versions=artifacts.library_versions(),
    )
    model_dir = root / arch / "model"
    artifacts.save_model_dir(model_dir, model, metadata)
    onnx_export.export_and_verify(model_dir)  # as training does (on fixed inputs here)
    artifacts.pack(model_dir, root / arch / artifacts.ARCHIVE_NAME)
    return model_dir


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Client:
    """Timed invocations on a kept-alive connection: to the front, or to MMS's unix socket."""

    def __init__(self, server: ModelServer, direct: bool = False) -> None:
        url = f"unix://{server.mms_socket}" if direct else server.url
        self.client = ServeClient(url, keep_alive=True)

    def invoke(self, name: str, body: bytes) -> float:
        start = time.perf_counter()
        reply = self.client.invoke(name, body, "image/jpeg")
        elapsed = time.perf_counter() - start
        if reply.status != 200:
            raise RuntimeError(f"invoke {name}: HTTP {reply.status} {reply.body[:200]!r}")
        return elapsed


def load_in_process(model_dir: Path, engine: str) -> inference.ServedModel | None:
    """``inference.model_fn`` on ``engine`` (as DOGBREED_SERVE_ENGINE would make a worker);
    None for onnxruntime when the model has no graph."""
    if engine == inference.ENGINE_ONNXRUNTIME and not artifacts.read_metadata(model_dir).graph:
        return None
    before = os.environ.get(ENGINE_ENV)
    os.environ[ENGINE_ENV] = engine
    try:
        return inference.model_fn(model_dir)
    finally:
        if before is None:
            os.environ.pop(ENGINE_ENV, None)
        else:
            os.environ[ENGINE_ENV] = before


def in_process(served: inference.ServedModel, body: bytes) -> float:
    start = time.perf_counter()
    request = inference.input_fn(body, "image/jpeg")
    inference.output_fn(inference.predict_fn(request, served))
    return time.perf_counter() - start


def cold_load(server: ModelServer, name: str, url: Path, body: bytes) -> dict[str, float]:
    start = time.perf_counter()
    response = server.client.load_model(name, str(url))
    loaded = time.perf_counter()
    if response.status != 200:
        raise RuntimeError(f"load {name}: HTTP {response.status} {response.body[:300]!r}")
    answer = server.client.invoke(name, body, "image/jpeg")
    done = time.perf_counter()
    if answer.status != 200:
        raise RuntimeError(f"first invoke {name}: HTTP {answer.status} {answer.body[:300]!r}")
    return {"post_models_s": round(loaded - start, 3), "first_answer_s": round(done - start, 3)}


def warm_server(server: ModelServer, root: Path, body: bytes) -> dict[str, float]:
    """Run MMS's Java paths until the JIT has compiled them (see SERVER_WARMUP_INVOKES): load and
    unload a throwaway model, then send it the benchmark's JPEG (a 32 px model: cheap forwards)."""
    start = time.perf_counter()
    model_dir = make_artifact("mobilenet_v2", SERVER_WARMUP_IMAGE_SIZE, root)
    for i in range(SERVER_WARMUP_LOADS):
        cold_load(server, "jvm-warmup", model_dir, body)
        if i < SERVER_WARMUP_LOADS - 1:
            server.client.unload_model("jvm-warmup")
    for url in (server.url, f"unix://{server.mms_socket}"):
        client = ServeClient(url, keep_alive=True)
        for _ in range(SERVER_WARMUP_INVOKES):
            if client.invoke("jvm-warmup", body, "image/jpeg").status != 200:
                raise RuntimeError("warm-up: the throwaway model did not answer")
    server.client.unload_model("jvm-warmup")
    return {"loads": SERVER_WARMUP_LOADS, "invokes_per_path": SERVER_WARMUP_INVOKES,
            "seconds": round(time.perf_counter() - start, 2)}


def throughput(server: ModelServer, name: str, body: bytes, clients: int, max_requests: int,
               max_seconds: float) -> dict[str, float]:
    lock = threading.Lock()
    count = {"sent": 0, "done": 0}
    deadline = time.perf_counter() + max_seconds
    latencies: list[float] = []

    def worker() -> None:
        client = Client(server)
        while True:
            with lock:
                if count["sent"] >= max_requests or time.perf_counter() > deadline:
                    return
                count["sent"] += 1
            elapsed = client.invoke(name, body)
            with lock:
                count["done"] += 1
                latencies.append(elapsed)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": count["done"], "seconds": round(elapsed, 2),
            "requests_per_s": round(count["done"] / elapsed, 2),
            "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99))}


def explain_latency(server: ModelServer, name: str, body: bytes, requests: int, rounds: int) -> dict:
    """Plain p50 before any explain request, explain p50, plain p50 after (alternating rounds)."""
    client = ServeClient(server.url, keep_alive=True)
    explain_headers = {"X-Amzn-SageMaker-Custom-Attributes": "explain=gradcam"}

    def timed(headers: dict[str, str] | None) -> float:
        start = time.perf_counter()
        reply = client.invoke(name, body, "image/jpeg", headers)
        elapsed = time.perf_counter() - start
        if reply.status != 200:
            raise RuntimeError(f"invoke {name}: HTTP {reply.status} {reply.body[:200]!r}")
        return elapsed

    before = [timed(None) for _ in range(requests)]
    first_explain = timed(explain_headers)  # imports Captum + matplotlib in the worker
    explain, after = [], []
    for _ in range(max(1, rounds)):
        explain += [timed(explain_headers) for _ in range(max(1, requests // rounds))]
        after += [timed(None) for _ in range(max(1, requests // rounds))]
    return {"plain_before_p50_ms": ms(percentile(before, 50)), "first_explain_ms": ms(first_explain),
            "explain_p50_ms": ms(percentile(explain, 50)), "plain_after_p50_ms": ms(percentile(after, 50)),
            "plain_after_vs_before_p50": round(percentile(after, 50) / percentile(before, 50), 3),
            "n": {"plain_before": len(before), "explain": len(explain), "plain_after": len(after)}}


def batch_folder(root: Path, count: int, fallback: bytes) -> Path:
    """``count`` images in the dogImages layout: the sample test photos, repeated."""
    samples = sorted((SAMPLE_DATA / "test").rglob("*.jpg")) if SAMPLE_DATA.is_dir() else []
    for i in range(count):
        source = samples[i % len(samples)] if samples else None
        folder = root / (source.parent.name if source else "001.Unknown")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}-{source.name if source else 'noise.jpg'}").write_bytes(
            source.read_bytes() if source else fallback)
    return root


def bench_batch(model_dir: Path, root: Path, body: bytes, args: argparse.Namespace) -> dict:
    images = batch_folder(root / "batch-in", args.batch_images, body)
    served = batch.served_batch(model_dir, images, root / "batch-out-served", workers=args.batch_workers,
                                progress=False)
    ceiling = batch.run_local(batch.in_process_predictor(model_dir), images, root / "batch-out-in-process",
                              workers=args.batch_workers, progress=False)
    return {"model": artifacts.read_metadata(model_dir).arch, "images": args.batch_images,
            "workers": args.batch_workers, "execution_parameters": served["execution_parameters"],
            "served_images_per_s": served["images_per_sec"], "served_errors": served["errors"],
            "in_process_images_per_s": ceiling["images_per_sec"],
            "served_vs_in_process": round(served["images_per_sec"] / ceiling["images_per_sec"], 3)}


def bench_model(server: ModelServer, name: str, model_dir: Path, body: bytes, args: argparse.Namespace) -> dict:
    result: dict = {"arch": artifacts.read_metadata(model_dir).arch,
                    "image_size": artifacts.read_metadata(model_dir).image_size}
    archive = model_dir.parent / artifacts.ARCHIVE_NAME
    sources = {"cold_load_dir": model_dir}
    if archive.is_file():
        sources["cold_load_archive"] = archive
    for key, source in sources.items():
        runs = [cold_load(server, f"{name}-cold{i}", source, body) for i in range(args.cold_loads)]
        for i in range(args.cold_loads):
            server.client.unload_model(f"{name}-cold{i}")
        result[key] = {stat: summarize([r[stat] for r in runs])
                       for stat in ("post_models_s", "first_answer_s")}
    loaded = cold_load(server, name, model_dir, body)
    assert loaded["first_answer_s"] > 0

    reply = server.client.invoke(name, body, "image/jpeg")
    result["engine"] = reply.json()["engine"]  # the engine the server chose for this model
    in_process_models = {engine: load_in_process(model_dir, engine)
                         for engine in (inference.ENGINE_TORCH, inference.ENGINE_ONNXRUNTIME)}
    in_process_models = {engine: served for engine, served in in_process_models.items() if served}
    http_client, direct_client = Client(server), Client(server, direct=True)
    for _ in range(args.warmup):
        http_client.invoke(name, body)
        direct_client.invoke(name, body)
        for served in in_process_models.values():
            in_process(served, body)
    timings: dict[str, list[float]] = {"server": [], "mms_direct": [],
                                       **{f"in_process_{engine}": [] for engine in in_process_models}}
    rounds = max(1, args.requests // args.round_size)
    for _ in range(rounds):
        for _ in range(args.round_size):
            timings["server"].append(http_client.invoke(name, body))
        for _ in range(args.round_size):
            timings["mms_direct"].append(direct_client.invoke(name, body))
        for engine, served in in_process_models.items():
            for _ in range(args.round_size):
                timings[f"in_process_{engine}"].append(in_process(served, body))
    for key, values in timings.items():
        result[key] = {"n": len(values), "p50_ms": ms(percentile(values, 50)),
                       "p99_ms": ms(percentile(values, 99)), "mean_ms": ms(statistics.fmean(values))}
    server_p50 = percentile(timings["server"], 50)
    result["ratio_p50_server_vs_in_process"] = round(
        server_p50 / percentile(timings[f"in_process_{result['engine']}"], 50), 3)
    result["ratio_p50_server_vs_torch_eager"] = round(
        server_p50 / percentile(timings["in_process_torch"], 50), 3)
    if "in_process_onnxruntime" in timings:
        result["ratio_p50_onnxruntime_vs_torch_eager_in_process"] = round(
            percentile(timings["in_process_onnxruntime"], 50) / percentile(timings["in_process_torch"], 50), 3)
    result["front_overhead_p50_ms"] = ms(
        percentile(timings["server"], 50) - percentile(timings["mms_direct"], 50))
    result["throughput"] = throughput(server, name, body, args.clients, args.throughput_requests,
                                      args.throughput_seconds)
    if args.explain_requests:
        result["explain"] = explain_latency(server, name, body, args.explain_requests, 4)
    del in_process_models
    return result


def targets(results: dict[str, dict]) -> dict:
    """Each target and whether this run met it (per model; architectures without one are left out)."""
    def arch(result: dict) -> str:
        return result["arch"]

    return {
        "p50_ratio_max": P50_RATIO_MAX, "cold_load_max_s": COLD_LOAD_MAX_S,
        "p50_vs_torch_eager_max": P50_VS_TORCH_EAGER_MAX, "throughput_min_per_s": THROUGHPUT_MIN,
        "cold_load_dir_max_s": COLD_LOAD_DIR_MAX_S,
        "p50_ratio_ok": {name: r["ratio_p50_server_vs_in_process"] <= P50_RATIO_MAX for name, r in results.items()},
        "p50_vs_torch_eager_ok": {name: r["ratio_p50_server_vs_torch_eager"] <= P50_VS_TORCH_EAGER_MAX[arch(r)]
                                  for name, r in results.items() if arch(r) in P50_VS_TORCH_EAGER_MAX},
        "throughput_ok": {name: r["throughput"]["requests_per_s"] >= THROUGHPUT_MIN[arch(r)]
                          for name, r in results.items() if arch(r) in THROUGHPUT_MIN},
        "throughput_more_workers_ok": {name: r["throughput_more_workers"]["requests_per_s"] >= THROUGHPUT_MIN[arch(r)]
                                       for name, r in results.items()
                                       if arch(r) in THROUGHPUT_MIN and "throughput_more_workers" in r},
        "cold_load_ok": {name: r["cold_load_dir"]["first_answer_s"]["p50"]
                         <= COLD_LOAD_DIR_MAX_S.get(arch(r), COLD_LOAD_MAX_S) for name, r in results.items()},
    }


def summary(results: dict[str, dict]) -> dict[str, dict]:
    """Per model, the figures the README shows: engine, p50s, throughput, cold load."""
    return {name: {
        "engine": r["engine"],
        "in_process_torch_p50_ms": r["in_process_torch"]["p50_ms"],
        "in_process_onnxruntime_p50_ms": r.get("in_process_onnxruntime", {}).get("p50_ms"),
        "served_p50_ms": r["server"]["p50_ms"],
        "served_vs_torch_eager": r["ratio_p50_server_vs_torch_eager"],
        "throughput_4_clients_per_s": r["throughput"]["requests_per_s"],
        **({f"throughput_4_clients_{r['throughput_more_workers']['workers']}_workers_per_s":
            r["throughput_more_workers"]["requests_per_s"]} if "throughput_more_workers" in r else {}),
        "cold_load_dir_s": r["cold_load_dir"]["first_answer_s"]["p50"],
    } for name, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet18,mobilenet_v2")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="benchmark a trained model dir instead of a generated one")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=150, help="per path (server, direct, in-process)")
    parser.add_argument("--round-size", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=WARMUP_REQUESTS,
                        help="requests per path before timing (default %(default)s: see WARMUP_REQUESTS)")
    parser.add_argument("--no-server-warmup", dest="server_warmup", action="store_false",
                        help="measure a fresh server (the JVM not yet compiled: slower loads and requests)")
    parser.add_argument("--cold-loads", type=int, default=5, help="cold loads per model and source")
    parser.add_argument("--cold-loads-without-zygote", type=int, default=2,
                        help="cold loads per model with DOGBREED_SERVE_ZYGOTE=0 (0: skip)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--throughput-requests", type=int, default=200)
    parser.add_argument("--throughput-seconds", type=float, default=20.0)
    parser.add_argument("--throughput-workers", type=int, default=os.cpu_count() or 1,
                        help="workers per model for the second throughput figure (0: skip)")
    parser.add_argument("--explain-requests", type=int, default=40,
                        help="plain requests before, and explain + plain after, per model (0: skip)")
    parser.add_argument("--batch-images", type=int, default=100, help="local batch files (0: skip)")
    parser.add_argument("--batch-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads in the workers and in-process (default: ${TORCH_THREADS_ENV} or 1)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    if args.threads:
        env[TORCH_THREADS_ENV] = str(args.threads)
        os.environ[TORCH_THREADS_ENV] = str(args.threads)  # the in-process ONNX Runtime sessions too
    threads = inference.configure_threads(env)
    body = make_jpeg()
    with tempfile.TemporaryDirectory(prefix="dogbreed-bench-") as tmp:
        root = Path(tmp)
        model_dirs: dict[str, Path] = {}
        for spec in args.model:
            name, _, path = spec.partition("=")
            model_dirs[name] = artifacts.find_model_dir(Path(path))
        if not args.model:
            for arch in args.archs.split(","):
                model_dirs[arch] = make_artifact(arch, args.image_size, root / "models")
        load_before = os.getloadavg()
        start = time.perf_counter()
        with ModelServer(port=0, host="127.0.0.1", multi_model=True, run_dir=root / "run",
                         log_file=root / "server.log", env=env) as server:
            started = time.perf_counter() - start
            warmed = warm_server(server, root / "warmup", body) if args.server_warmup else None
            results = {name: bench_model(server, name, path, body, args) for name, path in model_dirs.items()}
            listed = sorted(server.client.list_models())
        if args.cold_loads_without_zygote:  # DOGBREED_SERVE_ZYGOTE=0: MMS starts plain Python workers
            with ModelServer(port=0, host="127.0.0.1", multi_model=True, run_dir=root / "run-plain",
                             log_file=root / "server-plain.log", env=env, use_zygote=False) as server:
                for name, path in model_dirs.items():
                    runs = [cold_load(server, f"{name}-plain{i}", path, body)
                            for i in range(args.cold_loads_without_zygote)]
                    results[name]["cold_load_dir_without_zygote"] = {
                        stat: summarize([r[stat] for r in runs]) for stat in ("post_models_s", "first_answer_s")}
        if args.throughput_workers:
            with ModelServer(port=0, host="127.0.0.1", multi_model=True, run_dir=root / "run-workers",
                             log_file=root / "server-workers.log", env=env,
                             workers=args.throughput_workers) as server:
                for name, path in model_dirs.items():
                    cold_load(server, name, path, body)
                    client = Client(server)
                    for _ in range(args.warmup):
                        client.invoke(name, body)
                    results[name]["throughput_more_workers"] = {
                        "workers": args.throughput_workers,
                        **throughput(server, name, body, args.clients, args.throughput_requests,
                                     args.throughput_seconds)}
        batch_result = (bench_batch(next(iter(model_dirs.values())), root, body, args)
                        if args.batch_images else None)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": threads,
                    "onnxruntime": onnx_export.runtime_version() if onnx_export.runtime_available() else None,
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "image": {"width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1], "jpeg_bytes": len(body)},
        "server_start_s": round(started, 2),
        "server_warmup": warmed,
        "models_loaded": listed,
        "summary": summary(results),
        "models": results,
        "batch_local": batch_result,
        "targets": targets(results),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
