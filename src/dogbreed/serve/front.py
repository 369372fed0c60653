"""The thin HTTP front on the public port; MMS listens on a unix socket in the run dir behind it.

Only the SageMaker container API passes (:data:`ROUTES`): ``GET /ping``, ``POST /invocations``,
``GET|POST /models``, ``GET|DELETE /models/{name}``, ``POST /models/{name}/invoke``. MMS's other
management operations (``PUT /models/{name}?min_worker=`` worker scaling, caller-chosen
``initial_workers`` / ``batch_size`` / ``max_batch_delay`` on ``POST /models``) are refused with
a 4xx JSON error: the platform sizes workers (``SAGEMAKER_MODEL_SERVER_WORKERS``), not callers.
Requests pass through unchanged except ``POST /models`` and ``DELETE /models/{name}``, for what
multi-model-server 1.1.11 (pinned) cannot do:

1. **A refused model's reason.** MMS answers any failed worker start with a fixed "Failed to
   start workers" and drops the worker's message (``ManagementRequestHandler.updateModelWorkers``,
   ``WorkerThread``). The handler keeps a load failure instead of dying; after MMS registers a
   model, the front asks it once (``X-Dogbreed-Load-Status``) and, if refused, unregisters it and
   answers the reason (``400 {"type": "ArtifactError", "message": "...model.json..."}``).
2. **A model.tar.gz url**, which MMS would read as a .mar (zip). The front unpacks it once
   (the server's resolver: :func:`dogbreed.artifacts.safe_extract`) and removes it on ``DELETE``.
   SageMaker, the local router and ``add-model`` hand over model dirs.
3. **An unload never strands a request.** ``DELETE`` first stops new invokes of the model (503
   with ``Retry-After``), waits up to :data:`DRAIN_SECONDS` for those in flight, then unloads;
   any still waiting in MMS are answered 503 at once (MMS 1.1 left them hanging 65-90 s, then 504).
4. **A dead worker is noticed.** The zygote records every worker that dies while its model is
   loaded (``worker-deaths`` in the run dir); MMS 1.1 would retry the dead worker's socket forever
   while ``/ping`` says healthy and every invoke times out. The front re-registers the model
   (503 ``Retry-After`` meanwhile; ``GET /models/{name}`` says ``RECOVERING``), so it serves again
   within seconds, or is unloaded with the reason logged.

It also answers ``GET /execution-parameters`` itself (MMS has no such route): what SageMaker
batch transform asks a container before sending records, from the server's own settings
(:func:`execution_parameters`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from dogbreed import artifacts, contract
from dogbreed.serve import LOAD_STATUS_HEADER, error_body
from dogbreed.serve.client import Response, ServeClient, UnixHTTPConnection

log = logging.getLogger("dogbreed.serve")

# Request headers that describe one hop, not the request (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                        "transfer-encoding", "content-length", "host", "expect", "date", "server"})
# What POST /models takes: SageMaker sends model_name and url. Anything else (MMS's
# initial_workers, batch_size, max_batch_delay, handler, runtime...) is a 400: a caller-chosen
# max_batch_delay=5000 made every invoke wait 5 s (issue 11).
REGISTER_PARAMETERS = frozenset({"model_name", "url", "synchronous"})
JSON_HEADERS = {"content-type": "application/json"}
# (method, path shape) pairs that pass; "*" is one path segment (a model name).
ROUTES = frozenset({("GET", ("ping",)), ("POST", ("invocations",)), ("GET", ("models",)),
                    ("POST", ("models",)), ("GET", ("models", "*")), ("DELETE", ("models", "*")),
                    ("POST", ("models", "*", "invoke")), ("GET", ("execution-parameters",))})
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HTAB
MAX_PATH_BYTES = 8192  # MMS (netty) drops a longer request line without an answer
DRAIN_SECONDS = 5.0  # how long an unload waits for the model's requests in flight
RETRY_AFTER_SECONDS = "2"
SINGLE_MODEL_NAME = "model"  # what sagemaker-inference calls the model of a single-model endpoint


def route_error(method: str, path: list[str], raw_path: str) -> Response | None:
    """A 4xx for anything outside the SageMaker container API, else None."""
    if len(raw_path) > MAX_PATH_BYTES:
        return error(414, "URITooLong", f"request path of {len(raw_path)} bytes, over {MAX_PATH_BYTES}")
    if len(path) >= 2 and path[0] == "models":
        try:
            contract.validate_model_name(path[1])
        except contract.ContractError as exc:
            return error(400, "BadRequest", str(exc))
    shape = tuple("*" if i == 1 and path[0] == "models" else p for i, p in enumerate(path))
    if (method, shape) in ROUTES or method == "HEAD" and ("GET", shape) in ROUTES:
        return None
    if any(shape == s for _, s in ROUTES):
        return error(405, "MethodNotAllowed", f"{method} /{'/'.join(path)} is not part of the SageMaker "
                     "container API (worker scaling and other MMS management calls are not served)")
    return error(404, "ResourceNotFoundException", f"no route for {method} /{'/'.join(path)}")


def header_error(headers: Iterable[tuple[str, str]]) -> Response | None:
    """A 400 for a header holding control characters (RFC 9110 5.5), else None. MMS answers
    these 400 but may close the connection while the body is still being sent (1 in 20 tries for
    '\\x7f'), so the caller saw a dropped connection; refused here, always as JSON."""
    bad = next((k for k, v in headers if CONTROL_CHARACTERS.search(k + v)), None)
    return None if bad is None else error(400, "BadRequest", f"header {bad!r} holds control characters")


def error(status: int, error_type: str, message: str) -> Response:  # MMS's error shape
    return Response(status, dict(JSON_HEADERS), error_body(status, error_type, message))


def execution_parameters(workers: int) -> dict[str, Any]:
    """The ``GET /execution-parameters`` answer: one record per request (images are not split),
    as many in flight as there are model workers, and the one payload limit of the contract."""
    return {"MaxConcurrentTransforms": max(1, int(workers)), "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": contract.MAX_PAYLOAD_BYTES // 1024**2}


class Front(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    execution_parameters: dict[str, Any] = execution_parameters(1)  # the server sets its own

    def __init__(self, address: tuple[str, int], mms_socket: str,
                 resolve: Callable[[str, str], tuple[Path, Path | None]],
                 response_timeout: float, load_timeout: float,
                 max_request_bytes: int = contract.MAX_PAYLOAD_BYTES) -> None:
        self.mms = ServeClient(f"unix://{mms_socket}", response_timeout)
        self.resolve, self.max_request_bytes = resolve, max_request_bytes
        self.response_timeout, self.load_timeout = response_timeout, load_timeout
        self.unpacked: dict[str, Path] = {}  # name -> what the front unpacked for it
        self.registered: dict[str, str] = {}  # name -> the model dir MMS loaded it from
        self.state = threading.Condition()
        self.in_flight: dict[str, set[http.client.HTTPConnection]] = {}  # name -> its calls into MMS
        self.paused: dict[str, str] = {}  # name -> "UNLOADING" / "RECOVERING": invokes get a 503
        self.recoveries = 0
        self.single_model = False  # set by the server: /invocations goes to SINGLE_MODEL_NAME
        self.registered_at: dict[str, float] = {}  # name -> when its last registration began
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, FrontHandler)

    def register(self, body: bytes, query: str) -> Response:
        params: dict[str, Any] = dict(parse_qsl(query))
        try:
            params.update(json.loads(body) if body.strip() else {})
        except (ValueError, TypeError, RecursionError):  # not JSON, or not an object
            return error(400, "BadRequest", 'body must be a JSON object {"model_name", "url"}')
        unknown = sorted(set(params) - REGISTER_PARAMETERS)
        if unknown or str(params.get("synchronous", "true")).lower() != "true":
            return error(400, "BadRequest", f"POST /models takes model_name and url only, not {unknown or 'synchronous'}: "
                         "workers, batching and timeouts are set by the platform, not per request")
        name, url = params.get("model_name"), params.get("url")
        try:
            if not isinstance(url, str) or not url:
                return error(400, "BadRequest", "Parameter url is required.")
            if self.mms.describe_model(contract.validate_model_name(name)).status == 200:
                return error(409, "ConflictStatusException", f"Model {name} is already registered.")
            model_dir, unpacked = self.resolve(url, name)
        except FileNotFoundError:
            return error(404, "ModelNotFoundException", f"Model not found: {url}")
        except contract.ContractError as exc:
            return error(400, "BadRequest", f"Parameter model_name: {exc}")
        except artifacts.ArtifactError as exc:
            return error(400, "ArtifactError", str(exc))
        forward = {**{k: params[k] for k in REGISTER_PARAMETERS if k in params},
                   "model_name": name, "url": str(model_dir)}
        self.registered.pop(name, None)
        self.registered_at[name] = time.time()
        reply = error(500, "InternalServerError", "registration did not finish")
        try:
            reply = self.mms.request("POST", "/models", json.dumps(forward).encode(),
                                     JSON_HEADERS, self.load_timeout)
            if 200 <= reply.status < 300:
                probe = self.mms.invoke(name, b"", "application/json", {LOAD_STATUS_HEADER: "1"})
                if probe.status != 200:  # refused by the handler: its reason, and no model left behind
                    self.mms.unload_model(name)
                    reply = Response(probe.status, dict(JSON_HEADERS), probe.body)
                else:
                    self.registered[name] = str(model_dir)
        finally:  # tidy up before answering: the caller may look at once
            if unpacked is not None and 200 <= reply.status < 300:
                self.unpacked[name] = unpacked
            elif unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        return reply

    # -- invokes, unloads and dead workers ----------------------------------------------------
    def invoke(self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Forward one invoke of ``name``, tracked so an unload or a recovery can answer it."""
        with self.state:
            if name in self.paused:
                return self._unavailable(name)
            conn = UnixHTTPConnection(self.mms.unix_path or "", self.response_timeout)
            conn.connect()  # connected before it is tracked: _pause can always cut it off
            self.in_flight.setdefault(name, set()).add(conn)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except (OSError, http.client.HTTPException):
            cut_by = getattr(conn, "cut_by", None)  # an unload or a recovery (see _pause)
            if cut_by is not None:  # the pause may be over by now: answer why it was cut
                return self._unavailable(name, cut_by)
            raise
        finally:
            conn.close()
            with self.state:
                calls = self.in_flight.get(name, set())
                calls.discard(conn)
                if not calls:
                    self.in_flight.pop(name, None)
                    self.state.notify_all()

    def _unavailable(self, name: str, why: str | None = None) -> Response:
        why = why or self.paused.get(name, "UNLOADING")
        reply = error(503, "ServiceUnavailable", f"model {name} is {why.lower()}; retry in {RETRY_AFTER_SECONDS} s")
        reply.headers["retry-after"] = RETRY_AFTER_SECONDS
        return reply

    def _pause(self, name: str, why: str, drain: float) -> None:
        """Stop new invokes of ``name``; wait up to ``drain`` s for those in flight, then cut
        off the rest (their callers get a 503 now, not MMS's timeout later)."""
        deadline = time.monotonic() + drain
        with self.state:
            self.paused[name] = why
            while self.in_flight.get(name) and time.monotonic() < deadline:
                self.state.wait(max(0.01, deadline - time.monotonic()))
            stuck = list(self.in_flight.get(name, ()))
        for conn in stuck:
            conn.cut_by = why  # type: ignore[attr-defined]
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def _resume(self, name: str) -> None:
        with self.state:
            self.paused.pop(name, None)
            self.state.notify_all()

    def unload(self, name: str, path: str) -> Response:
        if self.paused.get(name) == "RECOVERING":
            return self._unavailable(name)
        self._pause(name, "UNLOADING", DRAIN_SECONDS)
        try:
            reply = self.mms.request("DELETE", path, b"", {}, self.load_timeout)
            if reply.status == 200:
                self.registered.pop(name, None)
                if name in self.unpacked:
                    shutil.rmtree(self.unpacked.pop(name), ignore_errors=True)
            return reply
        finally:
            self._resume(name)

    def describe(self, name: str, path: str, headers: dict[str, str]) -> Response:
        reply = self.mms.request("GET", path, b"", headers)
        why = self.paused.get(name)
        if why and reply.status == 200:  # say what MMS cannot: this model does not serve now
            try:
                described = json.loads(reply.body)
                for model in described if isinstance(described, list) else [described]:
                    model["status"] = why
                    for worker in model.get("workers", []):
                        worker["status"] = why
                return Response(200, dict(JSON_HEADERS), json.dumps(described, indent=2).encode())
            except (ValueError, AttributeError):
                pass
        return reply

    def watch_workers(self, deaths_file: Path, stop: threading.Event, interval: float = 0.5) -> None:
        """Follow the zygote's record of dead workers; recover each model that lost one."""
        offset = 0
        while not stop.wait(interval):
            try:
                with open(deaths_file, "rb") as handle:
                    handle.seek(offset)
                    lines = handle.read().splitlines(keepends=True)
            except FileNotFoundError:
                continue
            for line in lines:
                if not line.endswith(b"\n"):
                    break  # half-written: read it next time
                offset += len(line)
                try:
                    death = json.loads(line)
                    name, forked = death.get("model"), float(death.get("forked", 0))
                except (ValueError, AttributeError, TypeError):
                    continue
                # A worker forked before the model's last registration is one an unload stopped.
                if (isinstance(name, str) and name in self.registered and name not in self.paused
                        and forked >= self.registered_at.get(name, 0)):
                    try:
                        self.recover(name)
                    except Exception:  # the watcher outlives any one recovery
                        log.exception("event=worker_recovery_failed model=%s", name)

    def recover(self, name: str) -> None:
        """Re-register a model whose worker died: unload (MMS cannot restart a forked worker)
        and load again from the same dir; its invokes get a 503 meanwhile."""
        started = time.monotonic()
        model_dir = self.registered[name]
        log.warning("event=worker_died model=%s action=reload", name)
        self._pause(name, "RECOVERING", 0.0)
        try:
            self.mms.unload_model(name)
            self.registered_at[name] = time.time()
            reply = self.mms.request("POST", "/models", json.dumps({"model_name": name, "url": model_dir}).encode(),
                                     JSON_HEADERS, self.load_timeout)
            if 200 <= reply.status < 300:
                self.recoveries += 1
                log.info("event=worker_recovered model=%s seconds=%.2f", name, time.monotonic() - started)
            else:
                self.registered.pop(name, None)
                log.error("event=worker_recovery_failed model=%s status=%d reason=%s", name, reply.status,
                          reply.message())
        finally:
            self._resume(name)


