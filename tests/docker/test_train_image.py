"""The train image runs jobs as SageMaker does: `docker run <image> train`, /opt/ml in and out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dockerlib import TRAIN_HPS, TrainRun, docker, local_train, logs, unique, wait_for

pytestmark = pytest.mark.docker


def test_make_local_train_writes_model_metrics_and_plots(trained_models: dict[str, TrainRun]) -> None:
    for arch, run in trained_models.items():
        assert (run.model_dir / "model.pt").stat().st_size > 0, run.log()
        meta = json.loads((run.model_dir / "model.json").read_text())
        assert arch in json.dumps(meta)
        data = run.output_dir / "data"
        metrics = json.loads((data / "metrics.json").read_text())
        assert metrics, "empty metrics.json"
        assert list(data.glob("*.png")), f"no plots in {sorted(p.name for p in data.iterdir())}"
        assert not (run.output_dir / "failure").exists()
        assert (run.output_dir / "success").exists()  # written by sagemaker-training
        assert "Invoking script" in run.result.stdout + run.result.stderr  # went through the toolkit
        assert "event=gpu device=cpu" in run.result.stdout + run.result.stderr
        # The entry script filled in what SageMaker would have written and the run lacked.
        config = run.base / "input" / "config"
        assert json.loads((config / "inputdataconfig.json").read_text()) == {
            "training": {"TrainingInputMode": "File"}}
        assert json.loads((config / "resourceconfig.json").read_text())["hosts"] == ["localhost"]


def test_bad_hyperparameter_exits_non_zero_with_failure_file(
        train_image: str, sample_data: Path, tmp_path: Path) -> None:
    run = local_train(tmp_path / "job", {**TRAIN_HPS, "epochs": "zero"}, train_image, sample_data)
    assert run.result.returncode != 0, run.log()
    failure = (run.output_dir / "failure").read_text()
    assert "epochs" in failure and "zero" in failure, failure
    assert not (run.model_dir / "model.pt").exists()


def _sagemaker_layout(tmp_path: Path, hyperparameters: dict[str, str]) -> tuple[Path, list[str]]:
    """Config dir + separate model/output/checkpoint mounts, as a SageMaker training job has."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    channel = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
               "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": channel, "valid": channel}))
    (config / "resourceconfig.json").write_text(json.dumps({
        "current_host": "localhost", "hosts": ["localhost"], "current_group_name": "homogeneousCluster",
        "current_instance_type": "ml.m5.large", "network_interface_name": "lo"}))
    mounts = ["-v", f"{config}:/opt/ml/input/config"]
    for name in ("model", "output", "checkpoints"):
        (tmp_path / name).mkdir()
        mounts += ["-v", f"{tmp_path / name}:/opt/ml/{name}"]
    return tmp_path, mounts


