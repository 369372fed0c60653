"""The one HTTP client for a ``dogbreed-serve`` endpoint (tests, benchmark, router, the front's
calls into MMS). Every call returns a :class:`Response`; nothing raises for an HTTP error status.

    client = ServeClient("http://127.0.0.1:8080")     # or unix:///run/dir/mms.sock (MMS itself)
    client.load_model("resnet18", "/opt/ml/models/resnet18/model")   # POST /models
    client.invoke("resnet18", jpeg_bytes).json()                      # POST /models/{name}/invoke
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import quote, urlsplit

from dogbreed.serve import error_body

LOAD_TIMEOUT = 180.0  # MMS gives a new worker 2 minutes to start


def framing_error(headers: Any) -> str | None:
    """Why a request's body length is ambiguous, or None (``headers``: an ``email.message.Message``
    as ``http.server`` parses them). RFC 9112 6.3: differing Content-Length values are an
    unrecoverable error; 6.1: with both Transfer-Encoding and Content-Length the server may
    reject the request and must close the connection after answering. Either way a proxy in
    front could read the body differently: request smuggling."""
    lengths = {value.strip() for value in headers.get_all("Content-Length") or []}
    if len(lengths) > 1:
        return f"conflicting Content-Length headers {sorted(lengths)}"
    if lengths and headers.get_all("Transfer-Encoding"):
        return "both Transfer-Encoding and Content-Length: send one"
    return None


class BodyError(Exception):
    """A request body that cannot be read: ``status`` (400 or 413) and why. The rest of the body
    is unread, so the connection must close after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class HTTP11RequestHandler(BaseHTTPRequestHandler):
    """What both of the project's HTTP servers (the serving front, the local router) share:
    HTTP/1.1 answers, no HTTP/0.9 (its answers have no status line), one way to read a body."""

    protocol_version = "HTTP/1.1"
    # Before a request line is parsed, answer as HTTP/1.1: http.server's default (HTTP/0.9)
    # sends a garbage line's error as a bare body with no status line.
    default_request_version = "HTTP/1.1"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) == 2:  # "GET /": HTTP/0.9, which has no status line
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.1")
            return False
        return True

    def read_body(self, max_bytes: int) -> bytes:
        """The request body, sent with Content-Length or chunked (RFC 9112 7.1, trailers
        skipped), of at most ``max_bytes``; else a :class:`BodyError` with the connection
        marked to close."""
        try:
            return self._read_body(max_bytes)
        except BodyError:
            self.close_connection = True
            raise

    def _read_body(self, max_bytes: int) -> bytes:
        if ambiguous := framing_error(self.headers):
            raise BodyError(400, ambiguous)
        chunked, body = "chunked" in self.headers.get("Transfer-Encoding", "").lower(), b""
        while True:
            text = self.rfile.readline(1024).split(b";")[0].strip() if chunked else (
                self.headers.get("Content-Length") or "0").strip().encode()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}" if chunked else rb"[0-9]{1,16}", text):
                raise BodyError(400, f"bad body length {text[:20]!r}")
            size = int(text, 16 if chunked else 10)
            if len(body) + size > max_bytes:
                raise BodyError(413, f"request body over the {max_bytes} byte limit")
            body += self.rfile.read(size)
            if not chunked or size == 0:
                while chunked and self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            self.rfile.readline(1024)  # the CRLF after a chunk


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @classmethod
    def error(cls, status: int, error_type: str, message: str) -> Response:
        """The container's one error shape (MMS's own): ``{"code", "type", "message"}``."""
        return cls(status, {"content-type": "application/json"}, error_body(status, error_type, message))

    def json(self) -> Any:
        return json.loads(self.body)

    def message(self) -> str:
        """The message of a JSON error body, else the body's text."""
        try:
            data = json.loads(self.body)
            if isinstance(data, dict):
                return str(data.get("message") or data.get("Message") or data.get("error") or data)
        except (ValueError, UnicodeDecodeError):
            pass
        return self.body.decode("utf-8", "replace")[:500]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class ServeClient:
    """``keep_alive=True`` reuses one connection (one client per thread then); by default every
    call opens its own and the client is thread-safe."""

    def __init__(self, url: str, timeout: float = 120.0, keep_alive: bool = False) -> None:
        parts = urlsplit(url)
        if not (parts.scheme == "http" and parts.hostname or parts.scheme == "unix" and parts.path):
            raise ValueError(f"expected http://host:port or unix:///path/to.sock, got {url!r}")
        self.url, self.timeout, self.keep_alive = url.rstrip("/"), timeout, keep_alive
        self.host, self.port = parts.hostname, parts.port or 80
        self.unix_path = parts.path if parts.scheme == "unix" else None
        self._kept: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Response:
        timeout = timeout or self.timeout
        conn = self._kept or (UnixHTTPConnection(self.unix_path, timeout) if self.unix_path
                              else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            reply = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except BaseException:
            conn.close()
            self._kept = None
            raise
        self._kept = conn if self.keep_alive and not resp.will_close else None
        if self._kept is None:
            conn.close()
        return reply

    def ping(self) -> Response:
        return self.request("GET", "/ping", timeout=10)

    def load_model(self, name: str, url: str, timeout: float = LOAD_TIMEOUT) -> Response:
        """``POST /models {"model_name": name, "url": url}``, as SageMaker sends it."""
        body = json.dumps({"model_name": name, "url": str(url)}).encode()
        return self.request("POST", "/models", body, {"Content-Type": "application/json"}, timeout)

    def unload_model(self, name: str) -> Response:
        return self.request("DELETE", f"/models/{quote(name, safe='')}", timeout=LOAD_TIMEOUT)

    def describe_model(self, name: str) -> Response:
        return self.request("GET", f"/models/{quote(name, safe='')}")

    def list_models(self) -> list[str]:
        return [m["modelName"] for m in self.request("GET", "/models").json().get("models", [])]

    def invoke(self, name: str | None, body: bytes, content_type: str | None = "application/x-image",
               headers: Mapping[str, str] | None = None, query: str = "") -> Response:
        """``POST /models/{name}/invoke`` (``/invocations`` when ``name`` is None); a None
        ``content_type`` sends no Content-Type header."""
        path = "/invocations" if name is None else f"/models/{quote(name, safe='')}/invoke"
        headers = {**(headers or {}), **({"Content-Type": content_type} if content_type else {})}
        return self.request("POST", path + (f"?{query}" if query else ""), body, headers)
