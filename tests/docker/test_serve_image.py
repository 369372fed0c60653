"""The serve image as a SageMaker multi-model endpoint runs it, with models the train image made.

`docker run <image> serve` with SAGEMAKER_MULTI_MODEL=true, SAGEMAKER_BIND_TO_PORT and (here)
DOGBREED_BIND_HOST=127.0.0.1, as root (as SageMaker runs it), models mounted read-only under
/opt/ml/models (where SageMaker puts the models it loads):

- /opt/ml/models/trained   the two models `make local-train` made with the train image
- /opt/ml/models/contract  where the serving contract suite (tests/integration/
                           test_serve_contract.py, the same suite that runs against the
                           process) stages the artifacts it loads
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerlib import REPO_ROOT, TrainRun, docker, free_port, logs, unique, wait_for
from PIL import Image

from dogbreed import artifacts
from dogbreed.serve.client import ServeClient

pytestmark = pytest.mark.docker

MODELS = "/opt/ml/models"


@dataclass
class Endpoint:
    """A serve container and a client for it."""

    container: str
    client: ServeClient
    contract_root: Path  # host side of /opt/ml/models/contract

    def ping(self) -> bool:
        try:
            return self.client.ping().status == 200
        except OSError:
            return False


def _endpoint(container: str, port: int, contract_root: Path) -> Endpoint:
    return Endpoint(container, ServeClient(f"http://127.0.0.1:{port}", timeout=180), contract_root)


def _readable_dirs(root: Path) -> None:
    """pytest makes its temp dirs private (0700); SageMaker's model dirs are readable by the
    container's user. Files keep the modes the train image and pack() gave them."""
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


