# ruff: noqa: F811 - the fixtures imported from test_serve_front are arguments here
"""Serving faults found by the reliability pass, each reproduced without Java (fast): the HTTP front before a
fake MMS, the router before a fake model server, and the inference functions. The faults that
need real MMS (a killed worker, the soak) are in ``test_soak.py``."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import queue
import re
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the fake MMS and models
import fakes  # noqa: E402
from fakes import FakeModelServer, make_archive  # noqa: E402
from test_serve_front import FakeHandler, FakeMMS, call, good_model, register, setup  # noqa: E402,F401

from dogbreed.launcher.local.router import ModelStore, Router  # noqa: E402
from dogbreed.serve import inference, lifecycle  # noqa: E402


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 600))
            + chunk(b"IEND", b""))


# --- fault 1: decode-size limits before any decode or resize ---------------------------------
@pytest.mark.parametrize("width,height", [(200_000, 1), (1, 200_000), (20_000, 1_000), (3_000, 2), (16_385, 16)])
def test_extreme_sides_and_aspect_ratios_are_413_from_the_header(width: int, height: int) -> None:
    body = png_header(width, height)  # ~700 bytes; 200000x1 made a worker allocate 4 GB for 15 s
    started = time.perf_counter()
    with pytest.raises(inference.RequestError) as refused:
        inference.input_fn(body, "image/png", inference.Settings())
    assert refused.value.status_code == 413 and json.loads(refused.value.to_json())["code"] == 413
    assert time.perf_counter() - started < 0.5


def test_the_short_side_resize_is_bounded_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user ``input_fn`` may skip the header check: ``predict_fn`` bounds the resize itself."""
    monkeypatch.setattr(inference, "settings", lambda: inference.Settings(max_image_pixels=100_000))
    from dogbreed import artifacts, data

    metadata = artifacts.ModelMetadata(arch="resnet18", class_names=["001.A", "002.B"], image_size=224,
                                       resize_size=256, mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 40)).save(buffer, "PNG")  # 80,000 px decoded, 12.8 M px once resized
    with pytest.raises(inference.RequestError) as refused:
        inference.preprocess(buffer.getvalue(), metadata, torch.device("cpu"))
    assert refused.value.status_code == 413 and "resized" in refused.value.message


