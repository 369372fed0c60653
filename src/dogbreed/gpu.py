"""The NVIDIA driver, the image's CUDA runtime, and NVIDIA's CUDA forward-compatibility libraries.

Three facts decide whether a CUDA build of torch runs on a GPU host:

- the host's kernel driver version (``/proc/driver/nvidia/version``, else ``nvidia-smi``);
- the CUDA release torch was built for (``torch.version.cuda``; in the images also
  ``/opt/venv/torch-flavour``, written at build time, so it is known without importing torch);
- whether the image carries NVIDIA's forward-compatibility package (``cuda-compat-<major>-<minor>``
  installs ``/usr/local/cuda/compat/libcuda.so.1 -> libcuda.so.<driver version>``; images built
  FROM an ``nvidia/cuda`` base have it).

Minor-version compatibility (NVIDIA "CUDA Compatibility" guide, table "CUDA Toolkit 11.x, 12.x,
and 13.x Minimum and Maximum Required Driver Versions"): a CUDA 12.x runtime runs on any driver
>= 525.60.13, 13.x needs >= 580. An older driver needs the compat libraries, and they are used
only when put on ``LD_LIBRARY_PATH`` — and only while the host driver is older than the compat
library's own, or they would shadow a newer host driver. That is the start-up switch AWS
publishes (SageMaker developer guide, page ``inference-gpu-drivers``, and the Deep Learning
Containers' ``start_cuda_compat.sh``): the images' entry scripts run ``python -m dogbreed.gpu
compat-env`` and eval its output before anything loads libcuda. NVIDIA Container Toolkit >=
1.17.4 no longer mounts the compat libraries itself (page ``container-nvidia-compliance``).

Standard library only: the entry scripts run this before torch is imported.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

NVIDIA_VERSION_FILE = Path("/proc/driver/nvidia/version")
# Where cuda-compat-* installs (the nvidia/cuda images link /usr/local/cuda to the versioned dir).
CUDA_COMPAT_DIR = Path("/usr/local/cuda/compat")
# Written by docker/Dockerfile.deps: "cuda-<version>" or "cpu".
TORCH_FLAVOUR_FILE = Path("/opt/venv/torch-flavour")

# NVIDIA "CUDA Compatibility", minor-version compatibility: the oldest driver each CUDA major
# release runs on without the compat libraries (11.x: 450.80.02, the example the guide gives).
MINOR_VERSION_COMPAT_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}

# Image labels (docker/images.mk passes them to `docker build --label`; the launcher reads
# them from the `make push` record).
LABEL_CUDA = "dogbreed.cuda.version"
LABEL_MIN_DRIVER = "dogbreed.cuda.min-driver"
LABEL_COMPAT = "dogbreed.cuda.compat"
COMPAT_ABSENT = "absent"


def version_key(version: str) -> tuple[int, ...]:
    """``"535.104.12"`` -> (535, 104, 12): numeric order, as ``sort -V`` compares them."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def parse_driver_version(text: str) -> str | None:
    """``NVRM version: NVIDIA UNIX [Open ]Kernel Module[ for x86_64]  535.183.01  ...`` -> 535.183.01."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9]+(?:\.[0-9]+)+)", text)
    return match.group(1) if match else None


def host_driver_version(version_file: Path = NVIDIA_VERSION_FILE) -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``, else nvidia-smi)."""
    try:
        version = parse_driver_version(version_file.read_text(errors="replace"))
        if version:
            return version
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    return line or None


def compat_driver_version(compat_dir: Path = CUDA_COMPAT_DIR) -> str | None:
    """The driver version the compat libraries were built from, or None when they are absent:
    ``libcuda.so.1 -> libcuda.so.570.124.06`` -> ``570.124.06`` (as ``start_cuda_compat.sh``
    reads it: the link target's name after ``libcuda.so.``)."""
    link = compat_dir / "libcuda.so.1"
    if not link.exists():
        return None
    target = os.readlink(link) if link.is_symlink() else link.name
    version = Path(target).name.split(".", 2)[2] if Path(target).name.count(".") >= 2 else ""
    return version if re.fullmatch(r"\d+(\.\d+)+", version) else None


def cuda_min_driver(cuda: str) -> str | None:
    """The oldest driver a CUDA ``cuda`` runtime runs on without the compat libraries."""
    return MINOR_VERSION_COMPAT_MIN_DRIVER.get(version_key(cuda)[0]) if cuda else None


def compat_needed(driver: str, compat_driver: str | None) -> bool:
    """The AWS/DLC rule: use the compat libraries only when the host driver is older than
    theirs (a newer host driver must not be shadowed by an older user-mode libcuda)."""
    return compat_driver is not None and version_key(driver) < version_key(compat_driver)


def _paths(value: str) -> list[str]:
    return [p for p in value.split(":") if p]


def compat_active(env: Mapping[str, str] | None = None, compat_dir: Path = CUDA_COMPAT_DIR) -> bool:
    """True when the compat libraries are on ``LD_LIBRARY_PATH`` (the switch is on)."""
    env = os.environ if env is None else env
    return str(compat_dir) in _paths(env.get("LD_LIBRARY_PATH", ""))


def compat_library_path(env: Mapping[str, str], driver: str | None,
                        compat_driver: str | None, compat_dir: Path = CUDA_COMPAT_DIR) -> str | None:
    """The ``LD_LIBRARY_PATH`` to start with: the compat dir first when needed, else None
    (leave it as it is). No driver (a CPU host) never needs them."""
    if driver is None or not compat_needed(driver, compat_driver):
        return None
    rest = [p for p in _paths(env.get("LD_LIBRARY_PATH", "")) if p != str(compat_dir)]
    return ":".join([str(compat_dir), *rest])


@dataclass(frozen=True)
class ImageCuda:
    """What an image's labels say about its CUDA (see :func:`image_labels`)."""

    cuda: str | None  # None: CPU build
    min_driver: str | None  # without the compat libraries
    compat_driver: str | None  # None: no compat libraries in the image

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> ImageCuda | None:
        if LABEL_CUDA not in labels:
            return None
        cuda = labels[LABEL_CUDA]
        compat = labels.get(LABEL_COMPAT, COMPAT_ABSENT)
        return cls(cuda=None if cuda == "none" else cuda,
                   min_driver=labels.get(LABEL_MIN_DRIVER) or None,
                   compat_driver=None if compat == COMPAT_ABSENT else compat)

    def runs_on(self, driver: str) -> tuple[bool, bool]:
        """(runs, with_compat) for a host with ``driver``."""
        if self.cuda is None or self.min_driver is None:
            return True, False
        if version_key(driver) >= version_key(self.min_driver):
            return True, False
        # Older than minor-version compatibility allows: only the compat libraries help.
        return compat_needed(driver, self.compat_driver), True


def torch_flavour_cuda(flavour_file: Path = TORCH_FLAVOUR_FILE) -> str | None:
    """The image's CUDA version from the build-time flavour file (None: CPU build or no file)."""
    try:
        flavour = flavour_file.read_text().strip()
    except OSError:
        return None
    return flavour.removeprefix("cuda-") if flavour.startswith("cuda-") else None


def image_labels(cuda: str | None, compat_driver: str | None) -> dict[str, str]:
    """The labels an image carries: its CUDA version, the oldest driver it runs on without the
    compat libraries, and the compat libraries' driver version (or ``absent``)."""
    return {LABEL_CUDA: cuda or "none",
            LABEL_MIN_DRIVER: (cuda_min_driver(cuda) if cuda else None) or "none",
            LABEL_COMPAT: compat_driver or COMPAT_ABSENT}


def event_line(cuda_device: bool, cuda: str | None, driver: str | None,
               env: Mapping[str, str] | None = None) -> str:
    """The trainer's start-up line: ``event=gpu driver=... cuda=... compat=on|off`` when it
    trains on a GPU, ``event=gpu device=cpu`` otherwise."""
    if not cuda_device:
        return "event=gpu device=cpu"
    compat = "on" if compat_active(env) else "off"
    return f"event=gpu driver={driver or 'unknown'} cuda={cuda or 'none'} compat={compat}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dogbreed.gpu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("compat-env", help="print `export LD_LIBRARY_PATH=...` when the compat "
                                      "libraries must be used on this host (else nothing)")
    labels = sub.add_parser("labels", help="print this image's CUDA labels as `--label k=v` "
                                           "arguments for docker build")
    labels.add_argument("--flavour-file", type=Path, default=TORCH_FLAVOUR_FILE)
    args = parser.parse_args(argv)
    if args.command == "compat-env":
        driver, compat = host_driver_version(), compat_driver_version()
        value = compat_library_path(os.environ, driver, compat)
        if compat is not None:
            print(f"event=cuda_compat compat={'on' if value else 'off'} driver={driver or 'none'} "
                  f"compat_driver={compat} dir={CUDA_COMPAT_DIR}", file=sys.stderr)
        if value is not None:
            print(f"export LD_LIBRARY_PATH={shlex.quote(value)}")
        return 0
    for key, value in image_labels(torch_flavour_cuda(args.flavour_file), compat_driver_version()).items():
        print(f"--label={key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
