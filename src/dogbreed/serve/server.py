"""``dogbreed-serve`` and :class:`ModelServer`: Multi Model Server run the way SageMaker runs it.

    dogbreed-serve                              # single model: loads /opt/ml/model at start
    SAGEMAKER_MULTI_MODEL=true dogbreed-serve   # multi-model: POST /models {"model_name","url"}

Environment (names from :mod:`dogbreed.contract`): ``SAGEMAKER_BIND_TO_PORT`` (8080),
``DOGBREED_BIND_HOST`` (0.0.0.0), ``SAGEMAKER_MULTI_MODEL``, ``SAGEMAKER_MODEL_SERVER_WORKERS``
(workers per model, 1), ``SAGEMAKER_MODEL_SERVER_TIMEOUT`` (seconds per request, 60),
``SAGEMAKER_BASE_DIR`` (the model dir is ``$SAGEMAKER_BASE_DIR/model``), ``DOGBREED_RUN_DIR``.

The process stays in the foreground; SIGTERM or SIGINT stops everything it started. Processes::

    dogbreed-serve          the thin HTTP front on the public port (dogbreed.serve.front)
    ├── zygote              torch & co. imported once; forks, owns and kills every backend worker
    │   └── worker (one per model worker: mms/model_service_worker.py)
    └── java                MMS's frontend, listening on a unix socket in the run dir
        └── shim            stands in, for MMS, for the worker the zygote forked

Each child runs in its own session: stopping kills the two groups; the zygote kills its workers
(and a worker dies with the zygote). ``DOGBREED_SERVE_ZYGOTE=0``: MMS starts plain Python workers
(seconds per cold load instead of a fraction of one; ``scripts/bench_serve.py`` measures both).

Run dir (``DOGBREED_RUN_DIR``, else a fresh temp dir removed at stop): ``mms.properties`` (the
packaged base file + this start's settings), ``log4j2.properties``, ``mms.sock``, the workers'
sockets, ``zygote.sock``, the shim, ``*.pid``, ``models/`` (unpacked archives).

From Python (the launcher, tests, the benchmark)::

    with ModelServer(port=0, host="127.0.0.1", multi_model=True) as server:
        server.client.load_model("resnet18", "/path/to/model.tar.gz")
        server.client.invoke("resnet18", jpeg_bytes).json()
"""

from __future__ import annotations

import argparse
import functools
import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import IO
from urllib.parse import quote

from dogbreed import artifacts, contract
from dogbreed.serve import JVM_OPTS_ENV, LOAD_STATUS_HEADER, RUN_DIR_ENV, ZYGOTE_ENV, front, zygote
from dogbreed.serve.client import LOAD_TIMEOUT, ServeClient

log = logging.getLogger("dogbreed.serve")

HANDLER_MODULE = "dogbreed.serve.handler"
SINGLE_MODEL_NAME = front.SINGLE_MODEL_NAME
MMS_SOCKET = "mms.sock"
MMS_MAIN_CLASS = "com.amazonaws.ml.mms.ModelServer"
PID_FILE = "dogbreed-serve.pid"
# A unix socket path must fit in sun_path (108 bytes on Linux); MMS adds "/.mms.sock.NNNN".
MAX_RUN_DIR_LENGTH = 80


class ServerError(RuntimeError):
    """The server cannot start, or died."""


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ServerError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ServerError(f"{name}={raw!r} must be at least 1")
    return value


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise ServerError("java not found: MMS needs a Java runtime (apt-get install openjdk-17-jre-headless)")
    return java


def resolve_model_source(url: str, model_store: Path, staging: Path, name: str) -> tuple[Path, Path | None]:
    """Turn a ``POST /models`` url into a checked model dir: ``(model_dir, unpacked_dir)``.

    A dir holding ``model.json`` is used as it is (what SageMaker hands over); a
    ``model.tar.gz`` (the file, or a dir holding only it) is unpacked once, with
    :func:`artifacts.safe_extract`, into a new folder under ``staging`` (``unpacked_dir``: remove
    it with the model). ``FileNotFoundError`` for a missing path, :class:`artifacts.ArtifactError`
    for anything unusable. The model itself is checked where it is loaded, in the handler.
    """
    text = url[len("file://"):] if url.startswith("file://") else url
    if "://" in text:
        raise artifacts.ArtifactError(
            f"url {url!r}: only local paths are loaded (SageMaker passes the unpacked model dir)")
    path = model_store / text
    if ".." in path.parts:
        raise artifacts.ArtifactError(f"url {url!r}: '..' is not allowed")
    if not path.exists():
        raise FileNotFoundError(url)
    archive = path if path.is_file() else None
    if path.is_dir() and not (path / artifacts.METADATA_FILE).is_file() and (path / artifacts.ARCHIVE_NAME).is_file():
        archive = path / artifacts.ARCHIVE_NAME
    if archive is None:
        try:
            return artifacts.find_model_dir(path), None
        except artifacts.ArtifactError:
            raise artifacts.ArtifactError(
                f"{path} holds neither {artifacts.METADATA_FILE} nor {artifacts.ARCHIVE_NAME}") from None
    if not tarfile.is_tarfile(archive):
        raise artifacts.ArtifactError(f"{archive} is not a tar archive (model.tar.gz)")
    unpacked = staging / f"{quote(name, safe='')[:80] or 'model'}-{uuid.uuid4().hex[:8]}"
    try:
        artifacts.safe_extract(archive, unpacked)
        return artifacts.find_model_dir(unpacked), unpacked
    except BaseException:
        shutil.rmtree(unpacked, ignore_errors=True)
        raise


