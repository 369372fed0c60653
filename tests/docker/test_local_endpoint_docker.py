"""`dogbreed deploy --local --docker`: the router in the endpoint process, the serve image as
its model server (`docker run -d`, the image's own init), boto3's sagemaker-runtime client
against it; docker owns the container, so a killed endpoint process leaves it to `cleanup`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
from botocore.config import Config
from dockerlib import TrainRun, docker

from dogbreed import artifacts
from dogbreed.launcher.local.serve_container import container_name

pytestmark = pytest.mark.docker

DOGBREED = str(Path(sys.executable).with_name("dogbreed"))
TARGET = "resnet18/model.tar.gz"


def dogbreed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOGBREED, *args], capture_output=True, text=True, timeout=timeout)


def container_state(name: str) -> dict | None:
    result = docker("inspect", name, check=False)
    return json.loads(result.stdout)[0]["State"] if result.returncode == 0 else None


@pytest.fixture
def workdir() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="dbd-"))
    yield work
    docker("rm", "-f", container_name(work / "endpoint"), check=False)
    shutil.rmtree(work, ignore_errors=True)


def test_deploy_local_docker_serves_through_the_serve_image_and_cleanup_finds_its_container(
        serve_image: str, trained_models: dict[str, TrainRun], workdir: Path, sample_data: Path) -> None:
    archive = artifacts.pack(trained_models["resnet18"].model_dir, workdir / "resnet18.tar.gz")
    added = dogbreed("add-model", "resnet18", "--file", str(archive), "--local", "--workdir", str(workdir))
    assert added.returncode == 0, added.stderr

    def deploy() -> dict:
        deployed = dogbreed("deploy", "--local", "--docker", serve_image, "--port", "0",
                            "--workdir", str(workdir), timeout=400)
        assert deployed.returncode == 0, deployed.stderr
        state = json.loads(deployed.stdout)
        assert state["container"] == container_name(workdir / "endpoint")
        assert container_state(state["container"])["Running"]
        return state

    state = deploy()
    client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=state["url"],
                          aws_access_key_id="local", aws_secret_access_key="local",
                          config=Config(retries={"max_attempts": 1}))
    jpeg = sorted((sample_data / "test").glob("*/*.jpg"))[0].read_bytes()
    reply = client.invoke_endpoint(EndpointName="dogbreed-mme", TargetModel=TARGET, ContentType="image/jpeg",
                                   Accept="application/json", Body=jpeg)
    answer = json.loads(reply["Body"].read())
    assert answer["arch"] == "resnet18" and answer["engine"] == "onnxruntime", answer  # the image's runtime
    with pytest.raises(client.exceptions.ModelError) as bad:  # the container's 400, wrapped as SageMaker does
        client.invoke_endpoint(EndpointName="dogbreed-mme", TargetModel=TARGET, ContentType="image/jpeg", Body=b"no")
    assert bad.value.response["OriginalStatusCode"] == 400
    status = json.loads(dogbreed("status", "--local", "--workdir", str(workdir)).stdout)
    assert status["endpoint"]["loaded"] == [TARGET]

    cleanup = dogbreed("cleanup", "--local", "--workdir", str(workdir))  # stops the process and its container
    assert cleanup.returncode == 0 and json.loads(cleanup.stdout)["stopped"]["pid"] == state["pid"], cleanup.stderr
    assert container_state(state["container"]) is None

    # SIGKILL the endpoint process: its router is gone at once, the container (docker's) is not.
    state = deploy()
    endpoint = psutil.Process(state["pid"])
    os.kill(endpoint.pid, signal.SIGKILL)
    endpoint.wait(30)
    assert container_state(state["container"])["Running"]
    assert json.loads(dogbreed("status", "--local", "--workdir", str(workdir)).stdout)["endpoint"] is None
    cleanup = dogbreed("cleanup", "--local", "--workdir", str(workdir))
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["stopped"] == {"container_removed": state["container"]}
    assert "event=serve_container_leftover_removed" in cleanup.stderr
    assert container_state(state["container"]) is None