@pytest.fixture(scope="module")
def model_store(trained_models: dict[str, TrainRun], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What SageMaker gives an MME container, from the train image's output: the resnet18 job's
    model dir packed as SageMaker packs it, and the mobilenet_v2 model dir as written (SageMaker
    hands MME containers unpacked dirs)."""
    store = tmp_path_factory.mktemp("model-store")
    artifacts.pack(trained_models["resnet18"].model_dir, store / "resnet18" / artifacts.ARCHIVE_NAME)
    shutil.copytree(trained_models["mobilenet_v2"].model_dir, store / "mobilenet_v2" / "model")
    _readable_dirs(store)
    return store


def start_serve(image: str, port: int, *mounts: str) -> str:
    name = unique("dogbreed-test-serve")
    docker("run", "-d", "--name", name, "--network", "host",
           "-e", "SAGEMAKER_MULTI_MODEL=true", "-e", f"SAGEMAKER_BIND_TO_PORT={port}",
           "-e", "DOGBREED_BIND_HOST=127.0.0.1", *mounts, image, "serve")
    return name


def wait_ready(endpoint: Endpoint, timeout: float = 240) -> None:
    def ready() -> bool:
        state = json.loads(docker("inspect", endpoint.container).stdout)[0]["State"]
        assert state["Running"], f"serve container exited {state['ExitCode']}:\n{logs(endpoint.container)[-4000:]}"
        return endpoint.ping()

    wait_for(ready, timeout=timeout, what=f"/ping on {endpoint.client.url}")


@pytest.fixture(scope="module")
def endpoint(serve_image: str, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    contract_root = tmp_path_factory.mktemp("contract-store")
    _readable_dirs(contract_root)
    port = free_port()
    name = start_serve(serve_image, port, "-v", f"{model_store}:{MODELS}/trained:ro",
                       "-v", f"{contract_root}:{MODELS}/contract:ro")
    endpoint = _endpoint(name, port, contract_root)
    try:
        wait_ready(endpoint)
        yield endpoint
    finally:
        docker("rm", "-f", name, check=False)


def test_serves_the_models_the_train_image_made(endpoint: Endpoint, model_store: Path,
                                                sample_data: Path) -> None:
    sources = {"resnet18": f"{MODELS}/trained/resnet18/{artifacts.ARCHIVE_NAME}",
               "mobilenet_v2": f"{MODELS}/trained/mobilenet_v2/model"}
    jpeg = sorted((sample_data / "test").glob("*/*.jpg"))[0].read_bytes()
    class_names = artifacts.read_metadata(model_store / "mobilenet_v2" / "model").class_names
    # The train image exports and checks the graph; the (CPU) serve image runs it on ONNX Runtime.
    graph = artifacts.read_metadata(model_store / "mobilenet_v2" / "model").graph
    assert (model_store / "mobilenet_v2" / "model" / artifacts.GRAPH_FILE).is_file()
    assert graph["top1_agreement"] == 1.0 and graph["checked_on"] == "test", graph
    for arch, url in sources.items():
        name = f"train-image-{arch}"
        reply = endpoint.client.load_model(name, url)
        assert reply.status == 200, (arch, reply.status, reply.body[:1000])
        reply = endpoint.client.invoke(name, jpeg, "image/jpeg")
        assert reply.status == 200, (arch, reply.status, reply.body[:1000])
        answer = reply.json()
        assert answer["arch"] == arch and answer["model"] == name
        assert answer["engine"] == "onnxruntime", (arch, answer)
        assert {p["class_name"] for p in answer["predictions"]} <= set(class_names)
        assert endpoint.client.unload_model(name).status == 200


def test_the_serving_contract_suite_passes_against_the_container(
        endpoint: Endpoint, trained_models: dict[str, TrainRun],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """tests/integration/test_serve_contract.py, pointed at the container (DOGBREED_SERVE_URL),
    with the two models the train image made (DOGBREED_SERVE_TRAINED_MODELS)."""
    made_by_train_image = tmp_path_factory.mktemp("train-image-models")
    for arch, run in trained_models.items():
        (made_by_train_image / arch).symlink_to(run.model_dir, target_is_directory=True)
    env = {**os.environ, "DOGBREED_SERVE_URL": endpoint.client.url,
           "DOGBREED_SERVE_MODEL_ROOT": f"{endpoint.contract_root}:{MODELS}/contract",
           "DOGBREED_SERVE_TRAINED_MODELS": str(made_by_train_image)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/integration/test_serve_contract.py", "-q",
         "-p", "no:cacheprovider", "-o", "addopts=-ra"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL)
    tail = result.stdout[-6000:] + result.stderr[-2000:]
    print(tail.strip().splitlines()[-1] if tail.strip() else "")
    assert result.returncode == 0, tail + "\n--- container log ---\n" + logs(endpoint.container)[-3000:]


def _process_uids(container: str) -> list[str]:
    return docker("exec", container, "sh", "-c",
                  "cat /proc/[0-9]*/status 2>/dev/null | awk '/^Uid:/ {print $2}' | sort -u").stdout.split()


def test_runs_as_root_as_sagemaker_expects(endpoint: Endpoint) -> None:
    """"SageMaker AI expects all containers to run with root users" (your-algorithms-inference-code)."""
    assert _process_uids(endpoint.container) == ["0"]


def _tiny_model(root: Path) -> Path:
    """A real (random-weight) model dir, as dogbreed-train writes one."""
    from dogbreed import data, models

    model = models.build_model("mobilenet_v2", 3, models.WEIGHTS_NONE).eval()
    metadata = artifacts.ModelMetadata(
        arch="mobilenet_v2", class_names=["001.A", "002.B", "003.C"], image_size=32,
        resize_size=data.resize_size_for(32), mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    artifacts.save_model_dir(root, model, metadata)
    _readable_dirs(root.parent)
    for path in root.iterdir():
        path.chmod(0o644)
    return root


@pytest.mark.parametrize("mode", ["multi-model", "single-model"])
def test_sigterm_stops_everything_within_10_s(serve_image: str, tmp_path: Path, mode: str) -> None:
    """``docker kill -s TERM`` (what ``docker stop`` and SageMaker send) goes through tini to
    dogbreed-serve, which stops MMS, the zygote and every worker: exit 0 within 10 s, and the
    server's own log says it stopped them all (nothing left for the kernel to kill)."""
    port = free_port()
    if mode == "multi-model":
        name = start_serve(serve_image, port)
    else:
        model = _tiny_model(tmp_path / "opt-ml" / "model")
        name = unique("dogbreed-test-serve-single")
        docker("run", "-d", "--name", name, "--network", "host", "-e", f"SAGEMAKER_BIND_TO_PORT={port}",
               "-e", "DOGBREED_BIND_HOST=127.0.0.1", "-v", f"{model}:/opt/ml/model:ro", serve_image, "serve")
    endpoint = _endpoint(name, port, tmp_path)
    try:
        wait_ready(endpoint)
        if mode == "single-model":
            wait_for(lambda: b'"READY"' in endpoint.client.describe_model("model").body, 120, "the model's worker")
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), "brown").save(buffer, format="JPEG")
            reply = endpoint.client.invoke(None, buffer.getvalue(), "image/jpeg")
            assert reply.status == 200 and reply.json()["model"] == "model", reply.body[:300]
        processes = docker("top", name, "-eo", "pid,args").stdout
        assert "java" in processes and "dogbreed.serve.zygote" in processes, processes
        started = time.monotonic()
        docker("kill", "-s", "TERM", name)
        wait_for(lambda: not json.loads(docker("inspect", name).stdout)[0]["State"]["Running"], 10,
                 "the container to exit after SIGTERM", interval=0.1)
        seconds = time.monotonic() - started
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        log = logs(name)
        assert seconds < 10 and state["ExitCode"] == 0, (seconds, state, log[-3000:])
        assert "event=stopped" in log and "event=stop_failed" not in log, log[-3000:]
    finally:
        docker("rm", "-f", name, check=False)