class ModelServer:
    """MMS + the handler + the HTTP front, started and stopped from Python.

    Arguments left as None come from the environment, as ``dogbreed-serve`` reads it.
    ``port=0`` picks a free port (see :attr:`url`). ``log_file``: where MMS, the zygote and the
    workers write (None: this process's stdout). Use as a context manager, or call
    :meth:`start`, :meth:`wait_ready` and :meth:`stop`.
    """

    def __init__(self, port: int | None = None, host: str | None = None, run_dir: str | Path | None = None,
                 multi_model: bool | None = None, model_dir: str | Path | None = None,
                 workers: int | None = None, timeout: int | None = None, model_store: str | Path = "/",
                 log_file: str | Path | None = None, use_zygote: bool | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        if port is None:
            port = _env_int(self.env, contract.SAGEMAKER_BIND_TO_PORT) or contract.DEFAULT_BIND_PORT
        self.port = int(port)
        self.host = host or self.env.get(contract.BIND_HOST_ENV) or contract.DEFAULT_BIND_HOST
        if multi_model is None:
            multi_model = self.env.get(contract.SAGEMAKER_MULTI_MODEL, "").strip().lower() == "true"
        self.multi_model = multi_model
        self.model_dir = Path(model_dir) if model_dir else contract.Paths.from_env(self.env).model_dir
        self.workers = workers or _env_int(self.env, contract.SAGEMAKER_MODEL_SERVER_WORKERS)
        self.timeout = timeout or _env_int(self.env, contract.SAGEMAKER_MODEL_SERVER_TIMEOUT)
        self.model_store = Path(model_store)
        self.log_file = Path(log_file) if log_file else None
        if use_zygote is None:
            use_zygote = self.env.get(ZYGOTE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self.use_zygote = use_zygote
        requested = run_dir or self.env.get(RUN_DIR_ENV)
        self._own_run_dir = not requested
        self.run_dir = Path(requested) if requested else None
        self.java: subprocess.Popen | None = None
        self.zygote: subprocess.Popen | None = None
        self.front: front.Front | None = None
        self._log: IO[bytes] | None = None
        self._stopped = False
        self._watching = threading.Event()  # set to stop the dead-worker watcher

    @property
    def url(self) -> str:
        """Base URL to reach the front (127.0.0.1 when bound to every interface)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def effective_workers(self) -> int:
        """Workers per model: the setting, else MMS's own default on a CPU host (one per core;
        on a GPU host MMS starts one per GPU; set ``SAGEMAKER_MODEL_SERVER_WORKERS`` there)."""
        return self.workers or os.cpu_count() or 1

    @property
    def mms_socket(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / MMS_SOCKET

    @property
    def client(self) -> ServeClient:
        return ServeClient(self.url)

    def pids(self) -> dict[str, int | None]:
        return {"front": os.getpid(), "java": self.java.pid if self.java else None,
                "zygote": self.zygote.pid if self.zygote else None}

    def alive(self) -> bool:
        procs = [self.java] + ([self.zygote] if self.use_zygote else [])
        return all(p is not None and p.poll() is None for p in procs)

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
        java = _java()
        self._make_run_dir()
        try:
            single = None if self.multi_model else self._single_model_dir()
            self._start_processes(java, single)
        except BaseException:
            self.stop()
            raise
        return self

    def _single_model_dir(self) -> Path:
        """Single-model mode: the model dir, or the archive there unpacked once."""
        assert self.run_dir is not None
        try:
            return resolve_model_source(str(self.model_dir.resolve()), Path("/"), self.run_dir / "models",
                                        SINGLE_MODEL_NAME)[0]
        except FileNotFoundError:
            raise ServerError(f"single-model mode: model dir {self.model_dir} does not exist") from None
        except artifacts.ArtifactError as exc:
            raise ServerError(f"single-model mode: {exc}") from None

    def _make_run_dir(self) -> None:
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="dogbreed-serve-"))
        self.run_dir = self.run_dir.resolve()
        if len(str(self.run_dir)) > MAX_RUN_DIR_LENGTH:
            raise ServerError(f"run dir {self.run_dir} is too long for unix sockets "
                              f"(at most {MAX_RUN_DIR_LENGTH} characters)")
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pid_file = self.run_dir / PID_FILE
        if pid_file.is_file():
            try:
                other = int(pid_file.read_text().split()[0])
                os.kill(other, 0)
            except (ValueError, IndexError, ProcessLookupError, PermissionError):
                pass
            else:
                if other != os.getpid():
                    raise ServerError(f"run dir {self.run_dir} is in use by process {other}")
        pid_file.write_text(f"{os.getpid()}\n")

    def _write_config(self) -> tuple[Path, list[str]]:
        """The packaged base file + this start's settings; the JVM options."""
        assert self.run_dir is not None
        package = resources.files("dogbreed.serve")
        (self.run_dir / "log4j2.properties").write_text(
            package.joinpath("log4j2.properties").read_text(encoding="utf-8"), encoding="utf-8")
        settings = {
            "inference_address": f"unix:{self.mms_socket}",
            "management_address": f"unix:{self.mms_socket}",
            "model_store": str(self.model_store),
            "default_service_handler": HANDLER_MODULE,
            "load_models": "",
            "max_request_size": contract.MAX_PAYLOAD_BYTES,
            "max_response_size": contract.MAX_PAYLOAD_BYTES,
        }
        if self.workers:
            settings["default_workers_per_model"] = self.workers
        if self.timeout:
            settings["default_response_timeout_seconds"] = self.timeout
        base = package.joinpath("mms.properties").read_text(encoding="utf-8")
        lines = [base.rstrip(), "", "# Added by dogbreed-serve for this start."]
        config = self.run_dir / "mms.properties"
        config.write_text("\n".join(lines + [f"{k}={v}" for k, v in settings.items()]) + "\n", encoding="utf-8")
        vmargs = next((line.partition("=")[2] for line in base.splitlines() if line.startswith("vmargs=")), "")
        return config, (self.env.get(JVM_OPTS_ENV) or vmargs).split()

    def _start_processes(self, java: str, single_model_dir: Path | None) -> None:
        assert self.run_dir is not None
        config, vmargs = self._write_config()
        resolve = functools.partial(self._resolve, staging=self.run_dir / "models")
        try:  # listen first: a taken port fails the start before anything else runs
            self.front = front.Front((self.host, self.port), str(self.mms_socket), resolve,
                                     response_timeout=(self.timeout or 60) + 30, load_timeout=LOAD_TIMEOUT)
        except OSError as exc:
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self.port = self.front.server_address[1]
        self.front.execution_parameters = front.execution_parameters(self.effective_workers)
        env = dict(self.env)
        env[RUN_DIR_ENV] = str(self.run_dir)
        env[contract.SAGEMAKER_MULTI_MODEL] = "true" if self.multi_model else "false"
        env["LOG_LOCATION"] = env["METRICS_LOCATION"] = str(self.run_dir / "logs")
        env.pop("MMS_CONFIG_FILE", None)  # would replace our -f
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        out = {"stdout": self._log, "stderr": subprocess.STDOUT} if self._log else {}
        python = sys.executable
        if self.use_zygote:
            sock = str(self.run_dir / zygote.SOCKET_NAME)
            python = zygote.write_shim(str(self.run_dir / zygote.SHIM_NAME), sock)
            self.zygote = subprocess.Popen([sys.executable, "-m", "dogbreed.serve.zygote", sock],
                                           cwd=self.run_dir, env=env, start_new_session=True, **out)
            (self.run_dir / "zygote.pid").write_text(f"{self.zygote.pid}\n")
        import mms

        mms_home = Path(mms.__file__).resolve().parent.parent
        cmd = [java, f"-Dmodel_server_home={mms_home}",
               f"-Dlog4j.configurationFile=file://{self.run_dir / 'log4j2.properties'}",
               f"-Djava.io.tmpdir={self.run_dir}", *vmargs,
               "-cp", f"{mms_home / 'mms' / 'frontend'}/*", MMS_MAIN_CLASS,
               "--python", python, "-f", str(config), "-s", str(self.model_store)]
        if single_model_dir is not None:
            cmd += ["-m", f"{SINGLE_MODEL_NAME}={single_model_dir}"]
            self.front.registered[SINGLE_MODEL_NAME] = str(single_model_dir)  # reloaded if its worker dies
            self.front.single_model = True
        log.info("event=start_mms run_dir=%s cmd=%s", self.run_dir, " ".join(cmd))
        self.java = subprocess.Popen(cmd, cwd=self.run_dir, env=env, start_new_session=True, **out)
        (self.run_dir / "mms.pid").write_text(f"{self.java.pid}\n")
        threading.Thread(target=self.front.serve_forever, kwargs={"poll_interval": 0.2},
                         name="dogbreed-front", daemon=True).start()
        if self.use_zygote:
            threading.Thread(target=self.front.watch_workers, args=(self.run_dir / zygote.DEATHS_FILE, self._watching),
                             name="dogbreed-worker-watch", daemon=True).start()
        log.info("event=front_listening url=%s multi_model=%s", self.url, self.multi_model)

    def _resolve(self, url: str, name: str, staging: Path) -> tuple[Path, Path | None]:
        return resolve_model_source(url, self.model_store, staging, name)

    def wait_ready(self, timeout: float = 120.0, stop: threading.Event | None = None) -> ModelServer:
        """Block until MMS answers ``/ping`` (and, single-model, the model's worker is up), or
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
        assert self.run_dir is not None
        if self.use_zygote and not (self.run_dir / zygote.READY_FILE).exists():
            return False
        mms = ServeClient(f"unix://{self.mms_socket}", timeout=5)
        try:
            if mms.ping().status != 200:
                return False
            if self.multi_model or b'"READY"' not in mms.describe_model(SINGLE_MODEL_NAME).body:
                return self.multi_model
            refused = mms.invoke(SINGLE_MODEL_NAME, b"", "application/json", {LOAD_STATUS_HEADER: "1"})
            if refused.status != 200:  # a model that cannot serve fails the start, with the reason
                raise ServerError(f"single-model mode: model refused: {refused.message()}")
            return True
        except (OSError, http.client.HTTPException):
            return False

    def _log_hint(self) -> str:
        if self.log_file and self.log_file.is_file():
            tail = self.log_file.read_bytes()[-3000:].decode("utf-8", "replace")
            return f"; log {self.log_file} ends with:\n{tail}"
        return ""

    def stop(self, grace: float = 3.0) -> None:
        """Stop the front, then MMS and the zygote (which stops its workers); remove a temp run dir.

        Each child leads its own session: after ``grace`` seconds, whatever is left of either
        group is killed (MMS's plain-Python workers are in MMS's group).
        """
        if self._stopped:
            return
        self._stopped = True
        self._watching.set()
        if self.front is not None:
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
                (self.run_dir / PID_FILE).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "models", ignore_errors=True)
        log.info("event=stopped")


# --- dogbreed-serve -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dogbreed-serve",
        description="Serve dog-breed models with Multi Model Server under the SageMaker "
        "container contract (single-model /invocations, or multi-model POST /models).",
        epilog=__doc__.split("Environment", 1)[1].split("The process", 1)[0].strip()
        if __doc__ else None,
    )
    parser.add_argument("--port", type=int, help=f"default: ${contract.SAGEMAKER_BIND_TO_PORT} or "
                        f"{contract.DEFAULT_BIND_PORT}")
    parser.add_argument("--host", help=f"default: ${contract.BIND_HOST_ENV} or {contract.DEFAULT_BIND_HOST}")
    parser.add_argument("--multi-model", action="store_true", default=None,
                        help=f"default: ${contract.SAGEMAKER_MULTI_MODEL}=true")
    parser.add_argument("--model-dir", help="single-model mode: default $SAGEMAKER_BASE_DIR/model")
    parser.add_argument("--run-dir", help=f"default: ${RUN_DIR_ENV} or a temp dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        server = ModelServer(port=args.port, host=args.host, run_dir=args.run_dir,
                             multi_model=args.multi_model, model_dir=args.model_dir)
        server.start()
    except ServerError as exc:
        log.error("event=start_failed reason=%s", exc)
        code = 1
    else:
        try:
            server.wait_ready(float(LOAD_TIMEOUT), stop)
            if not stop.is_set():
                log.info("event=ready url=%s", server.url)
            while not stop.wait(1.0):
                if not server.alive():
                    log.error("event=child_exited pids=%s", server.pids())
                    code = 1
                    break
        except ServerError as exc:
            if not stop.is_set():
                log.error("event=start_failed reason=%s", exc)
                code = 1
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("event=signal signum=%d", received[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
