"""A time budget too small for one trial, through the real trainer: `dogbreed tune --local` says
so from the first timed batches (not at the budget's end), stops the trial, and still names its
best trial so far with a model that `add-model` and `train --from-tuning-job` take.

The trial is set up for 5000 epochs at 32 px on the sample (80 training images): no CPU finishes
that in 3 minutes, so the verdict does not depend on the machine's speed. The verdict comes from
the first timed batches, mid-epoch; no trial has an epoch yet and one fits in the time left, so
the trial finishes its first epoch (the study's model) and the study ends there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DOGBREED = str(Path(sys.executable).with_name("dogbreed"))


def test_a_budget_that_cannot_finish_a_trial_says_so_and_keeps_its_best_model(
        sample_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    tuned = subprocess.run(
        [DOGBREED, "tune", "--local", "--data", str(sample_data), "--name", "tight",
         "--time-budget", "3m", "--epochs-max", "5000", "--image-size", "32",
         "--workdir", str(work)], capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-4000:]
    answer = json.loads(tuned.stdout)
    (short,) = [line for line in tuned.stderr.splitlines() if "event=time_budget_short" in line]
    assert "trial=0 epochs_done=0 epochs_needed=5000" in short and "action=study_ends" in short
    assert "time budget too small for one full trial: 5000 epochs at image-size 32" in short
    assert answer["budget_short"]["suggestions"][0].startswith("--epochs-max ")
    assert answer["budget_short"]["suggestions"][-1].startswith("--time-budget ")

    # The trial the budget stopped after its first epoch is the study's answer, with a model.
    assert answer["best_trial"] == 0
    assert answer["best_state"].startswith("PRUNED after epoch 1 of 5000 (time budget)")
    assert "event=trial_model_finished" in tuned.stderr
    saved = json.loads(Path(answer["result_file"]).read_text())
    (trial,) = [t for t in saved["trials"] if t["state"] != "WAITING"]
    assert trial["state"] == "PRUNED" and trial["stopped"] == "time_budget"
    assert trial["epochs_completed"] == 1
    assert answer["best_objective"] == pytest.approx(trial["intermediate"][0])
    # A retrain pins the layout the trial trained in, not the one the finishing run measured.
    from dogbreed.launcher.local.tuning import logged_layout

    layout = logged_layout(Path(trial["dir"]) / "train.log")
    assert layout in ("true", "false") and answer["best_hyperparameters"]["channels-last"] == layout

    from dogbreed import artifacts

    model, metadata = artifacts.load_model(Path(saved["best_model_dir"]))
    assert metadata.metrics["epochs_completed"] == 1 and metadata.image_size == 32
    assert metadata.metrics["test_accuracy"] == answer["best_test_accuracy"]

    added = subprocess.run([DOGBREED, "add-model", "--local", "tight", "--file",
                            answer["best_model_data"], "--workdir", str(work)],
                           capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr[-3000:]
    assert json.loads(added.stdout)["target_model"] == "tight/model.tar.gz"
    # A retrain trains the trial's hyperparameters for the study's epochs (plan only).
    retrain = subprocess.run([DOGBREED, "train", "--local", "--from-tuning-job", "tight",
                              "--data", str(sample_data), "--workdir", str(work), "--dry-run"],
                             capture_output=True, text=True, timeout=120)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    plan = json.loads(retrain.stdout)
    assert plan["hyperparameters"]["epochs"] == "5000"
    assert plan["hyperparameters"]["lr"] == answer["best_hyperparameters"]["lr"]
