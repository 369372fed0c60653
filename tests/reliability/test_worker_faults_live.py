"""Worker faults through the real local endpoint (router + dogbreed-serve + MMS + the zygote):
a worker killed while its model reloads, a worker killed under a request, a worker out of
memory. Each waits on what the processes do (a new worker process, a line in MMS's log, a
request tracked by the front), never on a sleep."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from dogbreed import artifacts, data, models
from dogbreed.launcher.local.endpoint import LocalEndpoint
from dogbreed.launcher.local.router import ModelStore, mms_model_name
from dogbreed.serve import WORKER_MEMORY_ENV

pytestmark = pytest.mark.slow

SMALL, BIG = "small/model.tar.gz", "big/model.tar.gz"
# Worker memory limit for the out-of-memory test: a 32 px MobileNetV2 loads and predicts in
# about 35 MB more than the zygote; at 1024 px one activation alone is 96 MB.
WORKER_MEMORY_MB = "150"


def write_archive(root: Path, name: str, image_size: int, arch: str = "mobilenet_v2") -> Path:
    import torch

    torch.manual_seed(0)
    model = models.build_model(arch, 3, models.WEIGHTS_NONE).eval()
    metadata = artifacts.ModelMetadata(
        arch=arch, class_names=[f"{i + 1:03d}.Breed_{i}" for i in range(3)], image_size=image_size,
        resize_size=data.resize_size_for(image_size), mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    artifacts.save_model_dir(root / "dirs" / name, model, metadata)
    return artifacts.pack(root / "dirs" / name, root / "archives" / name / artifacts.ARCHIVE_NAME)


def jpeg(size: int = 48) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def post(port: int, path: str, body: bytes, headers: dict[str, str],
         timeout: float = 60) -> tuple[int, dict[str, str], dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, headers)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def invoke(endpoint: LocalEndpoint, target: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    return post(int(endpoint.url.rsplit(":", 1)[1]), "/invocations", jpeg(),
                {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": target})


def delete(endpoint: LocalEndpoint, name: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.server.port, timeout=60)
    try:
        conn.request("DELETE", f"/models/{name}")
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.005)


def workers(endpoint: LocalEndpoint) -> list[psutil.Process]:
    return psutil.Process(endpoint.server.zygote.pid).children()


def worker_socket(endpoint: LocalEndpoint, name: str) -> str:
    """The unix socket MMS talks to ``name``'s worker on (from MMS's shim for it)."""
    shims = psutil.Process(endpoint.server.java.pid).children()
    argv = next(p.cmdline() for p in shims if name in p.cmdline())
    return argv[argv.index("--sock-name") + 1]


def socket_owner(path: str) -> tuple[int, int]:
    """(pid, bytes queued unread) of the connected socket on ``path`` (``ss``: Recv-Q, users)."""
    out = subprocess.run(["ss", "-x", "-p", "-H"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[1] == "ESTAB" and fields[4] == path and "pid=" in line:
            return int(re.search(r"pid=(\d+)", line).group(1)), int(fields[2])
    raise LookupError(path)


def served_within(endpoint: LocalEndpoint, target: str, seconds: float) -> float:
    """Seconds until ``target`` answers 200 again (fails the test after ``seconds``)."""
    started = time.monotonic()
    while True:
        status, _, body = invoke(endpoint, target)
        if status == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, (status, body)
        time.sleep(0.05)  # a caller backing off between retries, as the SDKs do


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEndpoint]:
    work = tmp_path_factory.mktemp("worker-faults")
    store = ModelStore(work / "store")
    store.add("small", write_archive(work / "models", "small", 32))
    store.add("big", write_archive(work / "models", "big", 1024))
    previous = os.environ.get(WORKER_MEMORY_ENV)
    os.environ[WORKER_MEMORY_ENV] = WORKER_MEMORY_MB  # the zygote and MMS inherit it
    try:
        with LocalEndpoint(store.root, work / "run", endpoint_name="faults", max_loaded=4) as live:
            yield live
    finally:
        if previous is None:
            os.environ.pop(WORKER_MEMORY_ENV, None)
        else:
            os.environ[WORKER_MEMORY_ENV] = previous


def test_a_worker_killed_during_a_reload_does_not_take_the_model_out_of_service(endpoint: LocalEndpoint) -> None:
    """The soak's fault: MMS answered that load 500 "Failed to start workers", the router kept it
    as a refused model and every later invoke was a 424 until the endpoint restarted."""
    assert invoke(endpoint, SMALL)[0] == 200
    log = endpoint.run_dir / "model-server.log"
    connected = log.read_text(errors="replace").count("Connection accepted")
    before = {p.pid for p in workers(endpoint)}
    assert delete(endpoint, mms_model_name(SMALL)) == 200  # as SageMaker unloads an idle model
    answers: list[int] = []
    reload = threading.Thread(target=lambda: answers.append(invoke(endpoint, SMALL)[0]))
    reload.start()
    # The new worker has said hello to MMS and is loading the model: kill it now.
    victim = wait_for(lambda: log.read_text(errors="replace").count("Connection accepted") > connected
                      and [p for p in workers(endpoint) if p.pid not in before], "the reload's worker start")
    os.kill(victim[0].pid, signal.SIGKILL)
    reload.join(60)
    assert answers and answers[0] in (200, 424, 503), answers
    assert served_within(endpoint, SMALL, 10) < 10
    assert SMALL not in endpoint.router.describe()["failed"]


def test_a_request_held_by_a_killed_worker_gets_503_with_retry_after(endpoint: LocalEndpoint) -> None:
    """Was MMS's 500 "Worker died."; the platform retries a 503 with Retry-After."""
    assert invoke(endpoint, SMALL)[0] == 200
    name = mms_model_name(SMALL)
    path = worker_socket(endpoint, name)
    handler = psutil.Process(socket_owner(path)[0])  # MMS's worker forks one per connection
    worker = next(p for p in [handler, *handler.parents()] if p.ppid() == endpoint.server.zygote.pid)
    os.kill(handler.pid, signal.SIGSTOP)  # holds the next request inside the worker
    models_in_front = endpoint.server.front.models
    answer: list[tuple[int, dict[str, str], dict[str, Any]]] = []
    port = endpoint.server.port
    request = threading.Thread(target=lambda: answer.append(post(
        port, f"/models/{name}/invoke", jpeg(), {"Content-Type": "image/jpeg"})))
    request.start()
    wait_for(lambda: models_in_front.in_flight.get(name) and socket_owner(path)[1],
             "the request reaching the stopped worker")
    os.kill(worker.pid, signal.SIGKILL)
    request.join(60)
    status, headers, body = answer[0]
    assert status == 503 and headers.get("retry-after"), (status, body)
    assert served_within(endpoint, SMALL, 10) < 10


