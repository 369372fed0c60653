"""What SageMaker and the NVIDIA runtime read from the images: labels (CUDA too), user, env,
commands, size."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from dockerlib import REPO_ROOT, docker, image_exists, inspect, split_image

from dogbreed import gpu

pytestmark = pytest.mark.docker

GB = 1000**3
# Measured: deps 8.21 GB (torch 2.10's CUDA 12.8 wheels; 6.47 GB with CUDA 13); train adds
# ~0.1 MB, serve ~270 MB (Java). Bounds leave headroom without letting a second copy of torch
# (or a baked compiler/cache) slip in unnoticed.
MAX_SIZE = {"train": 9.0 * GB, "serve": 9.5 * GB}
MAX_ON_TOP_OF_DEPS = {"train": 0.4 * GB, "serve": 0.6 * GB}


@pytest.fixture(params=["train", "serve"])
def image(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, request.getfixturevalue(f"{request.param}_image")


def env_of(image: str) -> dict[str, str]:
    return dict(e.split("=", 1) for e in inspect(image)["Config"]["Env"])


def test_serve_image_declares_multi_model_and_bind_to_port(serve_image: str) -> None:
    labels = inspect(serve_image)["Config"]["Labels"]
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"


def test_oci_labels(image: tuple[str, str]) -> None:
    kind, name = image
    labels = inspect(name)["Config"]["Labels"]
    version = subprocess.run(["python3", "docker/pyproject_info.py", "version"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == f"dogbreed-{kind}"
    assert labels["org.opencontainers.image.source"]
    revision = labels["org.opencontainers.image.revision"]
    assert re.fullmatch(r"[0-9a-f]{40}", revision), revision
    assert revision.startswith(split_image(name)[1]) or split_image(name)[1] == "latest"


def test_nvidia_runtime_env(image: tuple[str, str]) -> None:
    env = env_of(image[1])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_sagemaker_commands(train_image: str, serve_image: str) -> None:
    """SageMaker runs `docker run <image> train|serve`: both must be what the image runs."""
    train, serve = inspect(train_image)["Config"], inspect(serve_image)["Config"]
    assert train["Cmd"] == ["train"] and train["Entrypoint"][0] == "tini"
    assert serve["Cmd"] == ["serve"] and serve["Entrypoint"][0] == "tini"
    assert env_of(train_image)["SAGEMAKER_PROGRAM"] == "/opt/dogbreed/dogbreed_train.py"
    where = docker("run", "--rm", "--network", "host", "--entrypoint", "sh", train_image, "-c",
                   "for c in train dogbreed-train; do command -v $c; done && test -f $SAGEMAKER_PROGRAM && python -c 'import smdebug'").stdout
    assert where.split() == ["/opt/venv/bin/train", "/opt/venv/bin/dogbreed-train"]
    where = docker("run", "--rm", "--network", "host", "--entrypoint", "sh", serve_image, "-c",
                   "for c in serve dogbreed-serve java; do command -v $c; done").stdout
    assert where.split()[:2] == ["/usr/local/bin/serve", "/opt/venv/bin/dogbreed-serve"]


def test_serve_image_runs_as_root_and_as_model_server_when_asked(serve_image: str) -> None:
    """SageMaker expects root (page your-algorithms-inference-code); `--user model-server` stays
    available for local runs and can write where MMS writes (its cwd: logs/, and /tmp)."""
    assert inspect(serve_image)["Config"]["User"] in ("", "root", "0")
    uid = docker("run", "--rm", "--network", "host", "--entrypoint", "id", serve_image, "-u").stdout.strip()
    assert uid == "0"
    probe = docker("run", "--rm", "--network", "host", "--user", "model-server", "--entrypoint", "sh",
                   serve_image, "-c", "id -u && touch ./probe /tmp/probe && java -version 2>&1 | head -n 1")
    assert probe.stdout.split()[0] == "1000", probe.stdout


def test_cuda_labels_match_the_torch_inside(image: tuple[str, str]) -> None:
    """The labels say which CUDA the image's torch needs and the oldest driver that runs it; the
    train image's torch is a CUDA 12 build (SageMaker's documented GPU drivers run 12.x, not 13)."""
    kind, name = image
    labels = inspect(name)["Config"]["Labels"]
    probe = json.loads(docker("run", "--rm", "--network", "host", "--entrypoint", "python", name, "-c",
                              "import json, os, torch; print(json.dumps([torch.version.cuda, "
                              "os.path.exists('/usr/local/cuda/compat/libcuda.so.1')]))").stdout)
    cuda, has_compat = probe
    assert labels["dogbreed.cuda.version"] == (cuda or "none")
    if kind == "train":
        assert cuda and cuda.startswith("12."), f"train image torch is built for CUDA {cuda}"
    if cuda:
        assert labels["dogbreed.cuda.min-driver"] == gpu.MINOR_VERSION_COMPAT_MIN_DRIVER[int(cuda.split(".")[0])]
    assert (labels["dogbreed.cuda.compat"] != "absent") == has_compat, labels


def test_sizes_and_shared_dependency_layers(train_image: str, serve_image: str) -> None:
    deps = os.environ.get("DOGBREED_DEPS_IMAGE", f"dogbreed-deps:{split_image(train_image)[1]}")
    if not image_exists(deps):
        pytest.skip(f"dependency image {deps} not here (set DOGBREED_DEPS_IMAGE)")
    deps_info = inspect(deps)
    deps_layers = deps_info["RootFS"]["Layers"]
    sizes = {"deps": deps_info["Size"]}
    # The serve image has its own dependency image (its torch flavour, CPU by default); where
    # both flavours resolve to the same index it is the same image.
    serve_deps = os.environ.get("DOGBREED_SERVE_DEPS_IMAGE", f"{deps.rsplit(':', 1)[0]}-serve:{deps.rsplit(':', 1)[1]}")
    own_deps = {"train": deps_info, "serve": inspect(serve_deps) if image_exists(serve_deps) else deps_info}
    for kind, name in (("train", train_image), ("serve", serve_image)):
        deps_info = own_deps[kind]
        deps_layers = deps_info["RootFS"]["Layers"]
        info = inspect(name)
        sizes[kind] = info["Size"]
        # One dependency stage: both images are the deps image plus their own small layers.
        assert info["RootFS"]["Layers"][: len(deps_layers)] == deps_layers, f"{kind} does not share deps"
        assert info["Size"] < MAX_SIZE[kind], f"{kind} image is {info['Size'] / GB:.2f} GB"
        assert info["Size"] - deps_info["Size"] < MAX_ON_TOP_OF_DEPS[kind]
    print("image sizes (GB): " + ", ".join(f"{k}={v / GB:.2f}" for k, v in sizes.items()))


def _pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S))


def test_no_build_ca_or_host_pip_config_in_the_images(image: tuple[str, str]) -> None:
    name = image[1]
    env = env_of(name)
    leaked = [k for k in env if k.startswith("PIP_") and k not in ("PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_INPUT")]
    leaked += [k for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if k in env]
    assert not leaked, f"build-time settings left in the image env: {leaked}"
    docker("run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "sh", name, "-c",
           "test ! -e /etc/pip.conf && test ! -e /root/.config/pip && test ! -e /root/.pip "
           "&& test -z \"$(find /run/secrets /tmp /root/.cache -type f 2>/dev/null)\"")
    # Certificates only the build's CA bundle has (the TLS proxy's) must not be anywhere.
    bundle = Path(os.environ.get("CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        pytest.skip(f"no host CA bundle at {bundle} to compare with")
    image_bundle = docker("run", "--rm", "--network", "host", "--entrypoint", "cat", name,
                          "/etc/ssl/certs/ca-certificates.crt").stdout
    extra = _pem_blocks(bundle.read_text(errors="replace")) - _pem_blocks(image_bundle)
    for cert in list(extra)[:5]:
        needle = cert.splitlines()[3]  # a line of the certificate's own base64, not the header
        found = docker("run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "grep", name,
                       "-rlF", needle, "/etc", "/opt", "/root", "/home", "/usr/local", "/tmp",
                       check=False)
        assert found.returncode == 1, f"build CA found in the image: {found.stdout}"
