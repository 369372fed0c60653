"""The local multi-model endpoint router, against a fake MMS (no Java): routing, LRU, errors."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import socket
from pathlib import Path

import boto3
import fakes
import pytest
from botocore.config import Config
from fakes import FakeModelServer, make_archive

from dogbreed.launcher.local import router as router_mod
from dogbreed.launcher.local.router import ModelStore, Router, RouterError, mms_model_name

ENDPOINT = "dogbreed-local"


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    for name in ("resnet", "mobilenet", "third"):
        store.add(name, make_archive(tmp_path / "archives", name))
    return store


@pytest.fixture
def fake_server():
    with FakeModelServer() as server:
        yield server


@pytest.fixture
def endpoint(store: ModelStore, fake_server: FakeModelServer, tmp_path: Path):
    with Router(store.root, fake_server.url, endpoint_name=ENDPOINT,
                max_loaded=2) as router:
        yield router


def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, payload
    connection.close()
    return result


def invoke(url: str, target: str | None, body: bytes = b"jpeg bytes",
           path: str = f"/endpoints/{ENDPOINT}/invocations") -> tuple[int, dict, dict]:
    headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
    if target is not None:
        headers[router_mod.TARGET_HEADER] = target
    return post(url, path, body, headers)


def runtime_client(url: str):
    return boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=url,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}))


def test_two_targets_route_to_their_own_model(endpoint: Router, fake_server: FakeModelServer) -> None:
    status, headers, body = invoke(endpoint.url, "resnet/model.tar.gz")
    assert status == 200 and body["artifact"] == "resnet"
    assert headers["x-amzn-invoked-production-variant"] == "AllTraffic"
    status, _, body = invoke(endpoint.url, "mobilenet/model.tar.gz", path="/invocations")
    assert status == 200 and body["artifact"] == "mobilenet"
    # A second call to a loaded target does not load it again.
    invoke(endpoint.url, "resnet/model.tar.gz")
    assert fake_server.count("load") == 2
    assert endpoint.cache.loaded() == ["mobilenet/model.tar.gz", "resnet/model.tar.gz"]


def test_lru_unloads_least_recently_used_past_max_loaded(endpoint: Router,
                                                         fake_server: FakeModelServer) -> None:
    for target in ("resnet", "mobilenet", "resnet", "third"):  # resnet was used after mobilenet
        assert invoke(endpoint.url, f"{target}/model.tar.gz")[0] == 200
    assert endpoint.cache.loaded() == ["resnet/model.tar.gz", "third/model.tar.gz"]
    assert ("unload", mms_model_name("mobilenet/model.tar.gz")) in fake_server.calls
    assert set(fake_server.loaded) == {mms_model_name("resnet/model.tar.gz"),
                                       mms_model_name("third/model.tar.gz")}
    # It loads again on its next use.
    assert invoke(endpoint.url, "mobilenet/model.tar.gz")[2]["artifact"] == "mobilenet"
    assert fake_server.count("load") == 4 and fake_server.count("unload") == 2


def test_unknown_target_is_404_validation_error(endpoint: Router) -> None:
    status, headers, body = invoke(endpoint.url, "nope/model.tar.gz")
    assert status == 404
    assert headers["x-amzn-errortype"] == "ValidationError"
    assert "nope/model.tar.gz" in body["Message"]


@pytest.mark.parametrize("target", ["../store/resnet/model.tar.gz", "/etc/passwd", "a//b", "resnet"])
def test_targets_outside_the_store_are_refused(endpoint: Router, target: str) -> None:
    status, headers, _ = invoke(endpoint.url, target)
    assert status in (400, 404) and headers["x-amzn-errortype"] == "ValidationError"


def test_bad_body_is_a_4xx_model_error(endpoint: Router) -> None:
    status, headers, body = invoke(endpoint.url, "resnet/model.tar.gz", body=b"bad")
    assert status == 424 and headers["x-amzn-errortype"] == "ModelError"
    assert body["OriginalStatusCode"] == 400 and body["OriginalMessage"] == "not an image"


@pytest.mark.parametrize(("target", "body", "path", "status"), [
    (None, b"x", f"/endpoints/{ENDPOINT}/invocations", 400),         # no TargetModel
    ("resnet/model.tar.gz", b"", f"/endpoints/{ENDPOINT}/invocations", 400),  # empty body
    ("resnet/model.tar.gz", b"x", "/endpoints/other/invocations", 400),       # wrong endpoint
    ("resnet/model.tar.gz", b"x", "/nowhere", 404),
])
def test_refused_requests(endpoint: Router, target, body, path, status) -> None:
    got, headers, payload = invoke(endpoint.url, target, body, path)
    assert got == status and payload["Message"] and headers["content-type"] == "application/json"


def test_oversized_body_is_413(endpoint: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_mod, "MAX_BODY_BYTES", 10)
    assert invoke(endpoint.url, "resnet/model.tar.gz", body=b"x" * 11)[0] == 413


def test_failed_load_is_a_model_error_remembered_until_the_archive_changes(
        endpoint: Router, fake_server: FakeModelServer, store: ModelStore) -> None:
    """(A refused load used to be retried on every request.)"""
    fake_server.fail_load_with = 400
    status, _, body = invoke(endpoint.url, "resnet/model.tar.gz")
    assert status == 424 and body["OriginalStatusCode"] == 400
    assert endpoint.cache.loaded() == []
    fake_server.fail_load_with = None
    status, _, again = invoke(endpoint.url, "resnet/model.tar.gz")
    assert (status, again["OriginalMessage"]) == (424, body["OriginalMessage"])
    assert fake_server.count("load") == 1  # remembered, not loaded again
    assert "resnet/model.tar.gz" in endpoint.describe()["failed"]
    archive = store.root / "resnet" / "model.tar.gz"
    archive.write_bytes(archive.read_bytes() + b"\0" * 1024)  # a new upload (tar ignores the padding)
    assert invoke(endpoint.url, "resnet/model.tar.gz")[0] == 200


def test_a_server_side_load_failure_is_not_remembered(
        endpoint: Router, fake_server: FakeModelServer) -> None:
    """MMS's 500 "Failed to start workers" (a worker died during a reload) said nothing about
    the archive: the next invoke loads it again instead of a 424 until the endpoint restarts."""
    fake_server.fail_load_with = 500
    status, _, body = invoke(endpoint.url, "resnet/model.tar.gz")
    assert status == 424 and body["OriginalStatusCode"] == 500
    assert "resnet/model.tar.gz" not in endpoint.describe()["failed"]
    fake_server.fail_load_with = None
    assert invoke(endpoint.url, "resnet/model.tar.gz")[0] == 200
    assert fake_server.count("load") == 2


def test_model_lost_by_the_server_is_loaded_again(endpoint: Router,
                                                  fake_server: FakeModelServer) -> None:
    assert invoke(endpoint.url, "resnet/model.tar.gz")[0] == 200
    fake_server.loaded.clear()  # e.g. the model server restarted
    assert invoke(endpoint.url, "resnet/model.tar.gz")[0] == 200
    assert fake_server.count("load") == 2


def test_a_model_the_server_still_holds_after_a_router_restart_is_used(
        store: ModelStore, fake_server: FakeModelServer, tmp_path: Path) -> None:
    """The server answers 409 (already registered) to the new router's load: that is a load."""
    for _ in range(2):
        with Router(store.root, fake_server.url, endpoint_name=ENDPOINT,
                    max_loaded=2) as router:
            status, _, body = invoke(router.url, "resnet/model.tar.gz")
            assert status == 200 and body["artifact"] == "resnet", body
    assert fake_server.count("load") == 2 and len(fake_server.loaded) == 1


