"""The serve image as a SageMaker multi-model endpoint runs it, with models the train image made.

`docker run <image> serve` with SAGEMAKER_MULTI_MODEL=true, SAGEMAKER_BIND_TO_PORT and (here)
DOGBREED_BIND_HOST=127.0.0.1, as the non-root image user, models mounted read-only under
/opt/ml/models (where SageMaker puts the models it loads):

- /opt/ml/models/trained   the two models `make local-train` made with the train image
- /opt/ml/models/contract  where the serving contract suite (tests/integration/
                           test_serve_contract.py, the same suite that runs against the
                           process) stages the artifacts it loads
"""

from __future__ import annotations

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
    for arch, url in sources.items():
        name = f"train-image-{arch}"
        reply = endpoint.client.load_model(name, url)
        assert reply.status == 200, (arch, reply.status, reply.body[:1000])
        reply = endpoint.client.invoke(name, jpeg, "image/jpeg")
        assert reply.status == 200, (arch, reply.status, reply.body[:1000])
        answer = reply.json()
        assert answer["arch"] == arch and answer["model"] == name
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


def test_every_process_runs_as_non_root(endpoint: Endpoint) -> None:
    uids = docker("exec", endpoint.container, "sh", "-c",
                  "cat /proc/[0-9]*/status 2>/dev/null | awk '/^Uid:/ {print $2}' | sort -u").stdout.split()
    assert uids and "0" not in uids, uids


def test_docker_stop_reaches_the_server(serve_image: str, tmp_path: Path) -> None:
    """SIGTERM goes through tini to dogbreed-serve, which stops MMS: a quick, clean exit."""
    port = free_port()
    endpoint = _endpoint(start_serve(serve_image, port), port, tmp_path)
    try:
        wait_ready(endpoint)
        started = time.monotonic()
        docker("stop", "-t", "30", endpoint.container, timeout=60)
        seconds = time.monotonic() - started
        state = json.loads(docker("inspect", endpoint.container).stdout)[0]["State"]
        log = logs(endpoint.container)[-3000:]
        assert seconds < 20, f"docker stop took {seconds:.0f} s: SIGTERM did not stop the server\n{log}"
        assert state["ExitCode"] in (0, 143), (state, log)
    finally:
        docker("rm", "-f", endpoint.container, check=False)
