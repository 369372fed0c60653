"""GPU instance families and the NVIDIA driver AWS documents for them: refuse, before any request
is sent, a training host whose driver cannot run the train image's CUDA.

The table is SageMaker's "Current versions and supported instance families" for real-time
inference (developer guide, page ``inference-gpu-drivers``). AWS publishes no driver table for
training hosts; the same instance families are assumed to run the same driver there. That is
the conservative reading: AWS's own training Deep Learning Containers carry NVIDIA's
forward-compatibility libraries precisely so that a newer CUDA runs on these older drivers
(aws/deep-learning-containers, ``start_cuda_compat.sh``). A family missing from the table
(CPU families, ml.g6e, ml.p6, ...) is not checked.

What the image needs comes from its ``dogbreed.cuda.*`` labels (dogbreed/gpu.py; ``make push``
copies them into the pushed-images record). An image without a record (``--train-image``,
``--latest-images``) is taken to be what ``make build`` makes by default: a CUDA 12.x build
without the compat libraries.
"""

from __future__ import annotations

import re
from typing import Any

from dogbreed import gpu
from dogbreed.launcher import events
from dogbreed.launcher.sagemaker import images
from dogbreed.launcher.settings import SettingsError

DRIVER_PAGE = "https://docs.aws.amazon.com/sagemaker/latest/dg/inference-gpu-drivers.html"

# Instance family -> (NVIDIA driver branch, the CUDA version AWS lists with it); page above.
DOCUMENTED_DRIVERS: dict[str, tuple[str, str]] = {
    **{family: ("470", "11.4") for family in ("p2", "p3", "p3dn", "p4d", "p4de", "g4dn", "g5")},
    **{family: ("535", "12.2") for family in ("p5", "g6")},
    **{family: ("550", "12.4") for family in ("p5e", "p5en")},
}

# What `make build` makes when nothing else is known (docker/images.mk IMAGE_TORCH: PyPI's torch
# on CUDA 12 wheels; the compat libraries need an nvidia/cuda BASE_IMAGE).
DEFAULT_BUILD = gpu.ImageCuda(cuda="12.x", min_driver=gpu.MINOR_VERSION_COMPAT_MIN_DRIVER[12],
                              compat_driver=None)


def instance_family(instance_type: str) -> str:
    """``ml.g4dn.xlarge`` -> ``g4dn``."""
    match = re.fullmatch(r"ml\.([a-z0-9-]+)\.[a-z0-9-]+", instance_type)
    return match.group(1) if match else instance_type


def recorded_image_cuda(settings: Any, image: str) -> gpu.ImageCuda | None:
    """The CUDA facts ``make push`` recorded for ``image`` (None: not the recorded image)."""
    record = images.load_record(images.record_path(settings))
    for entry in (record or {}).get("images", {}).values():
        if image in (entry.get("pinned"), entry.get("reference")):
            return gpu.ImageCuda.from_labels(entry.get("labels") or {})
    return None


def check_driver(instance_type: str, image: str, image_cuda: gpu.ImageCuda | None) -> None:
    """Raise SettingsError when ``instance_type``'s documented driver cannot run ``image``."""
    family = instance_family(instance_type)
    documented = DOCUMENTED_DRIVERS.get(family)
    if documented is None:
        return
    driver, driver_cuda = documented
    known = image_cuda is not None
    needs = image_cuda or DEFAULT_BUILD
    runs, with_compat = needs.runs_on(driver)
    source = "image labels" if known else "assumed: the default `make build`, no labels recorded"
    if runs:
        events.event("gpu_driver_check", instance_type=instance_type, driver=driver,
                     cuda=needs.cuda or "none", compat="on" if with_compat else "off",
                     compat_driver=needs.compat_driver, source=source)
        return
    raise SettingsError(
        f"{instance_type}: AWS documents NVIDIA driver {driver} (CUDA {driver_cuda}) on ml.{family} "
        f"({DRIVER_PAGE}), which cannot run the train image {image} (CUDA {needs.cuda}: driver >= "
        f"{needs.min_driver}, no CUDA forward-compatibility libraries; {source}). Fix: a "
        f"family with a newer driver ({', '.join(_newer_families(needs))}), or build the image "
        f"FROM an nvidia/cuda 12.x base, which carries the compat libraries "
        f"(`make build push BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04`; README 'GPU drivers')")


def _newer_families(needs: gpu.ImageCuda) -> list[str]:
    return [f"ml.{family}" for family, (driver, _) in DOCUMENTED_DRIVERS.items()
            if needs.runs_on(driver)[0]]


def checked_train_image(backend: Any, instance_type: str | None) -> str:
    """The train image for a training or tuning request, refused (SettingsError) when the
    instance's documented driver cannot run it."""
    image = backend.image_uri("train")
    check_driver(instance_type or backend.settings.train_instance_type, image,
                 recorded_image_cuda(backend.settings, image))
    return image
