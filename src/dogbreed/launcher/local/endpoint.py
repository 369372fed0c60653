"""The local multi-model endpoint: the TargetModel router in front of a model server.

:class:`LocalEndpoint` starts the model server and the router (a context manager). The model
server is ``dogbreed-serve`` in the same process, which the router calls directly (router → MMS),
or with ``docker_image`` the serve image (:mod:`~dogbreed.launcher.local.serve_container`), which
the router calls over HTTP. :class:`EndpointDaemon` runs one in the background for ``dogbreed
deploy --local``, in a session of its own. The kernel keeps the books: the daemon holds
``<workdir>/endpoint/endpoint.lock`` (an ``flock``) while it lives, so ``invoke``, ``status`` and
``cleanup`` find it through the lock and ``state.json`` and never take a dead or reused pid for
it; MMS and the zygote die with it (``PR_SET_PDEATHSIG``, their workers with them), so a
SIGKILLed daemon leaves nothing running but a serve container, which docker owns and ``cleanup``
removes by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dogbreed.artifacts import atomic_write
from dogbreed.launcher import events
from dogbreed.launcher.local.router import ModelStore, Router, listen
from dogbreed.launcher.local.runs import LocalError
from dogbreed.launcher.local.serve_container import ServeContainer
from dogbreed.processes import DirLock, signals_held
from dogbreed.serve.server import LOCK_FILE as LOCK_FILE_OF_SERVER
from dogbreed.serve.server import ModelServer

STATE_FILE = "state.json"
LOCK_FILE = "endpoint.lock"  # held by the `deploy --local` process while it starts and serves
ENDPOINT_LOG = "endpoint.log"
MMS_DIR = "mms"  # the model server's run dir, under the endpoint's run dir


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


class StartCancelled(KeyboardInterrupt):
    """A signal arrived while the endpoint was starting: what had started is stopped."""


class LocalEndpoint:
    """A multi-model ``dogbreed-serve`` (MMS; with ``docker_image``, that image's) + the router in
    front of it.

    ``model_server_url`` skips starting one and routes to a server that is already running
    (tests use a fake one). Usable as a context manager; ``stop`` stops what ``start`` started.
    ``cancel``: an event (set by a signal handler) that makes a ``start`` in progress stop what
    it started and raise :class:`StartCancelled` instead of waiting for MMS to be ready.
    """

    def __init__(self, store_dir: Path, run_dir: Path, *, endpoint_name: str | None = None,
                 port: int = 0, max_loaded: int = 4, model_server_url: str | None = None,
                 ready_timeout: float = 120.0, cancel: threading.Event | None = None,
                 docker_image: str | None = None) -> None:
        self.docker_image = docker_image
        self.container: ServeContainer | None = None
        self.store_dir = Path(store_dir)
        self.run_dir = Path(run_dir)
        self.endpoint_name = endpoint_name
        self.port = port
        self.max_loaded = max_loaded
        self.model_server_url = model_server_url
        self.ready_timeout = ready_timeout
        self.cancel = cancel or threading.Event()
        self.server: Any = None
        self.router: Router | None = None

    @property
    def url(self) -> str:
        assert self.router is not None, "endpoint is not started"
        return self.router.url

    def start(self) -> LocalEndpoint:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The router's port first: a taken or invalid one fails here, at once, not after MMS
        # has started (a ListenError: "cannot listen on 127.0.0.1:8090: address already in use").
        sock = listen("127.0.0.1", self.port)
        try:
            if self.docker_image and self.model_server_url is None:
                self.container = ServeContainer(self.docker_image, self.store_dir, self.run_dir)
                self._check_cancel()
                started, url = time.monotonic(), self.container.start()
                self.container.wait_ready(max(self.ready_timeout, 240.0), self.cancel)  # a cold image
                self._check_cancel()  # wait_ready returns early when cancelled
                self.model_server_url = url
                events.event("model_server_ready", url=url, container=self.container.name,
                             seconds=round(time.monotonic() - started, 1))
            elif self.model_server_url is None:
                mms_dir = self.run_dir / MMS_DIR
                owner = DirLock(mms_dir / LOCK_FILE_OF_SERVER).holder()
                if owner is not None:
                    raise LocalError(f"the model server in {mms_dir} belongs to the running "
                                     f"process {owner}; `dogbreed cleanup --local` stops it")
                if mms_dir.exists():
                    shutil.rmtree(mms_dir)
                self.server = ModelServer(port=0, host="127.0.0.1", run_dir=mms_dir,
                                          multi_model=True, log_file=self.run_dir / "model-server.log")
                started = time.monotonic()
                self._check_cancel()
                self.server.start()
                self.server.wait_ready(self.ready_timeout, stop=self.cancel)
                self._check_cancel()  # wait_ready returns early when cancelled
                self.model_server_url = self.server.url
                events.event("model_server_ready", url=self.model_server_url,
                             seconds=round(time.monotonic() - started, 1))
            # A server of our own is driven in-process (no HTTP hop); another one over HTTP.
            server = self.server.direct_client if self.server is not None else self.model_server_url
            self.router = Router(self.store_dir, server,
                                 endpoint_name=self.endpoint_name, max_loaded=self.max_loaded,
                                 port=self.port, sock=sock).start()
        except BaseException:
            if self.router is None:
                sock.close()
            self.stop()
            raise
        return self

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise StartCancelled("local endpoint start-up cancelled")

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        if self.server is not None:
            self.server.stop()
            self.server = None
            events.event("model_server_stopped")
        if self.container is not None:
            self.container.stop()
            self.container = None

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()




class EndpointDaemon:
    """``dogbreed deploy --local`` in the background: start, find (state file), stop."""

    def __init__(self, store: ModelStore, run_dir: Path, *, workdir: Path, endpoint_name: str,
                 port: int, max_loaded: int, docker_image: str | None = None) -> None:
        self.docker_image = docker_image
        self.store = store
        self.endpoint_dir = Path(run_dir)
        self.workdir = Path(workdir)
        self.endpoint_name = endpoint_name
        self.port = port
        self.max_loaded = max_loaded

    def endpoint(self, port: int | None = None, max_loaded: int | None = None,
                 cancel: threading.Event | None = None) -> LocalEndpoint:
        return LocalEndpoint(self.store.root, self.endpoint_dir, endpoint_name=self.endpoint_name,
                             port=self.port if port is None else port,
                             max_loaded=max_loaded or self.max_loaded, cancel=cancel,
                             docker_image=self.docker_image)

    @property
    def lock(self) -> DirLock:
        return DirLock(self.endpoint_dir / LOCK_FILE)

    def owner(self) -> int | None:
        """The pid of the live ``deploy --local`` starting or serving from this dir, else None."""
        return self.lock.holder()

    def state(self) -> dict[str, Any] | None:
        """What the serving endpoint wrote once ready (url, pid, ...); None if none serves."""
        path = self.endpoint_dir / STATE_FILE
        owner = self.owner()
        if owner is None or not path.is_file():
            return None  # a state file with no live owner is a killed endpoint's
        state = json.loads(path.read_text())
        return state if state.get("pid") == owner else None

    def serve_forever(self, port: int | None = None, max_loaded: int | None = None) -> None:
        """Run the endpoint in this process until SIGTERM/SIGINT (``dogbreed deploy --local``).

        A signal during start-up cancels it (MMS and the zygote are stopped, then a
        KeyboardInterrupt named after the signal) rather than waiting for MMS to be ready
        first; once serving, it ends the serving loop."""
        lock = self.lock
        if not lock.acquire():
            raise LocalError(f"a local endpoint (pid {lock.holder()}) already runs from "
                             f"{self.endpoint_dir}; `dogbreed cleanup --local` stops it")
        state_file = self.endpoint_dir / STATE_FILE
        state_file.unlink(missing_ok=True)  # a killed endpoint's
        stop = threading.Event()
        received: list[str] = []

        def handle(signum: int, _frame: Any) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self.endpoint(port, max_loaded, cancel=stop) as endpoint:
                state = {"pid": os.getpid(), "url": endpoint.url,
                         "endpoint_name": self.endpoint_name,
                         "model_server_url": endpoint.model_server_url,
                         "container": endpoint.container and endpoint.container.name,
                         "store": str(self.store.root)}
                _write_json(state_file, state)
                events.event("endpoint_ready", **state)
                while not stop.wait(1.0):
                    pass
        except StartCancelled:
            raise KeyboardInterrupt(received[0] if received else "SIGINT") from None
        finally:
            state_file.unlink(missing_ok=True)
            lock.release()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            events.event("endpoint_stopped", endpoint=self.endpoint_name)

    def deploy_detached(self, port: int | None = None, max_loaded: int | None = None,
                        timeout: float = 180.0) -> dict[str, Any]:
        """Start ``dogbreed deploy --local --foreground`` in the background; wait until it answers."""
        owner = self.owner()
        if owner is not None:
            state = self.state()
            where = f"running at {state['url']}" if state else "starting"
            raise LocalError(f"a local endpoint is {where} (pid {owner}); `dogbreed cleanup --local` stops it")
        port = self.port if port is None else port
        listen("127.0.0.1", port).close()  # a taken or invalid port: one line now, nothing started
        self.endpoint_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.endpoint_dir / ENDPOINT_LOG
        command = [sys.executable, "-m", "dogbreed.launcher.cli", "deploy", "--local", "--foreground",
                   "--workdir", str(self.workdir), "--endpoint-name", self.endpoint_name,
                   "--port", str(port), "--max-loaded-models", str(max_loaded or self.max_loaded),
                   *(["--docker", self.docker_image] if self.docker_image else [])]
        process: subprocess.Popen[bytes] | None = None
        try:
            # Signals held until `process` is bound, so the except below can cancel what started.
            with open(log_path, "w") as log_file, signals_held():
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
            raise LocalError(f"local endpoint not ready after {timeout:.0f}s; log: {log_path}")
        except BaseException:
            # Ctrl-C, SIGTERM, a timeout: the daemon must not go on starting behind our back.
            if process is not None:
                self._cancel(process)
            raise

    def _cancel(self, process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
        """Stop a daemon that is still starting: SIGTERM to its process group (it stops MMS on
        its way out), SIGKILL after ``grace`` seconds (MMS and the zygote die with it)."""
        if process.poll() is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        events.warning("endpoint_start_cancelled", pid=process.pid, returncode=process.returncode)

    def stop_endpoint(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """Stop the endpoint serving or starting from this dir (``cleanup --local``): SIGTERM,
        then SIGKILL if it still holds its lock after ``timeout`` seconds. Returns its state
        (with its pid), or None when nothing was running."""
        state, pid = self.state(), self.owner()
        if pid is None:
            (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)  # a killed endpoint's
            return {"container_removed": name} if (name := self._remove_container_left()) else None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.owner() == pid and time.monotonic() < deadline:
                time.sleep(0.2)  # the kernel drops the lock as the process ends
            if self.owner() != pid:
                break
        events.event("endpoint_stopped", pid=pid, url=state["url"] if state else None)
        self._remove_container_left()  # it stops its container, unless it was SIGKILLed first
        return {**(state or {}), "pid": pid}

    def _remove_container_left(self) -> str | None:
        """The serve container a killed ``deploy --local --docker`` left (docker owns it, so it
        outlives the endpoint process): removed, its name returned. Asked of docker only where
        there is a Docker client."""
        if not shutil.which("docker"):
            return None
        container = ServeContainer(self.docker_image or "", self.store.root, self.endpoint_dir)
        return container.name if container.remove_leftover() else None
