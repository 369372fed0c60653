"""``dogbreed batch --local`` through the real server (front + MMS + Java + handler), single-model
mode, over the sample test split: one ``.out`` per image, ``summary.csv``, the trainer's own
test accuracy, a corrupt file recorded and skipped past, and a rerun that predicts only what is
missing."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from servelib import TrainedModel, stalled_java, wait_for_start

from dogbreed.launcher import cli
from dogbreed.launcher.local import batch

pytestmark = pytest.mark.slow


def trainer_test_accuracy(model: TrainedModel) -> float:
    metrics = model.model_dir.parent / "output" / "data" / "metrics.json"
    if not metrics.is_file():
        pytest.skip(f"{model.model_dir} was trained elsewhere (DOGBREED_SERVE_TRAINED_MODELS): "
                    "no trainer metrics to compare with")
    return json.loads(metrics.read_text())["metrics"]["test_accuracy"]


def test_local_batch_through_the_server(serve_models: dict[str, TrainedModel], sample_data: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dogbreed.launcher")
    model = serve_models["resnet18"]
    images = Path(shutil.copytree(sample_data / "test", tmp_path / "in"))
    (images / "001.Beagle" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    output = tmp_path / "out"
    inputs = sorted(p for p in images.rglob("*") if p.is_file())

    assert cli.main(["batch", "--local", str(model.model_dir), str(images), str(output),
                     "--workers", "2"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["execution_parameters"] == {"MaxConcurrentTransforms": 2, "BatchStrategy": "SINGLE_RECORD",
                                               "MaxPayloadInMB": 6}
    assert summary["files"] == summary["predicted"] == len(inputs) == 21
    assert summary["errors"] == 1 and summary["images_per_sec"] > 0
    # Same pixels, same model: the served batch scores exactly what the trainer scored.
    assert summary["judged"] == 20
    # (the trainer reports a float32 mean: 0.2 is 0.20000000298...)
    assert summary["accuracy"] == pytest.approx(trainer_test_accuracy(model), abs=1e-6)
    assert "event=batch_progress done=21 total=21" in caplog.text  # not a TTY: event lines, no bar
    assert "event=batch_done" in caplog.text

    outs = sorted(p for p in output.rglob("*.out"))
    assert [p.relative_to(output) for p in outs] == [
        Path(str(p.relative_to(images)) + batch.OUT_SUFFIX) for p in inputs]
    corrupt = json.loads((output / "001.Beagle" / "corrupt.jpg.out").read_text())
    assert corrupt["status"] == 400 and "HTTP 400" in corrupt["error"], corrupt
    answer = json.loads(outs[-1].read_text())
    assert answer["model"] == "model" and answer["arch"] == "resnet18"
    assert answer["predictions"][0]["class_name"] in model.class_names
    with open(output / batch.SUMMARY_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 21
    assert [r["file"] for r in rows if r["error"]] == ["001.Beagle/corrupt.jpg"]
    assert sum(int(r["correct"]) for r in rows if r["correct"]) / 20 == summary["accuracy"]

    # Rerun from the model.tar.gz (unpacked once by the server) with one output gone: only that
    # file is predicted again; the corrupt file's 4xx record counts as finished.
    outs[3].unlink()
    assert cli.main(["batch", "--local", str(model.archive), str(images), str(output), "--workers", "1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["predicted"], again["skipped_finished"], again["errors"]) == (1, 20, 1)
    assert again["execution_parameters"]["MaxConcurrentTransforms"] == 1
    assert again["accuracy"] == summary["accuracy"]
    assert outs[3].is_file()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:200]}")
    return found


def test_ctrl_c_during_server_start_up_stops_the_server(serve_models: dict[str, TrainedModel],
                                                        sample_data: Path, tmp_path: Path) -> None:
    """`timeout --preserve-status -s INT 2 dogbreed batch --local …` exited 130 and left MMS
    (java) running with parent 1: only a ServerError stopped the server. The signal lands
    where that one did: MMS (a java that never answers) and the zygote started, the server
    still waiting to be ready (wait_ready)."""
    command = [str(Path(sys.executable).with_name("dogbreed")), "batch", "--local",
               str(serve_models["resnet18"].archive), str(sample_data / "test"), str(tmp_path / "out")]
    java_home = tmp_path / "java"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=stalled_java(java_home))
    try:
        wait_for_start(java_home, process)  # start-up is held there until the signal
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, rest[-3000:]
    assert "event=batch_server_ready" not in rest  # it really was interrupted during start-up
    run_dir = re.search(r"event=start_mms run_dir=(\S+)", rest).group(1)
    temp_dir = str(Path(run_dir).parent)
    assert Path(temp_dir).name.startswith("dogbreed-batch-")
    deadline = time.monotonic() + 2  # stop() waited for MMS and the zygote; workers are SIGKILLed
    while _processes_mentioning(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_mentioning(temp_dir)
    for line in left:  # ours (named by our run's temp dir): do not leave them to the next test
        with contextlib.suppress(OSError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert left == [], "MMS / zygote left running"
    assert not Path(temp_dir).exists()


def test_local_batch_by_training_job_name(serve_models: dict[str, TrainedModel], sample_data: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`batch --local best-1 IN OUT`: the local job's output/model.tar.gz, as its help says
    ("or a training job name"); it used to answer "no such model best-1"."""
    workdir = tmp_path / "work"
    packed = workdir / "jobs" / "best-1" / "output" / "model.tar.gz"
    packed.parent.mkdir(parents=True)
    shutil.copyfile(serve_models["resnet18"].archive, packed)
    images = tmp_path / "in"
    images.mkdir()
    for photo in sorted((sample_data / "test").rglob("*.jpg"))[:3]:
        shutil.copy(photo, images / photo.name)
    assert cli.main(["batch", "--local", "--workdir", str(workdir), "best-1", str(images),
                     str(tmp_path / "out"), "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(packed)
    assert (summary["files"], summary["predicted"], summary["errors"]) == (3, 3, 0)


def test_local_batch_rerun_with_another_model_predicts_every_file_again(
        serve_models: dict[str, TrainedModel], sample_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The README's two `batch --local` lines write to one folder: the second model used to
    report `"predicted": 0` and the first model's accuracy. A new SageMaker transform job into
    the same output prefix overwrites every `<name>.out`; so does a rerun with another model."""
    images = tmp_path / "in"
    for photo in sorted((sample_data / "test").rglob("*.jpg"))[:4]:
        (images / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, images / photo.parent.name / photo.name)
    output = tmp_path / "predictions"

    def batch_run(model: Path) -> dict:
        assert cli.main(["batch", "--local", str(model), str(images), str(output), "--workers", "1"]) == 0
        return json.loads(capsys.readouterr().out)

    first = batch_run(serve_models["resnet18"].archive)
    assert first["predicted"] == 4
    second = batch_run(serve_models["mobilenet_v2"].model_dir)
    assert (second["predicted"], second["skipped_finished"]) == (4, 0)
    assert second["replaced_outputs_of"] == str(serve_models["resnet18"].archive.resolve())
    outs = sorted(output.rglob("*.out"))
    assert len(outs) == 4 and {json.loads(p.read_text())["arch"] for p in outs} == {"mobilenet_v2"}
    # The same model again (packed this time): nothing to predict, no server started.
    third = batch_run(serve_models["mobilenet_v2"].archive)
    assert (third["predicted"], third["skipped_finished"]) == (0, 4)
    assert third["accuracy"] == second["accuracy"]
