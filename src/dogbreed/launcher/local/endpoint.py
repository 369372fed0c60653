"""The local multi-model endpoint: ``dogbreed-serve`` (MMS) behind the TargetModel router.

:class:`LocalEndpoint` starts MMS on a free port and the router in front of it (a context
manager). :class:`EndpointDaemon` runs one in the background for ``dogbreed deploy --local``,
found again through ``<workdir>/endpoint/state.json`` by ``invoke``, ``status`` and ``cleanup``.
"""

from __future__ import annotations

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

from dogbreed.artifacts import atomic_write
from dogbreed.launcher import events
from dogbreed.launcher.local.router import ModelStore, Router, listen
from dogbreed.launcher.local.runs import LocalError
from dogbreed.processes import signals_held
from dogbreed.serve.server import ModelServer

STATE_FILE = "state.json"
ENDPOINT_LOG = "endpoint.log"
MMS_DIR = "mms"  # the model server's run dir, under the endpoint's run dir
# What dogbreed.serve.server writes in its run dir: the pids of MMS (java) and the zygote, each
# a session leader (its own process group), and of the process that started them (the front).
CHILD_PID_FILES = ("mms.pid", "zygote.pid")
FRONT_PID_FILE = "dogbreed-serve.pid"


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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _runs_from(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is a process started for the server in ``run_dir``: its command line
    names a file in it (MMS: ``-Dlog4j.configurationFile=file://<run dir>/…``, the zygote:
    ``<run dir>/zygote.sock``), so a pid recycled by another program is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone, or no /proc to check with: leave it alone
    return (str(run_dir) + "/").encode() in cmdline


def running_front(run_dir: Path) -> int | None:
    """The pid of a live ``dogbreed … deploy`` that owns the server in ``run_dir`` (ready or
    still starting, state file or not), else None."""
    pid = _read_pid(Path(run_dir) / FRONT_PID_FILE)
    if pid is None or pid == os.getpid() or not _pid_alive(pid) or not _is_endpoint_process(pid):
        return None
    return pid


def leftover_processes(run_dir: Path) -> dict[str, int]:
    """MMS / zygote processes still running from ``run_dir`` (``mms.pid``, ``zygote.pid``)."""
    run_dir = Path(run_dir).resolve()
    found = {}
    for name in CHILD_PID_FILES:
        pid = _read_pid(run_dir / name)
        if pid is not None and pid > 1 and pid != os.getpid() and _pid_alive(pid) \
                and _runs_from(pid, run_dir):
            found[name.removesuffix(".pid")] = pid
    return found


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:  # a session leader, as the server starts them: its workers too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_leftovers(run_dir: Path, grace: float = 5.0) -> list[dict[str, Any]]:
    """Stop what an endpoint that died without stopping its server (its daemon SIGKILLed)
    left running from ``run_dir``: MMS and the zygote, in sessions of their own, outlive it,
    serve nobody and hold the run dir. Each one still running (checked by
    :func:`leftover_processes`) gets SIGTERM on its process group, SIGKILL after ``grace``
    seconds; an ``endpoint_leftover_stopped`` warning names each. Returns what was stopped."""
    found = leftover_processes(run_dir)
    for pid in found.values():
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_pid_alive(pid) for pid in found.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = []
    for role, pid in found.items():
        killed = _pid_alive(pid)
        if killed:
            _signal_group(pid, signal.SIGKILL)
        events.warning("endpoint_leftover_stopped", process=role, pid=pid, run_dir=run_dir,
                       signal="SIGKILL" if killed else "SIGTERM")
        stopped.append({"process": role, "pid": pid})
    return stopped


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


class StartCancelled(KeyboardInterrupt):
    """A signal arrived while the endpoint was starting: what had started is stopped."""


class LocalEndpoint:
    """A multi-model ``dogbreed-serve`` (MMS) on a free port + the router in front of it.

    ``model_server_url`` skips starting MMS and routes to a server that is already running
    (tests use a fake one). Usable as a context manager; ``stop`` stops what ``start`` started.
    ``cancel``: an event (set by a signal handler) that makes a ``start`` in progress stop what
    it started and raise :class:`StartCancelled` instead of waiting for MMS to be ready.
    """

    def __init__(self, store_dir: Path, run_dir: Path, *, endpoint_name: str | None = None,
                 port: int = 0, max_loaded: int = 4, model_server_url: str | None = None,
                 ready_timeout: float = 120.0, cancel: threading.Event | None = None) -> None:
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
            if self.model_server_url is None:
                mms_dir = self.run_dir / MMS_DIR
                owner = running_front(mms_dir)
                if owner is not None:
                    raise LocalError(f"the model server in {mms_dir} belongs to the running "
                                     f"endpoint process {owner}; `dogbreed cleanup --local` stops it")
                stop_leftovers(mms_dir)  # a killed endpoint's MMS + zygote: before the rmtree
                if mms_dir.exists():
                    shutil.rmtree(mms_dir)
                self.server = ModelServer(port=free_port(), host="127.0.0.1", run_dir=mms_dir,
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

    def endpoint(self, port: int | None = None, max_loaded: int | None = None,
                 cancel: threading.Event | None = None) -> LocalEndpoint:
        return LocalEndpoint(self.store.root, self.endpoint_dir, endpoint_name=self.endpoint_name,
                             port=self.port if port is None else port,
                             max_loaded=max_loaded or self.max_loaded, cancel=cancel)

    def state(self) -> dict[str, Any] | None:
        path = self.endpoint_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if not _pid_alive(state.get("pid", -1)) or not _is_endpoint_process(state["pid"]):
            return None  # stale: the endpoint died without cleaning up (or its pid was reused)
        return state

    def serve_forever(self, port: int | None = None, max_loaded: int | None = None) -> None:
        """Run the endpoint in this process until SIGTERM/SIGINT (``dogbreed deploy --local``).

        A signal during start-up cancels it (MMS and the zygote are stopped, then a
        KeyboardInterrupt named after the signal) rather than waiting for MMS to be ready
        first; once serving, it ends the serving loop."""
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
                         "store": str(self.store.root)}
                _write_json(self.endpoint_dir / STATE_FILE, state)
                events.event("endpoint_ready", **state)
                while not stop.wait(1.0):
                    pass
        except StartCancelled:
            raise KeyboardInterrupt(received[0] if received else "SIGINT") from None
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
        starting = running_front(self.mms_dir)
        if starting is not None:
            raise LocalError(f"a local endpoint is starting (pid {starting}); "
                             "`dogbreed cleanup --local` stops it")
        port = self.port if port is None else port
        listen("127.0.0.1", port).close()  # a taken or invalid port: one line now, nothing started
        stop_leftovers(self.mms_dir)  # here too, so the events reach this terminal
        self.endpoint_dir.mkdir(parents=True, exist_ok=True)
        (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
        log_path = self.endpoint_dir / ENDPOINT_LOG
        command = [sys.executable, "-m", "dogbreed.launcher.cli", "deploy", "--local", "--foreground",
                   "--workdir", str(self.workdir), "--endpoint-name", self.endpoint_name,
                   "--port", str(port), "--max-loaded-models", str(max_loaded or self.max_loaded)]
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

    @property
    def mms_dir(self) -> Path:
        return self.endpoint_dir.resolve() / MMS_DIR

    def _cancel(self, process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
        """Stop a daemon that is still starting: SIGTERM to its process group (it stops MMS on
        its way out), SIGKILL after ``grace`` seconds and then what it left behind."""
        if process.poll() is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
            stop_leftovers(self.mms_dir)
        (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
        events.warning("endpoint_start_cancelled", pid=process.pid, returncode=process.returncode)

    def stop_endpoint(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """Stop the running endpoint (``cleanup --local``), then anything a killed one left
        running (:func:`stop_leftovers`). Returns the stopped endpoint's state, with
        ``leftovers`` when some were stopped; None when nothing was running."""
        state = self.state()
        pid = state["pid"] if state else running_front(self.mms_dir)  # still starting
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            events.event("endpoint_stopped", pid=pid, url=state["url"] if state else None)
        leftovers = stop_leftovers(self.mms_dir)
        if pid is None and not leftovers:
            return None
        result: dict[str, Any] = dict(state) if state else {}
        if pid is not None:
            result["pid"] = pid
        if leftovers:
            result["leftovers"] = leftovers
        return result
