"""``dogbreed batch --local`` through the real server (front + MMS + Java + handler), single-model
mode, over the sample test split: one ``.out`` per image, ``summary.csv``, the trainer's own
test accuracy, a corrupt file recorded and skipped past, and a rerun that predicts only what is
missing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from servelib import TrainedModel

from dogbreed.launcher import batch, cli

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
