"""A local multi-model endpoint: what SageMaker does in front of an MME container, on 127.0.0.1.

SageMaker's runtime receives ``InvokeEndpoint`` with a ``TargetModel`` (a path relative to the
model's S3 prefix), downloads and unpacks that ``model.tar.gz`` on first use, loads it into the
container with ``POST /models``, forwards the request to ``POST /models/{name}/invoke`` and
unloads the least recently used model when the instance runs out of room. :class:`Router` does
the same against a local model store folder (``<store>/<name>/model.tar.gz``) and the serve
image's model server (in this process, called directly, or a container over HTTP), which
unpacks each archive it is handed:

* ``POST /endpoints/{EndpointName}/invocations`` — what boto3's ``sagemaker-runtime`` client
  sends (point it here with ``endpoint_url``) — and ``POST /invocations``; the target comes from
  the ``X-Amzn-SageMaker-Target-Model`` header.
* Errors are JSON with an ``x-amzn-ErrorType`` header, shaped like SageMaker's so the boto3
  client raises the modeled exception (botocore's sagemaker-runtime model: ``ValidationError``
  400, ``ModelError`` 424, ``ServiceUnavailable`` 503, …): a request the router refuses → 400
  ``ValidationError``; unknown target → ``ValidationError`` too, as SageMaker answers ("Failed
  to download model data"), but with status 404 rather than SageMaker's 400 so plain HTTP
  callers can tell it apart; a model that rejects the request (bad body) or fails to load →
  424 ``ModelError`` with ``OriginalStatusCode`` / ``OriginalMessage``, as SageMaker wraps a
  container's error.
* ``GET /ping`` → 200; ``GET /models`` → the store and what is loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from dogbreed import contract
from dogbreed.artifacts import ARCHIVE_NAME
from dogbreed.contract import CUSTOM_ATTRIBUTES_HEADER
from dogbreed.launcher import events
from dogbreed.serve.client import BodyError, HTTP11RequestHandler, Response, ServeClient

TARGET_HEADER = contract.TARGET_MODEL_HEADER
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
REQUEST_ID_HEADER = "x-amzn-RequestId"
VARIANT_NAME = "AllTraffic"
MAX_BODY_BYTES = contract.MAX_PAYLOAD_BYTES
FORWARDED_HEADERS = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES_HEADER)
_ENDPOINT_PATH = re.compile(r"^/endpoints/([^/]+)/invocations$")


class RouterError(Exception):
    """An error answered to the caller: HTTP status, SageMaker error code, message, extra fields."""

    def __init__(self, status: int, code: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {"ErrorCode": self.code, "Message": self.message, **self.fields}


def model_error(status: int, message: str, what: str = "model") -> RouterError:
    kind = "client" if 400 <= status < 500 else "server"
    return RouterError(424, "ModelError",
                       f'Received {kind} error ({status}) from {what} with message "{message}"',
                       OriginalStatusCode=status, OriginalMessage=message)


# --- the model store ---------------------------------------------------------------------------
class ModelStore:
    """A folder of ``<name>/model.tar.gz`` (any depth), addressed by relative ``TargetModel`` paths."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def resolve(self, target: str) -> Path:
        """The archive for ``target``, refusing anything that is not a file inside the store."""
        if not target or target.startswith(("/", "\\")) or "\\" in target or "\x00" in target:
            raise RouterError(400, "ValidationError", f"invalid TargetModel {target!r}")
        parts = target.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RouterError(400, "ValidationError", f"invalid TargetModel {target!r}")
        path = (self.root / target).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise RouterError(
                404, "ValidationError",
                f"Failed to download model data (TargetModel: {target}): no such model in the "
                f"model store {self.root}. Add it with `dogbreed add-model --local`.")
        return path

    def add(self, name: str, archive: Path) -> Path:
        """Copy ``archive`` to ``<store>/<name>/model.tar.gz`` atomically."""
        contract.validate_model_name(name)  # a ContractError (ValueError) for a bad one
        target = self.root / name / ARCHIVE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(archive, partial)
        partial.replace(target)
        return target

    def targets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix()
                      for p in self.root.rglob(ARCHIVE_NAME) if p.is_file())


