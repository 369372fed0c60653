"""Each image's torch flavour: recorded in the image, and nothing but torch pulls CUDA in."""

from __future__ import annotations

import json

import pytest
from dockerlib import docker

pytestmark = pytest.mark.docker

# Who requires the CUDA packages (nvidia-*, triton) in an image: only torch (and they each other).
CUDA_REQUIRERS = """
import importlib.metadata as md, json, re
def name(d): return re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
dists = {name(d): d for d in md.distributions()}
cuda = {n for n in dists if n.startswith("nvidia-") or n == "triton"}
requirers = {}
for n, d in dists.items():
    for req in d.requires or []:
        if "extra ==" in req:
            continue
        target = re.split(r"[ ;<>=!~\\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if target in cuda:
            requirers.setdefault(target, set()).add(n)
print(json.dumps({"cuda": sorted(cuda), "requirers": sorted({r for s in requirers.values() for r in s})}))
"""


@pytest.mark.parametrize("kind", ["train", "serve"])
def test_torch_flavour_is_recorded_and_only_torch_brings_cuda(kind: str, train_image: str, serve_image: str) -> None:
    image = train_image if kind == "train" else serve_image
    flavour = docker("run", "--rm", "--network", "host", "--entrypoint", "cat", image,
                     "/opt/venv/torch-flavour").stdout.strip()
    probe = docker("run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c",
                   "import torch; print(torch.version.cuda or 'cpu')").stdout.strip()
    assert flavour == ("cpu" if probe == "cpu" else f"cuda-{probe}")
    found = json.loads(docker("run", "--rm", "--network", "host", "--entrypoint", "python", image,
                              "-c", CUDA_REQUIRERS).stdout)
    if flavour == "cpu":
        assert found["cuda"] == [], found
    else:
        assert set(found["requirers"]) <= {"torch", "triton", *found["cuda"]}, found
