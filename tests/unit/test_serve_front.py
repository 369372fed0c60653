"""The HTTP front before MMS, against a fake MMS on a unix socket: pass-through, limits,
model sources (dirs, archives, tar-slip), the register/unregister checks."""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_artifacts import tiny_model_dir

from dogbreed import artifacts
from dogbreed.serve import LOAD_STATUS_HEADER, front
from dogbreed.serve.client import ServeClient
from dogbreed.serve.lifecycle import ModelLifecycle
from dogbreed.serve.server import resolve_url as resolve_model_source


class FakeMMS(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.requests: list[dict] = []
        self.models: dict[str, str] = {}
        self.fail_load: dict[str, str] = {}  # name -> reason the handler keeps and answers with
        self.hang_up_after_reply = False  # close the connection without saying so (an idle timeout)
        self.run_dir: Path | None = None
        super().__init__(path, FakeHandler)


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeMMS

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        if self.server.hang_up_after_reply:
            self.close_connection = True

    def do_ANY(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        record = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body,
                  "connection": id(self)}  # one handler per connection
        self.server.requests.append(record)
        segments = [s for s in urlsplit(self.path).path.split("/") if s]
        if segments[:1] == ["models"] and len(segments) == 2 and self.command == "GET":
            if segments[1] in self.server.models:
                return self._reply(200, {"modelName": segments[1]})
            return self._reply(404, {"code": 404, "type": "ModelNotFoundException", "message": "nope"})
        if segments == ["models"] and self.command == "POST":
            params = json.loads(body)
            name = params["model_name"]
            if name in self.server.models:
                return self._reply(409, {"code": 409, "type": "ConflictStatusException", "message": "taken"})
            self.server.models[name] = params["url"]
            return self._reply(200, {"status": "Workers scaled"})
        if segments[2:] == ["invoke"] and self.headers.get(LOAD_STATUS_HEADER):
            if segments[1] in self.server.fail_load:  # what the handler answers for a refused model
                return self._reply(400, {"code": 400, "type": "ArtifactError",
                                         "message": self.server.fail_load[segments[1]]})
            return self._reply(200, {"status": "loaded"})
        if segments[:1] == ["models"] and len(segments) == 2 and self.command == "DELETE":
            if self.server.models.pop(segments[1], None) is None:
                return self._reply(404, {"code": 404, "type": "ModelNotFoundException", "message": "nope"})
            return self._reply(200, {"status": "unregistered"})
        self._reply(200, {"echo": self.path, "method": self.command, "bytes": len(body)},
                    {"X-Custom": "kept", "Keep-Alive": "timeout=5"})

    do_GET = do_POST = do_PUT = do_DELETE = do_ANY


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix="dbf-"))
    sock = str(run_dir / "mms.sock")
    mms = FakeMMS(sock)
    mms.run_dir = run_dir
    threading.Thread(target=mms.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    store = tmp_path / "store"
    store.mkdir()
    def resolve(url: str, name: str) -> tuple[Path, Path | None]:
        return resolve_model_source(url, store, run_dir / "models", name)

    models = ModelLifecycle(ServeClient(f"unix://{sock}"), resolve, response_timeout=10, load_timeout=10)
    server = front.Front(("127.0.0.1", 0), models, max_request_bytes=100_000)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield {"front": server, "mms": mms, "run_dir": run_dir, "store": store, "port": server.server_address[1]}
    finally:
        server.shutdown()
        server.server_close()
        mms.shutdown()
        mms.server_close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def call(setup: dict, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", setup["port"], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if own:
            conn.close()


def registrations(setup: dict) -> list[dict]:
    """What the front sent MMS's ``POST /models`` (it also asks each new model if it loaded)."""
    return [json.loads(r["body"]) for r in setup["mms"].requests if r["method"] == "POST" and r["path"] == "/models"]


def register(setup: dict, name: str, url: str, **extra) -> tuple[int, dict]:
    status, _, body = call(setup, "POST", "/models", json.dumps({"model_name": name, "url": url, **extra}).encode(),
                           {"Content-Type": "application/json"})
    return status, json.loads(body)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("front-model") / "model")


# --- pass-through ---------------------------------------------------------------------------------
def test_requests_pass_through_on_kept_alive_connections(setup: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", setup["port"], timeout=10)
    for i in range(3):
        status, headers, body = call(setup, "POST", f"/models/m/invoke?top_k={i}", b"abc",
                                     {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=3"},
                                     conn=conn)
        assert status == 200 and json.loads(body) == {"echo": f"/models/m/invoke?top_k={i}", "method": "POST", "bytes": 3}
        assert headers["x-custom"] == "kept" and "keep-alive" not in headers
        assert headers["content-length"] == str(len(body))
    conn.close()
    seen = setup["mms"].requests[-1]["headers"]
    assert seen["Content-Type"] == "image/jpeg" and seen["X-Amzn-SageMaker-Custom-Attributes"] == "top_k=3"


def test_chunked_request_bodies_are_reassembled(setup: dict) -> None:
    with socket.create_connection(("127.0.0.1", setup["port"]), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
        reply = sock.recv(65536)
    assert b" 200 " in reply.split(b"\r\n")[0]
    assert setup["mms"].requests[-1]["body"] == b"hello world"


def test_oversized_bodies_are_413(setup: dict) -> None:
    status, _, body = call(setup, "POST", "/invocations", b"x" * 100_001, {"Content-Type": "image/jpeg"})
    assert status == 413 and json.loads(body)["code"] == 413
    with socket.create_connection(("127.0.0.1", setup["port"]), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % 100_001 + b"x" * 100_001 + b"\r\n0\r\n\r\n")
        assert b" 413 " in sock.recv(65536).split(b"\r\n")[0]


def test_bad_content_length_is_400(setup: dict) -> None:
    with socket.create_connection(("127.0.0.1", setup["port"]), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert b" 400 " in sock.recv(65536).split(b"\r\n")[0]


def test_mms_down_is_503(setup: dict) -> None:
    setup["mms"].shutdown()
    setup["mms"].server_close()
    Path(setup["run_dir"] / "mms.sock").unlink()
    status, _, body = call(setup, "GET", "/ping")
    assert status == 503 and json.loads(body)["type"] == "ServiceUnavailable"


# --- model sources ----------------------------------------------------------------------------------------
def test_resolve_model_dir_and_archives(good_model: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    assert resolve_model_source(str(good_model), Path("/"), staging, "m") == (good_model, None)
    assert resolve_model_source(f"file://{good_model}", Path("/"), staging, "m")[0] == good_model
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "inner").symlink_to(good_model, target_is_directory=True)
    assert resolve_model_source(str(wrapper), Path("/"), staging, "m")[0] == wrapper / "inner"
    archive = artifacts.pack(good_model, tmp_path / "store" / "name" / artifacts.ARCHIVE_NAME)
    for url in (str(archive), str(archive.parent), "name/model.tar.gz"):
        model_dir, unpacked = resolve_model_source(url, tmp_path / "store", staging, "a/b")
        assert unpacked is not None and unpacked.parent == staging and unpacked.name.startswith("a%2Fb-")
        assert model_dir == unpacked and (model_dir / artifacts.WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("url,error", [
    ("https://example.com/model.tar.gz", artifacts.ArtifactError),
    ("s3://bucket/model.tar.gz", artifacts.ArtifactError),
    ("/nonexistent/model", FileNotFoundError),
    ("{store}/../store/x", artifacts.ArtifactError),
    ("{store}", artifacts.ArtifactError),  # neither model.json nor model.tar.gz
    ("{store}/not-a-tar.gz", artifacts.ArtifactError),
    ("{store}/evil.tar.gz", artifacts.ArtifactError),
])
def test_resolve_refuses(tmp_path: Path, good_model: Path, url: str, error: type) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "not-a-tar.gz").write_bytes(b"plain text")
    with tarfile.open(store / "evil.tar.gz", "w:gz") as tar:
        tar.add(good_model / artifacts.METADATA_FILE, arcname="../model.json")
    staging = tmp_path / "staging"
    with pytest.raises(error):
        resolve_model_source(url.format(store=store), store, staging, "m")
    assert not staging.exists() or list(staging.iterdir()) == []


# --- register / unregister -------------------------------------------------------------------------------------
def test_register_a_dir_forwards_sagemakers_request(setup: dict, good_model: Path) -> None:
    # (MMS's own parameters used to be forwarded, or dropped silently.)
    assert register(setup, "m1", str(good_model), handler="evil.module", initial_workers=1)[0] == 400
    status, body = register(setup, "m1", str(good_model))
    assert status == 200, body
    sent = registrations(setup)[-1]
    assert sent == {"model_name": "m1", "url": str(good_model)}
    probe = setup["mms"].requests[-1]
    assert (probe["method"], probe["path"], probe["headers"][LOAD_STATUS_HEADER]) == ("POST", "/models/m1/invoke", "1")
    assert register(setup, "m1", str(good_model))[0] == 409
    assert len(registrations(setup)) == 1  # the conflict is found before MMS is asked


def test_register_with_query_parameters(setup: dict, good_model: Path) -> None:
    status, _, _ = call(setup, "POST", f"/models?model_name=q1&url={good_model}&synchronous=true")
    assert status == 200
    # MMS is sent exactly the name and the resolved dir (synchronous=true is its default)
    assert registrations(setup)[-1] == {"model_name": "q1", "url": str(good_model)}


def test_register_an_archive_unpacks_it_and_delete_removes_it(setup: dict, good_model: Path) -> None:
    archive = artifacts.pack(good_model, setup["store"] / "a" / artifacts.ARCHIVE_NAME)
    status, body = register(setup, "arch", str(archive))
    assert status == 200, body
    unpacked = Path(setup["mms"].models["arch"])
    assert unpacked.parent == setup["run_dir"] / "models" and (unpacked / artifacts.METADATA_FILE).is_file()
    status, _, _ = call(setup, "DELETE", "/models/arch")
    assert status == 200 and not unpacked.exists()
    assert call(setup, "DELETE", "/models/arch")[0] == 404


@pytest.mark.parametrize("payload,status", [
    ({"model_name": "x"}, 400),
    ({"url": "/tmp"}, 400),
    ({"model_name": "a/b", "url": "/tmp"}, 400),
    ({"model_name": "x", "url": "/nonexistent"}, 404),
    ({"model_name": "x", "url": "http://example.com/m"}, 400),
])
def test_register_refusals(setup: dict, payload: dict, status: int) -> None:
    code, _, body = call(setup, "POST", "/models", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    assert code == status and json.loads(body)["code"] == status
    assert not registrations(setup)


def test_register_non_json_body_is_400(setup: dict) -> None:
    assert call(setup, "POST", "/models", b"[1,2]", {"Content-Type": "application/json"})[0] == 400
    assert call(setup, "POST", "/models", b"\xff\xfe", {"Content-Type": "application/json"})[0] == 400


def test_a_tar_slip_archive_is_refused_before_mms(setup: dict, good_model: Path) -> None:
    evil = setup["store"] / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(good_model / artifacts.METADATA_FILE, arcname="../../model.json")
    status, body = register(setup, "evil", str(evil))
    assert status == 400 and "unsafe path" in body["message"]
    assert not registrations(setup)
    assert not (setup["run_dir"] / "models").exists() or not list((setup["run_dir"] / "models").iterdir())


def test_a_worker_load_failure_comes_back_with_its_reason(setup: dict, good_model: Path) -> None:
    archive = artifacts.pack(good_model, setup["store"] / "b" / artifacts.ARCHIVE_NAME)
    setup["mms"].fail_load["bad"] = "model.pt: cannot load state_dict"
    status, body = register(setup, "bad", str(archive))
    assert (status, body["type"], body["message"]) == (400, "ArtifactError", "model.pt: cannot load state_dict")
    assert not list((setup["run_dir"] / "models").iterdir())  # the unpacked copy is gone
    assert "bad" not in setup["mms"].models  # unregistered again: nothing left behind
    assert [r["method"] for r in setup["mms"].requests if "/models" in r["path"]][-2:] == ["POST", "DELETE"]


def test_invokes_reuse_one_connection_to_mms_and_retry_one_mms_closed(setup: dict, good_model: Path) -> None:
    assert register(setup, "m1", str(good_model))[0] == 200
    invoke = ("POST", "/models/m1/invoke", b"x", {"Content-Type": "image/jpeg"})
    before = len(setup["mms"].requests)
    assert [call(setup, *invoke)[0] for _ in range(3)] == [200] * 3
    assert len({r["connection"] for r in setup["mms"].requests[before:]}) == 1
    # MMS closes a kept connection without a word (an idle timeout, a restart): the next invoke
    # fails on it, and is sent again on a new connection; the caller sees only the answer.
    setup["mms"].hang_up_after_reply = True
    assert call(setup, *invoke)[0] == 200
    setup["mms"].hang_up_after_reply = False
    before = len(setup["mms"].requests)
    assert call(setup, *invoke)[0] == 200
    sent = setup["mms"].requests[before:]
    assert len(sent) == 1 and sent[0]["path"] == "/models/m1/invoke"
