"""Fixtures for the serving contract suite (``test_serve_contract.py``): real MMS, real Java.

The suite speaks only HTTP, so it runs against any server that keeps the contract: by default
it starts :class:`dogbreed.serve.server.ModelServer` itself (multi-model mode, 127.0.0.1, a free
port, once per session); with ``DOGBREED_SERVE_URL`` it uses a server that is already running,
e.g. the serve image (``docker run ... -e SAGEMAKER_MULTI_MODEL=true <image> serve``)::

    DOGBREED_SERVE_URL=http://127.0.0.1:8080 \\
    DOGBREED_SERVE_MODEL_ROOT=/tmp/contract-models:/opt/ml/models \\
        pytest tests/integration/test_serve_contract.py

Models travel as paths (``POST /models {"model_name", "url"}``), so the suite copies every
artifact it loads under ``HOST_DIR`` and sends the path the server sees, ``SERVER_DIR``
(``DOGBREED_SERVE_MODEL_ROOT=HOST_DIR:SERVER_DIR``; mount HOST_DIR at SERVER_DIR, writable
or not). Without it the suite uses a temp dir, same path on both sides. Tests that need the
process itself (single-model ``dogbreed-serve``, logs) skip against an external server; the
URL-input test expects ``DOGBREED_ALLOW_URL_HOSTS`` unset there.

Fixture API:

``serve_models`` (session) -> ``{"resnet18": TrainedModel, "mobilenet_v2": TrainedModel}``
    trained once per session by ``dogbreed-train`` on a copy of the sample data (1 epoch,
    64 px), or, with ``DOGBREED_SERVE_TRAINED_MODELS=DIR``, the model dirs ``DIR/resnet18`` and
    ``DIR/mobilenet_v2`` made elsewhere (the train image): ``.model_dir`` (model.json +
    model.pt), ``.archive`` (model.tar.gz), ``.class_names``, ``.labels`` (breed names).
``serve_endpoint`` (session) -> :class:`ServeEndpoint`
    a :class:`dogbreed.serve.client.ServeClient` (``.url``, ``.request(method, path, body,
    headers)`` -> ``Response`` with ``.status``/``.headers``/``.body``/``.json()``, ``.ping()``,
    ``.load_model(name, url)``, ``.unload_model(name)``, ``.describe_model(name)``,
    ``.list_models()``, ``.invoke(name, body, content_type, headers, query)``) plus
    ``.load(name, source)`` that stages a model dir or file first, ``.unique(prefix)`` a model
    name no other test uses, ``.server`` (the ModelServer, None when external) and
    ``.log_text()``. At teardown it stops the server and fails if any process it started is
    still alive.
``sample_jpeg`` (session) -> bytes of a sample dog photo.

The classes and helpers behind them (``ServeEndpoint``, ``TrainedModel``, ``train_models``,
``server_processes``) live in ``servelib.py``, importable without these fixtures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servelib import (
    MODEL_ROOT_ENV,
    SERVE_URL_ENV,
    TRAINED_MODELS_ENV,
    ServeEndpoint,
    TrainedModel,
    existing_models,
    server_processes,
    train_models,
)


@pytest.fixture(scope="session")
def serve_models(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainedModel]:
    root = tmp_path_factory.mktemp("serve-models")
    if os.environ.get(TRAINED_MODELS_ENV):
        return existing_models(Path(os.environ[TRAINED_MODELS_ENV]), root)
    return train_models(root, sample_data)


@pytest.fixture(scope="session")
def sample_jpeg(sample_data: Path) -> bytes:
    return sorted((sample_data / "test").rglob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="session")
def serve_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeEndpoint]:
    root_spec = os.environ.get(MODEL_ROOT_ENV)
    if root_spec:
        host_dir, _, server_dir = root_spec.partition(":")
        host_root = Path(host_dir)
        host_root.mkdir(parents=True, exist_ok=True)
        host_root = Path(tempfile.mkdtemp(prefix="contract-", dir=host_root))
        host_root.chmod(0o755)  # mkdtemp makes 0700; a non-root container user reads below it
        server_root = f"{(server_dir or host_dir).rstrip('/')}/{host_root.name}"
    else:
        host_root = tmp_path_factory.mktemp("serve-store")
        server_root = str(host_root)
    external = os.environ.get(SERVE_URL_ENV)
    if external:
        endpoint = ServeEndpoint(external, host_root, server_root)
        deadline = time.monotonic() + 120
        while True:
            try:
                if endpoint.ping().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{SERVE_URL_ENV}={external} does not answer /ping")
            time.sleep(0.5)
        yield endpoint
        if root_spec:
            shutil.rmtree(host_root, ignore_errors=True)
        return

    from dogbreed.serve.server import ModelServer

    run_dir = Path(tempfile.mkdtemp(prefix="dbs-"))  # short: unix socket paths live in it
    log_file = tmp_path_factory.mktemp("serve-log") / "server.log"
    server = ModelServer(port=0, host="127.0.0.1", run_dir=run_dir, multi_model=True, log_file=log_file)
    try:
        server.start()
        server.wait_ready(180)
        yield ServeEndpoint(server.url, host_root, server_root, server)
    finally:
        server.stop()
        left = server_processes(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        assert not left, f"processes left after stop(): {[(p.pid, p.name()) for p in left]}"
