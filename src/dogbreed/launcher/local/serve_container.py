"""The serve image as a local endpoint's model server: ``deploy --local --docker [IMAGE]``.

The container runs as a SageMaker multi-model endpoint runs it (``serve``, ``SAGEMAKER_MULTI_MODEL``,
``SAGEMAKER_BIND_TO_PORT``), detached (``docker run -d``) under the image's own init (tini), on
127.0.0.1 with ``--network host``. The model store is mounted read-only at its own path, so the
archive paths the router sends with ``POST /models`` mean the same inside; the container unpacks
them. Docker owns the container: it has one name per endpoint dir, so a ``deploy`` or ``cleanup``
after the endpoint process was killed finds and removes it by that name.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import threading
import time
from pathlib import Path

from dogbreed import contract
from dogbreed.launcher import events
from dogbreed.launcher.local.runs import LocalError
from dogbreed.serve.client import ServeClient

DEFAULT_SERVE_IMAGE = "dogbreed-serve:latest"
LABEL = "dogbreed.endpoint"  # the endpoint dir the container serves, for `docker ps --filter`


def container_name(endpoint_dir: Path) -> str:
    """One name per endpoint dir (docker refuses a second container of that name)."""
    return "dogbreed-endpoint-" + hashlib.sha1(str(Path(endpoint_dir).resolve()).encode()).hexdigest()[:12]


class ServeContainer:
    def __init__(self, image: str, store_dir: Path, endpoint_dir: Path, docker: str = "docker") -> None:
        self.image, self.docker = image, docker
        self.store_dir = Path(store_dir).resolve()
        self.endpoint_dir = Path(endpoint_dir).resolve()
        self.name = container_name(self.endpoint_dir)
        self.url: str | None = None

    def _docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise LocalError(f"--docker: no Docker client ({self.docker})") from None

    def start(self) -> str:
        """``docker run -d`` the image; its URL (not ready yet: :meth:`wait_ready`)."""
        self.remove_leftover()
        port = contract.free_port()
        result = self._docker(
            "run", "-d", "--name", self.name, "--network", "host",
            "--label", f"{LABEL}={self.endpoint_dir}", "-v", f"{self.store_dir}:{self.store_dir}:ro",
            "-e", f"{contract.SAGEMAKER_MULTI_MODEL}=true", "-e", f"{contract.SAGEMAKER_BIND_TO_PORT}={port}",
            "-e", f"{contract.BIND_HOST_ENV}=127.0.0.1", self.image, "serve")
        if result.returncode != 0:
            raise LocalError(f"docker run {self.image} serve failed: {result.stderr.strip()[-1500:]}")
        self.url = f"http://127.0.0.1:{port}"
        events.event("serve_container_started", container=self.name, image=self.image, url=self.url)
        return self.url

    def wait_ready(self, timeout: float, cancel: threading.Event) -> None:
        """Until the container answers ``/ping``; a :class:`LocalError` with its log if it exits
        or ``timeout`` passes; returns early once ``cancel`` is set."""
        assert self.url is not None, "not started"
        client, deadline = ServeClient(self.url, timeout=5), time.monotonic() + timeout
        while not cancel.is_set():
            try:
                if client.ping().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if not self.running():
                raise LocalError(f"the serve container {self.name} exited:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise LocalError(f"the serve container {self.name} did not answer /ping in {timeout:g} s:\n{self.logs()}")
            cancel.wait(0.5)

    def running(self) -> bool:
        result = self._docker("inspect", self.name)
        return result.returncode == 0 and json.loads(result.stdout)[0]["State"]["Running"] is True

    def logs(self) -> str:
        result = self._docker("logs", "--tail", "40", self.name)
        return (result.stdout + result.stderr)[-4000:]

    def stop(self, grace: int = 10) -> None:
        """SIGTERM through tini (the server drains and stops MMS), SIGKILL after ``grace`` s; removed."""
        self._docker("stop", "-t", str(grace), self.name, timeout=grace + 60)
        self._docker("rm", "-f", self.name)
        events.event("serve_container_stopped", container=self.name)

    def remove_leftover(self) -> bool:
        """Remove this endpoint dir's container if one is there (its endpoint process was killed):
        whether there was one. Only a container labelled for this dir is touched."""
        result = self._docker("ps", "-aq", "--filter", f"name=^/{self.name}$",
                              "--filter", f"label={LABEL}={self.endpoint_dir}")
        if result.returncode != 0 or not result.stdout.strip():
            return False
        self._docker("rm", "-f", self.name)
        events.warning("serve_container_leftover_removed", container=self.name)
        return True
