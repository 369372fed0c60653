"""`dogbreed train`/`tune` refuse, before any request, an instance family whose documented NVIDIA
driver cannot run the train image's CUDA (launcher/sagemaker/instances.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dogbreed import gpu
from dogbreed.launcher import cli
from dogbreed.launcher import settings as settings_mod
from dogbreed.launcher.sagemaker import instances
from dogbreed.launcher.sagemaker.backend import SageMakerBackend
from dogbreed.launcher.settings import Settings, SettingsError

AWS = ["--region", "us-west-2", "--role-arn", "arn:aws:iam::123456789012:role/sm", "--bucket", "b"]
PINNED = "123456789012.dkr.ecr.us-west-2.amazonaws.com/dogbreed-train@sha256:" + "0" * 64


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(settings_mod.FIELDS) + ["config"]:
        monkeypatch.delenv(settings_mod.env_name(name), raising=False)


def _record(workdir: Path, compat: str) -> None:
    """A `make push` record whose train image carries these CUDA labels."""
    workdir.mkdir(parents=True, exist_ok=True)
    entry = {"repository": "dogbreed-train", "reference": PINNED.split("@")[0] + ":abc",
             "digest": "sha256:" + "0" * 64, "pinned": PINNED,
             "labels": gpu.image_labels("12.8", None if compat == "absent" else compat)}
    (workdir / "pushed-images.json").write_text(json.dumps({"version": 1, "images": {"train": entry}}))


def test_the_table_is_the_documented_one() -> None:
    assert instances.DOCUMENTED_DRIVERS["g4dn"] == ("470", "11.4")
    assert instances.DOCUMENTED_DRIVERS["g6"] == ("535", "12.2")
    assert instances.DOCUMENTED_DRIVERS["p5en"] == ("550", "12.4")
    assert instances.instance_family("ml.p4de.24xlarge") == "p4de"


@pytest.mark.parametrize("command", ["train", "tune"])
def test_g4dn_is_refused_for_the_default_image_before_any_request(command: str, capsys, caplog) -> None:
    code = cli.main([command, "--dry-run", *AWS, "--instance-type", "ml.g4dn.xlarge"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE
    message = err + caplog.text
    assert "ml.g4dn.xlarge" in message and "driver 470" in message and "CUDA 12.x" in message
    assert "nvidia/cuda" in message and "ml.g6" in message  # the fixes
    assert out.strip() == ""  # no request printed


def test_default_instance_runs_the_default_image(capsys, caplog) -> None:
    caplog.set_level("INFO")
    assert cli.main(["train", "--dry-run", *AWS]) == 0
    request = json.loads(capsys.readouterr().out)["request"]
    assert request["ResourceConfig"]["InstanceType"] == "ml.g6.xlarge"
    assert "event=gpu_driver_check instance_type=ml.g6.xlarge driver=535" in caplog.text
    assert "compat=off" in caplog.text


def test_g4dn_passes_with_the_compat_libraries_and_says_so(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    _record(tmp_path / "work", compat="570.124.06")
    settings = Settings(region="us-west-2", role_arn="arn:aws:iam::123456789012:role/r", bucket="b",
                        workdir=str(tmp_path / "work"))
    sm = SageMakerBackend(settings, dry_run=True)
    sm.train(name="dogbreed-g4dn", hyperparameters={}, instance_type="ml.g4dn.xlarge")
    request = sm.recorded[-1].request
    assert request["AlgorithmSpecification"]["TrainingImage"] == PINNED
    assert "driver=470 cuda=12.8 compat=on compat_driver=570.124.06 source=\"image labels\"" in caplog.text


def test_recorded_labels_without_compat_are_refused_by_name(tmp_path: Path) -> None:
    _record(tmp_path / "work", compat="absent")
    settings = Settings(region="us-west-2", role_arn="arn:aws:iam::123456789012:role/r", bucket="b",
                        workdir=str(tmp_path / "work"))
    sm = SageMakerBackend(settings, dry_run=True)
    with pytest.raises(SettingsError, match=r"ml\.p4d\.24xlarge: AWS documents NVIDIA driver 470.*CUDA 12\.8"):
        sm.tune(instance_type="ml.p4d.24xlarge")
    assert sm.recorded == []


def test_unlisted_families_are_not_checked() -> None:
    instances.check_driver("ml.m5.xlarge", "x", None)
    instances.check_driver("ml.g6e.xlarge", "x", None)
