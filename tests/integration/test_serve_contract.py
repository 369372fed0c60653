"""The SageMaker multi-model container contract, driven over HTTP against real MMS + Java.

Loads a ResNet18 and a MobileNetV2 trained on the sample data the way SageMaker loads models
into a multi-model endpoint (``POST /models {"model_name","url"}``), invokes them
(``POST /models/{name}/invoke``), unloads them, and throws bad input and bad artifacts at the
server until it has had 200 of them, then checks it still answers with the same worker.
Single-model mode (``/invocations``) runs the ``dogbreed-serve`` console script itself.

Point it at a running server with ``DOGBREED_SERVE_URL`` (see ``conftest.py``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from servelib import SERVE_URL_ENV, ServeEndpoint, TrainedModel, server_processes

from dogbreed import artifacts, contract
from dogbreed.contract import free_port
from dogbreed.serve import RUN_DIR_ENV

pytestmark = pytest.mark.slow

external = pytest.mark.skipif(bool(os.environ.get(SERVE_URL_ENV)),
                              reason="needs the server process itself, not DOGBREED_SERVE_URL")


# --- inputs -------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels and holds almost nothing (a bomb's header)."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def gif_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def bad_requests(jpeg: bytes) -> list[tuple[str, bytes, str | None, dict[str, str], int]]:
    """``(id, body, content_type, headers, expected status)`` for input the server must refuse."""
    as_json = "application/json"
    return [
        ("empty-body", b"", "image/jpeg", {}, 400),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", {}, 400),
        ("text-plain", b"a dog, probably", "text/plain", {}, 415),
        ("png-claiming-30000x30000", png_header_only(30000, 30000), "image/png", {}, 413),
        ("json-without-image", json.dumps({"top_k": 3}).encode(), as_json, {}, 400),
        ("url-while-disabled", json.dumps({"url": "https://images.example.com/dog.jpg"}).encode(), as_json, {}, 403),
        ("not-an-image", b"\x00\x01garbage" * 50, "application/x-image", {}, 400),
        ("missing-content-type", jpeg, None, {}, 415),
        ("invalid-json", b"{not json", as_json, {}, 400),
        ("json-not-an-object", b"[1, 2]", as_json, {}, 400),
        ("bad-base64", json.dumps({"image": "not base64!"}).encode(), as_json, {}, 400),
        ("gif", gif_bytes(), "image/png", {}, 415),
        ("form-body", b"image=abc", "application/x-www-form-urlencoded", {}, 415),
        ("top-k-zero", jpeg, "image/jpeg", {"X-Amzn-SageMaker-Custom-Attributes": "top_k=0"}, 400),
        ("unacceptable-accept", jpeg, "image/jpeg", {"Accept": "text/csv"}, 406),
    ]


def assert_json_error(reply, status: int) -> None:
    assert reply.status == status, (reply.status, reply.body[:300])
    error = reply.json()
    assert error["code"] == status and error["message"] and error["type"], error


def assert_prediction(reply, name: str, model: TrainedModel, k: int) -> list[dict]:
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["content-type"].startswith("application/json")
    answer = reply.json()
    assert answer["model"] == name
    assert answer["arch"] == model.arch
    predictions = answer["predictions"]
    assert len(predictions) == k
    for p in predictions:
        assert p["class_name"] in model.class_names
        assert p["label"] == model.labels[model.class_names.index(p["class_name"])]
        assert 0.0 <= p["probability"] <= 1.0
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-4
    return predictions


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(serve_endpoint: ServeEndpoint, serve_models: dict[str, TrainedModel]) -> dict[str, TrainedModel]:
    """Both models loaded under unique names: ResNet18 from its model.tar.gz, MobileNetV2 from
    its unpacked dir (what SageMaker passes)."""
    names = {}
    for arch, source in (("resnet18", serve_models["resnet18"].archive),
                         ("mobilenet_v2", serve_models["mobilenet_v2"].model_dir)):
        name = serve_endpoint.unique(arch)
        reply = serve_endpoint.load(name, source)
        assert reply.status == 200, reply.body[:500]
        names[name] = serve_models[arch]
    return names


def name_of(loaded: dict[str, TrainedModel], arch: str) -> str:
    return next(n for n, m in loaded.items() if m.arch == arch)


# --- the container API -----------------------------------------------------------------------------------
def test_ping(serve_endpoint: ServeEndpoint) -> None:
    assert serve_endpoint.ping().status == 200


def test_models_are_listed_and_described(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel]) -> None:
    listed = {m["modelName"] for m in serve_endpoint.request("GET", "/models").json()["models"]}
    assert set(loaded) <= listed
    for name in loaded:
        reply = serve_endpoint.describe_model(name)
        assert reply.status == 200
        described = reply.json()
        assert described["modelName"] == name
        assert [w["status"] for w in described["workers"]] == ["READY"]


def test_each_model_answers_with_its_own_classes(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel],
                                                 sample_jpeg: bytes) -> None:
    for name, model in loaded.items():
        assert_prediction(serve_endpoint.invoke(name, sample_jpeg), name, model, k=5)


def test_png_and_application_x_image(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel],
                                     sample_jpeg: bytes) -> None:
    from PIL import Image

    name = name_of(loaded, "mobilenet_v2")
    png = io.BytesIO()
    Image.open(io.BytesIO(sample_jpeg)).save(png, format="PNG")
    assert_prediction(serve_endpoint.invoke(name, png.getvalue(), "image/png"), name, loaded[name], k=5)
    assert_prediction(serve_endpoint.invoke(name, sample_jpeg, "application/x-image"), name, loaded[name], k=5)


def test_top_k_from_custom_attributes_json_and_query(serve_endpoint: ServeEndpoint,
                                                      loaded: dict[str, TrainedModel], sample_jpeg: bytes) -> None:
    name = name_of(loaded, "resnet18")
    model = loaded[name]
    header = {"X-Amzn-SageMaker-Custom-Attributes": "top_k=3"}
    first = assert_prediction(serve_endpoint.invoke(name, sample_jpeg, headers=header), name, model, k=3)
    body = json.dumps({"image": base64.b64encode(sample_jpeg).decode(), "top_k": 2}).encode()
    second = assert_prediction(serve_endpoint.invoke(name, body, "application/json"), name, model, k=2)
    assert second == first[:2]  # same pixels, same model, same answer
    assert_prediction(serve_endpoint.invoke(name, sample_jpeg, query="top_k=1"), name, model, k=1)
    assert_prediction(serve_endpoint.invoke(name, sample_jpeg, headers={
        "X-Amzn-SageMaker-Custom-Attributes": "top_k=99"}), name, model, k=len(model.class_names))


def test_loading_a_name_twice_is_a_conflict(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel]) -> None:
    name = name_of(loaded, "mobilenet_v2")
    assert_json_error(serve_endpoint.load(name, loaded[name].model_dir), 409)


def test_unknown_model_is_404(serve_endpoint: ServeEndpoint, sample_jpeg: bytes) -> None:
    name = serve_endpoint.unique("never-loaded")
    assert_json_error(serve_endpoint.invoke(name, sample_jpeg), 404)
    assert_json_error(serve_endpoint.describe_model(name), 404)
    assert_json_error(serve_endpoint.unload_model(name), 404)


def test_unloaded_model_is_404(serve_endpoint: ServeEndpoint, serve_models: dict[str, TrainedModel],
                               sample_jpeg: bytes) -> None:
    name = serve_endpoint.unique("short-lived")
    assert serve_endpoint.load(name, serve_models["mobilenet_v2"].archive).status == 200
    assert serve_endpoint.invoke(name, sample_jpeg).status == 200
    assert serve_endpoint.unload_model(name).status == 200
    assert_json_error(serve_endpoint.invoke(name, sample_jpeg), 404)
    listed = {m["modelName"] for m in serve_endpoint.request("GET", "/models").json()["models"]}
    assert name not in listed


@pytest.mark.parametrize("case", range(len(bad_requests(b"\xff\xd8"))),
                         ids=[c[0] for c in bad_requests(b"\xff\xd8")])
def test_bad_input_is_a_4xx_json_error(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel],
                                       sample_jpeg: bytes, case: int) -> None:
    _, body, content_type, headers, status = bad_requests(sample_jpeg)[case]
    reply = serve_endpoint.invoke(name_of(loaded, "resnet18"), body, content_type, headers)
    assert_json_error(reply, status)


# --- bad artifacts -------------------------------------------------------------------------------------
def _tar_with(tmp: Path, model_dir: Path, extra: list[tarfile.TarInfo], name: str = "model.tar.gz") -> Path:
    archive = tmp / name
    with tarfile.open(archive, "w:gz") as tar:
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, (size if kind == tarfile.REGTYPE else 0), link
    return info


@pytest.fixture
def bad_artifact(tmp_path: Path, serve_models: dict[str, TrainedModel]):
    good = serve_models["mobilenet_v2"].model_dir

    def make(kind: str) -> Path:
        root = tmp_path / kind
        root.mkdir()
        if kind == "tar-dotdot":
            return _tar_with(root, good, [_member("../escaped.txt")])
        if kind == "tar-absolute":
            return _tar_with(root, good, [_member("/tmp/dogbreed-escaped.txt")])
        if kind == "tar-symlink":
            return _tar_with(root, good, [_member("evil", tarfile.SYMTYPE, link="/etc/passwd")])
        if kind == "tar-device":
            return _tar_with(root, good, [_member("null", tarfile.CHRTYPE)])
        if kind == "not-a-tar":
            (root / "model.tar.gz").write_bytes(b"this is not gzip")
            return root / "model.tar.gz"
        model = Path(shutil.copytree(good, root / "model"))
        if kind == "no-model-json":
            (model / artifacts.METADATA_FILE).unlink()
        elif kind == "broken-model-json":
            (model / artifacts.METADATA_FILE).write_text("{not json")
        elif kind == "unknown-arch":
            meta = json.loads((model / artifacts.METADATA_FILE).read_text())
            (model / artifacts.METADATA_FILE).write_text(json.dumps({**meta, "arch": "vgg99"}))
        elif kind == "no-weights":
            (model / artifacts.WEIGHTS_FILE).unlink()
        elif kind == "corrupt-weights":  # only the worker's torch.load finds this one
            (model / artifacts.WEIGHTS_FILE).write_bytes(b"\x00" * 4096)
        elif kind == "wrong-classes":  # model.json says 7 classes, the weights hold 5
            meta = json.loads((model / artifacts.METADATA_FILE).read_text())
            classes = [*meta["class_names"], "006.Extra_one", "007.Extra_two"]
            (model / artifacts.METADATA_FILE).write_text(json.dumps({**meta, "class_names": classes}))
        return model

    return make


ARTIFACT_CASES = ["tar-dotdot", "tar-absolute", "tar-symlink", "tar-device", "not-a-tar", "no-model-json",
                  "broken-model-json", "unknown-arch", "no-weights", "corrupt-weights", "wrong-classes"]


@pytest.mark.parametrize("kind", ARTIFACT_CASES)
def test_bad_artifact_is_refused_with_the_reason(serve_endpoint: ServeEndpoint, bad_artifact, kind: str) -> None:
    name = serve_endpoint.unique(kind)
    reply = serve_endpoint.load(name, bad_artifact(kind))
    assert_json_error(reply, 400)
    assert serve_endpoint.describe_model(name).status == 404
    if kind == "tar-dotdot":
        assert "unsafe path" in reply.json()["message"]
    reasons = {"no-model-json": "model.json", "wrong-classes": "7 classes", "corrupt-weights": "state_dict",
               "unknown-arch": "vgg99", "no-weights": "model.pt"}
    if kind in reasons:  # the handler's own reason, not MMS's "Failed to start workers"
        assert reasons[kind] in reply.json()["message"], reply.json()


class _RunsCode:
    """Unpickled by a plain unpickler, this creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def test_a_code_running_model_pt_is_refused_and_nothing_runs(serve_endpoint: ServeEndpoint,
                                                             serve_models: dict[str, TrainedModel],
                                                             sample_jpeg: bytes) -> None:
    import torch

    server_dir = serve_endpoint.stage(serve_models["mobilenet_v2"].model_dir)
    host_dir = serve_endpoint.host_root / Path(server_dir).relative_to(serve_endpoint.server_root)
    marker = host_dir.parent / "pwned"
    torch.save({"weight": _RunsCode(str(Path(server_dir).parent / "pwned"))}, host_dir / artifacts.WEIGHTS_FILE)
    name = serve_endpoint.unique("pickle")
    reply = serve_endpoint.load(name, server_dir, stage=False)
    assert_json_error(reply, 400)
    assert "state_dict" in reply.json()["message"]
    assert serve_endpoint.describe_model(name).status == 404
    assert not marker.exists(), "the server ran code from model.pt"


