#!/usr/bin/env python3
"""Soak and fault run of the local multi-model endpoint (router + dogbreed-serve), JSON out.

    python scripts/soak.py                                  # 10 minutes, 8 clients
    python scripts/soak.py --seconds 30 --clients 4 --unload-every 8 --kill-every 12 --hostile 150

Everything binds and targets 127.0.0.1 and every loop is bounded in count and time. It writes
two tiny models (ResNet18 and MobileNetV2, random weights, 64 px: serving cost does not depend
on weight values) into a local model store, starts :class:`~dogbreed.launcher.local.endpoint.LocalEndpoint`
(the router in front of a multi-model ``dogbreed-serve`` with the zygote), then:

1. **hostile**: ``--hostile`` requests of over 50 kinds (bad content types, truncated and
   oversized images, extreme aspect ratios, 16-bit PNGs, broken JSON shapes, bad model names,
   MMS management calls, a 60 KB path...) straight at the model server's port. Each must be a
   4xx with a JSON body in under 2 s; no worker may restart; RSS of the server processes
   (java, zygote, workers) before and after.
2. **soak**: ``--clients`` threads invoke both models through the router for ``--seconds``
   (JPEG bodies, TargetModel alternating) while a scheduler unloads a model every
   ``--unload-every`` s (``DELETE /models/{name}`` on the model server, as the platform does; the
   router loads it again on the next request) and SIGKILLs one process of a model's worker every
   ``--kill-every`` s, in turn: a worker that is loading its model during a reload (the model unloaded, then its new worker killed once it has
   connected to MMS: the fault that once made the router refuse a model until a restart), MMS's
   shim for a model, and a zygote-forked worker.
   Reports requests, answers by status, p50/p99, requests over 10 s, the recovery time after
   each fault (until every model answers 200 again), per model its requests, errors, longest
   outage (first failed answer to the next 200) and whether it serves at the end, and RSS
   growth per server process.

Exit 0 when the reliability acceptance figures hold (``"ok": true`` in the JSON), else 1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import random
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import psutil

ALLOWED_SOAK_STATUSES = {200, 503, 424}
HOSTILE_MAX_SECONDS = 2.0
SLOW_SECONDS = 10.0
RECOVERY_LIMIT_SECONDS = 5.0


# --- models ----------------------------------------------------------------------------------------
def write_models(root: Path, image_size: int = 64) -> dict[str, Path]:
    """Two tiny archives written with the project's artifact writer (random weights)."""
    import torch

    from dogbreed import artifacts, data, models

    archives = {}
    for arch in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        model = models.build_model(arch, 5, models.WEIGHTS_NONE).eval()
        metadata = artifacts.ModelMetadata(
            arch=arch, class_names=[f"{i + 1:03d}.Breed_{i}" for i in range(5)], image_size=image_size,
            resize_size=data.resize_size_for(image_size), mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
        model_dir = root / "dirs" / arch
        artifacts.save_model_dir(model_dir, model, metadata)
        archives[arch.replace("_", "")] = artifacts.pack(model_dir, root / "archives" / arch / artifacts.ARCHIVE_NAME)
    return archives


def jpeg(width: int = 120, height: int = 90, seed: int = 0) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def png_header(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 600))
            + chunk(b"IEND", b""))


