"""Helpers for the image tests (tests/docker): the docker CLI, make, free ports, waiting.

Env: DOCKER (client; default /usr/bin/docker when present, the 20.10 client with BuildKit),
DOGBREED_TRAIN_IMAGE / DOGBREED_SERVE_IMAGE (default dogbreed-train:latest / dogbreed-serve:latest;
`make test-docker` passes the <git sha> tags it just built).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dogbreed import contract

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
TRAIN_IMAGE = os.environ.get("DOGBREED_TRAIN_IMAGE", "dogbreed-train:latest")
SERVE_IMAGE = os.environ.get("DOGBREED_SERVE_IMAGE", "dogbreed-serve:latest")
# The acceptance run: 2 epochs, small images, no pretrained download.
TRAIN_HPS = {"epochs": "2", "batch-size": "16", "lr": "0.01", "image-size": "64", "weights": "none"}

T = TypeVar("T")


def docker(*args: str, check: bool = True, timeout: float = 120,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> exit {result.returncode}\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def engine_problem() -> str | None:
    """None when a Docker engine answers, else why not (the skip reason)."""
    if shutil.which(DOCKER) is None:
        return f"no Docker client ({DOCKER}): `make test-docker` installs and starts an engine"
    try:
        result = subprocess.run([DOCKER, "version", "--format", "{{.Server.Version}}"],
                                capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker version` within 20 s"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return (f"no Docker engine reachable ({lines[-1] if lines else 'docker version failed'}); "
                "`make test-docker` starts one (scripts/docker-up.sh)")
    return None


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


free_port = contract.free_port


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def split_image(image: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); a registry port is not a tag."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def make(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`make <args>` at the repo root with this suite's docker client."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", f"DOCKER={DOCKER}", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@dataclass
class TrainRun:
    """One `make local-train` run: the folder mounted as /opt/ml, and make's result."""

    base: Path
    result: subprocess.CompletedProcess[str]

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def log(self) -> str:
        return f"exit {self.result.returncode}\n{self.result.stdout[-6000:]}\n{self.result.stderr[-6000:]}"


def local_train(base: Path, hyperparameters: dict[str, str], image: str, data: Path,
                timeout: float = 900) -> TrainRun:
    """Train in ``image`` exactly as `make local-train` does (``data`` as the training channel)."""
    name, tag = split_image(image)
    result = make("local-train", f"TRAIN_IMAGE={name}", f"RUN_TAG={tag}", f"LOCAL_TRAIN_DIR={base}",
                  f"SAMPLE_DATA={data}", f"LOCAL_TRAIN_HPS={json.dumps(hyperparameters)}",
                  timeout=timeout)
    return TrainRun(base, result)


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def logs(container: str) -> str:
    """A container's stdout and stderr."""
    result = docker("logs", container, check=False)
    return result.stdout + result.stderr
