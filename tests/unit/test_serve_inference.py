"""The inference path without MMS: input parsing, image checks, URL policy, top-k, output, errors."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.io
from PIL import Image
from test_artifacts import tiny_model_dir

from dogbreed import artifacts, data
from dogbreed.serve import inference
from dogbreed.serve.inference import RequestError, UrlPolicy


def jpeg(width: int = 120, height: int = 90, fmt: str = "JPEG") -> bytes:
    """A noisy image (so a JPEG of it is mostly entropy-coded data, not header)."""
    generator = torch.Generator().manual_seed(width * height)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def status_of(excinfo: pytest.ExceptionInfo) -> int:
    return excinfo.value.status_code


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> inference.ServedModel:
    torch.set_num_threads(1)
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("served") / "model", classes=4)
    return inference.model_fn(model_dir, SimpleNamespace(model_name="tiny"))


# --- input_fn -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image", "IMAGE/JPEG; q=1", "image/jpg"])
def test_image_bodies(content_type: str) -> None:
    body = jpeg()
    assert inference.input_fn(body, content_type) == inference.InferenceRequest(body)


def test_png_body() -> None:
    body = jpeg(fmt="PNG")
    assert inference.input_fn(bytearray(body), "image/png").image == body


def test_json_body_with_base64_and_top_k() -> None:
    body = jpeg()
    for image in (base64.b64encode(body).decode(), "data:image/jpeg;base64," + base64.b64encode(body).decode()):
        request = inference.input_fn(json.dumps({"image": image, "top_k": 2}).encode(), "application/json")
        assert request == inference.InferenceRequest(body, 2)


@pytest.mark.parametrize("body,content_type,status", [
    (b"", "image/jpeg", 400),
    (b"abc", None, 415),
    (b"abc", "", 415),
    (b"hello", "text/plain", 415),
    (b"a=b", "application/x-www-form-urlencoded", 415),
    (b"\0" * 100, "image/jpeg", 400),
    (b"", "application/json", 400),
    (b"{nope", "application/json", 400),
    (b"[1]", "application/json", 400),
    (b'{"top_k": 3}', "application/json", 400),
    (b'{"image": 3}', "application/json", 400),
    (b'{"image": "***"}', "application/json", 400),
    (b'{"image": ""}', "application/json", 400),
    (b'{"url": "https://example.com/x.jpg"}', "application/json", 403),
])
def test_bad_input(body: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(RequestError) as excinfo:
        inference.input_fn(body, content_type, inference.Settings())
    assert status_of(excinfo) == status
    error = json.loads(excinfo.value.to_json())
    assert error["code"] == status and error["message"] and error["type"]


# --- check_image ----------------------------------------------------------------------------------
def test_check_image_reads_the_header_only() -> None:
    assert inference.check_image(jpeg(50, 40)) == ("JPEG", (50, 40))
    with pytest.raises(RequestError) as excinfo:
        inference.check_image(png_claiming(30000, 30000))
    assert status_of(excinfo) == 413
    with pytest.raises(RequestError) as excinfo:
        inference.check_image(png_claiming(3000, 3000), max_pixels=1_000_000)
    assert status_of(excinfo) == 413 and "3000x3000" in excinfo.value.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP"])
def test_only_jpeg_and_png(fmt: str) -> None:
    with pytest.raises(RequestError) as excinfo:
        inference.check_image(jpeg(fmt=fmt))
    assert status_of(excinfo) == 415


def test_truncated_jpeg_fails_at_decode_as_400(served: inference.ServedModel) -> None:
    body = jpeg(200, 150)
    request = inference.input_fn(body[: len(body) // 2], "image/jpeg")  # the header is intact
    with pytest.raises(RequestError) as excinfo:
        inference.predict_fn(request, served)
    assert status_of(excinfo) == 400 and "cannot decode" in excinfo.value.message


def test_16_bit_png_is_refused(served: inference.ServedModel) -> None:
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray((np.arange(60 * 80).reshape(60, 80) * 13).astype(np.uint16)).save(buffer, format="PNG")
    with pytest.raises(RequestError) as excinfo:  # from the PNG header now, before any decode
        inference.predict_fn(inference.input_fn(buffer.getvalue(), "image/png"), served)
    assert status_of(excinfo) == 415


def test_animated_gif_sent_as_jpeg_is_refused(served: inference.ServedModel) -> None:
    """decode_image would give [frames, 3, S, S] for it (training skips such files): serving must
    refuse it from the header, whatever the Content-Type says."""
    frames = [Image.new("RGB", (80, 60), color) for color in ((200, 30, 60), (30, 200, 60))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(RequestError) as excinfo:  # input_fn reads the header already
        inference.predict_fn(inference.input_fn(buffer.getvalue(), "image/jpeg"), served)
    assert status_of(excinfo) == 415 and "GIF" in excinfo.value.message


# --- top-k ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("3", 3), (3, 3), (b"7", 7), (" 2 ", 2)])
def test_parse_top_k(value, expected: int) -> None:
    assert inference.parse_top_k(value) == expected


@pytest.mark.parametrize("value", ["0", -1, "abc", True, None, 2.5, ""])
def test_parse_top_k_refuses(value) -> None:
    with pytest.raises(RequestError):
        inference.parse_top_k(value)


def test_custom_attributes() -> None:
    assert inference.custom_attributes("top_k=3; trace=abc,Other = x") == {"top_k": "3", "trace": "abc", "other": "x"}
    assert inference.custom_attributes(None) == {}
    assert inference.custom_attributes("flag;=3") == {}


# --- URL input --------------------------------------------------------------------------------------------
def test_url_policy_from_env_and_matching() -> None:
    policy = UrlPolicy.from_env({"DOGBREED_ALLOW_URL_HOSTS": " Images.Example.com, *.cdn.net,.dogs.org ",
                                 "DOGBREED_URL_MAX_BYTES": "1000", "DOGBREED_URL_TIMEOUT": "2.5"})
    assert policy.max_bytes == 1000 and policy.timeout == 2.5
    assert policy.allows("images.example.com") and policy.allows("IMAGES.EXAMPLE.COM.")
    assert policy.allows("a.cdn.net") and policy.allows("x.y.dogs.org")
    assert not policy.allows("example.com") and not policy.allows("evilimages.example.com")
    assert not policy.allows("cdn.net") and not policy.allows("evilcdn.net")
    assert not UrlPolicy.from_env({}).hosts


class FakeResponse:
    def __init__(self, status: int = 200, body: bytes = b"", headers: dict | None = None, delay=None) -> None:
        self.status, self._body, self._headers, self._delay = status, io.BytesIO(body), headers or {}, delay

    def getheader(self, name: str):
        return self._headers.get(name)

    def read(self, size: int) -> bytes:
        if self._delay:
            self._delay()
        return self._body.read(size)


class FakeConnection:
    def __init__(self, response: FakeResponse | Exception) -> None:
        self.response, self.calls, self.closed = response, [], False

    def __call__(self, host: str, port: int, timeout: float):
        self.calls.append((host, port, timeout))
        return self

    def request(self, method: str, target: str, headers: dict) -> None:
        self.calls.append((method, target))
        if isinstance(self.response, Exception):
            raise self.response

    def getresponse(self) -> FakeResponse:
        return self.response

    def close(self) -> None:
        self.closed = True


POLICY = UrlPolicy(hosts=frozenset({"images.example.com"}), max_bytes=10_000, timeout=1.0)


def test_fetch_image_success() -> None:
    body = jpeg()
    fake = FakeConnection(FakeResponse(200, body, {"Content-Length": str(len(body))}))
    assert inference.fetch_image("https://images.example.com:8443/a/dog.jpg?size=l", POLICY, fake) == body
    assert fake.calls[:2] == [("images.example.com", 8443, 1.0), ("GET", "/a/dog.jpg?size=l")]
    assert fake.closed


@pytest.mark.parametrize("url,status", [
    ("http://images.example.com/dog.jpg", 400),
    ("ftp://images.example.com/dog.jpg", 400),
    ("https://user:pw@images.example.com/dog.jpg", 400),
    ("https://other.example.com/dog.jpg", 403),
    ("https://images.example.com.evil.net/dog.jpg", 403),
    ("https://images.example.com:99999/dog.jpg", 400),
    ("", 400),
    (42, 400),
])
def test_fetch_image_refuses_urls(url, status: int) -> None:
    fake = FakeConnection(FakeResponse(200, b"x"))
    with pytest.raises(RequestError) as excinfo:
        inference.fetch_image(url, POLICY, fake)
    assert status_of(excinfo) == status
    assert fake.calls == []  # refused before connecting


def test_fetch_image_disabled_without_hosts() -> None:
    with pytest.raises(RequestError) as excinfo:
        inference.fetch_image("https://images.example.com/x.jpg", UrlPolicy(), FakeConnection(FakeResponse()))
    assert status_of(excinfo) == 403 and "disabled" in excinfo.value.message


@pytest.mark.parametrize("response,status", [
    (FakeResponse(302, b"", {"Location": "https://elsewhere/"}), 400),
    (FakeResponse(404), 400),
    (FakeResponse(200, b"x", {"Content-Length": "20000"}), 413),
    (FakeResponse(200, b"x" * 20_000), 413),  # no Content-Length: counted while reading
    (TimeoutError("timed out"), 400),
    (socket.gaierror("no such host"), 400),
    (ConnectionRefusedError(), 400),
])
def test_fetch_image_failures(response, status: int) -> None:
    with pytest.raises(RequestError) as excinfo:
        inference.fetch_image("https://images.example.com/dog.jpg", POLICY, FakeConnection(response))
    assert status_of(excinfo) == status


def test_fetch_image_total_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 100, 1))
    monkeypatch.setattr(inference.time, "monotonic", lambda: float(next(clock)))
    class Trickle(FakeResponse):
        def read(self, size: int) -> bytes:
            return self._body.read(1000)  # several small chunks, a second apart

    slow = Trickle(200, b"x" * 5000)
    with pytest.raises(RequestError, match="took more than"):
        inference.fetch_image("https://images.example.com/dog.jpg", POLICY, FakeConnection(slow))


def test_url_input_end_to_end_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    body = jpeg()
    settings = inference.Settings(url_policy=POLICY)
    monkeypatch.setattr(inference, "fetch_image", lambda url, policy: body if policy is POLICY else None)
    request = inference.input_fn(json.dumps({"url": "https://images.example.com/d.jpg"}).encode(),
                                 "application/json", settings)
    assert request.image == body


# --- model, predict, output -------------------------------------------------------------------------
def test_serving_preprocessing_is_the_evaluation_pipeline(served: inference.ServedModel) -> None:
    body = jpeg(500, 375)
    meta = served.metadata
    expected = data.eval_transform(data.decode_image(body, meta.resize_size), meta.image_size, meta.mean, meta.std)
    assert torch.equal(inference.preprocess(body, meta, torch.device("cpu")), expected)


def test_predict_and_output(served: inference.ServedModel) -> None:
    prediction = inference.predict_fn(inference.InferenceRequest(jpeg(), top_k=3), served)
    body, content_type = inference.output_fn(prediction, "application/json")
    answer = json.loads(body)
    assert content_type == "application/json"
    assert answer["model"] == "tiny" and answer["arch"] == "mobilenet_v2"
    assert [p["class_name"] for p in answer["predictions"]] == [
        served.metadata.class_names[p["index"]] for p in answer["predictions"]]
    assert [p["label"] for p in answer["predictions"]] == [
        artifacts.breed_name(p["class_name"]) for p in answer["predictions"]]
    assert len(answer["predictions"]) == 3
    probabilities = [p["probability"] for p in answer["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    everything = inference.predict_fn(inference.InferenceRequest(jpeg(), top_k=50), served)
    assert len(json.loads(inference.output_fn(everything)[0])["predictions"]) == 4  # clamped
    assert abs(sum(p["probability"] for p in json.loads(inference.output_fn(everything)[0])["predictions"]) - 1) < 1e-4


@pytest.mark.parametrize("accept,ok", [(None, True), ("*/*", True), ("application/json", True),
                                       ("text/html, application/json;q=0.9", True), ("text/csv", False)])
def test_accept(served: inference.ServedModel, accept: str | None, ok: bool) -> None:
    prediction = inference.predict_fn(inference.InferenceRequest(jpeg()), served)
    if ok:
        assert len(json.loads(inference.output_fn(prediction, accept)[0])["predictions"]) == 4
    else:
        with pytest.raises(RequestError) as excinfo:
            inference.output_fn(prediction, accept)
        assert status_of(excinfo) == 406


def test_model_fn_refuses_bad_artifacts(tmp_path: Path) -> None:
    with pytest.raises(artifacts.ArtifactError):
        inference.model_fn(tmp_path)


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert inference.configure_threads({}) == 1 and torch.get_num_threads() == 1
        assert inference.configure_threads({"DOGBREED_TORCH_THREADS": "2"}) == 2
    finally:
        torch.set_num_threads(before)


def test_load_failure_statuses() -> None:
    assert inference.load_failure(artifacts.ArtifactError("bad"))[:2] == (400, "ArtifactError")
    assert inference.load_failure(MemoryError())[0] == 507
    assert inference.load_failure(RuntimeError("x"))[0] == 500
    assert inference.load_failure(SyntaxError("x"))[:2] == (400, "UserCodeError")


# --- train pixels = serve pixels, EXIF orientation included --------------------------------------------
def exif_jpeg(orientation: int) -> bytes:
    """An asymmetric 48x32 picture whose EXIF header says ``orientation``."""
    image = Image.new("RGB", (48, 32), (20, 20, 20))
    image.paste((250, 30, 30), (0, 0, 24, 16))  # a red top-left corner
    image.paste((30, 250, 30), (36, 0, 48, 32))  # a green right edge
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_training_cache_matches_serving_for_exif_rotated_jpegs(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "dog.jpg"
    path.write_bytes(exif_jpeg(orientation))
    served = data.decode_image(path.read_bytes(), 40)  # what preprocess() decodes for a request
    # the batched decoder (nvJPEG on CUDA; its EXIF step is the same on the CPU)
    [batched] = data.decode_jpeg_batches([path], 40, torch.device("cpu"))
    assert torch.equal(batched, served)
    raw = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)))  # what nvJPEG hands back: no EXIF
    turned = data.apply_exif_orientation(raw, data.exif_orientation(torchvision.io.read_file(str(path))))
    assert torch.equal(turned, torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                                            apply_exif_orientation=True))
    if orientation in (5, 6, 7, 8):
        assert turned.shape[-2:] == (48, 32)  # portrait once turned


# --- explain=gradcam ------------------------------------------------------------------------------
def test_explain_option() -> None:
    assert inference.explain_option(None) is None
    assert inference.explain_option(" GradCAM ") == "gradcam"
    with pytest.raises(RequestError) as excinfo:
        inference.explain_option("shap")
    assert status_of(excinfo) == 400 and "explain=gradcam" in excinfo.value.message


def test_plain_requests_import_nothing_of_the_explain_path(tmp_path: Path) -> None:
    """A fresh process serves a plain request without Captum, matplotlib or dogbreed.explain."""
    import subprocess
    import sys

    model_dir = tiny_model_dir(tmp_path / "model", classes=4)
    script = f"""
