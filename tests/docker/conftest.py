"""Fixtures for the image tests: a real Docker engine and the images `make build` made.

Run with `make test-docker` (starts the engine, builds, sets DOGBREED_DOCKER_TESTS=1 and the
image names). Without an engine every test here is skipped, with the reason. Containers run
with `--network host` and bind 127.0.0.1; whatever a test creates (containers, tags,
registries) is removed again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerlib import (
    SERVE_IMAGE,
    TRAIN_HPS,
    TRAIN_IMAGE,
    TrainRun,
    docker,
    engine_problem,
    image_exists,
    local_train,
)


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)


def _built(image: str) -> str:
    if not image_exists(image):
        pytest.skip(f"image {image} is not built: run `make build` (make test-docker does)")
    return image


@pytest.fixture(scope="session")
def train_image() -> str:
    return _built(TRAIN_IMAGE)


@pytest.fixture(scope="session")
def serve_image() -> str:
    return _built(SERVE_IMAGE)


@pytest.fixture(scope="session")
def trained_models(train_image: str, sample_data: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainRun]:
    """Two models trained by the train image via `make local-train`: resnet18, mobilenet_v2."""
    root = tmp_path_factory.mktemp("train-image")
    runs = {}
    for arch in ("resnet18", "mobilenet_v2"):
        run = local_train(root / arch, {"model": arch, **TRAIN_HPS}, train_image, sample_data)
        assert run.result.returncode == 0, run.log()
        runs[arch] = run
    return runs


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Container names appended here are force-removed after the test."""
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "-f", name, check=False)