def phrase_of(code: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(code).phrase.replace(" ", "")
    except ValueError:
        return "Error"


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else the body waits for the delayed ACK of the headers (40 ms)
    timeout = 120  # a caller that stops sending mid-request gives up its thread
    server_version, sys_version = "dogbreed-serve", ""
    server: Front

    def log_message(self, *args: Any) -> None:
        pass  # MMS logs every request already

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line over 64 KB, a malformed one) as JSON too."""
        self.close_connection = True
        try:
            self._send(error(code, phrase_of(code), message or phrase_of(code)), close=True)
        except OSError:
            pass

    def do_GET(self) -> None:
        try:
            body = self._body()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller went away mid-request
            return
        if body is None:
            return
        close = False
        try:
            reply = self._reply(body)
        except (ConnectionRefusedError, FileNotFoundError):
            reply = error(503, "ServiceUnavailable", "the model server (MMS) is not running")
        except TimeoutError:
            reply, close = error(504, "GatewayTimeout", "the model server did not answer in time"), True
        except (OSError, http.client.HTTPException) as exc:  # MMS dropped the connection
            log.warning("event=mms_disconnected path=%s error=%s", self.path, type(exc).__name__)
            reply = error(502, "BadGateway", f"the model server closed the connection ({type(exc).__name__})")
        except Exception as exc:  # the front outlives anything a request does
            log.exception("event=front_error path=%s", self.path)
            reply = error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")
        try:
            self._send(reply, close=close)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller went away

    def _reply(self, body: bytes) -> Response:
        """The answer to this request; errors talking to MMS propagate (see :meth:`do_GET`)."""
        parts = urlsplit(self.path)
        path = [unquote(s) for s in parts.path.split("/") if s]
        refused = route_error(self.command, path, self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        refused = refused or header_error(self.headers.items())
        if refused is not None:
            return refused
        if self.command == "POST" and path == ["models"]:
            reply = self.server.register(body, parts.query)
        elif self.command == "GET" and path == ["execution-parameters"]:
            reply = Response(200, dict(JSON_HEADERS), json.dumps(self.server.execution_parameters).encode())
        elif self.command == "DELETE":
            reply = self.server.unload(path[1], self.path)
        elif len(path) == 3:
            reply = self.server.invoke(path[1], self.command, self.path, body, headers)
        elif path == ["invocations"] and self.server.single_model:
            # Single-model: the model MMS loaded at start, by name (MMS's /invocations finds
            # only a model loaded at start, not the one reloaded after its worker died).
            target = f"/models/{SINGLE_MODEL_NAME}/invoke" + (f"?{parts.query}" if parts.query else "")
            reply = self.server.invoke(SINGLE_MODEL_NAME, self.command, target, body, headers)
        elif len(path) == 2 and self.command in ("GET", "HEAD"):
            reply = self.server.describe(path[1], self.path, headers)
        else:
            reply = self.server.mms.request(self.command, self.path, body, headers)
        return reply

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_GET

    def _body(self) -> bytes | None:
        """The request body (Content-Length or chunked), or None after a 400/413 answer."""
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        chunks, total = [], 0
        while True:
            size_text = self.rfile.readline(1024).split(b";")[0].strip() if chunked else (
                self.headers.get("Content-Length") or "0").encode()
            try:
                size = int(size_text, 16 if chunked else 10)
                if size < 0:
                    raise ValueError(size)
            except ValueError:
                self._send(error(400, "BadRequest", f"bad body length {size_text[:20]!r}"), close=True)
                return None
            total += size
            if total > self.server.max_request_bytes:
                self._send(error(413, "RequestEntityTooLarge",
                                 f"request body over the {self.server.max_request_bytes} bytes allowed"), close=True)
                return None
            chunks.append(self.rfile.read(size))
            if not chunked:
                return b"".join(chunks)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            self.rfile.readline(1024)

    def _send(self, reply: Response, close: bool = False) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        if close:
            self.send_header("Connection", "close")
        self.close_connection = self.close_connection or close
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
