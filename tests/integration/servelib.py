"""Helpers for the serving contract suite: the endpoint client, trained models, process checks.

See ``conftest.py`` for the fixtures and how to point the suite at a running server.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from dogbreed import artifacts, contract
from dogbreed.serve.client import Response, ServeClient

SERVE_URL_ENV = "DOGBREED_SERVE_URL"
MODEL_ROOT_ENV = "DOGBREED_SERVE_MODEL_ROOT"
# A folder of <arch>/ model dirs made elsewhere (e.g. by the train image): used instead of
# training the suite's own models.
TRAINED_MODELS_ENV = "DOGBREED_SERVE_TRAINED_MODELS"
ARCHS = ("resnet18", "mobilenet_v2")
TINY = {"epochs": "1", "batch-size": "16", "image-size": "64", "weights": "none"}


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    arch: str
    model_dir: Path
    archive: Path
    class_names: list[str]

    @property
    def labels(self) -> list[str]:
        return [artifacts.breed_name(c) for c in self.class_names]


def server_processes(run_dir: Path) -> list[Any]:
    """Live processes started for the server whose run dir is ``run_dir``."""
    import psutil

    from dogbreed.serve import RUN_DIR_ENV

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(RUN_DIR_ENV) == str(run_dir) or str(run_dir) in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


STARTED_FILE = "java.started"


def stalled_java(home: Path) -> dict[str, str]:
    """An environment whose ``$JAVA_HOME/bin/java`` never answers: it writes ``STARTED_FILE``
    under ``home`` (the event a test waits on), then waits for a signal, keeping MMS's arguments
    (the run dir) in its command line so a leftover is found like a real MMS. A start-up held
    there cannot finish before a test's signal lands, however loaded the machine is."""
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True, exist_ok=True)
    java.write_text(f"""#!/bin/sh
echo $$ > '{home}/{STARTED_FILE}.tmp' && mv '{home}/{STARTED_FILE}.tmp' '{home}/{STARTED_FILE}'
exec '{sys.executable}' -c 'import signal; signal.pause()' "$@"
""")
    java.chmod(0o755)
    return {**os.environ, "JAVA_HOME": str(home)}


def wait_for_start(home: Path, process: subprocess.Popen[Any], timeout: float = 120.0) -> int:
    """The pid of the stalled java once it has started (its file appears); fails the test if
    ``process`` ends first or nothing starts within ``timeout`` seconds."""
    import time

    started = home / STARTED_FILE
    deadline = time.monotonic() + timeout
    while not started.is_file():
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before starting java")
        if time.monotonic() > deadline:
            pytest.fail(f"java did not start within {timeout:g} s")
        time.sleep(0.05)
    return int(started.read_text())


class ServeEndpoint(ServeClient):
    """A :class:`ServeClient` that also hands the server model files by path (see conftest)."""

    def __init__(self, url: str, host_root: Path, server_root: str, server: Any = None) -> None:
        super().__init__(url, timeout=180)
        self.host_root, self.server_root = host_root, server_root.rstrip("/")
        self.server = server
        self._session = uuid.uuid4().hex[:6]

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{self._session}-{uuid.uuid4().hex[:4]}"

    def stage(self, source: Path) -> str:
        """Copy a model dir or file where the server can read it; the path as the server sees it."""
        folder = uuid.uuid4().hex[:10]
        target = self.host_root / folder / source.name
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
        # A containerised server runs as another (non-root) user: it must be able to read them.
        for path in [target.parent, target, *(target.rglob("*") if target.is_dir() else ())]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        return f"{self.server_root}/{folder}/{source.name}"

    def load(self, name: str, source: Path | str, stage: bool = True) -> Response:
        """Stage ``source`` (unless ``stage=False``: send it as it is) and ``POST /models``."""
        return self.load_model(name, self.stage(Path(source)) if stage else str(source))

    def log_text(self) -> str:
        if self.server is None or self.server.log_file is None or not self.server.log_file.is_file():
            return ""
        return self.server.log_file.read_text(encoding="utf-8", errors="replace")


def existing_models(source: Path, root: Path, archs: tuple[str, ...] = ARCHS) -> dict[str, TrainedModel]:
    """Models trained elsewhere: ``source/<arch>`` holds model.pt + model.json for each arch."""
    models = {}
    for arch in archs:
        model_dir = source / arch
        metadata = artifacts.read_metadata(model_dir)
        assert metadata.arch == arch, f"{model_dir} holds a {metadata.arch}, not a {arch}"
        archive = artifacts.pack(model_dir, root / "archives" / arch / artifacts.ARCHIVE_NAME)
        models[arch] = TrainedModel(arch, model_dir, archive, metadata.class_names)
    return models


def train_models(root: Path, sample_data: Path, archs: tuple[str, ...] = ARCHS) -> dict[str, TrainedModel]:
    """Run ``dogbreed-train`` once per architecture (in parallel), as a training job does."""
    script = Path(sys.executable).with_name("dogbreed-train")
    jobs = {}
    for arch in archs:
        paths = contract.prepare_local_job(root / arch, {"model": arch, **TINY},
                                           {"training": sample_data}, copy_data=True)
        # One thread each: two trainers on a small CPU otherwise wait on each other's cores.
        env = {"OMP_NUM_THREADS": "1", **os.environ, contract.BASE_DIR_ENV: str(paths.base)}
        env.pop(contract.SM_HPS, None)
        log = open(root / f"{arch}.log", "w")  # noqa: SIM115 - closed below
        jobs[arch] = (paths, log, subprocess.Popen([str(script)], env=env, stdout=log, stderr=subprocess.STDOUT))
    models = {}
    for arch, (paths, log, proc) in jobs.items():
        code = proc.wait(timeout=600)
        log.close()
        if code != 0:
            pytest.fail(f"dogbreed-train {arch} exited {code}:\n{(root / f'{arch}.log').read_text()[-3000:]}")
        archive = artifacts.pack(paths.model_dir, root / "archives" / arch / artifacts.ARCHIVE_NAME)
        models[arch] = TrainedModel(arch, paths.model_dir, archive,
                                    artifacts.read_metadata(paths.model_dir).class_names)
    return models