def mms_model_name(target: str) -> str:
    """A model name MMS accepts, unique per target (SageMaker uses a hash too)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", target.removesuffix(".tar.gz").removesuffix("/model"))
    return f"{stem[:48].strip('_') or 'model'}-{hashlib.sha1(target.encode()).hexdigest()[:8]}"


# --- the MMS side ------------------------------------------------------------------------------
class ModelServerAPI(Protocol):
    """The container API the router drives: :class:`ModelServerClient` over HTTP, or
    :class:`dogbreed.serve.lifecycle.DirectClient` for a server in the router's own process."""

    timeout: float

    def load_model(self, name: str, url: str) -> Response: ...

    def unload_model(self, name: str) -> Response: ...

    def invoke(self, name: str, body: bytes, content_type: str | None = ...,
               headers: Mapping[str, str] | None = None) -> Response: ...


class ModelServerClient(ServeClient):
    """The container API (``POST /models``, ``DELETE``, ``/invoke``) over HTTP; an unreachable
    model server is a 503 for the router's caller."""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Response:
        try:
            return super().request(method, path, body, headers, timeout)
        except OSError as exc:
            raise RouterError(503, "ServiceUnavailable",
                              f"model server at {self.host}:{self.port} is unreachable: {exc}") from None


# --- routing with LRU loading ------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Entry:
    target: str
    name: str
    ready: bool = False
    in_flight: int = 0
    unloaded: threading.Event = dataclasses.field(default_factory=threading.Event)
    archive_stat: tuple[int, int] = (0, -1)  # the store archive's (mtime_ns, size) when loaded
    warned_stat: tuple[int, int] | None = None  # the changed stat last warned about


def _stat_key(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, -1)
    return (stat.st_mtime_ns, stat.st_size)


def _refused_by_the_model(error: RouterError) -> bool:
    """A load failure the archive itself caused (the model server's 4xx: a broken archive, a
    model the handler cannot load), which loading again cannot fix. A server-side failure (5xx,
    e.g. a worker that died while the model loaded) says nothing about the model: the next
    request tries again."""
    original = error.fields.get("OriginalStatusCode")
    return error.status == 424 and isinstance(original, int) and 400 <= original < 500