def test_user_inference_code_serves_its_model_only(serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel],
                                                   serve_models: dict[str, TrainedModel], tmp_path: Path,
                                                   sample_jpeg: bytes) -> None:
    """code/inference.py with its own input_fn and output_fn; the loaded models keep ours."""
    custom = Path(shutil.copytree(serve_models["resnet18"].model_dir, tmp_path / "custom"))
    (custom / "code").mkdir()
    (custom / "code" / "inference.py").write_text(
        "import base64, json\n"
        "from dogbreed.serve import inference\n"
        "def input_fn(body, content_type):\n"
        "    if content_type != 'text/plain':\n"
        "        raise inference.RequestError(415, 'send base64 text')\n"
        "    return inference.InferenceRequest(base64.b64decode(body), top_k=2)\n"
        "def output_fn(prediction, accept):\n"
        "    values, indices = prediction.probabilities.topk(prediction.top_k)\n"
        "    return ','.join(prediction.model.labels[i] for i in indices.tolist()), 'text/csv'\n")
    (custom / "code" / "requirements.txt").write_text("never-installed-at-run-time==0.0.1\n")
    name = serve_endpoint.unique("custom")
    assert serve_endpoint.load(name, custom).status == 200
    try:
        reply = serve_endpoint.invoke(name, base64.b64encode(sample_jpeg), "text/plain")
        assert reply.status == 200, reply.body[:300]
        assert reply.headers["content-type"].startswith("text/csv")
        labels = reply.body.decode().split(",")
        model = serve_models["resnet18"]
        assert len(labels) == 2 and set(labels) <= set(model.labels)
        ours = assert_prediction(serve_endpoint.invoke(name_of(loaded, "resnet18"), sample_jpeg),
                                 name_of(loaded, "resnet18"), loaded[name_of(loaded, "resnet18")], k=5)
        assert labels == [p["label"] for p in ours[:2]]  # same weights, same pixels, custom I/O
        assert_json_error(serve_endpoint.invoke(name, sample_jpeg, "image/jpeg"), 415)  # its input_fn
        for other, model in loaded.items():  # the other models keep our functions
            assert_prediction(serve_endpoint.invoke(other, sample_jpeg), other, model, k=5)
    finally:
        assert serve_endpoint.unload_model(name).status == 200


