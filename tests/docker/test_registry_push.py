"""`make push REGISTRY=127.0.0.1:<port>` to a throwaway local registry; pull back and run.

The registry is Debian's `docker-registry` (scripts/docker-up.sh installs it) on a free port of
127.0.0.1, storing into a temp dir; it, and every tag this test makes, is removed afterwards.
(127.0.0.0/8 registries are plain-HTTP "insecure" by default: no engine change is needed.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerlib import REPO_ROOT, docker, free_port, inspect, make, split_image, wait_for

pytestmark = pytest.mark.docker


def _get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not Path(binary).exists():
        pytest.skip("no docker-registry binary (apt-get install docker-registry; make docker-up does)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(tmp_path / "registry.log", "w")
    process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _get_json(f"http://127.0.0.1:{port}/v2/") is not None or process.poll() is not None,
                 timeout=30, what="the registry")
        assert process.poll() is None, (tmp_path / "registry.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _image_torch() -> str:
    """The torch version docker/images.mk pins for the images (IMAGE_TORCH)."""
    text = (REPO_ROOT / "docker" / "images.mk").read_text()
    return re.search(r"^IMAGE_TORCH \?= torch==(\S+)", text, re.M).group(1)


def test_make_push_to_a_registry_then_pull_back_and_run(
        train_image: str, serve_image: str, registry: str, tmp_path: Path) -> None:
    (train_name, tag), (serve_name, serve_tag) = split_image(train_image), split_image(serve_image)
    assert tag == serve_tag, "make push pushes one TAG for both images"
    pushed: list[str] = []
    record_file = tmp_path / "pushed-images.json"  # never the checkout's .dogbreed/
    try:
        result = make("push", f"REGISTRY={registry}", f"TAG={tag}", f"PYTHON={sys.executable}",
                      f"TRAIN_IMAGE={train_name}", f"SERVE_IMAGE={serve_name}",
                      f"PUSHED_IMAGES={record_file}", timeout=1800)
        pushed = [line for line in result.stdout.split() if line.startswith(registry + "/")]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        expected = {f"{registry}/{repo}:{t}" for repo in ("dogbreed-train", "dogbreed-serve")
                    for t in dict.fromkeys([tag, "latest"])}
        assert set(pushed) == expected
        record = json.loads(record_file.read_text())
        assert record["tag"] == tag
        for kind, repo, local in (("train", "dogbreed-train", train_image),
                                  ("serve", "dogbreed-serve", serve_image)):
            entry = record["images"][kind]
            assert entry["reference"] == f"{registry}/{repo}:{tag}"
            assert entry["digest"].startswith("sha256:")
            assert entry["pinned"] == f"{registry}/{repo}@{entry['digest']}"
            # The image's CUDA labels, which the launcher checks against instance drivers.
            assert entry["labels"] == {k: v for k, v in inspect(local)["Config"]["Labels"].items()
                                       if k.startswith("dogbreed.cuda.")}
            assert entry["labels"]["dogbreed.cuda.version"] != ""

        catalog = _get_json(f"http://{registry}/v2/_catalog")
        assert {"dogbreed-train", "dogbreed-serve"} <= set(catalog["repositories"])
        for repo in ("dogbreed-train", "dogbreed-serve"):
            tags = _get_json(f"http://{registry}/v2/{repo}/tags/list")["tags"]
            assert {tag, "latest"} <= set(tags)

        # Pull back: drop the registry tags, pull them, check it is the same image and it runs.
        for local, repo in ((train_image, "dogbreed-train"), (serve_image, "dogbreed-serve")):
            remote = f"{registry}/{repo}:{tag}"
            docker("rmi", remote)
            docker("pull", remote, timeout=1200)
            assert inspect(remote)["Id"] == inspect(local)["Id"]
            out = docker("run", "--rm", "--network", "host", "--entrypoint", "python", remote, "-c",
                         "import dogbreed.train, torch; print('ok', torch.__version__)", timeout=300).stdout
            assert out.startswith(f"ok {_image_torch()}"), out
    finally:
        for ref in pushed:
            docker("rmi", ref, check=False)