# --- fault 5: no response carries NaN ---------------------------------------------------------
def test_non_finite_probabilities_are_a_json_error_never_nan() -> None:
    from dogbreed import artifacts, data

    metadata = artifacts.ModelMetadata(arch="resnet18", class_names=["001.A", "002.B", "003.C"], image_size=32,
                                       resize_size=37, mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    served = inference.ServedModel("m", torch.nn.Identity(), metadata, torch.device("cpu"), ("A", "B", "C"))
    for bad in (math.nan, math.inf):
        prediction = inference.Prediction(served, torch.tensor([0.5, bad, 0.1]), 3)
        try:
            body, _ = inference.output_fn(prediction, "application/json")
        except inference.NonFiniteOutputError as exc:
            assert exc.status_code == 500 and "non-finite" in exc.message
        else:
            json.loads(body, parse_constant=lambda c: pytest.fail(f"answered {c} (invalid JSON)"))
            pytest.fail(f"answered {body!r}")


# --- fault 4: MMS management beyond the container contract is refused ------------------------------
def test_worker_scaling_and_caller_chosen_batching_are_refused(setup: dict, good_model: Path) -> None:
    status, body = register(setup, "m1", str(good_model), initial_workers=4)
    assert status == 400 and "model_name and url only" in body["message"]
    for extra in ({"batch_size": 8}, {"max_batch_delay": 5000}, {"handler": "evil"}, {"synchronous": "false"}):
        assert register(setup, "m1", str(good_model), **extra)[0] == 400
    assert call(setup, "POST", f"/models?model_name=q1&url={good_model}&max_batch_delay=5000")[0] == 400
    assert register(setup, "m1", str(good_model))[0] == 200
    for method, path in (("PUT", "/models/m1?min_worker=4"), ("PUT", "/models/m1"), ("POST", "/models/m1"),
                         ("DELETE", "/models"), ("GET", "/api-description"), ("OPTIONS", "/models"),
                         ("POST", "/predictions/m1"), ("PATCH", "/ping")):
        status, headers, raw = call(setup, method, path, b"{}")
        assert 400 <= status < 500 and json.loads(raw)["code"] == status, (method, path, status)
    sent = [(r["method"], r["path"]) for r in setup["mms"].requests]
    assert not any(m == "PUT" or "min_worker" in p or "predictions" in p for m, p in sent)
    assert all("initial_workers" not in json.loads(r["body"] or b"{}") for r in setup["mms"].requests
               if r["path"] == "/models")


# --- fault 8: names, long paths, nested JSON ----------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "-rf", "a/b", "", "x" * 129, ".hidden"])
def test_bad_model_names_are_refused_before_mms(setup: dict, good_model: Path, name: str) -> None:
    status, body = register(setup, name, str(good_model))
    assert status == 400 and body["code"] == 400
    assert not any(r["path"] == "/models" and r["method"] == "POST" for r in setup["mms"].requests)


@pytest.mark.parametrize("name", ["..", "-rf", "."])
def test_bad_model_names_in_paths_are_400(setup: dict, name: str) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/invoke")):
        status, _, raw = call(setup, method, f"/models/{name}{suffix}", b"x")
        assert status in (400, 404) and json.loads(raw)["code"] == status


@pytest.mark.parametrize("length", [4_090, 5_000, 8_000, 9_000, 60_000, 70_000])
def test_a_long_path_is_a_414_json_not_a_dropped_connection(setup: dict, length: int) -> None:
    """MMS (Netty: request lines of 4096 bytes at most) answered ~4,090-8,192 bytes a bare 400."""
    status, headers, raw = call(setup, "GET", "/ping?q=" + "a" * length)
    assert status == 414 and json.loads(raw)["code"] == 414 and headers["content-type"] == "application/json"
    assert call(setup, "GET", "/ping?q=" + "a" * 4_000)[0] == 200  # a request line MMS takes passes


def test_a_60_kb_header_is_431_not_502(setup: dict) -> None:
    """MMS (Netty: 8 KB of headers) hung up on it: the front answered 502."""
    status, _, raw = call(setup, "GET", "/ping", headers={"X-Big": "a" * 60_000})
    assert status == 431 and json.loads(raw)["code"] == 431
    assert call(setup, "GET", "/ping", headers={"X-Fits": "a" * 7_000})[0] == 200


def test_a_5000_character_url_is_a_400_naming_it(setup: dict) -> None:
    """The front's own "file name too long" was reported as MMS hanging up (502)."""
    status, body = register(setup, "m", "x" * 5_000)
    assert status == 400 and "url" in body["message"] and "too long" in body["message"].lower(), body


def test_a_model_json_nested_100k_deep_is_a_400_load_failure(tmp_path: Path) -> None:
    """The worker's load failed with RecursionError: the model's caller got a 500."""
    from dogbreed import artifacts

    (tmp_path / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(artifacts.ArtifactError, match="nested too deeply") as refused:
        artifacts.read_metadata(tmp_path)
    assert inference.load_failure(refused.value)[0] == 400


def raw_exchange(setup: dict, request: bytes) -> bytes:
    """Send ``request`` as is; everything the front answers until it closes (or 5 s pass)."""
    return fakes.raw_exchange("127.0.0.1", setup["port"], request)


def test_two_different_content_lengths_are_400(setup: dict) -> None:
    answer = raw_exchange(setup, b"POST /models/m/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                 b"Content-Length: 4\r\nContent-Length: 40\r\n\r\njpeg")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"conflicting Content-Length" in answer
    assert not answer.endswith(b"<still open>")


def test_transfer_encoding_with_content_length_is_refused_and_the_connection_closed(setup: dict) -> None:
    """RFC 9112 6.1: the trailing bytes ran as a second request on the kept connection."""
    smuggled = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_exchange(setup, b"POST /models/m/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                 b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert not answer.endswith(b"<still open>")


@pytest.mark.parametrize("line", [b"hello", b"GET /ping", b"\x16\x03\x01\x02\x00\x01", b"GET / HTTP/9.9"])
def test_a_garbage_request_line_gets_a_status_line_and_json(setup: dict, line: bytes) -> None:
    answer = raw_exchange(setup, line + b"\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.1 [45]\d\d ", head), answer
    assert json.loads(body)["code"] >= 400


def test_16_bit_and_multi_frame_pngs_are_415_from_the_header() -> None:
    """A 16-bit 4000x4000 PNG was decoded in full (+275 MB) before its 415; an APNG was served
    (training and explain refuse both)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("I;16", (4000, 4000)).save(buffer, "PNG")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, "PNG", save_all=True, append_images=frames[1:])
    for body, reason in ((buffer.getvalue(), "16-bit"), (animated.getvalue(), "multi-frame")):
        with pytest.raises(inference.RequestError) as refused:
            with mock.patch("torchvision.io.decode_image", side_effect=AssertionError("decoded")), \
                    mock.patch("torchvision.io.decode_png", side_effect=AssertionError("decoded")):
                inference.input_fn(body, "image/png", inference.Settings(max_image_pixels=20_000_000))
        assert refused.value.status_code == 415 and reason in refused.value.message


@pytest.mark.parametrize("size", [(4096, 4096), (1025, 1172), (224, 1172)])
def test_model_json_sizes_over_what_training_makes_are_refused(size: tuple[int, int]) -> None:
    """image_size = resize_size = 4096 was allowed and made one invoke peak at 4.0 GB."""
    from dogbreed import artifacts, data

    raw = {"arch": "resnet18", "class_names": ["001.A", "002.B"], "image_size": size[0],
           "resize_size": size[1], "mean": list(data.IMAGENET_MEAN), "std": list(data.IMAGENET_STD)}
    with pytest.raises(artifacts.ArtifactError, match="what training makes"):
        artifacts.ModelMetadata.from_mapping(raw)
    largest = {**raw, "image_size": 1024, "resize_size": data.resize_size_for(1024)}
    assert artifacts.ModelMetadata.from_mapping(largest).resize_size == artifacts.MAX_RESIZE_SIZE


def test_deeply_nested_json_is_400(setup: dict) -> None:
    status, _, raw = call(setup, "POST", "/models", b"[" * 40_000 + b"]" * 40_000,
                          {"Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["code"] == 400
    with pytest.raises(inference.RequestError) as refused:
        inference.input_fn(b'{"image":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json",
                           inference.Settings())
    assert refused.value.status_code == 400


# --- fault 2: an unload never strands a request ---------------------------------------------------
class StuckHandler(FakeHandler):
    """Invokes wait in the 'queue' (MMS 1.1 left them there when the model was unloaded)."""

    def do_POST(self) -> None:
        if self.path.endswith("/invoke") and not self.headers.get("X-Dogbreed-Load-Status"):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.server.queued += 1
            self.server.release.wait(60)
            return self._reply(200, {"predictions": []})
        return self.do_ANY()


def test_unload_answers_every_queued_request_promptly(setup: dict, good_model: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "DRAIN_SECONDS", 1.0)
    mms = setup["mms"]
    mms.RequestHandlerClass = StuckHandler
    mms.queued, mms.release = 0, threading.Event()
    assert register(setup, "m1", str(good_model))[0] == 200

    def invoke(_: int) -> tuple[int, str | None, float]:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", setup["port"], timeout=15)
        try:
            conn.request("POST", "/models/m1/invoke", b"jpeg", {"Content-Type": "image/jpeg"})
            reply = conn.getresponse()
            json.loads(reply.read())
            return reply.status, reply.getheader("Retry-After"), time.monotonic() - started
        except (OSError, http.client.HTTPException) as exc:
            return -1, type(exc).__name__, time.monotonic() - started
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(invoke, i) for i in range(8)]
        deadline = time.monotonic() + 5
        while mms.queued < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        status, _, _ = call(setup, "DELETE", "/models/m1")
        unload_seconds = time.monotonic() - started
        results = [c.result() for c in clients]
    mms.release.set()
    assert status == 200 and unload_seconds < 5
    assert all(s == 503 and retry for s, retry, _ in results), results
    assert max(t for *_, t in results) < 6


def test_a_request_cut_off_by_an_unload_is_answered_after_the_unload_ends(
        setup: dict, good_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI flake of session 2: a stranded thread that sees its connection cut only after the
    unload finished (the model no longer paused) dropped its caller without an answer."""
    monkeypatch.setattr(lifecycle, "DRAIN_SECONDS", 0.2)
    mms = setup["mms"]
    mms.RequestHandlerClass = StuckHandler
    mms.queued, mms.release = 0, threading.Event()
    assert register(setup, "m1", str(good_model))[0] == 200
    unloaded = threading.Event()
    real_getresponse = lifecycle.UnixHTTPConnection.getresponse

    def late_getresponse(self: http.client.HTTPConnection) -> http.client.HTTPResponse:
        try:
            return real_getresponse(self)
        except (OSError, http.client.HTTPException):
            unloaded.wait(10)  # the unload has answered and resumed the model by now
            raise

    monkeypatch.setattr(lifecycle.UnixHTTPConnection, "getresponse", late_getresponse)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stranded = pool.submit(call, setup, "POST", "/models/m1/invoke", b"jpeg", {"Content-Type": "image/jpeg"})
        deadline = time.monotonic() + 5
        while mms.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert call(setup, "DELETE", "/models/m1")[0] == 200
        unloaded.set()
        status, headers, body = stranded.result(timeout=15)
    mms.release.set()
    assert status == 503 and json.loads(body)["code"] == 503, (status, body)


# --- found by the live hostile test in session 3's CI check ------------------------------------
@pytest.mark.parametrize("value", ["\x0c\x1111111O0", "image/\x0bjpeg", "\x7f", "a\x00b"])
def test_control_characters_in_a_header_are_a_400_json_before_mms(setup: dict, value: str) -> None:
    """Real MMS answers these 400 but may close the connection while the body is still being
    sent: the caller saw a dropped connection about once in 20 tries."""
    before = len(setup["mms"].requests)
    conn = http.client.HTTPConnection("127.0.0.1", setup["port"], timeout=10)
    try:
        conn.putrequest("POST", "/models/m1/invoke")
        conn.putheader("Content-Type", value)
        conn.putheader("Content-Length", "4")
        conn.endheaders(b"jpeg")
        reply = conn.getresponse()
        payload = json.loads(reply.read())
    finally:
        conn.close()
    assert reply.status == 400 and payload["code"] == 400 and "control characters" in payload["message"]
    assert len(setup["mms"].requests) == before  # refused before MMS


class HangUpHandler(FakeHandler):
    """MMS closing the connection without an answer (what netty does after some 400s)."""

    def do_POST(self) -> None:
        if self.path.endswith("/invoke") and not self.headers.get("X-Dogbreed-Load-Status"):
            self.close_connection = True
            return
        return self.do_ANY()


def test_mms_hanging_up_is_a_502_json_not_a_dropped_connection(setup: dict, good_model: Path) -> None:
    mms = setup["mms"]
    mms.RequestHandlerClass = HangUpHandler
    assert register(setup, "m1", str(good_model))[0] == 200
    status, _, body = call(setup, "POST", "/models/m1/invoke", b"jpeg", {"Content-Type": "image/jpeg"})
    assert status == 502 and json.loads(body)["type"] == "BadGateway"
    assert call(setup, "GET", "/ping")[0] == 200  # the front serves on


# --- fault 7: a broken model in the local store --------------------------------------------------
def test_a_failed_load_is_shared_by_concurrent_callers_and_remembered(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.add("broken", make_archive(tmp_path / "archives", "broken"))
    with FakeModelServer() as server, Router(store.root, server.url) as router:
        server.fail_load_with = 400
        body = b"jpeg"
        headers = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": "broken/model.tar.gz"}

        def invoke(_: int) -> int:
            conn = http.client.HTTPConnection(*router.url.removeprefix("http://").split(":"), timeout=10)
            conn.request("POST", "/invocations", body, headers)
            status = conn.getresponse().status
            conn.close()
            return status

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(invoke, range(4)))
        assert statuses == [424] * 4 and invoke(0) == 424
        assert server.count("load") == 1
        assert "broken/model.tar.gz" in router.describe()["failed"]


def test_a_corrupted_archive_is_a_400_json_not_a_loaded_model(setup: dict, good_model: Path) -> None:
    """One byte flipped in a model.tar.gz: POST /models served it with changed weights."""
    from dogbreed import artifacts

    archive = artifacts.pack(good_model, setup["store"] / "m" / artifacts.ARCHIVE_NAME)
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    archive.write_bytes(bytes(raw))
    status, body = register(setup, "corrupt", "m/model.tar.gz")
    assert status == 400 and "checksum does not match" in body["message"], body
    assert "corrupt" not in setup["mms"].models


def test_the_socket_is_reachable_only_where_bound(setup: dict) -> None:
    """The front listens where it is told (127.0.0.1 here); MMS only on a unix socket."""
    assert setup["front"].server_address[0] == "127.0.0.1"
    assert setup["front"].mms.unix_path.endswith("mms.sock")


# --- fault 3: a dead worker is noticed and its model reloaded ----------------------------------------
def test_a_reported_worker_death_reloads_the_model(setup: dict, good_model: Path) -> None:
    assert register(setup, "m1", str(good_model))[0] == 200
    models, reports = setup["front"].models, queue.Queue()  # the zygote's stdout, line by line
    watcher = threading.Thread(target=models.watch, args=(iter(reports.get, None),), daemon=True)
    watcher.start()
    try:
        before = len(setup["mms"].requests)
        stale = time.time() - 60  # a worker forked before the registration: an unload's, ignored
        reports.put(json.dumps({"died": "m1", "pid": 1, "exit": -9, "forked": stale}) + "\n")
        reports.put("not json: something the zygote's imports printed\n")
        time.sleep(0.3)
        assert len(setup["mms"].requests) == before and models.recoveries == 0
        reports.put(json.dumps({"died": "m1", "pid": 2, "exit": -9, "forked": time.time()}) + "\n")
        deadline = time.monotonic() + 5
        while models.recoveries == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert models.recoveries == 1
        sent = [(r["method"], r["path"]) for r in setup["mms"].requests[before:]]
        assert sent[:2] == [("DELETE", "/models/m1"), ("POST", "/models")]
        assert "m1" in setup["mms"].models and not models.paused
        # another model's, or one never registered: ignored
        reports.put(json.dumps({"died": "other", "pid": 3, "exit": -9, "forked": time.time()}) + "\n")
        time.sleep(0.3)
        assert models.recoveries == 1
    finally:
        reports.put(None)
        watcher.join(5)


def test_a_worker_the_kernel_killed_for_memory_is_unloaded_not_reloaded(setup: dict, good_model: Path) -> None:
    """Reloading it looped RECOVERING / 503 (the next load or invoke was killed again); SageMaker's
    multi-model contract wants a 507 so it can unload models ("mms-container-apis")."""
    assert register(setup, "m1", str(good_model))[0] == 200
    assert register(setup, "m2", str(good_model))[0] == 200
    models = setup["front"].models
    before = len(setup["mms"].requests)
    models.watch([json.dumps({"died": "m1", "pid": 2, "exit": -9, "forked": time.time(), "oom": True}) + "\n"])
    sent = [(r["method"], r["path"]) for r in setup["mms"].requests[before:]]
    assert sent == [("DELETE", "/models/m1")] and models.recoveries == 0  # unloaded, never loaded again
    assert "m1" not in models.registered and "m1" not in setup["mms"].models
    assert call(setup, "POST", "/models/m2/invoke", b"jpeg", {"Content-Type": "image/jpeg"})[0] == 200


def test_an_invoke_that_ran_out_of_memory_is_507_and_unloads_its_model(setup: dict, good_model: Path) -> None:
    """The handler's 507 (an allocation failed under the worker's limit) also frees that memory."""
    mms = setup["mms"]
    mms.RequestHandlerClass = OutOfMemoryHandler
    assert register(setup, "m1", str(good_model))[0] == 200
    status, _, raw = call(setup, "POST", "/models/m1/invoke", b"jpeg", {"Content-Type": "image/jpeg"})
    assert status == 507 and json.loads(raw)["code"] == 507
    deadline, models = time.monotonic() + 10, setup["front"].models
    while ("m1" in mms.models or "m1" in models.registered) and time.monotonic() < deadline:
        time.sleep(0.02)  # the unload runs after the caller has its answer
    assert "m1" not in mms.models and "m1" not in models.registered


class OutOfMemoryHandler(FakeHandler):
    def do_POST(self) -> None:
        if self.path.endswith("/invoke") and not self.headers.get("X-Dogbreed-Load-Status"):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return self._reply(507, {"code": 507, "type": "InsufficientStorage", "message": "out of memory"})
        return self.do_ANY()


def test_a_request_held_by_a_dying_worker_is_503_not_mms_500(setup: dict, good_model: Path) -> None:
    """MMS answers the requests a dying worker held 500 "Worker died."."""
    mms = setup["mms"]
    mms.RequestHandlerClass = WorkerDiedHandler
    assert register(setup, "m1", str(good_model))[0] == 200
    models = setup["front"].models
    threading.Timer(0.2, models.watch, args=([json.dumps(
        {"died": "m1", "pid": 2, "exit": -9, "forked": time.time() + 1}) + "\n"],)).start()
    status, headers, raw = call(setup, "POST", "/models/m1/invoke", b"jpeg", {"Content-Type": "image/jpeg"})
    assert status == 503 and headers["retry-after"] and json.loads(raw)["code"] == 503


class WorkerDiedHandler(FakeHandler):
    def do_POST(self) -> None:
        if self.path.endswith("/invoke") and not self.headers.get("X-Dogbreed-Load-Status"):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return self._reply(500, {"code": 500, "type": "InternalServerException", "message": "Worker died."})
        return self.do_ANY()


class StuckRegistrationHandler(FakeHandler):
    """MMS when a new worker dies before it connects: the registration hangs until MMS's
    response timeout, and an unregister waits behind it (its model lock)."""

    def do_POST(self) -> None:
        if self.path == "/models" and self.server.stuck.is_set():
            self.server.registering.set()
            self.server.release.wait(30)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return self._reply(500, {"code": 500, "type": "InternalServerException", "message": "Failed to save model"})
        return self.do_ANY()

    def do_DELETE(self) -> None:
        if self.server.stuck.is_set():
            self.server.release.wait(30)
        return self.do_ANY()


def test_a_worker_dying_before_it_connects_gets_a_prompt_503_not_a_hang(setup: dict, good_model: Path) -> None:
    """MMS held such a registration (and every unload of the model) for its whole response
    timeout, 60 s; the caller, and the router's callers behind it, waited as long."""
    mms, models = setup["mms"], setup["front"].models
    mms.RequestHandlerClass = StuckRegistrationHandler
    mms.stuck, mms.registering, mms.release = threading.Event(), threading.Event(), threading.Event()
    mms.stuck.set()
    try:
        answer: list[tuple[int, dict]] = []
        loading = threading.Thread(target=lambda: answer.append(register(setup, "m1", str(good_model))))
        loading.start()
        assert mms.registering.wait(10)
        models.watch([json.dumps({"died": "m1", "pid": 2, "exit": -9, "forked": time.time()}) + "\n"])
        loading.join(10)
        assert answer and answer[0][0] == 503, answer
        status, _, raw = call(setup, "POST", "/models", json.dumps({"model_name": "m1", "url": str(good_model)}).encode(),
                              {"Content-Type": "application/json"})
        assert status == 503 and "recovering" in json.loads(raw)["message"]  # at once, not behind MMS
    finally:
        mms.stuck.clear()
        mms.release.set()
    deadline = time.monotonic() + 10
    while "m1" in models.paused and time.monotonic() < deadline:
        time.sleep(0.02)  # the clean-up ends when MMS lets go
    assert register(setup, "m1", str(good_model))[0] == 200


def test_a_paused_model_answers_503_with_retry_after(setup: dict, good_model: Path) -> None:
    assert register(setup, "m1", str(good_model))[0] == 200
    setup["front"].models.paused["m1"] = "RECOVERING"
    status, headers, raw = call(setup, "POST", "/models/m1/invoke", b"x", {"Content-Type": "image/jpeg"})
    assert status == 503 and headers["retry-after"] and "recovering" in json.loads(raw)["message"]
    status, _, raw = call(setup, "GET", "/models/m1")
    assert status == 200 and "RECOVERING" in raw.decode()


# --- found by test_live_hostile.py: a corrupt PNG ended the worker process -------------------------
@pytest.mark.parametrize("mode, size, corrupt", [
    # libpng exited the worker on a wrong zlib header in IDAT ("incorrect header check").
    ("RGB", 16, "png[png.find(b'IDAT') + 4] ^= 0x55"),
    # A bad IDAT CRC (Hypothesis, session 3's CI check): PIL's load passed it, libpng said
    # "IDAT: CRC error" and the worker segfaulted.
    ("1", 1, "png[51] ^= 1"),
], ids=["zlib-header", "idat-crc"])
def test_a_corrupt_png_that_kills_libpng_is_refused_not_fatal(mode: str, size: int, corrupt: str) -> None:
    """torchvision.io.decode_png (libpng) ends the process on these files; a subprocess shows it."""
    import subprocess

    script = ("import io, sys\nfrom PIL import Image\nfrom dogbreed import data\n"
              f"b = io.BytesIO(); Image.new({mode!r}, ({size}, {size})).save(b, 'PNG'); png = bytearray(b.getvalue())\n"
              f"{corrupt}\n"
              "try:\n    data.decode_image(bytes(png), 37)\nexcept ValueError as exc:\n    print('refused', exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("refused corrupt PNG"), (proc.returncode, proc.stderr)
