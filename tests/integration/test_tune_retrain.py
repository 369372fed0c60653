"""`train --from-tuning-job` reproduces the trial it copies: same hyperparameters, same seed,
same per-epoch metrics on the CPU. The trial's CPU memory layout was picked by timing
(`channels-last=auto`) and the layouts round differently, so the retrain drifted from epoch 2;
the tune result now pins the layout the trial measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DOGBREED = str(Path(sys.executable).with_name("dogbreed"))
METRICS = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")


def _dogbreed(*args: str) -> dict:
    result = subprocess.run([DOGBREED, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_retrain_from_a_tuning_job_reproduces_the_trial(sample_data: Path, tmp_path: Path) -> None:
    work = str(tmp_path / "work")
    tuned = _dogbreed("tune", "--local", "--data", str(sample_data), "--workdir", work,
                      "--name", "repro", "--trials", "1", "--pruner", "none", "--space", "seeds",
                      "--epochs-max", "2", "--image-size", "32")
    best = tuned["best_hyperparameters"]
    study = json.loads(Path(tuned["result_file"]).read_text())
    trial = next(t for t in study["trials"] if t["number"] == tuned["best_trial"])
    # The layout the trial measured travels with its hyperparameters.
    assert best["channels-last"] in ("true", "false")
    assert best["channels-last"] == trial["channels_last"]

    retrain = _dogbreed("train", "--local", "--data", str(sample_data), "--workdir", work,
                        "--from-tuning-job", "repro", "--name", "repro-best")
    model_json = json.loads((Path(retrain["model_dir"]) / "model.json").read_text())
    assert model_json["hyperparameters"]["channels_last"] == best["channels-last"]
    log = (Path(work) / "jobs" / "repro-best" / "train.log").read_text()
    epochs = [dict(pair.split("=") for pair in line.split()) for line in log.splitlines()
              if line.startswith("epoch=")]
    assert len(epochs) == len(trial["curve"]) == int(best["epochs"])
    for retrained, original in zip(epochs, trial["curve"], strict=True):
        assert {m: float(retrained[m]) for m in METRICS} == \
            {m: round(original[m], 4) for m in METRICS}, f"epoch {original['epoch']}"