def test_sagemaker_layout_with_one_channel_per_split(
        train_image: str, sample_data: Path, tmp_path: Path, containers: list[str]) -> None:
    """No /opt/ml mount: /opt/ml/code etc. come from the image, each split is its own channel."""
    base, mounts = _sagemaker_layout(tmp_path, {**TRAIN_HPS, "model": "mobilenet_v2", "epochs": "1"})
    name = unique("dogbreed-test-train")
    containers.append(name)
    result = docker("run", "--name", name, "--network", "host", *mounts,
                    "-v", f"{sample_data / 'train'}:/opt/ml/input/data/train:ro",
                    "-v", f"{sample_data / 'valid'}:/opt/ml/input/data/valid:ro",
                    train_image, "train", check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (base / "model" / "model.pt").is_file() and (base / "model" / "model.json").is_file()
    assert list((base / "output" / "data").glob("*.png"))


def test_sigterm_checkpoints_and_reports_the_stop(
        train_image: str, sample_data: Path, tmp_path: Path, containers: list[str]) -> None:
    """`docker stop` (as StopTrainingJob) reaches the training process through tini and the toolkit."""
    base, mounts = _sagemaker_layout(tmp_path, {**TRAIN_HPS, "epochs": "200"})
    name = unique("dogbreed-test-train-stop")
    containers.append(name)
    docker("run", "-d", "--name", name, "--network", "host", *mounts,
           "-v", f"{sample_data / 'train'}:/opt/ml/input/data/train:ro",
           "-v", f"{sample_data / 'valid'}:/opt/ml/input/data/valid:ro", train_image, "train")
    wait_for(lambda: "epoch=1 " in logs(name), timeout=300,
             what="the first epoch")
    started = time.monotonic()
    docker("stop", "-t", "90", name, timeout=120)
    stop_seconds = time.monotonic() - started
    state = json.loads(docker("inspect", name).stdout)[0]["State"]
    assert stop_seconds < 60, f"stop took {stop_seconds:.0f} s (SIGTERM not handled?)\n{logs(name)[-3000:]}"
    assert state["ExitCode"] != 0 and not state["OOMKilled"]
    assert "SIGTERM" in (base / "output" / "failure").read_text()
    assert list((base / "checkpoints").iterdir()), "no checkpoint written on SIGTERM"


def test_serve_in_the_train_image_is_refused_naming_the_serve_image(train_image: str) -> None:
    """What `estimator.deploy()` makes SageMaker run: one line that says which image serves."""
    result = docker("run", "--rm", "--network", "host", train_image, "serve", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dogbreed-serve" in lines[0] and "SDK" in lines[0], result.stderr
    assert result.stdout == ""


def _fake_gpu_host(root: Path, driver: str) -> list[str]:
    """Mounts that make a container see NVIDIA's compat package (libcuda.so.1 -> the 570 driver's)
    and a host driver (an `nvidia-smi` answering ``driver``; no /proc/driver/nvidia here)."""
    compat = root / "compat"
    compat.mkdir(parents=True)
    (compat / "libcuda.so.570.124.06").write_bytes(b"")
    (compat / "libcuda.so.1").symlink_to("libcuda.so.570.124.06")
    smi = root / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\n")
    smi.chmod(0o755)
    return ["-v", f"{compat}:/usr/local/cuda/compat:ro", "-v", f"{smi}:/usr/local/bin/nvidia-smi:ro"]


@pytest.mark.parametrize(("driver", "on"), [("470.256.02", True), ("580.65.06", False)])
@pytest.mark.parametrize("kind", ["train", "serve"])
def test_compat_libraries_switched_on_only_for_an_older_driver(
        kind: str, driver: str, on: bool, train_image: str, serve_image: str, tmp_path: Path) -> None:
    """The entry scripts put /usr/local/cuda/compat first on LD_LIBRARY_PATH only when the host
    driver is older than the compat libraries' (as AWS's start_cuda_compat.sh does)."""
    mounts = _fake_gpu_host(tmp_path, driver)
    if kind == "train":
        result = docker("run", "--rm", "--network", "host", *mounts, train_image,
                        "sh", "-c", 'echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"')
    else:  # `serve` execs dogbreed-serve: a stand-in first on PATH reports what it was given
        stand_in = tmp_path / "bin" / "dogbreed-serve"
        stand_in.parent.mkdir()
        stand_in.write_text('#!/bin/sh\necho "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"\n')
        stand_in.chmod(0o755)
        path = docker("run", "--rm", "--network", "host", "--entrypoint", "sh", serve_image, "-c",
                      'echo "$PATH"').stdout.strip()
        result = docker("run", "--rm", "--network", "host", *mounts, "-v", f"{stand_in.parent}:/opt/stand-in:ro",
                        "-e", f"PATH=/opt/stand-in:{path}", serve_image, "serve")
    paths = result.stdout.strip().removeprefix("LD_LIBRARY_PATH=").split(":")
    assert (paths[0] == "/usr/local/cuda/compat") == on, result.stdout + result.stderr
    assert f"event=cuda_compat compat={'on' if on else 'off'} driver={driver}" in result.stderr
