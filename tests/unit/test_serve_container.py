"""`deploy --local --docker`'s container, against a stand-in docker client that records its
calls (the real engine: tests/docker/test_local_endpoint_docker.py): what is run, and that
only this endpoint dir's own container is ever removed."""

from __future__ import annotations

import json
import stat
import sys
import threading
from pathlib import Path

import pytest

from dogbreed import contract
from dogbreed.launcher.local.runs import LocalError
from dogbreed.launcher.local.serve_container import LABEL, ServeContainer, container_name

# A docker client stand-in: appends its argv (JSON) to $FAKE_DOCKER_LOG; `ps` prints
# $FAKE_DOCKER_PS, `run` exits with $FAKE_DOCKER_RUN_EXIT and says why on stderr.
FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "ps":
    print(os.environ.get("FAKE_DOCKER_PS", ""))
elif sys.argv[1] == "run":
    code = int(os.environ.get("FAKE_DOCKER_RUN_EXIT", "0"))
    print("Unable to find image" if code else "0123abcd", file=sys.stderr if code else sys.stdout)
    sys.exit(code)
elif sys.argv[1] == "inspect":
    print(json.dumps([{{"State": {{"Running": False}}}}]))
elif sys.argv[1] == "logs":
    print("dogbreed-serve: event=start_failed reason=boom")
"""


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    return str(docker), log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_the_container_runs_the_serve_image_as_sagemaker_does(fake_docker: tuple[str, Path], tmp_path: Path) -> None:
    docker, log = fake_docker
    store, endpoint_dir = tmp_path / "store", tmp_path / "endpoint"
    container = ServeContainer("dogbreed-serve:x", store, endpoint_dir, docker=docker)
    url = container.start()
    run = calls(log)[-1]
    assert run[:2] == ["run", "-d"] and run[-2:] == ["dogbreed-serve:x", "serve"]
    assert ["--network", "host"] == run[run.index("--network"):run.index("--network") + 2]
    assert run[run.index("--name") + 1] == container_name(endpoint_dir) == container.name
    assert run[run.index("--label") + 1] == f"{LABEL}={endpoint_dir.resolve()}"
    assert run[run.index("-v") + 1] == f"{store.resolve()}:{store.resolve()}:ro"  # the router's paths hold inside
    env = dict(run[i + 1].split("=", 1) for i, arg in enumerate(run) if arg == "-e")
    port = url.rsplit(":", 1)[1]
    assert env == {contract.SAGEMAKER_MULTI_MODEL: "true", contract.SAGEMAKER_BIND_TO_PORT: port,
                   contract.BIND_HOST_ENV: "127.0.0.1"}
    assert url == f"http://127.0.0.1:{port}"


def test_a_failed_run_and_an_exited_container_are_errors_with_the_reason(
        fake_docker: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker, _ = fake_docker
    container = ServeContainer("nope:latest", tmp_path / "store", tmp_path / "endpoint", docker=docker)
    monkeypatch.setenv("FAKE_DOCKER_RUN_EXIT", "125")
    with pytest.raises(LocalError, match="docker run nope:latest serve failed: Unable to find image"):
        container.start()
    monkeypatch.setenv("FAKE_DOCKER_RUN_EXIT", "0")
    container.start()  # nothing answers its port, and docker says it is not running
    with pytest.raises(LocalError, match="exited:\n.*reason=boom"):
        container.wait_ready(60, threading.Event())
    with pytest.raises(LocalError, match="no Docker client"):
        ServeContainer("x", tmp_path, tmp_path, docker=str(tmp_path / "no-docker")).start()


def test_only_this_endpoint_dirs_labelled_container_is_removed(
        fake_docker: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker, log = fake_docker
    container = ServeContainer("x", tmp_path / "store", tmp_path / "endpoint", docker=docker)
    assert container.remove_leftover() is False  # docker lists none: nothing removed
    assert [c[0] for c in calls(log)] == ["ps"]
    ps = calls(log)[0]
    assert f"name=^/{container.name}$" in ps and f"label={LABEL}={(tmp_path / 'endpoint').resolve()}" in ps
    monkeypatch.setenv("FAKE_DOCKER_PS", "0123abcd")
    assert container.remove_leftover() is True
    assert calls(log)[-1] == ["rm", "-f", container.name]
    assert container_name(tmp_path / "other") != container.name  # another workdir's is never this one
