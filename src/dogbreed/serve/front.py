"""The thin HTTP front on the public port; MMS listens on a unix socket in the run dir behind it.

Every request passes through unchanged except ``POST /models`` and ``DELETE /models/{name}``,
for two things multi-model-server 1.1.11 (pinned) cannot do:

1. **A refused model's reason.** MMS answers any failed worker start with a fixed "Failed to
   start workers" and drops the worker's message (``ManagementRequestHandler.updateModelWorkers``,
   ``WorkerThread``). The handler keeps a load failure instead of dying; after MMS registers a
   model, the front asks it once (``X-Dogbreed-Load-Status``) and, if refused, unregisters it and
   answers the reason (``400 {"type": "ArtifactError", "message": "...model.json..."}``).
2. **A model.tar.gz url**, which MMS would read as a .mar (zip). The front unpacks it once
   (the server's resolver: :func:`dogbreed.artifacts.safe_extract`) and removes it on ``DELETE``.
   SageMaker, the local router and ``add-model`` hand over model dirs.

It also answers ``GET /execution-parameters`` itself (MMS has no such route): what SageMaker
batch transform asks a container before sending records, from the server's own settings
(:func:`execution_parameters`).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from dogbreed import artifacts, contract
from dogbreed.serve import LOAD_STATUS_HEADER, error_body
from dogbreed.serve.client import Response, ServeClient

log = logging.getLogger("dogbreed.serve")

# Request headers that describe one hop, not the request (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                        "transfer-encoding", "content-length", "host", "expect", "date", "server"})
# Registration parameters passed on to MMS; anything else (``handler``, ``runtime``) is dropped.
REGISTER_PARAMETERS = ("initial_workers", "batch_size", "max_batch_delay", "response_timeout", "synchronous")
JSON_HEADERS = {"content-type": "application/json"}


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
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, FrontHandler)

    def register(self, body: bytes, query: str) -> Response:
        params: dict[str, Any] = dict(parse_qsl(query))
        try:
            params.update(json.loads(body) if body.strip() else {})
        except (ValueError, TypeError, RecursionError):  # not JSON, or not an object
            return error(400, "BadRequest", 'body must be a JSON object {"model_name", "url"}')
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
        reply = error(500, "InternalServerError", "registration did not finish")
        try:
            reply = self.mms.request("POST", "/models", json.dumps(forward).encode(),
                                     JSON_HEADERS, self.load_timeout)
            waited = str(forward.get("synchronous", True)).lower() != "false"
            if 200 <= reply.status < 300 and waited and str(forward.get("initial_workers", 1)) != "0":
                probe = self.mms.invoke(name, b"", "application/json", {LOAD_STATUS_HEADER: "1"})
                if probe.status != 200:  # refused by the handler: its reason, and no model left behind
                    self.mms.unload_model(name)
                    reply = Response(probe.status, dict(JSON_HEADERS), probe.body)
        finally:  # tidy up before answering: the caller may look at once
            if unpacked is not None and 200 <= reply.status < 300:
                self.unpacked[name] = unpacked
            elif unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        return reply


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else the body waits for the delayed ACK of the headers (40 ms)
    timeout = 120  # a caller that stops sending mid-request gives up its thread
    server_version, sys_version = "dogbreed-serve", ""
    server: Front

    def log_message(self, *args: Any) -> None:
        pass  # MMS logs every request already

    def do_GET(self) -> None:
        try:
            body = self._body()
            if body is None:
                return
            parts = urlsplit(self.path)
            path = [unquote(s) for s in parts.path.split("/") if s]
            if self.command == "POST" and path == ["models"]:
                reply = self.server.register(body, parts.query)
            elif self.command == "GET" and path == ["execution-parameters"]:
                reply = Response(200, dict(JSON_HEADERS), json.dumps(self.server.execution_parameters).encode())
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                delete = self.command == "DELETE" and len(path) == 2 and path[0] == "models"
                reply = self.server.mms.request(self.command, self.path, body, headers,
                                                self.server.load_timeout if delete else None)
                if delete and reply.status == 200 and path[1] in self.server.unpacked:
                    shutil.rmtree(self.server.unpacked.pop(path[1]), ignore_errors=True)
            self._send(reply)
        except (ConnectionRefusedError, FileNotFoundError):
            self._send(error(503, "ServiceUnavailable", "the model server (MMS) is not running"))
        except TimeoutError:
            self._send(error(504, "GatewayTimeout", "the model server did not answer in time"), close=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller went away
        except Exception as exc:  # the front outlives anything a request does
            log.exception("event=front_error path=%s", self.path)
            self._send(error(500, "InternalServerError", f"{type(exc).__name__}: {exc}"))

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
