"""Shared fixtures: the sample data, local SageMaker job layouts, and the docker-test gate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from dogbreed import contract

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("DOGBREED_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data" / "dogs-sample"))
# Small and fast on a 2-core CPU; every test that trains starts from these.
TINY_HYPERPARAMETERS = {"model": "resnet18", "epochs": "1", "batch-size": "16", "lr": "0.01",
                        "image-size": "64", "weights": "none"}


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal sends it, whatever started pytest: a shell without job control starts
    its background jobs with SIGINT ignored, an ignored signal stays ignored across exec, and the
    Ctrl-C tests (this process raising SIGINT, or sending it to a `dogbreed` it started) would
    see nothing arrive.

    Under pytest-xdist each worker, and what it starts, gets one OpenMP thread: N workers each
    spinning a thread per core would slow every one of them down."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(config, "workerinput"):  # an xdist worker, before any test imports torch
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docker tests need an engine and ~10 minutes: they run only under `make test-docker`."""
    if os.environ.get("DOGBREED_DOCKER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="docker tests run with `make test-docker` "
                                   "(DOGBREED_DOCKER_TESTS=1, needs a Docker engine)")
    for item in items:
        if "docker" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    if not (SAMPLE_DATA / "train").is_dir():
        pytest.fail(f"sample data not found at {SAMPLE_DATA} (set DOGBREED_SAMPLE_DATA)")
    return SAMPLE_DATA


@pytest.fixture
def sample_copy(sample_data: Path, tmp_path: Path) -> Path:
    """A writable copy of the sample data (tests that break data must never touch ../shared)."""
    return Path(shutil.copytree(sample_data, tmp_path / "dogs-sample"))


JobFactory = Callable[..., contract.Paths]


@pytest.fixture
def make_job(tmp_path: Path, sample_data: Path) -> JobFactory:
    """Build an /opt/ml layout under tmp_path: ``make_job(hyperparameters, channels=None)``."""

    def factory(hyperparameters: Mapping[str, Any] | None = None,
                channels: Mapping[str, Path] | None = None, name: str = "job") -> contract.Paths:
        hps = dict(TINY_HYPERPARAMETERS if hyperparameters is None else hyperparameters)
        return contract.prepare_local_job(tmp_path / name, hps, channels or {"training": sample_data})

    return factory


EntryPoint = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def run_entry_point() -> EntryPoint:
    """Run the training entry point as a job does: a fresh process with SAGEMAKER_BASE_DIR set.

    ``run_entry_point(paths, *cli_args, console_script=False, timeout=300, env=None)``; with
    ``console_script=True`` it runs the installed ``dogbreed-train`` script itself.
    """

    def run(paths: contract.Paths, *args: str, console_script: bool = False, timeout: float = 300,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base), **(env or {})}
        full_env.pop(contract.SM_HPS, None)
        command = ([str(Path(sys.executable).with_name("dogbreed-train"))] if console_script
                   else [sys.executable, "-m", "dogbreed.train"])
        return subprocess.run([*command, *args], env=full_env, capture_output=True, text=True,
                              timeout=timeout)

    return run