def test_corrupt_archive_in_store_is_refused(endpoint: Router, store: ModelStore) -> None:
    bad = store.root / "broken" / "model.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tar")
    status, headers, _ = invoke(endpoint.url, "broken/model.tar.gz")
    assert status == 424 and headers["x-amzn-errortype"] == "ModelError"


def test_concurrent_first_use_loads_once_and_respects_max(endpoint: Router,
                                                          fake_server: FakeModelServer) -> None:
    targets = ["resnet", "mobilenet", "third"] * 8
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda t: invoke(endpoint.url, f"{t}/model.tar.gz"), targets))
    assert all(status == 200 and body["artifact"] == t
               for t, (status, _, body) in zip(targets, results, strict=True))
    assert len(endpoint.cache.loaded()) <= 2
    assert fake_server.count("load") - fake_server.count("unload") == len(fake_server.loaded) <= 2


def test_boto3_sagemaker_runtime_client_works_unchanged(endpoint: Router) -> None:
    client = runtime_client(endpoint.url)
    response = client.invoke_endpoint(EndpointName=ENDPOINT, TargetModel="resnet/model.tar.gz",
                                      ContentType="image/jpeg", Accept="application/json",
                                      CustomAttributes="top_k=3", Body=b"jpeg bytes")
    payload = json.loads(response["Body"].read())
    assert payload["artifact"] == "resnet" and payload["custom"] == "top_k=3"
    assert payload["content_type"] == "image/jpeg"
    assert response["InvokedProductionVariant"] == "AllTraffic"

    with pytest.raises(client.exceptions.ValidationError) as missing:
        client.invoke_endpoint(EndpointName=ENDPOINT, TargetModel="nope/model.tar.gz",
                               ContentType="image/jpeg", Body=b"jpeg bytes")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    with pytest.raises(client.exceptions.ModelError) as bad:
        client.invoke_endpoint(EndpointName=ENDPOINT, TargetModel="resnet/model.tar.gz",
                               ContentType="image/jpeg", Body=b"bad")
    assert bad.value.response["OriginalStatusCode"] == 400
    assert bad.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424


def test_ping_and_models(endpoint: Router) -> None:
    host, port = endpoint.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    connection.request("GET", "/ping")
    assert connection.getresponse().status == 200
    connection.close()
    assert endpoint.describe()["models"] == ["mobilenet/model.tar.gz", "resnet/model.tar.gz",
                                             "third/model.tar.gz"]


