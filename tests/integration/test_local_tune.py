"""`dogbreed tune --local --trials 6 --epochs-max 3` on the sample data: real trials, Optuna TPE
over the full space, Hyperband pruning from the per-epoch metric lines, best hyperparameters
saved as JSON and the best model added to the local model store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed import contract

pytestmark = pytest.mark.slow

DOGBREED = str(Path(sys.executable).with_name("dogbreed"))


def test_local_tune_prunes_and_reports_the_best(sample_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "best.json"
    result = subprocess.run(
        [DOGBREED, "tune", "--local", "--trials", "6", "--epochs-max", "3", "--data", str(sample_data),
         "--image-size", "32", "--workdir", str(tmp_path / "work"), "--output", str(output)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    saved = json.loads(output.read_text())
    assert saved["best_hyperparameters"] == report["best_hyperparameters"]
    assert len(saved["trials"]) == 6 and saved["counts"]["FAIL"] == 0
    assert saved["counts"]["PRUNED"] >= 1, [t["intermediate"] for t in saved["trials"]]
    best = saved["best_hyperparameters"]
    assert {"lr", "batch-size", "epochs"} <= set(best) and best["image-size"] == "32"
    assert 2 <= int(best["epochs"]) <= 3
    contract.parse_hyperparameters(best)
    for trial in saved["trials"]:
        # Hyperband: epochs is the resource (static), every trial set up for the most.
        epochs = int({**saved["static_hyperparameters"], **trial["hyperparameters"]}["epochs"])
        assert 1 <= trial["epochs_completed"] <= epochs
        if trial["state"] == "PRUNED":
            assert trial["value"] is None and trial["epochs_completed"] < epochs
        else:
            assert trial["epochs_completed"] == epochs == len(trial["curve"])
    assert result.stderr.count("event=trial ") == 6
    assert Path(saved["best_model_data"]).is_file()
    # The best model is ready for the endpoint's model store as it is.
    added = subprocess.run([DOGBREED, "add-model", "--local", "tuned", "--file", saved["best_model_data"],
                            "--workdir", str(tmp_path / "work")], capture_output=True, text=True,
                           timeout=300)
    assert added.returncode == 0, added.stderr[-3000:]
    assert json.loads(added.stdout)["target_model"] == "tuned/model.tar.gz"
