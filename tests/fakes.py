"""Test doubles for the launcher: a tiny MMS management/inference server, fake model archives
and a fake training entry point (run as ``FAKE_TRAIN_COMMAND``: the real metric lines and files
in milliseconds per epoch). No Java, no torch.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dogbreed import artifacts
from dogbreed.artifacts import METADATA_FILE, WEIGHTS_FILE  # noqa: F401 - re-exported for tests
from dogbreed.metrics import best_line


def raw_exchange(host: str, port: int, request: bytes) -> bytes:
    """Send ``request`` as is; all the server answers until it closes (or 5 s pass)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open>")
        return b"".join(chunks)


def read_model_json(url: Path) -> dict[str, Any]:
    """The model.json of a model dir or model.tar.gz, as a server finds it (unpacked once)."""
    with tempfile.TemporaryDirectory() as staging:
        model_dir, _ = artifacts.resolve_model_dir(url, Path(staging))
        return json.loads((model_dir / METADATA_FILE).read_text())


def make_archive(tmp: Path, name: str, classes: list[str] | None = None) -> Path:
    """A model.tar.gz holding a model.json (and a placeholder model.pt): enough for routing."""
    model_dir = tmp / f"{name}-dir"
    model_dir.mkdir(parents=True)
    (model_dir / artifacts.WEIGHTS_FILE).write_bytes(b"not really weights")
    (model_dir / artifacts.METADATA_FILE).write_text(json.dumps({"name": name,
                                                                "class_names": classes or ["a", "b"]}))
    return artifacts.pack(model_dir, tmp / f"{name}.tar.gz")


class FakeModelServer:
    """Speaks the MMS API used by the router: POST/DELETE/GET /models, POST /models/{n}/invoke.

    ``invoke`` answers 400 for a body of ``b"bad"`` (the way MMS answers a non-image), else the
    model name and the ``name`` field of its model.json, so a test can tell models apart.
    """

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail_load_with: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:  # noqa: N802
                parsed = urllib.parse.urlsplit(self.path)
                data = self.body()
                if parsed.path == "/models":
                    spec = json.loads(data) if data else dict(urllib.parse.parse_qsl(parsed.query))
                    name, url = spec["model_name"], spec["url"]
                    with fake.lock:
                        fake.calls.append(("load", name))
                        if fake.fail_load_with:
                            return self.reply(fake.fail_load_with, {"code": fake.fail_load_with,
                                                                    "message": "cannot load"})
                        if name in fake.loaded:
                            return self.reply(409, {"code": 409, "message": f"{name} exists"})
                        try:
                            fake.loaded[name] = read_model_json(Path(url))
                        except artifacts.ArtifactError as exc:  # as the real server answers it
                            return self.reply(400, {"code": 400, "type": "ArtifactError", "message": str(exc)})
                    return self.reply(200, {"status": f"Model {name} registered"})
                parts = parsed.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "models" and parts[2] == "invoke":
                    name = parts[1]
                    with fake.lock:
                        fake.calls.append(("invoke", name))
                        meta = fake.loaded.get(name)
                    if meta is None:
                        return self.reply(404, {"code": 404, "message": f"Model not found: {name}"})
                    if data == b"bad":
                        return self.reply(400, {"code": 400, "message": "not an image"})
                    return self.reply(200, {"model": name, "artifact": meta["name"],
                                            "content_type": self.headers.get("Content-Type"),
                                            "custom": self.headers.get(
                                                "X-Amzn-SageMaker-Custom-Attributes")})
                self.reply(404, {"code": 404, "message": "no route"})

            def do_DELETE(self) -> None:  # noqa: N802
                name = self.path.strip("/").split("/")[-1]
                with fake.lock:
                    fake.calls.append(("unload", name))
                    if fake.loaded.pop(name, None) is None:
                        return self.reply(404, {"code": 404, "message": "not found"})
                self.reply(200, {"status": f"Model {name} unregistered"})

            def do_GET(self) -> None:  # noqa: N802
                with fake.lock:
                    self.reply(200, {"models": [{"modelName": n} for n in fake.loaded]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeModelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for k, _ in self.calls if k == kind)


# --- a fake training entry point ---------------------------------------------------------------------
# The entry point as a command (this file run by path: tests/ is not a package).
FAKE_TRAIN_COMMAND = (sys.executable, str(Path(__file__).resolve()))
FAKE_EPOCH_SECONDS_ENV = "DOGBREED_FAKE_EPOCH_SECONDS"
FAKE_FAIL_ENV = "DOGBREED_FAKE_FAIL"  # set: fail every run with this reason
# Set: the first epoch starts with the trainer's timing line, this many seconds per image.
FAKE_SECONDS_PER_IMAGE_ENV = "DOGBREED_FAKE_SECONDS_PER_IMAGE"
FAKE_IMAGES = {"train": 80, "valid": 20, "test": 20}  # the sample data's counts


def fake_accuracy(lr: float, epoch: int, epochs: int) -> float:
    """Deterministic: a larger lr scores higher (0.2 at 1e-3 … 0.7 at 1e-1), rising per epoch."""
    import math

    base = 0.2 + 0.25 * (math.log10(lr) + 3)
    return round(base * epoch / epochs, 4)


def fake_train_main() -> int:
    """Behaves like ``python -m dogbreed.train`` on the outside, in milliseconds: reads the
    /opt/ml layout, prints per-epoch metric lines and the final line, writes model.pt +
    model.json, stops on SIGTERM with exit 143 and a failure file, fails on a bad hyperparameter."""
    import os
    import signal
    import sys
    import time

    from dogbreed import contract
    from dogbreed.metrics import timing_line

    paths = contract.Paths.from_env()
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        hp = contract.load_hyperparameters([], paths)
    except contract.ContractError as exc:
        contract.write_failure(f"ContractError: {exc}", paths)
        return 1
    paths.create_output_dirs()
    if os.environ.get(FAKE_FAIL_ENV):
        contract.write_failure(os.environ[FAKE_FAIL_ENV], paths)
        return 1
    delay = float(os.environ.get(FAKE_EPOCH_SECONDS_ENV, "0.02"))
    if os.environ.get(FAKE_SECONDS_PER_IMAGE_ENV):
        per_image = float(os.environ[FAKE_SECONDS_PER_IMAGE_ENV])
        print(timing_line(2, 64, 64 * per_image, False, FAKE_IMAGES["train"], FAKE_IMAGES["valid"],
                          FAKE_IMAGES["test"], hp.image_size), file=sys.stderr, flush=True)
    for epoch in range(1, hp.epochs + 1):
        ends = time.monotonic() + delay
        while not stopped and time.monotonic() < ends:  # an epoch a SIGTERM cuts short
            time.sleep(min(0.01, delay))
        if stopped:
            contract.write_failure("stopped by SIGTERM", paths)
            return 143
        acc = fake_accuracy(hp.lr, epoch, hp.epochs)
        print(f"epoch={epoch} train_loss={1 - acc:.4f} train_accuracy={acc:.4f} "
              f"valid_loss={1 - acc:.4f} valid_accuracy={acc:.4f} images_per_sec=100.0 "
              f"epoch_seconds={delay:.2f} lr={hp.lr:.6g}", flush=True)
    print(best_line(hp.epochs, 1 - acc, acc), flush=True)
    (paths.model_dir / WEIGHTS_FILE).write_bytes(b"fake weights")
    (paths.model_dir / METADATA_FILE).write_text(json.dumps(
        {"name": hp.model, "hyperparameters": hp.to_dict()}))
    print("fake training done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(fake_train_main())