def test_a_model_out_of_memory_gets_507_is_unloaded_and_the_others_keep_serving(endpoint: LocalEndpoint) -> None:
    """With a memory limit per worker, the 1024 px model's forward cannot allocate: its caller
    gets the multi-model contract's 507 and the model is unloaded, instead of MMS looping it
    through reloads; the small model answers throughout."""
    assert invoke(endpoint, SMALL)[0] == 200
    big = mms_model_name(BIG)
    status, _, body = invoke(endpoint, BIG)  # the router loads it, the forward runs out of memory
    assert status == 424 and body["OriginalStatusCode"] == 507, body
    front = endpoint.server.front.models
    wait_for(lambda: big not in front.registered and big not in front.paused, "the unload of the big model")
    assert big not in endpoint.server.client.list_models()
    assert BIG not in endpoint.router.describe()["loaded"]
    assert invoke(endpoint, SMALL)[0] == 200
    assert BIG not in endpoint.router.describe()["failed"]  # a later request may try it again


def test_a_dead_zygote_is_reaped_and_restarted_and_leaves_no_orphan_worker(endpoint: LocalEndpoint) -> None:
    """Under `deploy --local` a killed zygote stayed a zombie, was never restarted, and its model
    kept answering from an orphaned worker (MMS's per-connection child, parent PID 1)."""
    assert invoke(endpoint, SMALL)[0] == 200
    server = endpoint.server
    old = psutil.Process(server.zygote.pid)
    family = old.children(recursive=True)
    assert family
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: server.zygote.pid != old.pid and server._zygote_ready.is_set(), "a new zygote")
    wait_for(lambda: not psutil.pid_exists(old.pid), "the dead zygote being reaped")
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
             "the old zygote's workers ending")
    assert served_within(endpoint, SMALL, 30) < 30
    assert psutil.Process(server.zygote.pid).children()  # the reloaded model's worker is the new zygote's


def test_the_run_dir_keeps_only_the_live_workers_sockets_and_fifos(endpoint: LocalEndpoint) -> None:
    """Every worker start left 2 FIFOs and a socket behind (94 FIFOs after 16 minutes); after
    the kills, reloads and the zygote restart above, only what live workers use remains."""
    import stat

    assert invoke(endpoint, SMALL)[0] == 200
    mms_dir = endpoint.server.run_dir
    server = endpoint.server

    def leftovers() -> tuple[list[str], list[str]]:
        live = {worker_socket(endpoint, n) for n in server.front.models.registered}
        kinds = {p.name: p.lstat().st_mode for p in mms_dir.iterdir()}
        sockets = [n for n, m in kinds.items() if stat.S_ISSOCK(m) and n.startswith(".mms.sock.")
                   and str(mms_dir / n) not in live]
        fifos = [n for n, m in kinds.items() if stat.S_ISFIFO(m)]
        return sockets, fifos if len(fifos) > 2 * len(live) else []

    wait_for(lambda: leftovers() == ([], []), "the dead workers' files going")
