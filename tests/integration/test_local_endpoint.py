"""The local multi-model endpoint end to end: real training, real MMS (Java), the router, and
boto3's own sagemaker-runtime client pointed at it — `make demo` and the CLI's local flow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
from botocore.config import Config
from servelib import stalled_java, wait_for_start

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
        printed = json.loads(cli.stdout)  # JSON on stdout, named by the TargetModel asked for
        assert printed["model"] == printed["target_model"] == TARGETS[0]
        assert printed["arch"] == "resnet18" and len(printed["predictions"]) == 2

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
        # The model server unpacked each archive once and removed the unloaded one's copy.
        assert len(list((work / "endpoint" / "mms" / "models").iterdir())) == 1
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

        # Replacing a loaded model's archive: warned, and the loaded copy keeps serving, as on
        # SageMaker MME (AWS: add a changed model under a new name).
        mobilenet = demo_work / "demo" / "jobs" / "demo-mobilenetv2" / "output" / "model.tar.gz"
        replaced = dogbreed("add-model", "dog-breed-classifier", "--file", str(mobilenet), "--local",
                            "--workdir", str(work))
        assert replaced.returncode == 0, replaced.stderr
        assert f"event=model_still_loaded target_model={TARGETS[0]}" in replaced.stderr
        assert invoke(TARGETS[0], jpeg)["arch"] == "resnet18"
    finally:
        cleanup = dogbreed("cleanup", "--local", "--workdir", str(work))
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["stopped"]["pid"] == state["pid"]
    assert processes_mentioning(str(work)) == []
    assert json.loads(dogbreed("status", "--local", "--workdir", str(work)).stdout)["endpoint"] is None


# --- start-up, ports and leftovers (no models needed: an empty store serves /ping) -------------
@pytest.fixture
def short_workdir() -> Iterator[Path]:
    """A workdir with a short path (MMS's run dir must fit a unix socket path); at teardown every
    process still naming it (all started by the test) is killed, and the test fails."""
    work = Path(tempfile.mkdtemp(prefix="dbw-"))
    yield work
    left = processes_mentioning(str(work))
    for line in left:
        try:
            os.killpg(int(line.split(":")[0]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    shutil.rmtree(work, ignore_errors=True)
    assert left == [], "left running"


def test_ctrl_c_during_deploy_start_up_cancels_the_daemon(short_workdir: Path) -> None:
    """`timeout -s INT 2 dogbreed deploy --local` exited 130 while the daemon it had spawned
    went on starting and then served, with nobody knowing. The daemon's MMS is a java that
    never answers, so the signal lands mid start-up however fast the machine is."""
    java_home = short_workdir / "java"
    deploy = subprocess.Popen([DOGBREED, "deploy", "--local", "--port", "0", "--workdir",
                               str(short_workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=stalled_java(java_home))
    java = wait_for_start(java_home, deploy)  # the daemon's MMS has started; start-up is held
    assert any(line.startswith(f"{java}: ") for line in processes_mentioning(str(short_workdir)))
    deploy.send_signal(signal.SIGINT)
    _, stderr = deploy.communicate(timeout=60)
    assert deploy.returncode == 130, stderr
    assert "event=endpoint_start_cancelled" in stderr
    assert processes_mentioning(str(short_workdir)) == []  # daemon, MMS and zygote all gone
    assert not (short_workdir / "endpoint" / "state.json").exists()
    status = dogbreed("status", "--local", "--workdir", str(short_workdir))
    assert json.loads(status.stdout)["endpoint"] is None


@pytest.mark.parametrize("foreground", [False, True], ids=["detached", "foreground"])
def test_a_busy_port_is_one_error_line_before_anything_starts(short_workdir: Path,
                                                              foreground: bool) -> None:
    """With the port taken, deploy printed an OSError traceback (twice) ~8 s later, after MMS
    had started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = dogbreed("deploy", "--local", "--port", str(port), "--workdir", str(short_workdir),
                          *(["--foreground"] if foreground else []), timeout=60)
        elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert f"dogbreed deploy: cannot listen on 127.0.0.1:{port}: address already in use\n" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("dogbreed deploy: cannot listen") == 1
    assert elapsed < 10  # not after an MMS start
    assert not (short_workdir / "endpoint" / "mms").exists()  # MMS never started
    assert processes_mentioning(str(short_workdir)) == []


def test_a_killed_daemon_leaves_nothing_behind_the_next_deploy_or_cleanup(short_workdir: Path) -> None:
    """SIGKILL the daemon: its MMS + zygote (own sessions) used to run on, invisible to status,
    untouched by cleanup, their run dir deleted under them by the next deploy. Now the kernel
    kills them with it (PR_SET_PDEATHSIG) and drops its lock: nothing to find or stop later."""
    work = str(short_workdir)

    def deploy_then_kill() -> list[psutil.Process]:
        deployed = dogbreed("deploy", "--local", "--port", "0", "--workdir", work, timeout=300)
        assert deployed.returncode == 0, deployed.stderr
        daemon = psutil.Process(json.loads(deployed.stdout)["pid"])
        family = daemon.children(recursive=True)
        roles = {"zygote" if "dogbreed.serve.zygote" in p.cmdline() else p.name() for p in family}
        assert {"java", "zygote"} <= roles, roles
        daemon.kill()
        gone, alive = psutil.wait_procs([daemon, *family], timeout=30)
        assert alive == [], f"outlived the SIGKILLed daemon: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
        return family

    deploy_then_kill()
    assert processes_mentioning(work) == []
    assert json.loads(dogbreed("status", "--local", "--workdir", work).stdout)["endpoint"] is None
    cleanup = dogbreed("cleanup", "--local", "--workdir", work)
    assert cleanup.returncode == 0, cleanup.stderr
    assert json.loads(cleanup.stdout)["stopped"] is None  # nothing was left to stop
    assert not (short_workdir / "endpoint" / "state.json").exists()  # the dead daemon's is gone too

    # The next deploy takes over the dead one's dirs (its lock, its MMS run dir) and serves.
    again = dogbreed("deploy", "--local", "--port", "0", "--workdir", work, timeout=300)
    assert again.returncode == 0, again.stderr
    cleanup = dogbreed("cleanup", "--local", "--workdir", work)
    assert cleanup.returncode == 0 and json.loads(cleanup.stdout)["stopped"]["pid"] == json.loads(again.stdout)["pid"]
    assert processes_mentioning(work) == []