def test_load_refusals_for_bad_urls(serve_endpoint: ServeEndpoint) -> None:
    assert_json_error(serve_endpoint.load(serve_endpoint.unique("missing"), "/nonexistent/model", stage=False), 404)
    assert_json_error(serve_endpoint.load(serve_endpoint.unique("remote"), "https://example.com/m.tar.gz", stage=False), 400)
    no_url = serve_endpoint.request("POST", "/models", json.dumps({"model_name": "x"}).encode(),
                                    {"Content-Type": "application/json"})
    assert_json_error(no_url, 400)


def test_survives_200_bad_requests_without_a_worker_restart(
        serve_endpoint: ServeEndpoint, loaded: dict[str, TrainedModel], sample_jpeg: bytes, bad_artifact) -> None:
    name = name_of(loaded, "resnet18")
    workers_before = serve_endpoint.describe_model(name).json()["workers"]
    expected = assert_prediction(serve_endpoint.invoke(name, sample_jpeg), name, loaded[name], k=5)
    cases = bad_requests(sample_jpeg)
    statuses = []
    for i in range(200):
        if i % 50 == 49:  # a refused load now and then, through the same server
            kind = ("tar-dotdot", "corrupt-weights", "broken-model-json", "wrong-classes")[i // 50]
            reply = serve_endpoint.load(serve_endpoint.unique("bad"), bad_artifact(kind))
        else:
            _, body, content_type, headers, _ = cases[i % len(cases)]
            reply = serve_endpoint.invoke(name, body, content_type, headers)
        statuses.append(reply.status)
        assert 400 <= reply.status < 500, (i, reply.status, reply.body[:200])
    assert len(statuses) == 200
    after = assert_prediction(serve_endpoint.invoke(name, sample_jpeg), name, loaded[name], k=5)
    assert after == expected
    workers_after = serve_endpoint.describe_model(name).json()["workers"]
    assert [(w["id"], w["startTime"]) for w in workers_after] == [(w["id"], w["startTime"]) for w in workers_before]
    log = serve_endpoint.log_text()
    if log:  # started here: the worker loaded this model once and never died
        assert log.count(f"event=model_loaded model={name} ") == 1
        # (Other models' workers die on purpose in other tests: unloads, refused loads.)
        assert not [line for line in log.splitlines() if name[:25] in line and "died" in line]


# --- single-model mode through the console script -----------------------------------------------------------
@pytest.fixture
def single_model_server(serve_models: dict[str, TrainedModel], tmp_path: Path) -> Iterator[dict]:
    """``dogbreed-serve`` as the serve image runs it, one model in $SAGEMAKER_BASE_DIR/model."""
    base = tmp_path / "opt-ml"
    shutil.copytree(serve_models["resnet18"].model_dir, base / "model")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="dbs-"))
    port = free_port()
    env = {**os.environ, contract.BASE_DIR_ENV: str(base), contract.SAGEMAKER_BIND_TO_PORT: str(port),
           contract.BIND_HOST_ENV: "127.0.0.1", RUN_DIR_ENV: str(run_dir),
           contract.SAGEMAKER_MODEL_SERVER_WORKERS: "1", contract.SAGEMAKER_MODEL_SERVER_TIMEOUT: "30"}
    env.pop(contract.SAGEMAKER_MULTI_MODEL, None)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dogbreed-serve"))], env=env, cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = ServeEndpoint(f"http://127.0.0.1:{port}", tmp_path, str(tmp_path))
    info = {"proc": proc, "endpoint": endpoint, "run_dir": run_dir, "cwd": cwd, "log": tmp_path / "serve.log"}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                reply = endpoint.request("GET", "/models/model", timeout=5)
                if reply.status == 200 and reply.json()["workers"][0]["status"] == "READY":
                    break
            except (OSError, KeyError, IndexError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        yield info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        for leftover in server_processes(run_dir):
            leftover.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


@external
def test_single_model_invocations_and_sigterm(single_model_server: dict, serve_models: dict[str, TrainedModel],
                                              sample_jpeg: bytes) -> None:
    endpoint: ServeEndpoint = single_model_server["endpoint"]
    proc: subprocess.Popen = single_model_server["proc"]
    run_dir: Path = single_model_server["run_dir"]
    assert endpoint.ping().status == 200
    reply = endpoint.request("POST", "/invocations", sample_jpeg, {"Content-Type": "image/jpeg"})
    assert_prediction(reply, "model", serve_models["resnet18"], k=5)
    assert_json_error(endpoint.request("POST", "/invocations", b"", {"Content-Type": "image/jpeg"}), 400)

    # Config, sockets and the lock live in the run dir; nothing in the cwd; MMS is not on TCP.
    config = (run_dir / "mms.properties").read_text()
    assert f"inference_address=unix:{run_dir}/mms.sock" in config
    assert "default_response_timeout_seconds=30" in config and "default_workers_per_model=1" in config
    assert {"dogbreed-serve.lock", "mms.sock"} <= {p.name for p in run_dir.iterdir()}
    assert list(single_model_server["cwd"].iterdir()) == []
    assert server_processes(run_dir), "the server's processes carry its run dir"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while server_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_processes(run_dir) == [], "SIGTERM left processes behind"
    assert "event=stopped" in single_model_server["log"].read_text()


@external
def test_single_model_refused_model_fails_the_start_with_the_reason(serve_models: dict[str, TrainedModel],
                                                                     tmp_path: Path) -> None:
    """A model the handler refuses (here: 7 classes in model.json, 5 in the weights) must not
    become a healthy endpoint that fails every request: dogbreed-serve exits 1, saying why."""
    base = tmp_path / "opt-ml"
    model = Path(shutil.copytree(serve_models["mobilenet_v2"].model_dir, base / "model"))
    meta = json.loads((model / artifacts.METADATA_FILE).read_text())
    meta["class_names"] = [*meta["class_names"], "006.Extra_one", "007.Extra_two"]
    (model / artifacts.METADATA_FILE).write_text(json.dumps(meta))
    run_dir = Path(tempfile.mkdtemp(prefix="dbr-"))
    env = {**os.environ, contract.BASE_DIR_ENV: str(base), contract.SAGEMAKER_BIND_TO_PORT: str(free_port()),
           contract.BIND_HOST_ENV: "127.0.0.1", RUN_DIR_ENV: str(run_dir)}
    env.pop(contract.SAGEMAKER_MULTI_MODEL, None)
    try:
        result = subprocess.run([str(Path(sys.executable).with_name("dogbreed-serve"))], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stdout[-3000:]
        assert "model refused" in result.stdout and "7 classes" in result.stdout, result.stdout[-3000:]
        assert server_processes(run_dir) == []
    finally:
        for leftover in server_processes(run_dir):
            leftover.kill()
        shutil.rmtree(run_dir, ignore_errors=True)