import json, sys
from dogbreed.serve import inference
served = inference.model_fn({str(model_dir)!r})
request = inference.input_fn({jpeg()!r}, "image/jpeg")
plain = json.loads(inference.output_fn(inference.predict_fn(request, served))[0])
assert len(plain["predictions"]) == 4, plain
print(sorted(m for m in ("captum", "matplotlib", "dogbreed.explain") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_explain_answers_the_top_class_heat_map_as_png(served: inference.ServedModel) -> None:
    request = inference.input_fn(jpeg(), "image/jpeg")
    plain = json.loads(inference.output_fn(inference.predict_fn(request, served))[0])
    assert "explanations" not in plain
    explained = json.loads(inference.output_fn(inference.predict_fn(
        inference.InferenceRequest(request.image, top_k=2, explain="gradcam"), served))[0])
    assert explained["predictions"] == plain["predictions"][:2]
    heat = explained["explanations"][0]
    assert heat["method"] == "gradcam" and heat["index"] == plain["predictions"][0]["index"]
    assert heat["class_name"] == plain["predictions"][0]["class_name"]
    size = served.metadata.image_size
    with Image.open(io.BytesIO(base64.b64decode(heat["png_base64"]))) as image:
        assert (image.format, image.size) == ("PNG", (size, size))