def test_store_refuses_bad_names(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ValueError):
        store.add("../x", tmp_path / "whatever")
    with pytest.raises(RouterError):
        store.resolve("x/../../etc/passwd")


def test_unreachable_model_server_is_503(store: ModelStore, tmp_path: Path) -> None:
    with Router(store.root, "http://127.0.0.1:9", timeout=2) as router:
        status, headers, _ = invoke(router.url, "resnet/model.tar.gz",
                                    path="/invocations")
    assert status == 503 and headers["x-amzn-errortype"] == "ServiceUnavailable"


def test_a_loaded_model_whose_archive_is_replaced_keeps_serving_and_is_warned_about(
        endpoint: Router, fake_server: FakeModelServer, store: ModelStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """`add-model` over a loaded model: SageMaker keeps serving what it loaded (its MME guide:
    "Use a new and unique name. Don't overwrite model artifacts"); so does the router, but it
    says so, once per change."""
    caplog.set_level("WARNING", logger="dogbreed.launcher")
    assert invoke(endpoint.url, "resnet/model.tar.gz")[2]["artifact"] == "resnet"
    assert "model_archive_changed" not in caplog.text
    store.add("resnet", make_archive(tmp_path / "v2", "resnet-v2"))
    for _ in range(2):
        status, _, body = invoke(endpoint.url, "resnet/model.tar.gz")
        assert status == 200 and body["artifact"] == "resnet"  # the loaded copy
    warnings = [r.getMessage() for r in caplog.records if "model_archive_changed" in r.getMessage()]
    assert len(warnings) == 1 and "target=resnet/model.tar.gz" in warnings[0], warnings
    assert fake_server.count("load") == 1
    store.add("resnet", make_archive(tmp_path / "v3", "resnet-v3-longer-name"))  # changed again
    invoke(endpoint.url, "resnet/model.tar.gz")
    assert caplog.text.count("event=model_archive_changed") == 2


def test_router_port_errors_are_one_line(store: ModelStore, tmp_path: Path) -> None:
    """A taken or invalid port: a ListenError naming the address, not an OSError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        router = Router(store.root, "http://127.0.0.1:9", port=port)
        with pytest.raises(router_mod.ListenError) as busy:
            router.start()
        assert str(busy.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    for bad in (70000, -1):
        with pytest.raises(router_mod.ListenError, match=f"^cannot listen on 127.0.0.1:{bad}: "
                                                         "the port must be 0-65535$"):
            router_mod.listen("127.0.0.1", bad)
    # A socket bound beforehand is the one the router serves on.
    sock = router_mod.listen("127.0.0.1", 0)
    with Router(store.root, "http://127.0.0.1:9", sock=sock) as router:
        assert router.url == f"http://127.0.0.1:{sock.getsockname()[1]}"
        host, port = router.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        connection.request("GET", "/ping")
        assert connection.getresponse().status == 200
        connection.close()
    assert sock.fileno() == -1  # closed with the router


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` as is; all the router answers until it closes (or 5 s pass)."""
    host, port = url.removeprefix("http://").split(":")
    return fakes.raw_exchange(host, int(port), request)


def test_ambiguous_body_framing_is_400_and_closes(endpoint: Router) -> None:
    """Two Content-Lengths (the first won) or Transfer-Encoding with Content-Length (the
    connection stayed open, so trailing bytes ran as a second request: RFC 9112 6.1)."""
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Amzn-SageMaker-Target-Model: resnet/model.tar.gz\r\n"
            b"Content-Type: image/jpeg\r\n")
    smuggled = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    for framing in (b"Content-Length: 4\r\nContent-Length: 40\r\n\r\njpeg",
                    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
        answer = raw_exchange(endpoint.url, head + framing + smuggled)
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
        assert b'"ValidationError"' in answer and not answer.endswith(b"<still open>")


def test_a_chunked_body_is_read_as_the_model_server_reads_it(endpoint: Router) -> None:
    """The router and the serving front read bodies one way: chunked ones too (curl -T -)."""
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Amzn-SageMaker-Target-Model: resnet/model.tar.gz\r\n"
            b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    answer = raw_exchange(endpoint.url, head + b"4\r\njpeg\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"artifact": "resnet"' in answer, answer
    answer = raw_exchange(endpoint.url, head + b"2\r\nba\r\n1;ext=1\r\nd\r\n0\r\n\r\n")  # "bad"
    assert answer.startswith(b"HTTP/1.1 424 ") and b'"OriginalStatusCode": 400' in answer, answer


@pytest.mark.parametrize("line", [b"hello", b"GET /ping", b"\x16\x03\x01\x02\x00\x01", b"GET / HTTP/9.9"])
def test_a_garbage_request_line_gets_a_status_line_and_json(endpoint: Router, line: bytes) -> None:
    head, _, body = raw_exchange(endpoint.url, line + b"\r\n\r\n").partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.1 [45]\d\d ", head), head
    assert json.loads(body)["ErrorCode"]
