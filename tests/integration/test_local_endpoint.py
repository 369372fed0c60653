"""The local multi-model endpoint end to end: real training, real MMS (Java), the router, and
boto3's own sagemaker-runtime client pointed at it — `make demo` and the CLI's local flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

pytestmark = pytest.mark.slow

DOGBREED = str(Path(sys.executable).with_name("dogbreed"))
TARGETS = ("dog-breed-classifier/model.tar.gz", "dog-breed-mobilenet/model.tar.gz")


def dogbreed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOGBREED, *args], capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> tuple[Path, str]:
    """`dogbreed demo` (what `make demo` runs), once: its trained models serve the tests below."""
    work = tmp_path_factory.mktemp("demo-work")
    started = time.monotonic()
    result = dogbreed("demo", "--data", str(sample_data), "--epochs", "1", "--workdir", str(work))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    assert elapsed < 600
    return work, result.stdout


def test_demo_predicts_with_both_models_and_stops_everything(demo: tuple[Path, str]) -> None:
    work, stdout = demo
    for target in TARGETS:
        assert f"TargetModel={target}" in stdout
    assert "arch=resnet18" in stdout and "arch=mobilenet_v2" in stdout
    assert stdout.count("  1. ") == 2  # a top prediction from each model
    assert "training_curves.png" in stdout
    for job in ("demo-resnet18", "demo-mobilenetv2"):
        assert (work / "demo" / "jobs" / job / "output" / "data" / "training_curves.png").is_file()
    assert processes_mentioning(str(work)) == []  # no MMS, worker or router left behind


def test_local_endpoint_routes_by_target_model_with_lru(demo: tuple[Path, str], tmp_path: Path,
                                                        sample_data: Path) -> None:
    """deploy --local → invoke (CLI and boto3) → LRU unload → errors → status → cleanup."""
    demo_work, _ = demo
    work = tmp_path / "work"
    for name, job in (("dog-breed-classifier", "demo-resnet18"), ("dog-breed-mobilenet", "demo-mobilenetv2")):
        archive = demo_work / "demo" / "jobs" / job / "output" / "model.tar.gz"
        added = dogbreed("add-model", name, "--file", str(archive), "--local", "--workdir", str(work))
        assert added.returncode == 0, added.stderr
    deployed = dogbreed("deploy", "--local", "--port", "0", "--max-loaded-models", "1",
                        "--endpoint-name", "dogs-local", "--workdir", str(work), timeout=300)
    assert deployed.returncode == 0, deployed.stderr
    state = json.loads(deployed.stdout)
    url = state["url"]
    try:
        image = sorted((sample_data / "test" / "001.Beagle").glob("*.jpg"))[0]
        cli = dogbreed("invoke", str(image), "--target-model", TARGETS[0], "--local", "--top-k", "2",
                       "--endpoint-name", "dogs-local", "--workdir", str(work))
        assert cli.returncode == 0, cli.stderr
        assert "arch=resnet18" in cli.stdout and "  2. " in cli.stdout and "  3. " not in cli.stdout

        client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=url,
                              aws_access_key_id="local", aws_secret_access_key="local",
                              config=Config(retries={"max_attempts": 1}))

        def invoke(target: str, body: bytes, content_type: str = "image/jpeg") -> dict:
            response = client.invoke_endpoint(EndpointName="dogs-local", TargetModel=target,
                                              ContentType=content_type, Accept="application/json",
                                              CustomAttributes="top_k=3", Body=body)
            return json.loads(response["Body"].read())

        def loaded() -> list[str]:
            with urllib.request.urlopen(url + "/models", timeout=10) as reply:
                return json.loads(reply.read())["loaded"]

        jpeg = image.read_bytes()
        assert invoke(TARGETS[1], jpeg)["arch"] == "mobilenet_v2"
        assert loaded() == [TARGETS[1]]  # max 1 loaded: the ResNet was unloaded
        answer = invoke(TARGETS[0], jpeg)
        assert answer["arch"] == "resnet18" and len(answer["predictions"]) == 3
        labels = {p["class_name"] for p in answer["predictions"]}
        assert labels <= {d.name for d in (sample_data / "train").iterdir()}
        assert loaded() == [TARGETS[0]]

        with pytest.raises(client.exceptions.ValidationError) as unknown:
            invoke("no-such-model/model.tar.gz", jpeg)
        assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        with pytest.raises(client.exceptions.ModelError) as bad:
            invoke(TARGETS[0], b"this is not an image")
        assert bad.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424
        assert 400 <= bad.value.response["OriginalStatusCode"] < 500
        with pytest.raises(client.exceptions.ModelError) as wrong_type:
            invoke(TARGETS[0], b"hello", content_type="text/plain")
        assert 400 <= wrong_type.value.response["OriginalStatusCode"] < 500
        assert invoke(TARGETS[0], jpeg)["arch"] == "resnet18"  # still serving after bad input

        status = dogbreed("status", "--local", "--workdir", str(work))
        assert json.loads(status.stdout)["endpoint"]["loaded"] == [TARGETS[0]]
    finally:
        cleanup = dogbreed("cleanup", "--local", "--workdir", str(work))
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["stopped"]["pid"] == state["pid"]
    assert processes_mentioning(str(work)) == []
    assert json.loads(dogbreed("status", "--local", "--workdir", str(work)).stdout)["endpoint"] is None
