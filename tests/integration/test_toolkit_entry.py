"""sagemaker-training's own `train` command running our entry point, as the train image does.

The image sets SAGEMAKER_PROGRAM to docker/dogbreed_train.py; the toolkit turns the string
hyperparameters into CLI args, sets SM_* and runs it. No Docker needed to prove the contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed import contract

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_toolkit(paths: contract.Paths, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base),
           "SAGEMAKER_PROGRAM": str(REPO / "docker" / "dogbreed_train.py")}
    for name in list(env):
        if name.startswith("SM_"):
            env.pop(name)
    toolkit_train = Path(sys.executable).with_name("train")
    return subprocess.run([str(toolkit_train)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_toolkit_train_runs_the_entry_point_with_sdk_encoded_hyperparameters(make_job, tmp_path):
    paths = make_job({"model": '"resnet18"', "epochs": "1", "batch-size": "16", "image-size": "32",
                      "weights": '"none"', "_tuning_objective_metric": "valid_accuracy",
                      "sagemaker_region": '"us-east-1"'})
    result = run_toolkit(paths, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Invoking user script" in output and "epoch=1 " in output
    assert (paths.model_dir / "model.pt").is_file() and (paths.model_dir / "model.json").is_file()
    assert (paths.output_dir / "success").is_file()  # written by the toolkit


def test_toolkit_keeps_our_one_line_failure_reason(make_job, tmp_path):
    paths = make_job({"epochs": "1", "bogus": "1"})
    result = run_toolkit(paths, tmp_path)
    assert result.returncode != 0
    reason = paths.failure_file.read_text().strip()
    assert reason.startswith("ContractError: unknown hyperparameter(s) bogus; valid:")
    assert "\n" not in reason