class ModelCache:
    """Which targets are loaded in the model server; loads on first use, unloads the LRU.

    Thread-safe: concurrent first requests for one target load it once; a model is never
    unloaded while a request is using it (the cache may run over ``max_loaded`` for as long as
    every loaded model is busy, and trims back as they finish). A load the model refused (a
    424 for the model server's 4xx: a broken archive, a model the handler cannot load) is
    remembered with its reason until the archive in the store changes (mtime or size): every
    request in the meantime, and every request that waited on that load, gets the same answer
    at once instead of loading it again one caller at a time. A load that failed
    on the server's side (its 5xx) is not remembered: one worker dying during a reload must not
    take the model out of service until a restart.

    A loaded model whose archive is replaced in the store (``add-model`` under the same name)
    keeps serving the copy it loaded, as on SageMaker, whose docs say to add a changed model
    under a new name rather than overwrite its artifacts ("Add or Remove Models" in the
    multi-model endpoint guide); the router logs ``event=model_archive_changed`` (a warning)
    the first time a request to that target notices the change (mtime or size), once per change.
    """

    def __init__(self, store: ModelStore, server: ModelServerAPI, max_loaded: int = 4) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.store = store
        self.server = server
        self.max_loaded = max_loaded
        self._cond = threading.Condition()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._unloading: dict[str, _Entry] = {}
        self._failed: dict[str, tuple[tuple[int, int], RouterError]] = {}  # target -> (archive stat, why)
        self.loads = 0
        self.unloads = 0

    def loaded(self) -> list[str]:
        """Loaded targets, least recently used first."""
        with self._cond:
            return [t for t, e in self._entries.items() if e.ready]

    def failed(self) -> dict[str, str]:
        """Targets whose last load was refused, with the reason (until their archive changes)."""
        with self._cond:
            return {t: error.message for t, (_, error) in self._failed.items()}

    def acquire(self, target: str) -> _Entry:
        archive = self.store.resolve(target)
        with self._cond:
            while True:
                failed = self._failed.get(target)
                if failed is not None:
                    if failed[0] == _stat_key(archive):
                        raise failed[1]
                    del self._failed[target]  # the archive changed: try it again
                entry = self._entries.get(target)
                if entry is not None and entry.ready:
                    entry.in_flight += 1
                    self._entries.move_to_end(target)
                    self._warn_if_changed(entry, archive)
                    return entry
                if entry is None:
                    break
                self._cond.wait()  # another request is loading it
            entry = _Entry(target, mms_model_name(target))
            entry.in_flight = 1
            self._entries[target] = entry
            previous = self._unloading.get(target)
            victims = self._pick_victims()
        stat = _stat_key(archive)
        try:
            self._unload_all(victims)
            if previous is not None:
                previous.unloaded.wait(timeout=self.server.timeout)
            self._load(entry, archive)
        except BaseException as exc:
            with self._cond:
                self._entries.pop(target, None)
                if isinstance(exc, RouterError) and _refused_by_the_model(exc):
                    self._failed[target] = (stat, exc)
                self._cond.notify_all()
            raise
        with self._cond:
            entry.archive_stat = stat
            entry.ready = True
            self._cond.notify_all()
        return entry

    @staticmethod
    def _warn_if_changed(entry: _Entry, archive: Path) -> None:
        """Log once per change that the store's archive is no longer the one loaded. Locked."""
        current = _stat_key(archive)
        if current == entry.archive_stat or current == entry.warned_stat:
            return
        entry.warned_stat = current
        events.warning("model_archive_changed", target=entry.target, model=entry.name,
                       archive=archive, loaded_mtime_ns=entry.archive_stat[0],
                       loaded_size=entry.archive_stat[1], mtime_ns=current[0], size=current[1],
                       serving="the loaded copy",
                       hint="add the new archive under a new name (TargetModel), as on SageMaker")

    def release(self, entry: _Entry) -> None:
        with self._cond:
            entry.in_flight -= 1
            victims = self._pick_victims()
        self._unload_all(victims)

    def forget(self, entry: _Entry) -> None:
        """Drop an entry the model server no longer knows (it answered 404 for it)."""
        with self._cond:
            if self._entries.get(entry.target) is entry:
                del self._entries[entry.target]
            self._cond.notify_all()

    def _pick_victims(self) -> list[_Entry]:
        """Idle ready entries to unload, LRU first, until at most ``max_loaded`` remain. Locked."""
        victims = []
        excess = len(self._entries) - self.max_loaded
        for entry in list(self._entries.values()):
            if excess <= 0:
                break
            if entry.ready and entry.in_flight == 0:
                del self._entries[entry.target]
                self._unloading[entry.target] = entry
                victims.append(entry)
                excess -= 1
        return victims

    def _unload_all(self, victims: list[_Entry]) -> None:
        for entry in victims:
            try:
                reply = self.server.unload_model(entry.name)
                events.event("model_unloaded", target=entry.target, model=entry.name,
                             status=reply.status)
                self.unloads += 1
            except RouterError as exc:
                events.warning("model_unload_failed", target=entry.target, error=exc.message)
            finally:
                with self._cond:
                    if self._unloading.get(entry.target) is entry:
                        del self._unloading[entry.target]
                entry.unloaded.set()

    def _load(self, entry: _Entry, archive: Path) -> None:
        """``POST /models`` with the archive itself: the model server unpacks it (once, and
        removes it at unload), where SageMaker's front-end would hand over the unpacked dir."""
        reply = self.server.load_model(entry.name, str(archive))
        if reply.status == 507:  # the server is out of memory: make room once and retry
            with self._cond:
                victims = self._pick_victims_beyond(1)
            self._unload_all(victims)
            reply = self.server.load_model(entry.name, str(archive))
        # 409: the server already holds it (e.g. a router restart): that is a load too.
        if reply.status >= 300 and reply.status != 409:
            raise model_error(reply.status, reply.message(), f"model server loading {entry.target}")
        self.loads += 1
        events.event("model_loaded", target=entry.target, model=entry.name)

    def _pick_victims_beyond(self, room: int) -> list[_Entry]:
        saved, self.max_loaded = self.max_loaded, max(1, len(self._entries) - room)
        try:
            return self._pick_victims()
        finally:
            self.max_loaded = saved

