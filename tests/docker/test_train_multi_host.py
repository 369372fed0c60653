"""Two train containers as a two-instance SageMaker job (algo-1, algo-2) train one model.

Each container gets the /opt/ml a SageMaker host gets: its own resourceconfig.json
(``current_host`` algo-1 or algo-2, both hosts, ``network_interface_name`` lo) and the whole
data set. On ``--network host`` with ``--add-host algo-N:127.0.0.1`` the two meet at algo-1
(127.0.0.1) on a free port, train data-parallel over gloo, and only algo-1 (rank 0) writes
the model, which the serve image then loads and serves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dockerlib import (
    SERVE_IMAGE,
    TRAIN_HPS,
    docker,
    free_port,
    image_exists,
    logs,
    unique,
    wait_for,
)

from dogbreed import artifacts
from dogbreed.serve.client import ServeClient

pytestmark = pytest.mark.docker

HOSTS = ["algo-1", "algo-2"]
ADD_HOSTS = [arg for host in HOSTS for arg in ("--add-host", f"{host}:127.0.0.1")]


def _host_layout(root: Path, host: str, hyperparameters: dict[str, str]) -> list[str]:
    config = root / host / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(json.dumps({"training": {
        "TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}}))
    (config / "resourceconfig.json").write_text(json.dumps({
        "current_host": host, "hosts": HOSTS, "current_group_name": "homogeneousCluster",
        "current_instance_type": "ml.m5.xlarge", "network_interface_name": "lo"}))
    mounts = ["-v", f"{config}:/opt/ml/input/config"]
    for name in ("model", "output", "checkpoints"):
        (root / host / name).mkdir()
        mounts += ["-v", f"{root / host / name}:/opt/ml/{name}"]
    return mounts


def test_two_containers_train_one_model_that_serves(
        train_image: str, sample_data: Path, tmp_path: Path, containers: list[str]) -> None:
    port = free_port()
    hps = {**TRAIN_HPS, "image-size": "32", "epochs": "2"}
    names = {}
    for host in HOSTS:
        names[host] = unique(f"dogbreed-test-{host}")
        containers.append(names[host])
        docker("run", "-d", "--name", names[host], "--network", "host", *ADD_HOSTS,
               "-e", f"DOGBREED_MASTER_PORT={port}", *_host_layout(tmp_path, host, hps),
               # Two "instances" on one machine: one thread each instead of all cores each.
               "-e", "OMP_NUM_THREADS=1",
               "-v", f"{sample_data}:/opt/ml/input/data/training:ro", train_image, "train")

    def exited() -> bool:
        states = [json.loads(docker("inspect", n).stdout)[0]["State"] for n in names.values()]
        return all(not s["Running"] for s in states)

    wait_for(exited, timeout=900, what="both training containers to finish")
    log = {host: logs(name) for host, name in names.items()}
    for host, name in names.items():
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, f"{host}:\n{log[host][-4000:]}"
    assert "world_size=2 rank=0" in log["algo-1"] and "world_size=2 rank=1" in log["algo-2"]
    assert "backend=gloo" in log["algo-2"]
    # One model, written by rank 0 on algo-1; algo-2 trained but wrote nothing.
    model_dir = tmp_path / "algo-1" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert not list((tmp_path / "algo-2" / "model").iterdir())
    assert not list((tmp_path / "algo-2" / "checkpoints").iterdir())
    assert [line.split()[0] for line in log["algo-1"].splitlines() if line.startswith("epoch=")] == [
        "epoch=1", "epoch=2"]
    assert not [line for line in log["algo-2"].splitlines() if line.startswith("epoch=")]
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["metrics"]["world_size"] == 2

    # The model serves: the serve image loads it as a multi-model endpoint loads a model.
    if not image_exists(SERVE_IMAGE):
        pytest.skip(f"serve image {SERVE_IMAGE} is not built")
    store = tmp_path / "store"
    artifacts.pack(model_dir, store / "ddp" / artifacts.ARCHIVE_NAME)
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    serve_port = free_port()
    serve = unique("dogbreed-test-serve-ddp")
    containers.append(serve)
    docker("run", "-d", "--name", serve, "--network", "host", "-e", "SAGEMAKER_MULTI_MODEL=true",
           "-e", f"SAGEMAKER_BIND_TO_PORT={serve_port}", "-e", "DOGBREED_BIND_HOST=127.0.0.1",
           "-v", f"{store}:/opt/ml/models:ro", SERVE_IMAGE, "serve")
    client = ServeClient(f"http://127.0.0.1:{serve_port}", timeout=180)

    def ping() -> bool:
        try:
            return client.ping().status == 200
        except OSError:
            return False

    wait_for(ping, timeout=300, what=f"the serve container\n{logs(serve)[-2000:]}")
    loaded = client.load_model("ddp", "/opt/ml/models/ddp")
    assert loaded.status == 200, loaded.body
    jpeg = next((sample_data / "test").rglob("*.jpg")).read_bytes()
    started = time.monotonic()
    response = client.invoke("ddp", jpeg, "image/jpeg")
    assert response.status == 200, response.body
    predictions = response.json()
    text = json.dumps(predictions)
    assert any(artifacts_label in text for artifacts_label in (
        name.partition(".")[2] for name in meta["class_names"])), text
    assert time.monotonic() - started < 120
