"""``dogbreed-serve`` and :class:`ModelServer`: Multi Model Server run the way SageMaker runs it.

Environment (names from :mod:`dogbreed.contract`): ``SAGEMAKER_BIND_TO_PORT`` (8080),
``DOGBREED_BIND_HOST`` (0.0.0.0), ``SAGEMAKER_MULTI_MODEL``, ``SAGEMAKER_MODEL_SERVER_WORKERS``
(workers per model, 1), ``SAGEMAKER_MODEL_SERVER_TIMEOUT`` (seconds per request, 60),
``SAGEMAKER_BASE_DIR`` (the model dir is ``$SAGEMAKER_BASE_DIR/model``), ``DOGBREED_RUN_DIR``,
``DOGBREED_SERVE_WORKER_MEMORY_MB`` (address space a worker may add after its fork; unset: no limit).

The process stays in the foreground; SIGTERM or SIGINT stops everything it started::

    dogbreed-serve      the HTTP front on the public port (front.py, lifecycle.py)
    ├── zygote          torch imported once; forks, owns and kills every backend worker (zygote.py)
    └── java            MMS, on a unix socket in the run dir; runs a shim per worker

Each child leads its own session, killed as a group at stop, and, started from the main thread,
dies with this process whatever ends it (``PR_SET_PDEATHSIG``: nothing is left to hunt down after
a SIGKILL). ``DOGBREED_SERVE_ZYGOTE=0``: MMS
starts plain Python workers (seconds per cold load; ``scripts/bench_serve.py`` measures both).
The run dir (``DOGBREED_RUN_DIR``, else a temp dir removed at stop) holds ``mms.properties``,
``log4j2.properties``, the sockets, the shim, ``models/`` (unpacked archives) and the lock that
keeps a second server out of it while this one lives.

    with ModelServer(port=0, host="127.0.0.1", multi_model=True) as server:
        server.client.load_model("resnet18", "/path/to/model.tar.gz")
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import IO

from dogbreed import artifacts, contract
from dogbreed.processes import DirLock, dying_with_this_process, signals_held
from dogbreed.serve import JVM_OPTS_ENV, RUN_DIR_ENV, WORKER_MEMORY_ENV, ZYGOTE_ENV, front, zygote
from dogbreed.serve.client import LOAD_TIMEOUT, ServeClient
from dogbreed.serve.lifecycle import DirectClient, ModelLifecycle

log = logging.getLogger("dogbreed.serve")

HANDLER_MODULE = "dogbreed.serve.handler"
SINGLE_MODEL_NAME = contract.SINGLE_MODEL_NAME
LOCK_FILE = "dogbreed-serve.lock"
# A unix socket path is at most 107 bytes (sun_path holds 108, the NUL included); the longest
# socket in the run dir is an MMS worker's, "/.mms.sock.<port>" (16 with a 5-digit port).
MAX_RUN_DIR_LENGTH = 107 - len("/.mms.sock.65535")
# Workers per model without SAGEMAKER_MODEL_SERVER_WORKERS. Not MMS's own default (one per vCPU):
# each worker of a multi-model endpoint holds its own copy of every model it serves, so one per
# model keeps an endpoint at one copy a model; the variable buys throughput (README: workers x
# threads <= vCPUs).
DEFAULT_WORKERS_PER_MODEL = 1


class ServerError(RuntimeError):
    """The server cannot start, or died."""


def resolve_url(url: str, model_store: Path, staging: Path, name: str) -> tuple[Path, Path | None]:
    """A ``POST /models`` url (a local path, relative to the model store) as a checked model
    dir: :func:`dogbreed.artifacts.resolve_model_dir`, which unpacks a model.tar.gz once."""
    text = url[len("file://"):] if url.startswith("file://") else url
    if "://" in text:
        raise artifacts.ArtifactError(f"url {url!r}: only local paths are loaded (SageMaker passes the unpacked model dir)")
    if ".." in Path(text).parts:
        raise artifacts.ArtifactError(f"url {url!r}: '..' is not allowed")
    return artifacts.resolve_model_dir(model_store / text, staging, name)


class ModelServer:
    """MMS + the handler + the HTTP front, started and stopped from Python.

    Arguments left as None come from the environment, as ``dogbreed-serve`` reads it; ``port=0``
    picks a free port (see :attr:`url`); ``log_file``: where MMS, the zygote and the workers write
    (None: this process's stdout). A context manager, or :meth:`start`, :meth:`wait_ready`, :meth:`stop`.
    """

    def __init__(self, port: int | None = None, host: str | None = None, run_dir: str | Path | None = None,
                 multi_model: bool | None = None, model_dir: str | Path | None = None,
                 workers: int | None = None, timeout: int | None = None, model_store: str | Path = "/",
                 log_file: str | Path | None = None, use_zygote: bool | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.env = env = dict(os.environ if env is None else env)
        try:
            self.port = int(contract.env_int(env, contract.SAGEMAKER_BIND_TO_PORT, 0, contract.DEFAULT_BIND_PORT)
                            if port is None else port)
            self.workers = (workers or contract.env_int(env, contract.SAGEMAKER_MODEL_SERVER_WORKERS, 1, None)
                            or DEFAULT_WORKERS_PER_MODEL)
            self.timeout = timeout or contract.env_int(env, contract.SAGEMAKER_MODEL_SERVER_TIMEOUT, 1, None)
            # Checked here: every worker reads it after its fork, where a bad value only fails loads.
            self.worker_memory_mb = contract.env_int(env, WORKER_MEMORY_ENV, 1, None)
        except contract.ContractError as exc:
            raise ServerError(str(exc)) from None
        self.host = host or env.get(contract.BIND_HOST_ENV) or contract.DEFAULT_BIND_HOST
        self.multi_model = (env.get(contract.SAGEMAKER_MULTI_MODEL, "").strip().lower() == "true"
                            if multi_model is None else multi_model)
        self.model_dir = Path(model_dir) if model_dir else contract.Paths.from_env(env).model_dir
        self.model_store = Path(model_store)
        self.log_file = Path(log_file) if log_file else None
        self.use_zygote = (env.get(ZYGOTE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
                           if use_zygote is None else use_zygote)
        requested = run_dir or env.get(RUN_DIR_ENV)
        self._own_run_dir, self.run_dir = not requested, Path(requested) if requested else None
        self.java: subprocess.Popen | None = None
        self.zygote: subprocess.Popen | None = None
        self.front: front.Front | None = None
        self._front_thread: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self._stopped = False
        self._zygote_ready = threading.Event()
        self._zygote_command: tuple[list[str], dict[str, str]] = ([], {})  # to start it again
        self._lock: DirLock | None = None
        self._children_die_with_us = False  # set at start (see _popen)
        self.single_model_source: Path | None = None  # single-model: the dir it loads

    @property
    def url(self) -> str:
        """Base URL to reach the front (127.0.0.1 when bound to every interface)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def mms_socket(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "mms.sock"

    @property
    def client(self) -> ServeClient:
        return ServeClient(self.url)

    @property
    def direct_client(self) -> DirectClient:
        """The container API without the HTTP hop to the front, for a caller in this process."""
        if self.front is None:
            raise ServerError("server is not started")
        return DirectClient(self.front.models, LOAD_TIMEOUT)

    def pids(self) -> dict[str, int | None]:
        return {"front": os.getpid(), "java": self.java and self.java.pid, "zygote": self.zygote and self.zygote.pid}

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in [self.java] + [self.zygote] * self.use_zygote)

    def __enter__(self) -> ModelServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ModelServer:
        if self.java is not None:
            raise ServerError("server already started")
        java = str(Path(os.environ["JAVA_HOME"], "bin", "java")) if os.environ.get("JAVA_HOME") else shutil.which("java")
        if not java or not os.access(java, os.X_OK):
            raise ServerError("java not found: MMS needs a Java runtime (apt-get install openjdk-17-jre-headless)")
        self._make_run_dir()
        try:
            self._start_processes(java, None if self.multi_model else self._single_model_dir())
        except BaseException:
            self.stop()
            raise
        return self

    def _single_model_dir(self) -> Path:
        """Single-model mode: the model dir, or the archive there unpacked once."""
        assert self.run_dir is not None
        try:
            return artifacts.resolve_model_dir(self.model_dir, self.run_dir / "models", SINGLE_MODEL_NAME)[0]
        except FileNotFoundError:
            raise ServerError(f"single-model mode: model dir {self.model_dir} does not exist") from None
        except artifacts.ArtifactError as exc:
            raise ServerError(f"single-model mode: {exc}") from None

    def _make_run_dir(self) -> None:
        self.run_dir = (self.run_dir or Path(tempfile.mkdtemp(prefix="dogbreed-serve-"))).resolve()
        if len(str(self.run_dir)) > MAX_RUN_DIR_LENGTH:
            raise ServerError(f"run dir {self.run_dir} is too long for unix sockets (at most {MAX_RUN_DIR_LENGTH} characters)")
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = DirLock(self.run_dir / LOCK_FILE)
        if not lock.acquire():
            raise ServerError(f"run dir {self.run_dir} is in use by process {lock.holder()}")
        self._lock = lock

    def _write_config(self) -> tuple[Path, list[str]]:
        """The packaged base file + this start's settings; the JVM options."""
        assert self.run_dir is not None
        package = resources.files("dogbreed.serve")
        (self.run_dir / "log4j2.properties").write_text(package.joinpath("log4j2.properties").read_text("utf-8"))
        settings = {"inference_address": f"unix:{self.mms_socket}", "management_address": f"unix:{self.mms_socket}",
                    "model_store": self.model_store, "default_service_handler": HANDLER_MODULE, "load_models": "",
                    "max_request_size": contract.MAX_PAYLOAD_BYTES, "max_response_size": contract.MAX_PAYLOAD_BYTES,
                    "default_workers_per_model": self.workers, "default_response_timeout_seconds": self.timeout}
        base = package.joinpath("mms.properties").read_text(encoding="utf-8")
        config = self.run_dir / "mms.properties"
        config.write_text("\n".join([base.rstrip(), "", "# Added by dogbreed-serve for this start."]
                                    + [f"{k}={v}" for k, v in settings.items() if v is not None]) + "\n")
        vmargs = next((line.partition("=")[2] for line in base.splitlines() if line.startswith("vmargs=")), "")
        return config, (self.env.get(JVM_OPTS_ENV) or vmargs).split()

    def _start_processes(self, java: str, single_model_dir: Path | None) -> None:
        assert self.run_dir is not None
        config, vmargs = self._write_config()
        staging = self.run_dir / "models"
        models = ModelLifecycle(ServeClient(f"unix://{self.mms_socket}"),
                                lambda url, name: resolve_url(url, self.model_store, staging, name),
                                response_timeout=(self.timeout or 60) + 30, load_timeout=LOAD_TIMEOUT,
                                multi_model=self.multi_model)
        try:  # listen first: a taken port fails the start before anything else runs
            self.front = front.Front((self.host, self.port), models, self.workers)
        except OSError as exc:
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self.port = self.front.server_address[1]
        env = {**self.env, RUN_DIR_ENV: str(self.run_dir), contract.SAGEMAKER_MULTI_MODEL: str(self.multi_model).lower(),
               "LOG_LOCATION": str(self.run_dir / "logs"), "METRICS_LOCATION": str(self.run_dir / "logs")}
        env.pop("MMS_CONFIG_FILE", None)  # would replace our -f
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        out = {"stdout": self._log, "stderr": subprocess.STDOUT} if self._log else {}
        python = sys.executable
        # The kernel kills a PR_SET_PDEATHSIG child when the thread that started it ends: only
        # the main thread lives as long as the process (the zygote's restarts run on its reader).
        self._children_die_with_us = threading.current_thread() is threading.main_thread()
        if self.use_zygote:  # its stdout is its report channel (see zygote.py); the rest goes to the log
            sock = str(self.run_dir / zygote.SOCKET_NAME)
            python = zygote.write_shim(str(self.run_dir / zygote.SHIM_NAME), sock)
            self._zygote_command = ([sys.executable, "-m", "dogbreed.serve.zygote", sock], env)
            with signals_held():  # a Ctrl-C now must find the zygote in self.zygote to stop it
                self.zygote = self._start_zygote()
            threading.Thread(target=self._follow_zygote, args=(self.zygote,), name="dogbreed-zygote-reports",
                             daemon=True).start()
        import mms  # serve extra: the launcher imports this module without it

        home = Path(mms.__file__).resolve().parent.parent
        cmd = [java, f"-Dmodel_server_home={home}", f"-Dlog4j.configurationFile=file://{self.run_dir / 'log4j2.properties'}",
               f"-Djava.io.tmpdir={self.run_dir}", *vmargs, "-cp", f"{home / 'mms' / 'frontend'}/*",
               "com.amazonaws.ml.mms.ModelServer", "--python", python, "-f", str(config), "-s", str(self.model_store)]
        self.single_model_source, self.front.single_model = single_model_dir, single_model_dir is not None
        log.info("event=start_mms run_dir=%s cmd=%s", self.run_dir, " ".join(cmd))
        with signals_held():
            self.java = self._popen(cmd, cwd=self.run_dir, env=env, **out)
        serving = threading.Thread(target=self.front.serve_forever, kwargs={"poll_interval": 0.2},
                                   name="dogbreed-front", daemon=True)
        serving.start()
        self._front_thread = serving
        log.info("event=front_listening url=%s multi_model=%s", self.url, self.multi_model)

    def _popen(self, cmd: list[str], **kwargs: object) -> subprocess.Popen:
        """A child in a session of its own (stopped as a group), dying with this process when
        started from the main thread."""
        if self._children_die_with_us:
            cmd = dying_with_this_process(cmd)
        return subprocess.Popen(cmd, start_new_session=True, **kwargs)  # type: ignore[call-overload]

    def _start_zygote(self) -> subprocess.Popen:
        command, env = self._zygote_command
        return self._popen(command, cwd=self.run_dir, env=env, stdout=subprocess.PIPE, stderr=self._log)

    def _follow_zygote(self, proc: subprocess.Popen) -> None:
        """Read the zygote's reports while the server runs. A zygote that dies is restarted from
        this thread, which then follows the new one: a child's PR_SET_PDEATHSIG follows the
        thread that started it, and this one lives as long as the zygote it reads."""
        restarted = False
        while True:
            assert proc.stdout is not None and self.front is not None
            reports = iter(proc.stdout.readline, b"")
            for line in reports:
                if line.startswith(b'{"ready"'):
                    self._zygote_ready.set()
                    if restarted:  # off this thread: reloading needs the reports it reads
                        threading.Thread(target=self._reload_all, name="dogbreed-zygote-reload", daemon=True).start()
                    break
            self.front.models.watch(reports)  # returns when the zygote's stdout closes: it ended
            if self._stopped:
                return
            proc, restarted = self._restart_zygote(proc), True

    def _restart_zygote(self, dead: subprocess.Popen) -> subprocess.Popen:
        """The zygote died while serving: reap it (no zombie) and start a new one; once it is
        ready every model is reloaded (:meth:`_reload_all`), as their workers died with it (each
        worker, and what it forked, has PR_SET_PDEATHSIG). Without this, no worker death would be
        noticed again and new workers would start cold."""
        code = dead.wait()
        log.error("event=zygote_died pid=%d exit=%d action=restart", dead.pid, code)
        self._zygote_ready.clear()
        self.zygote = self._start_zygote()
        return self.zygote

    def _reload_all(self) -> None:
        assert self.front is not None and self.zygote is not None
        log.info("event=zygote_restarted pid=%d models=%d", self.zygote.pid, len(self.front.models.registered))
        for name in list(self.front.models.registered):
            if self._stopped:
                return
            try:
                self.front.models.recover(name)
            except Exception:  # one model's failure must not keep the others down
                log.exception("event=worker_recovery_failed model=%s", name)

    def wait_ready(self, timeout: float = 120.0, stop: threading.Event | None = None) -> ModelServer:
        """Block until MMS answers ``/ping`` (and, single-model, the model is loaded), or
        until ``stop`` is set (a SIGTERM during start-up)."""
        deadline = time.monotonic() + timeout
        while not (stop and stop.is_set()):
            if not self.alive():
                raise ServerError(f"the model server exited during start-up{self._log_hint()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                raise ServerError(f"the model server was not ready within {timeout:g} s{self._log_hint()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        """MMS answers; single-model: the model is loaded the one way any model is (lifecycle)."""
        if self.use_zygote and not self._zygote_ready.is_set():
            return False
        try:
            if self.front.models.mms.ping().status != 200:
                return False
            if self.single_model_source is None or SINGLE_MODEL_NAME in self.front.models.registered:
                return True
            reply = self.front.models.load(SINGLE_MODEL_NAME, str(self.single_model_source))
        except (OSError, http.client.HTTPException):
            return False
        if reply.status != 200:  # a model that cannot serve fails the start, with the reason
            raise ServerError(f"single-model mode: model refused: {reply.message()}")
        return True

    def _log_hint(self) -> str:
        if self.log_file and self.log_file.is_file():
            return f"; log {self.log_file} ends with:\n{self.log_file.read_bytes()[-3000:].decode('utf-8', 'replace')}"
        return ""

    def stop(self, grace: float = 3.0) -> None:
        """Stop the front, then MMS and the zygote (which stops its workers); after ``grace``
        seconds whatever is left of either process group is killed."""
        if self._stopped:
            return
        self._stopped = True
        if self.front is not None:
            # shutdown() waits for the serving loop to acknowledge: a Ctrl-C before that loop was
            # started would wait forever.
            if self._front_thread is not None:
                self.front.shutdown()
            self.front.server_close()
        procs = [p for p in (self.zygote, self.java) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("event=stop_failed pid=%d", proc.pid)
        if self._log is not None:
            self._log.close()
        if self.run_dir is not None:
            if self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            else:
                shutil.rmtree(self.run_dir / "models", ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
        log.info("event=stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dogbreed-serve", description="Serve dog-breed models with Multi "
                                     "Model Server under the SageMaker container contract (single-model "
                                     "/invocations, or multi-model POST /models).",
                                     epilog=(__doc__ or "Environment").split("Environment", 1)[1].split("The process")[0].strip())
    parser.add_argument("--port", type=int, help=f"default: ${contract.SAGEMAKER_BIND_TO_PORT} or {contract.DEFAULT_BIND_PORT}")
    parser.add_argument("--host", help=f"default: ${contract.BIND_HOST_ENV} or {contract.DEFAULT_BIND_HOST}")
    parser.add_argument("--multi-model", action="store_true", default=None,
                        help=f"default: ${contract.SAGEMAKER_MULTI_MODEL}=true")
    parser.add_argument("--model-dir", help="single-model mode: default $SAGEMAKER_BASE_DIR/model")
    parser.add_argument("--run-dir", help=f"default: ${RUN_DIR_ENV} or a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop, received = threading.Event(), []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 1
    try:
        server = ModelServer(port=args.port, host=args.host, run_dir=args.run_dir,
                             multi_model=args.multi_model, model_dir=args.model_dir).start()
        try:
            server.wait_ready(float(LOAD_TIMEOUT), stop)
            if not stop.is_set():
                log.info("event=ready url=%s", server.url)
            while not stop.wait(1.0) and server.alive():
                pass
            if not stop.is_set():
                log.error("event=child_exited pids=%s", server.pids())
            code = 0 if stop.is_set() else 1
        finally:
            server.stop()
    except ServerError as exc:
        if not stop.is_set():
            log.error("event=start_failed reason=%s", exc)
        code = 0 if stop.is_set() else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("event=signal signum=%d", received[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