class ListenError(RuntimeError):
    """The router cannot listen on the address asked for (taken, invalid, not allowed)."""


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (SO_REUSEADDR, as http.server binds), or a
    :class:`ListenError` with one readable line: bind early, before anything slow starts."""
    where = f"{host}:{port}"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(ThreadingHTTPServer.request_queue_size)
    except OverflowError:  # bind(): port must be 0-65535
        sock.close()
        raise ListenError(f"cannot listen on {where}: the port must be 0-65535") from None
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {where}: {reason[:1].lower()}{reason[1:]}") from None
    return sock


class _HTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on a socket that is already listening (see :func:`listen`)."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: Callable[..., BaseHTTPRequestHandler]) -> None:
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()  # the unbound one the base class made
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.server_name, self.server_port = self.server_address


class Router:
    """What SageMaker's front-end does for a multi-model endpoint, on this machine: routes each
    ``TargetModel`` request to the model server, loading the model first.
    ``Router(store_dir, model_server).start()``; ``.url``. ``model_server``: the container's URL,
    or a :class:`ModelServerAPI` (a server in this process: no HTTP hop to it).

    ``sock``: a socket already listening (:func:`listen`), which the router then owns;
    without one, ``start`` binds ``host:port`` itself (a :class:`ListenError` if it cannot)."""

    def __init__(self, store_dir: Path, model_server: str | ModelServerAPI, *,
                 endpoint_name: str | None = None, max_loaded: int = 4, host: str = "127.0.0.1",
                 port: int = 0, timeout: float = 120.0, sock: socket.socket | None = None) -> None:
        self.store = ModelStore(store_dir)
        self.server = (ModelServerClient(model_server, timeout) if isinstance(model_server, str)
                       else model_server)
        self.cache = ModelCache(self.store, self.server, max_loaded)
        self.endpoint_name = endpoint_name
        self.host, self.port = host, port
        self._socket = sock
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._request_ids = iter(range(1, 1 << 62))
        self._ids_lock = threading.Lock()

    # -- lifecycle
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("router is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Router:
        sock, self._socket = self._socket or listen(self.host, self.port), None
        try:
            self._httpd = _HTTPServer(sock, _make_handler(self))
        except BaseException:
            sock.close()
            raise
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="dogbreed-router",
                                        daemon=True)
        self._thread.start()
        events.event("router_started", url=self.url, store=self.store.root,
                     max_loaded=self.cache.max_loaded)
        return self

    def stop(self) -> None:
        if self._socket is not None:  # given, never started
            self._socket.close()
            self._socket = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests
    def request_id(self) -> str:
        with self._ids_lock:
            return f"local-{next(self._request_ids):08d}"

    def invoke(self, endpoint: str | None, headers: dict[str, str], body: bytes) -> Response:
        if endpoint is not None and self.endpoint_name and endpoint != self.endpoint_name:
            raise RouterError(400, "ValidationError", f"Endpoint {endpoint} not found "
                              f"(this local endpoint is {self.endpoint_name}).")
        target = headers.get(TARGET_HEADER.lower())
        if not target:
            raise RouterError(400, "ValidationError",
                              f"this is a multi-model endpoint: give TargetModel ({TARGET_HEADER} "
                              f"header), e.g. one of {self.store.targets()[:5]}")
        if not body:
            raise RouterError(400, "ValidationError", "request body is empty")
        forwarded = {h: headers[h.lower()] for h in FORWARDED_HEADERS if h.lower() in headers}
        for attempt in (1, 2):
            entry = self.cache.acquire(target)
            try:
                reply = self.server.invoke(entry.name, body, content_type=None, headers=forwarded)
            finally:
                self.cache.release(entry)
            if reply.status == 404 and attempt == 1:
                # The server lost the model (restarted?): forget it and load it again once.
                events.warning("model_missing_in_server", target=target, model=entry.name)
                self.cache.forget(entry)
                continue
            break
        if reply.status == 507:
            # The container ran out of memory and unloaded the model ("mms-container-apis":
            # SageMaker unloads models on a 507): the next request loads it again.
            events.warning("model_out_of_memory", target=target, model=entry.name)
            self.cache.forget(entry)
        if reply.status >= 300:
            raise model_error(reply.status, reply.message(), f"model {target}")
        out_headers = {"Content-Type": reply.headers.get("Content-Type")
                       or reply.headers.get("content-type") or "application/json",
                       VARIANT_HEADER: VARIANT_NAME}
        for key, value in reply.headers.items():
            if key.lower() == CUSTOM_ATTRIBUTES_HEADER.lower():
                out_headers[CUSTOM_ATTRIBUTES_HEADER] = value
        return Response(200, out_headers, reply.body)

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint_name, "store": str(self.store.root),
                "models": self.store.targets(), "loaded": self.cache.loaded(),
                "failed": self.cache.failed(),
                "max_loaded": self.cache.max_loaded}


def _make_handler(router: Router) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(HTTP11RequestHandler):
        server_version = "dogbreed-local-endpoint"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # one event per request is logged below instead

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a bad request line, headers too long) as JSON too."""
            self.close_connection = True
            self._error(RouterError(code, "ValidationError" if code < 500 else "InternalFailure",
                                    message or HTTPStatus(code).phrase), router.request_id())

        def _send(self, status: int, body: bytes, headers: dict[str, str], request_id: str) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(REQUEST_ID_HEADER, request_id)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, error: RouterError, request_id: str) -> None:
            body = json.dumps(error.body()).encode()
            self._send(error.status, body, {"Content-Type": "application/json",
                                            ERROR_TYPE_HEADER: error.code}, request_id)

        def _handle(self, method: str) -> None:
            request_id = router.request_id()
            path = urllib.parse.urlsplit(self.path).path
            status = 500
            target = self.headers.get(TARGET_HEADER)
            try:
                if method == "GET" and path == "/ping":
                    response = Response(200, {"Content-Type": "application/json"}, b'{"status": "healthy"}\n')
                elif method == "GET" and path == "/models":
                    response = Response(200, {"Content-Type": "application/json"},
                                        json.dumps(router.describe()).encode())
                else:
                    match = _ENDPOINT_PATH.match(path)
                    if path != "/invocations" and not match:
                        raise RouterError(404, "UnknownOperationException", f"no route for {method} {path}")
                    if method != "POST":
                        raise RouterError(405, "ValidationError", f"{path} takes POST")
                    try:
                        body = self.read_body(MAX_BODY_BYTES)
                    except BodyError as exc:
                        raise RouterError(exc.status, "ValidationError", exc.message) from None
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    endpoint = urllib.parse.unquote(match.group(1)) if match else None
                    response = router.invoke(endpoint, headers, body)
                status = response.status
                self._send(response.status, response.body, response.headers, request_id)
            except RouterError as exc:
                status = exc.status
                self._error(exc, request_id)
            except Exception as exc:  # noqa: BLE001 - the router must answer, never die
                events.warning("router_error", error=f"{type(exc).__name__}: {exc}")
                error = RouterError(500, "InternalFailure", f"{type(exc).__name__}: {exc}")
                status = 500
                self._error(error, request_id)
            if path not in ("/ping",):
                events.event("request", method=method, path=path, target=target, status=status,
                             request_id=request_id)

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler
