"""dogbreed.gpu: driver version parsing, the CUDA compat switch, image labels, the start-up line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dogbreed import gpu

# /proc/driver/nvidia/version as the proprietary and the open kernel modules write it.
PROC_470 = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"
            "GCC version:  gcc version 7.3.1 20180712 (Red Hat 7.3.1-17) (GCC) \n")
PROC_535_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.183.01  Release Build  "
                 "(dvs-builder@U16-I3-B03-4-3)  Sun May 12 19:39:15 UTC 2024\n"
                 "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04) \n")


@pytest.mark.parametrize(("text", "version"), [(PROC_470, "470.256.02"), (PROC_535_OPEN, "535.183.01"),
                                               ("", None), ("NVRM version: garbage\n", None)])
def test_parse_driver_version(text: str, version: str | None) -> None:
    assert gpu.parse_driver_version(text) == version


def test_host_driver_version_reads_the_proc_file(tmp_path: Path) -> None:
    proc = tmp_path / "version"
    proc.write_text(PROC_535_OPEN)
    assert gpu.host_driver_version(proc) == "535.183.01"


def test_version_order_is_numeric() -> None:
    assert gpu.version_key("535.104.12") > gpu.version_key("535.54.03")
    assert gpu.version_key("470.256.02") < gpu.version_key("525.60.13")


def _compat_dir(root: Path, driver: str) -> Path:
    """What cuda-compat-12-8 installs: libcuda.so.1 -> libcuda.so.<its driver version>."""
    compat = root / "compat"
    compat.mkdir()
    (compat / f"libcuda.so.{driver}").write_bytes(b"")
    (compat / "libcuda.so.1").symlink_to(f"libcuda.so.{driver}")
    return compat


def test_compat_driver_version_from_the_link(tmp_path: Path) -> None:
    assert gpu.compat_driver_version(_compat_dir(tmp_path, "570.124.06")) == "570.124.06"
    assert gpu.compat_driver_version(tmp_path / "absent") is None


@pytest.mark.parametrize(("driver", "compat", "on"), [
    ("470.256.02", "570.124.06", True),    # g4dn/g5/p4d (AWS: 470): older than the compat libs
    ("535.183.01", "570.124.06", True),    # g6/p5 (AWS: 535)
    ("570.124.06", "570.124.06", False),   # same driver: the host's own libcuda
    ("580.65.06", "570.124.06", False),    # newer host driver must not be shadowed
    ("470.256.02", None, False),           # no compat package in the image
    (None, "570.124.06", False),           # CPU host
])
def test_compat_switch(driver: str | None, compat: str | None, on: bool, tmp_path: Path) -> None:
    compat_dir = tmp_path / "compat"
    env = {"LD_LIBRARY_PATH": f"/usr/local/nvidia/lib64:{compat_dir}"}
    value = gpu.compat_library_path(env, driver, compat, compat_dir)
    if not on:
        assert value is None
        return
    # First, and only once; what was there stays after it.
    assert value == f"{compat_dir}:/usr/local/nvidia/lib64"
    assert gpu.compat_active({"LD_LIBRARY_PATH": value}, compat_dir)


def test_compat_env_command_prints_an_export_only_when_needed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/lib")
    monkeypatch.setattr(gpu, "compat_driver_version", lambda: "570.124.06")
    monkeypatch.setattr(gpu, "host_driver_version", lambda: "470.256.02")
    assert gpu.main(["compat-env"]) == 0
    out, err = capsys.readouterr()
    assert out == f"export LD_LIBRARY_PATH={gpu.CUDA_COMPAT_DIR}:/opt/lib\n"
    assert "event=cuda_compat compat=on driver=470.256.02 compat_driver=570.124.06" in err
    monkeypatch.setattr(gpu, "host_driver_version", lambda: "580.65.06")
    assert gpu.main(["compat-env"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "compat=off" in err


def test_image_labels_and_what_they_run_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = gpu.image_labels("12.8", None)
    assert labels == {gpu.LABEL_CUDA: "12.8", gpu.LABEL_MIN_DRIVER: "525.60.13",
                      gpu.LABEL_COMPAT: gpu.COMPAT_ABSENT}
    image = gpu.ImageCuda.from_labels(labels)
    assert image.runs_on("470.256.02") == (False, True)
    assert image.runs_on("535.183.01") == (True, False)
    with_compat = gpu.ImageCuda.from_labels(gpu.image_labels("12.8", "570.124.06"))
    assert with_compat.runs_on("470.256.02") == (True, True)
    assert gpu.ImageCuda.from_labels(gpu.image_labels(None, None)).runs_on("470.256.02") == (True, False)
    assert gpu.ImageCuda.from_labels({}) is None
    # The build reads the flavour file the dependency stage wrote.
    flavour = tmp_path / "torch-flavour"
    flavour.write_text("cuda-12.8\n")
    assert gpu.main(["labels", "--flavour-file", str(flavour)]) == 0
    printed = capsys.readouterr().out.split()
    assert f"--label={gpu.LABEL_CUDA}=12.8" in printed
    assert f"--label={gpu.LABEL_MIN_DRIVER}=525.60.13" in printed


def test_event_line(tmp_path: Path) -> None:
    assert gpu.event_line(False, "12.8", None) == "event=gpu device=cpu"
    on = {"LD_LIBRARY_PATH": f"{gpu.CUDA_COMPAT_DIR}:/x"}
    assert gpu.event_line(True, "12.8", "470.256.02", on) == \
        "event=gpu driver=470.256.02 cuda=12.8 compat=on"
    assert gpu.event_line(True, "12.8", "535.183.01", {}) == \
        "event=gpu driver=535.183.01 cuda=12.8 compat=off"


def test_standard_library_only() -> None:
    """The entry scripts run `python -m dogbreed.gpu` before torch loads: it must not import it."""
    import subprocess
    import sys

    code = "import sys, dogbreed.gpu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout.strip()
    assert out == "False"