def test_single_model_answers_execution_parameters_and_explain(serve_image: str, tmp_path: Path) -> None:
    """What SageMaker batch transform asks the serve image before it sends records, from the
    container's own settings (2 workers here); and explain=gradcam works in the image (Captum is
    installed there): the prediction plus a PNG heat map of the model's input size. Run as the
    unprivileged model-server user (`docker run --user`, for local use): every process is."""
    import base64

    model = _tiny_model(tmp_path / "opt-ml" / "model")
    port = free_port()
    name = unique("dogbreed-test-serve-batch")
    docker("run", "-d", "--name", name, "--network", "host", "--user", "model-server",
           "-e", f"SAGEMAKER_BIND_TO_PORT={port}",
           "-e", "DOGBREED_BIND_HOST=127.0.0.1", "-e", "SAGEMAKER_MODEL_SERVER_WORKERS=2",
           "-v", f"{model}:/opt/ml/model:ro", serve_image, "serve")
    endpoint = _endpoint(name, port, tmp_path)
    try:
        wait_ready(endpoint)
        reply = endpoint.client.request("GET", "/execution-parameters")
        assert reply.status == 200 and reply.headers["content-type"] == "application/json", reply
        assert reply.json() == {"MaxConcurrentTransforms": 2, "BatchStrategy": "SINGLE_RECORD",
                                "MaxPayloadInMB": 6}
        wait_for(lambda: b'"READY"' in endpoint.client.describe_model("model").body, 120, "the model's worker")
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), "brown").save(buffer, format="JPEG")
        reply = endpoint.client.invoke(None, buffer.getvalue(), "image/jpeg",
                                       {"X-Amzn-SageMaker-Custom-Attributes": "explain=gradcam"})
        assert reply.status == 200, (reply.body[:500], logs(name)[-3000:])
        heat = reply.json()["explanations"][0]
        with Image.open(io.BytesIO(base64.b64decode(heat["png_base64"]))) as image:
            assert (image.format, image.size) == ("PNG", (32, 32))
        uids = _process_uids(name)
        assert uids and "0" not in uids, uids
    finally:
        docker("rm", "-f", name, check=False)
