"""scripts/bench_recipe.py --quick: default recipe vs a budgeted in-process study, one JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed import contract

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_recipe_benchmark_compares_the_arms_on_one_split(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_recipe.py"), "--quick", "--arms", "default",
         "study", "--hp", "num-workers=1", "--out", str(tmp_path / "recipe.json")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert report == json.loads((tmp_path / "recipe.json").read_text())
    assert report["data_images"] == {"train": 80, "valid": 20, "test": 20} and report["seeds"] == [0]
    default, study = report["arms"]["default"], report["arms"]["study"]
    # weights=none: the default arm ran the scratch defaults, as the trainer resolved them.
    scratch = contract.Hyperparameters(**{**contract.recipe_defaults("none"), "weights": "none", "image_size": 32,
                                          "epochs": 1, "num_workers": 1})
    assert default["hyperparameters"] == scratch.to_sagemaker()
    for arm in (default, study):
        assert 0.0 <= arm["test_accuracy_mean"] <= 1.0 and len(arm["runs"]) == 1
    inner = study["study"]
    assert inner["counts"]["COMPLETE"] >= 1 and inner["counts"]["FAIL"] == 0
    # The CLI's budgeted tuner: Hyperband on epochs over the full space, capped at 2 trials.
    assert len(inner["trials"]) == inner["trials_cap"] == 2 and inner["space"] == "full"
    assert inner["pruner"] == {"name": "HyperbandPruner", "max_epochs": 1}
    assert inner["trials"][0]["origin"] == "defaults"  # a new study starts from the default recipe
    assert set(inner["best_hyperparameters"]) >= {"lr", "batch-size", "epochs", "augment"}
    assert sorted(report["ranking"]) == ["default", "study"]
