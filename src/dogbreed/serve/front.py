"""The small HTTP front between callers and MMS, in the ``dogbreed-serve`` process.

MMS listens only on a unix socket in the run dir; this front owns the public port
(``DOGBREED_BIND_HOST:SAGEMAKER_BIND_TO_PORT``) and passes every request through unchanged,
except ``POST /models`` and ``DELETE /models/{name}``, which it checks first:

- ``POST /models`` (``{"model_name","url"}`` as JSON, SageMaker's form, or query parameters):
  ``url`` must be a local path (SageMaker passes the unpacked model dir). A dir holding
  ``model.json`` is used as it is; a ``model.tar.gz`` (the file, or a dir holding only it) is
  unpacked with :func:`dogbreed.artifacts.safe_extract` into the run dir first. ``model.json`` is
  validated before MMS sees anything, so a bad artifact is a 400 with the reason, not a worker
  that dies. If the worker still fails to load it (say a corrupt ``model.pt``), the reason the
  handler left in the run dir replaces MMS's generic "Failed to start workers". Caller-chosen
  ``handler``/``runtime`` are dropped: every model runs :mod:`dogbreed.serve.handler`.
- ``DELETE /models/{name}`` also removes what was unpacked for that model.

Error answers have MMS's shape: ``{"code", "type", "message"}``.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import tarfile
import threading
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from dogbreed import artifacts
from dogbreed.serve import error_body, load_error_file

log = logging.getLogger("dogbreed.serve")

# Request headers that describe one hop, not the request (RFC 9110 7.6.1).
# (``expect``: the front answers ``100-continue`` itself, then sends MMS the whole body.)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate",
                        "content-length", "host", "expect"})
# Registration parameters passed on to MMS; anything else (``handler``, ``runtime``) is dropped.
REGISTER_PARAMETERS = ("model_name", "url", "initial_workers", "batch_size", "max_batch_delay",
                       "response_timeout", "synchronous")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (MMS's listener in the run dir)."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


# --- model sources ------------------------------------------------------------------------------
def resolve_model_source(url: str, model_store: Path, staging: Path, name: str) -> tuple[Path, Path | None]:
    """Turn a ``POST /models`` url into a validated model dir: ``(model_dir, unpacked_dir)``.

    ``unpacked_dir`` is the folder created under ``staging`` for an archive (remove it when the
    model goes), None when the url was a model dir already. Raises ``FileNotFoundError`` for a
    path that does not exist and :class:`artifacts.ArtifactError` for anything unusable.
    """
    text = url[len("file://"):] if url.startswith("file://") else url
    if "://" in text:
        raise artifacts.ArtifactError(
            f"url {url!r}: only local paths are loaded (SageMaker passes the unpacked model dir)"
        )
    path = Path(text)
    if not path.is_absolute():
        path = model_store / path
    if ".." in path.parts:
        raise artifacts.ArtifactError(f"url {url!r}: '..' is not allowed")
    if not path.exists():
        raise FileNotFoundError(url)
    archive: Path | None = None
    if path.is_file():
        archive = path
    elif (path / artifacts.METADATA_FILE).is_file() or list(path.glob(f"*/{artifacts.METADATA_FILE}")):
        model_dir = artifacts.find_model_dir(path)
    elif (path / artifacts.ARCHIVE_NAME).is_file():
        archive = path / artifacts.ARCHIVE_NAME
    else:
        raise artifacts.ArtifactError(
            f"{path} holds neither {artifacts.METADATA_FILE} nor {artifacts.ARCHIVE_NAME}"
        )
    unpacked: Path | None = None
    try:
        if archive is not None:
            if not tarfile.is_tarfile(archive):
                raise artifacts.ArtifactError(f"{archive} is not a tar archive (model.tar.gz)")
            safe_name = quote(name, safe="")[:80] or "model"
            unpacked = staging / f"{safe_name}-{uuid.uuid4().hex[:8]}"
            artifacts.safe_extract(archive, unpacked)
            model_dir = artifacts.find_model_dir(unpacked)
        artifacts.read_metadata(model_dir)
        if not (model_dir / artifacts.WEIGHTS_FILE).is_file():
            raise artifacts.ArtifactError(f"model dir {model_dir} has no {artifacts.WEIGHTS_FILE}")
    except BaseException:
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)
        raise
    return model_dir, unpacked


# --- the HTTP front --------------------------------------------------------------------------------
class Front(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], backend_socket: str, run_dir: Path,
                 model_store: Path, max_request_bytes: int, response_timeout: float,
                 load_timeout: float) -> None:
        self.backend_socket = backend_socket
        self.run_dir = run_dir
        self.model_store = model_store
        self.max_request_bytes = max_request_bytes
        self.response_timeout = response_timeout
        self.load_timeout = load_timeout
        self.unpacked: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.local = threading.local()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, FrontHandler)

    def backend(self) -> UnixHTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = UnixHTTPConnection(self.backend_socket, self.response_timeout)
        return conn

    def call_backend(self, method: str, target: str, body: bytes | None,
                     headers: Mapping[str, str], timeout: float | None = None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """One request to MMS on this thread's kept-alive connection (reopened once if stale)."""
        for attempt in (1, 2):
            conn = self.backend()
            conn.timeout = timeout or self.response_timeout
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            fresh = conn.sock is None
            try:
                conn.request(method, target, body=body, headers=dict(headers))
                response = conn.getresponse()
                data = response.read()
                return response.status, response.reason, response.getheaders(), data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if fresh or attempt == 2:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (40 ms on Linux).
    disable_nagle_algorithm = True
    # A caller that stops sending mid-request gives up its thread after this many seconds.
    timeout = 120
    server_version = "dogbreed-serve"
    sys_version = ""
    server: Front

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # MMS logs every request already

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_GET

    # -- plumbing ------------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400/413 for one that cannot be read."""
        limit = self.server.max_request_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    self._send_error(400, "BadRequest", "malformed chunked body", close=True)
                    return None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    self._send_error(413, "RequestEntityTooLarge", f"request body over {limit} bytes", close=True)
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
            if size < 0:
                raise ValueError(length)
        except ValueError:
            self._send_error(400, "BadRequest", f"bad Content-Length {length!r}", close=True)
            return None
        if size > limit:
            self._send_error(413, "RequestEntityTooLarge", f"request body of {size} bytes is over the {limit} allowed", close=True)
            return None
        return self.rfile.read(size)

    def _send(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes,
              close: bool = False) -> None:
        self.send_response(status, reason or None)
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP and key.lower() not in ("date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, status: int, error_type: str, message: str, close: bool = False) -> None:
        self._send(status, None, [("Content-Type", "application/json")],
                   error_body(status, error_type, message), close=close)

    def _forward(self, body: bytes, target: str | None = None, timeout: float | None = None,
                 json_body: bytes | None = None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if json_body is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["Content-Type"] = "application/json"
            body = json_body
        return self.server.call_backend(self.command, target or self.path, body, headers, timeout)

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is None:
            return
        try:
            segments = [unquote(s) for s in urlsplit(self.path).path.split("/") if s]
            if self.command == "POST" and segments == ["models"]:
                self._register(body)
            elif self.command == "DELETE" and len(segments) == 2 and segments[0] == "models":
                self._unregister(body, segments[1])
            else:
                status, reason, headers, data = self._forward(body)
                self._send(status, reason, headers, data)
        except (ConnectionRefusedError, FileNotFoundError):
            self._send_error(503, "ServiceUnavailable", "the model server (MMS) is not running")
        except TimeoutError:
            self._send_error(504, "GatewayTimeout", "the model server did not answer in time", close=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller went away
        except Exception as exc:  # the front must outlive anything a request does
            log.exception("event=front_error path=%s", self.path)
            self._send_error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")

    # -- model management -----------------------------------------------------------------------
    def _register(self, body: bytes) -> None:
        params: dict[str, Any] = dict(parse_qsl(urlsplit(self.path).query))
        if body.strip():
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                payload = None
            if not isinstance(payload, dict):
                self._send_error(400, "BadRequest", 'body must be a JSON object {"model_name", "url"}')
                return
            params.update(payload)
        name, url = params.get("model_name"), params.get("url")
        if not isinstance(url, str) or not url:
            self._send_error(400, "BadRequest", "Parameter url is required.")
            return
        if not isinstance(name, str) or not name or "/" in name:
            self._send_error(400, "BadRequest", "Parameter model_name is required (no '/').")
            return
        status, _, _, _ = self.server.call_backend("GET", f"/models/{quote(name, safe='')}", None, {})
        if status == 200:
            self._send_error(409, "ConflictStatusException", f"Model {name} is already registered.")
            return
        try:
            model_dir, unpacked = resolve_model_source(
                url, self.server.model_store, self.server.run_dir / "models", name
            )
        except FileNotFoundError:
            self._send_error(404, "ModelNotFoundException", f"Model not found: {url}")
            return
        except artifacts.ArtifactError as exc:
            self._send_error(400, "ArtifactError", str(exc))
            return
        error_file = Path(load_error_file(str(self.server.run_dir), name))
        error_file.unlink(missing_ok=True)
        forward = {k: params[k] for k in REGISTER_PARAMETERS if k in params}
        forward["url"] = str(model_dir)
        ok = False
        try:
            status, reason, headers, data = self._forward(
                body, target="/models", timeout=self.server.load_timeout,
                json_body=json.dumps(forward).encode(),
            )
            ok = 200 <= status < 300
            if not ok and error_file.is_file():
                reason_json = json.loads(error_file.read_text())
                status, reason, headers, data = (int(reason_json["code"]), None,
                                                 [("Content-Type", "application/json")],
                                                 json.dumps(reason_json).encode())
        finally:  # tidy up before answering: the caller may look at once
            error_file.unlink(missing_ok=True)
            if unpacked is not None:
                if ok:
                    with self.server.lock:
                        self.server.unpacked[name] = unpacked
                else:
                    shutil.rmtree(unpacked, ignore_errors=True)
        self._send(status, reason, headers, data)

    def _unregister(self, body: bytes, name: str) -> None:
        status, reason, headers, data = self._forward(body, timeout=self.server.load_timeout)
        if 200 <= status < 300:
            with self.server.lock:
                unpacked = self.server.unpacked.pop(name, None)
            if unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        self._send(status, reason, headers, data)