def encoded(mode: str, fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


# --- hostile requests ------------------------------------------------------------------------------
def hostile_kinds(model: str) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """(kind, method, path, headers, body): every one must be answered with a 4xx JSON body."""
    good = jpeg()
    invoke = f"/models/{model}/invoke"
    image = {"Content-Type": "image/jpeg"}
    as_json = {"Content-Type": "application/json"}

    def js(value: Any) -> bytes:
        return json.dumps(value).encode()

    kinds: list[tuple[str, str, str, dict[str, str], bytes]] = []
    for ctype in ("text/plain", "application/xml", "image/gif", "image/webp", "multipart/form-data",
                  "application/octet-stream", "video/mp4", "image/svg+xml"):
        kinds.append((f"content_type:{ctype}", "POST", invoke, {"Content-Type": ctype}, good))
    kinds.append(("content_type:none", "POST", invoke, {}, good))
    for name, body in (("empty", b""), ("one_byte", b"\xff"), ("random", bytes(random.Random(1).randrange(256)
                                                                               for _ in range(4096))),
                       ("jpeg_truncated_10", good[:10]), ("jpeg_truncated_100", good[:100]),
                       ("jpeg_header_only", good[:2]), ("gif_as_jpeg", encoded("P", "GIF")),
                       ("bmp_as_jpeg", encoded("RGB", "BMP")), ("tiff_as_jpeg", encoded("RGB", "TIFF")),
                       ("webp_as_jpeg", encoded("RGB", "WEBP")), ("text_as_jpeg", b"hello world" * 10)):
        kinds.append((f"body:{name}", "POST", invoke, image, body))
    for width, height in ((200_000, 1), (1, 200_000), (30_000, 30_000), (0, 0), (20_000, 100), (5_000, 10),
                          (16_385, 16), (65_535, 65_535)):
        kinds.append((f"png_header:{width}x{height}", "POST", invoke, {"Content-Type": "image/png"},
                      png_header(width, height)))
    kinds.append(("png:16bit", "POST", invoke, {"Content-Type": "image/png"}, encoded("I;16", "PNG")))
    kinds.append(("png:bad_depth", "POST", invoke, {"Content-Type": "image/png"}, png_header(32, 32, 3, 2)))
    b64 = base64.b64encode(good).decode()
    for name, body in (("array", js([])), ("empty_object", js({})), ("image_int", js({"image": 1})),
                       ("image_empty", js({"image": ""})), ("image_not_b64", js({"image": "!!!not base64"})),
                       ("image_b64_garbage", js({"image": base64.b64encode(b"garbage").decode()})),
                       ("url_disabled", js({"url": "https://example.com/dog.jpg"})),
                       ("top_k_negative", js({"image": b64, "top_k": -1})),
                       ("top_k_text", js({"image": b64, "top_k": "many"})),
                       ("top_k_zero", js({"image": b64, "top_k": 0})),
                       ("nested", b"[" * 20_000 + b"]" * 20_000),
                       ("nan_literal", b'{"image": NaN}'), ("not_utf8", b'{"image": "\xff\xfe"}'),
                       ("truncated_json", b'{"image": "abc'), ("string", js("image"))):
        kinds.append((f"json:{name}", "POST", invoke, as_json, body))
    for name, body in (("initial_workers", {"model_name": "h1", "url": "/tmp", "initial_workers": 4}),
                       ("max_batch_delay", {"model_name": "h1", "url": "/tmp", "max_batch_delay": 5000}),
                       ("name_dot", {"model_name": ".", "url": "/tmp"}),
                       ("name_dotdot", {"model_name": "..", "url": "/tmp"}),
                       ("name_dash", {"model_name": "-rf", "url": "/tmp"}),
                       ("url_http", {"model_name": "h1", "url": "http://example.com/m.tar.gz"}),
                       ("url_missing", {"model_name": "h1", "url": "/nonexistent/model"}),
                       ("url_dotdot", {"model_name": "h1", "url": "/tmp/../etc"}),
                       ("no_url", {"model_name": "h1"})):
        kinds.append((f"register:{name}", "POST", "/models", as_json, js(body)))
    kinds += [
        ("scale:put_min_worker", "PUT", f"/models/{model}?min_worker=4", {}, b""),
        ("scale:put", "PUT", f"/models/{model}", as_json, js({"min_worker": 3})),
        ("route:delete_dotdot", "DELETE", "/models/..", {}, b""),
        ("route:delete_unknown", "DELETE", "/models/no-such-model", {}, b""),
        ("route:invoke_unknown", "POST", "/models/no-such-model/invoke", image, good),
        ("route:predictions", "POST", f"/predictions/{model}", image, good),
        ("route:unknown", "GET", "/api-description", {}, b""),
        ("route:options", "OPTIONS", "/models", {}, b""),
        ("route:patch", "PATCH", "/ping", {}, b""),
        ("route:long_path", "GET", "/models/" + "a" * 60_000, {}, b""),
    ]
    return kinds


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes,
            timeout: float = 30.0) -> tuple[int, dict[str, str], bytes, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data, time.monotonic() - started
    except (OSError, http.client.HTTPException) as exc:
        return -1, {"error": f"{type(exc).__name__}: {exc}"}, b"", time.monotonic() - started
    finally:
        conn.close()


# --- processes ---------------------------------------------------------------------------------------
def server_processes(server: Any) -> dict[str, list[psutil.Process]]:
    java, zygote = psutil.Process(server.java.pid), psutil.Process(server.zygote.pid)
    return {"java": [java], "zygote": [zygote], "workers": zygote.children(recursive=True),
            "shims": java.children()}


def rss_mb(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, items in procs.items():
        total = 0
        for proc in items:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        out[role] = round(total / 2**20, 1)
    out["server_total"] = round(sum(v for k, v in out.items() if k != "shims"), 1)
    return out


def worker_pids(server: Any) -> set[int]:
    return {p.pid for p in psutil.Process(server.zygote.pid).children(recursive=True)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


# --- the runs ------------------------------------------------------------------------------------------
def run_hostile(endpoint: Any, model: str, count: int) -> dict[str, Any]:
    server = endpoint.server
    port = server.port
    good = jpeg()
    for _ in range(20):  # warm up: first requests allocate what later ones reuse
        request(port, "POST", f"/models/{model}/invoke", {"Content-Type": "image/jpeg"}, good)
    kinds = hostile_kinds(model)
    pids_before, recoveries_before = worker_pids(server), server.front.models.recoveries
    rss_before = rss_mb(server_processes(server))
    failures: list[dict[str, Any]] = []
    slowest = 0.0
    statuses: dict[str, int] = {}
    for kind, method, path, headers, body in itertools.islice(itertools.cycle(kinds), count):
        status, _, data, seconds = request(port, method, path, headers, body)
        slowest = max(slowest, seconds)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        try:
            is_json = isinstance(json.loads(data), dict)
        except ValueError:
            is_json = False
        if not (400 <= status < 500 and is_json and seconds < HOSTILE_MAX_SECONDS):
            failures.append({"kind": kind, "status": status, "seconds": round(seconds, 3), "body": data[:200].decode(
                "utf-8", "replace")})
    for _ in range(20):
        request(port, "POST", f"/models/{model}/invoke", {"Content-Type": "image/jpeg"}, good)
    rss_after = rss_mb(server_processes(server))
    restarts = len(pids_before - worker_pids(server)) + server.front.models.recoveries - recoveries_before
    growth = (rss_after["server_total"] - rss_before["server_total"]) / max(rss_before["server_total"], 1)
    result = {"requests": count, "kinds": len(kinds), "statuses": statuses, "failures": failures[:20],
              "failure_count": len(failures), "slowest_s": round(slowest, 3), "worker_restarts": restarts,
              "rss_mb_before": rss_before, "rss_mb_after": rss_after, "server_rss_growth": round(growth, 4)}
    result["ok"] = bool(not failures and restarts == 0 and growth < 0.10 and len(kinds) >= 50)
    return result


class Soak:
    def __init__(self, endpoint: Any, targets: dict[str, str], clients: int, seconds: float,
                 unload_every: float, kill_every: float) -> None:
        self.endpoint, self.targets = endpoint, targets  # target -> model server name
        self.clients, self.seconds = clients, seconds
        self.unload_every, self.kill_every = unload_every, kill_every
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.slow = 0
        self.samples: list[dict[str, Any]] = []  # unexpected answers
        self.faults: list[dict[str, Any]] = []
        self.stop = threading.Event()
        # Per target: requests, errors, when its current outage began, its longest outage.
        self.per_model = {t: {"requests": 0, "errors": 0, "down_since": None, "longest_outage_s": 0.0}
                          for t in targets}

    def client(self, index: int) -> None:
        router_port = int(self.endpoint.url.rsplit(":", 1)[1])
        body = jpeg(seed=index)
        targets = list(self.targets)
        for n in itertools.count():
            if self.stop.is_set():
                return
            target = targets[(index + n) % len(targets)]
            headers = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": target}
            status, _, data, seconds = request(router_port, "POST", "/endpoints/soak/invocations", headers, body,
                                               timeout=60)
            with self.lock:
                self.record(target, status == 200, time.monotonic())
                self.latencies.append(seconds)
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                self.slow += seconds > SLOW_SECONDS
                if status not in ALLOWED_SOAK_STATUSES and len(self.samples) < 20:
                    self.samples.append({"status": status, "target": target, "body": data[:300].decode(
                        "utf-8", "replace")})
            if status != 200:
                time.sleep(0.05)  # a client backs off a little on an error, as SDKs do

    def record(self, target: str, ok: bool, now: float) -> None:
        """One answer for ``target``: an outage runs from its first failed answer to the next 200.
        Locked."""
        model = self.per_model[target]
        model["requests"] += 1
        if ok and model["down_since"] is not None:
            model["longest_outage_s"] = max(model["longest_outage_s"], now - model["down_since"])
            model["down_since"] = None
        elif not ok:
            model["errors"] += 1
            if model["down_since"] is None:
                model["down_since"] = now

    def model_report(self, serving_at_end: set[str], ended: float) -> dict[str, dict[str, Any]]:
        out = {}
        for target, model in self.per_model.items():
            longest = model["longest_outage_s"]
            if model["down_since"] is not None:  # still down when the clients stopped
                longest = max(longest, ended - model["down_since"])
            out[target] = {"requests": model["requests"], "errors": model["errors"],
                           "longest_outage_s": round(longest, 3), "serves_at_end": target in serving_at_end}
        return out

    def serving(self, limit: float = 30.0) -> set[str]:
        """The targets that answer 200 through the router within ``limit`` seconds."""
        router_port = int(self.endpoint.url.rsplit(":", 1)[1])
        body, deadline, ok = jpeg(seed=98), time.monotonic() + limit, set()
        while len(ok) < len(self.targets) and time.monotonic() < deadline:
            for target in set(self.targets) - ok:
                status, *_ = request(router_port, "POST", "/invocations", {
                    "Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": target}, body, timeout=15)
                if status == 200:
                    ok.add(target)
            if len(ok) < len(self.targets):
                time.sleep(0.1)
        return ok

    def recovered_after(self, started: float, limit: float = 60.0) -> float | None:
        """Seconds from ``started`` until every model answers 200 through the router."""
        router_port = int(self.endpoint.url.rsplit(":", 1)[1])
        body = jpeg(seed=99)
        deadline = started + limit
        pending = set(self.targets)
        while pending and time.monotonic() < deadline:
            for target in sorted(pending):
                status, *_ = request(router_port, "POST", "/invocations", {
                    "Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": target}, body, timeout=15)
                if status == 200:
                    pending.discard(target)
            if pending:
                time.sleep(0.1)
        return None if pending else round(time.monotonic() - started, 3)

    def kill_during_reload(self, n: int) -> dict[str, Any]:
        """Unload a model (as the platform does), let the next request reload it, and SIGKILL
        the reload's new worker once it has connected to MMS (it is loading the model then)."""
        server = self.endpoint.server
        target, name = list(self.targets.items())[n % len(self.targets)]
        log = self.endpoint.run_dir / "model-server.log"
        connected = log.read_text(errors="replace").count("Connection accepted")
        before = {p.pid for p in psutil.Process(server.zygote.pid).children()}
        status, *_ = request(server.port, "DELETE", f"/models/{name}", {}, b"", timeout=60)
        router_port = int(self.endpoint.url.rsplit(":", 1)[1])
        threading.Thread(target=request, daemon=True, args=(router_port, "POST", "/invocations", {
            "Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": target}, jpeg(seed=97))).start()
        deadline, victim = time.monotonic() + 30, None
        while victim is None and time.monotonic() < deadline:
            new = [p for p in psutil.Process(server.zygote.pid).children() if p.pid not in before]
            if new and log.read_text(errors="replace").count("Connection accepted") > connected:
                victim = new[0]
            else:
                time.sleep(0.01)
        if victim is None:
            return {"fault": "kill_during_reload", "model": name, "skipped": "no reload seen", "unload_status": status}
        started = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        return {"fault": "kill_during_reload", "pid": victim.pid, "model": name, "unload_status": status,
                "recovery_s": self.recovered_after(started)}

    def kill_worker(self, n: int) -> dict[str, Any]:
        if n % 3 == 0:
            return self.kill_during_reload(n // 3)
        procs = server_processes(self.endpoint.server)
        role = "shim" if n % 3 == 1 else "worker"
        name = list(self.targets.values())[n // 3 % len(self.targets)]
        candidates = [p for p in procs["shims"] if name in " ".join(p.cmdline())] if role == "shim" else []
        if role == "worker":  # the zygote's direct children: one per model (MMS's per-model worker)
            candidates = psutil.Process(self.endpoint.server.zygote.pid).children()
        if not candidates:
            return {"fault": f"kill_{role}", "skipped": "no such process"}
        victim = random.Random(n).choice(candidates)
        started = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        return {"fault": f"kill_{role}", "pid": victim.pid, "model": name if role == "shim" else None,
                "recovery_s": self.recovered_after(started)}

    def unload(self, n: int) -> dict[str, Any]:
        name = list(self.targets.values())[n % len(self.targets)]
        started = time.monotonic()
        status, _, _, seconds = request(self.endpoint.server.port, "DELETE", f"/models/{name}", {}, b"", timeout=60)
        return {"fault": "unload", "model": name, "status": status, "unload_s": round(seconds, 3),
                "recovery_s": self.recovered_after(started)}

    def run(self) -> dict[str, Any]:
        server = self.endpoint.server
        rss_before = rss_mb(server_processes(server))
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        next_unload, next_kill = started + self.unload_every, started + self.kill_every
        unloads = kills = 0
        while time.monotonic() < started + self.seconds:
            now = time.monotonic()
            if now >= next_kill:
                self.faults.append(self.kill_worker(kills))
                kills += 1
                next_kill += self.kill_every
                next_unload = max(next_unload, time.monotonic() + 1)
            elif now >= next_unload:
                self.faults.append(self.unload(unloads))
                unloads += 1
                next_unload += self.unload_every
            time.sleep(0.05)
        self.stop.set()
        for thread in threads:
            thread.join(70)
        elapsed = time.monotonic() - started
        models = self.model_report(self.serving(), started + elapsed)
        rss_after = rss_mb(server_processes(server))
        recoveries = [f.get("recovery_s") for f in self.faults if f["fault"].startswith("kill") and "pid" in f]
        result = {
            "clients": self.clients, "seconds": round(elapsed, 1), "requests": len(self.latencies),
            "requests_per_s": round(len(self.latencies) / elapsed, 1), "statuses": self.statuses,
            "p50_s": percentile(self.latencies, 0.50), "p99_s": percentile(self.latencies, 0.99),
            "max_s": round(max(self.latencies), 3) if self.latencies else None,
            "over_10s": self.slow, "unexpected": self.samples, "faults": self.faults,
            "unloads": unloads, "kills": kills, "front_recoveries": server.front.models.recoveries,
            "models": models, "every_model_serves_at_end": all(m["serves_at_end"] for m in models.values()),
            "rss_mb_before": rss_before, "rss_mb_after": rss_after,
            "rss_growth": {k: round((rss_after[k] - v) / v, 4) if v else None for k, v in rss_before.items()},
        }
        result["ok"] = bool(
            self.slow == 0 and set(self.statuses) <= {str(s) for s in ALLOWED_SOAK_STATUSES}
            and self.statuses.get("200", 0) > 0 and result["every_model_serves_at_end"]
            and all(r is not None and r <= RECOVERY_LIMIT_SECONDS for r in recoveries)
            and all(f.get("recovery_s") is not None for f in self.faults if "skipped" not in f))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--unload-every", type=float, default=20.0)
    parser.add_argument("--kill-every", type=float, default=120.0)
    parser.add_argument("--hostile", type=int, default=500, help="hostile requests (0: skip)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="default: a temp dir, removed afterwards")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 64 and 0 < args.seconds <= 3600 and 0 <= args.hostile <= 10_000):
        parser.error("bounded runs only: 1-64 clients, at most 3600 s, at most 10000 hostile requests")

    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from dogbreed.launcher.local.endpoint import LocalEndpoint
    from dogbreed.launcher.local.router import ModelStore, mms_model_name

    with tempfile.TemporaryDirectory(prefix="dbsoak-", dir="/tmp") as tmp:
        work = args.workdir or Path(tmp)
        archives = write_models(work / "models", args.image_size)
        store = ModelStore(work / "store")
        targets = {}
        for name, archive in archives.items():
            store.add(name, archive)
            targets[f"{name}/model.tar.gz"] = mms_model_name(f"{name}/model.tar.gz")
        report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                                  "config": {k: str(v) for k, v in vars(args).items()}}
        started = time.monotonic()
        with LocalEndpoint(store.root, work / "run", endpoint_name="soak", max_loaded=4) as endpoint:
            report["start_s"] = round(time.monotonic() - started, 1)
            soak = Soak(endpoint, targets, args.clients, args.seconds, args.unload_every, args.kill_every)
            if soak.recovered_after(time.monotonic(), 120) is None:
                raise SystemExit("the models never answered 200")
            if args.hostile:
                report["hostile"] = run_hostile(endpoint, next(iter(targets.values())), args.hostile)
            report["soak"] = soak.run()
        report["machine"]["load_avg_end"] = os.getloadavg()
        report["ok"] = bool(report["soak"]["ok"] and report.get("hostile", {"ok": True})["ok"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
