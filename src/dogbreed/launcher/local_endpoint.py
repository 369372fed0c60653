"""The local multi-model endpoint: ``dogbreed-serve`` (MMS) behind the TargetModel router.

:class:`LocalEndpoint` starts MMS on a free port and the router in front of it (a context
manager). :class:`EndpointDaemon` runs one in the background for ``dogbreed deploy --local``,
found again through ``<workdir>/endpoint/state.json`` by ``invoke``, ``status`` and ``cleanup``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dogbreed.launcher import events
from dogbreed.launcher.local_runs import LocalError
from dogbreed.launcher.router import ModelStore, Router

STATE_FILE = "state.json"
ENDPOINT_LOG = "endpoint.log"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_endpoint_process(pid: int) -> bool:
    """Whether ``pid`` runs ``dogbreed … deploy`` (so a reused pid is never signalled)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (not Linux): trust the state file
    return b"deploy" in argv and any(b"dogbreed" in arg for arg in argv)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    from dogbreed.artifacts import atomic_write

    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


class LocalEndpoint:
    """A multi-model ``dogbreed-serve`` (MMS) on a free port + the router in front of it.

    ``model_server_url`` skips starting MMS and routes to a server that is already running
    (tests use a fake one). Usable as a context manager; ``stop`` stops what ``start`` started.
    """

    def __init__(self, store_dir: Path, run_dir: Path, *, endpoint_name: str | None = None,
                 port: int = 0, max_loaded: int = 4, model_server_url: str | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.store_dir = Path(store_dir)
        self.run_dir = Path(run_dir)
        self.endpoint_name = endpoint_name
        self.port = port
        self.max_loaded = max_loaded
        self.model_server_url = model_server_url
        self.ready_timeout = ready_timeout
        self.server: Any = None
        self.router: Router | None = None

    @property
    def url(self) -> str:
        assert self.router is not None, "endpoint is not started"
        return self.router.url

    def start(self) -> LocalEndpoint:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.model_server_url is None:
                from dogbreed.serve.server import ModelServer

                mms_dir = self.run_dir / "mms"
                if mms_dir.exists():
                    shutil.rmtree(mms_dir)
                options: dict[str, Any] = {}
                if "log_file" in inspect.signature(ModelServer).parameters:
                    options["log_file"] = self.run_dir / "model-server.log"
                self.server = ModelServer(port=free_port(), host="127.0.0.1", run_dir=mms_dir,
                                          multi_model=True, **options)
                started = time.monotonic()
                self.server.start()
                self.server.wait_ready(self.ready_timeout)
                self.model_server_url = self.server.url
                events.event("model_server_ready", url=self.model_server_url,
                             seconds=round(time.monotonic() - started, 1))
            work = self.run_dir / "router-models"
            if work.exists():
                shutil.rmtree(work)
            self.router = Router(self.store_dir, self.model_server_url, work,
                                 endpoint_name=self.endpoint_name, max_loaded=self.max_loaded,
                                 port=self.port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        if self.server is not None:
            self.server.stop()
            self.server = None
            events.event("model_server_stopped")

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()




class EndpointDaemon:
    """``dogbreed deploy --local`` in the background: start, find (state file), stop."""

    def __init__(self, store: ModelStore, run_dir: Path, *, workdir: Path, endpoint_name: str,
                 port: int, max_loaded: int) -> None:
        self.store = store
        self.endpoint_dir = Path(run_dir)
        self.workdir = Path(workdir)
        self.endpoint_name = endpoint_name
        self.port = port
        self.max_loaded = max_loaded

    def endpoint(self, port: int | None = None, max_loaded: int | None = None) -> LocalEndpoint:
        return LocalEndpoint(self.store.root, self.endpoint_dir, endpoint_name=self.endpoint_name,
                             port=self.port if port is None else port,
                             max_loaded=max_loaded or self.max_loaded)

    def state(self) -> dict[str, Any] | None:
        path = self.endpoint_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if not _pid_alive(state.get("pid", -1)) or not _is_endpoint_process(state["pid"]):
            return None  # stale: the endpoint died without cleaning up (or its pid was reused)
        return state

    def serve_forever(self, port: int | None = None, max_loaded: int | None = None) -> None:
        """Run the endpoint in this process until SIGTERM/SIGINT (``dogbreed deploy --local``)."""
        stop = threading.Event()

        def handle(signum: int, _frame: Any) -> None:
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self.endpoint(port, max_loaded) as endpoint:
                state = {"pid": os.getpid(), "url": endpoint.url,
                         "endpoint_name": self.endpoint_name,
                         "model_server_url": endpoint.model_server_url,
                         "store": str(self.store.root)}
                _write_json(self.endpoint_dir / STATE_FILE, state)
                events.event("endpoint_ready", **state)
                while not stop.wait(1.0):
                    pass
        finally:
            (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            events.event("endpoint_stopped", endpoint=self.endpoint_name)

    def deploy_detached(self, port: int | None = None, max_loaded: int | None = None,
                        timeout: float = 180.0) -> dict[str, Any]:
        """Start ``dogbreed deploy --local --foreground`` in the background; wait until it answers."""
        existing = self.state()
        if existing:
            raise LocalError(f"a local endpoint is already running at {existing['url']} "
                             f"(pid {existing['pid']}); `dogbreed cleanup --local` stops it")
        self.endpoint_dir.mkdir(parents=True, exist_ok=True)
        (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
        log_path = self.endpoint_dir / ENDPOINT_LOG
        command = [sys.executable, "-m", "dogbreed.launcher.cli", "deploy", "--local", "--foreground",
                   "--workdir", str(self.workdir), "--endpoint-name", self.endpoint_name,
                   "--port", str(self.port if port is None else port),
                   "--max-loaded-models", str(max_loaded or self.max_loaded)]
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and state["pid"] == process.pid:
                return {**state, "log": str(log_path)}
            if process.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise LocalError(f"local endpoint exited with {process.returncode}:\n{tail}")
            time.sleep(0.5)
        process.terminate()
        raise LocalError(f"local endpoint not ready after {timeout:.0f}s; log: {log_path}")

    def stop_endpoint(self, timeout: float = 60.0) -> dict[str, Any] | None:
        state = self.state()
        if state is None:
            return None
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
        events.event("endpoint_stopped", pid=state["pid"], url=state["url"])
        return state
