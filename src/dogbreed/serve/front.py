"""The thin HTTP front on the public port (MMS on a unix socket behind it), for what only a front
can do with multi-model-server 1.1.11 (pinned), each found by hostile-input tests: only the SageMaker
container API passes (MMS would also take worker scaling, batching set by callers); every refusal
is JSON, never a dropped connection (MMS answers chunked bodies and request lines over 4 KB a
bare 400, hangs up on headers over 8 KB, may close mid-answer on a header with control
characters; MMS hanging up is a 502); ambiguous body framing is refused and the connection
closed (RFC 9112 6.1); the model life MMS lacks (:mod:`dogbreed.serve.lifecycle`);
``GET /execution-parameters``."""

from __future__ import annotations

import json
import re
import socket
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from dogbreed import contract
from dogbreed.serve.client import BodyError, HTTP11RequestHandler, Response
from dogbreed.serve.lifecycle import ModelLifecycle, answer

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",  # RFC 9110
                        "transfer-encoding", "content-length", "host", "expect", "date", "server"})  # 7.6.1
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HTAB (RFC 9110 5.5)
# What MMS's Netty HTTP decoder takes (its defaults: maxInitialLineLength 4096, maxHeaderSize
# 8192). Over them MMS answers a bare 400 or hangs up; the front answers 414 / 431 first.
MAX_REQUEST_LINE_BYTES = 4096
MAX_HEADER_BYTES = 8192


def refusal(method: str, path: list[str], raw_path: str, headers: list[tuple[str, str]]) -> Response | None:
    """A 4xx for anything outside the SageMaker container API, else None."""
    line = len(method) + len(raw_path) + len("  HTTP/1.1")  # as the front sends it on to MMS
    if line >= MAX_REQUEST_LINE_BYTES:
        return Response.error(414, "URITooLong", f"request line of {line} bytes (path {len(raw_path)}), "
                              f"the limit is {MAX_REQUEST_LINE_BYTES - 1}")
    header_bytes = sum(len(k) + len(v) + 4 for k, v in headers)  # "name: value\r\n"
    if header_bytes > MAX_HEADER_BYTES:
        return Response.error(431, "RequestHeaderFieldsTooLarge",
                              f"request headers of {header_bytes} bytes, over {MAX_HEADER_BYTES}")
    if path[:1] == ["models"] and len(path) >= 2:
        try:
            contract.validate_model_name(path[1])
        except contract.ContractError as exc:
            return Response.error(400, "BadRequest", str(exc))
    shape = tuple("*" if i == 1 and path[0] == "models" else p for i, p in enumerate(path))
    routes = contract.CONTAINER_ROUTES
    if not ((method, shape) in routes or method == "HEAD" and ("GET", shape) in routes):
        if any(shape == s for _, s in routes):
            return Response.error(405, "MethodNotAllowed", f"{method} /{'/'.join(path)}: not in the SageMaker container API")
        return Response.error(404, "ResourceNotFoundException", f"no route for {method} /{'/'.join(path)}")
    bad = next((k for k, v in headers if CONTROL_CHARACTERS.search(k + v)), None)
    return None if bad is None else Response.error(400, "BadRequest", f"header {bad!r} holds control characters")


class Front(ThreadingHTTPServer):
    daemon_threads, request_queue_size = True, 128
    single_model = False  # set by the server: /invocations goes to contract.SINGLE_MODEL_NAME

    def __init__(self, address: tuple[str, int], models: ModelLifecycle, workers: int = 1,
                 max_request_bytes: int = contract.MAX_PAYLOAD_BYTES) -> None:
        self.models, self.mms, self.max_request_bytes = models, models.mms, max_request_bytes
        self.execution_parameters = json.dumps(contract.execution_parameters(workers)).encode()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, FrontHandler)


class FrontHandler(HTTP11RequestHandler):
    server_version, sys_version = "dogbreed-serve", ""
    disable_nagle_algorithm = True  # else the body waits for the delayed ACK of the headers (40 ms)
    timeout = 120  # a caller that stops sending mid-request gives up its thread
    server: Front

    def log_message(self, *args: object) -> None:
        pass  # MMS logs every request already

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:  # as JSON too
        kind = HTTPStatus(code).phrase.replace(" ", "")
        self._send(Response.error(code, kind, message or kind), close=True)

    def do_GET(self) -> None:
        try:
            body = self.read_body(self.server.max_request_bytes)
        except BodyError as exc:  # answered with Connection: close, the rest of it unread
            self.send_error(exc.status, exc.message)
            return
        except OSError:
            self.close_connection = True  # the caller went away mid-request
            return
        reply = answer(lambda: self._reply(body), self.path)
        self._send(reply, close=reply.status == 504)

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_GET

    def _reply(self, body: bytes) -> Response:
        parts, method, models = urlsplit(self.path), self.command, self.server.models
        path = [unquote(s) for s in parts.path.split("/") if s]
        if refused := refusal(method, path, self.path, self.headers.items()):
            return refused
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if method == "POST" and path == ["models"]:
            return models.register(body, parts.query)
        if path == ["execution-parameters"]:
            return Response(200, {"content-type": "application/json"}, self.server.execution_parameters)
        if method == "DELETE":
            return models.unload(path[1], self.path)
        if len(path) == 3:
            return models.invoke(path[1], method, self.path, body, headers)
        if path == ["invocations"] and self.server.single_model:
            return models.invoke_single(method, parts.query, body, headers)
        if len(path) == 2:
            return models.describe(path[1], self.path, headers)
        return self.server.mms.request(method, self.path, body, headers)

    def _send(self, reply: Response, close: bool = False) -> None:
        try:
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
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller went away
