"""In-process local tuning: trials back to back in one process, sharing one decoded image cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dogbreed import data
from dogbreed.launcher.local import backend as local_backend

pytestmark = pytest.mark.slow


def test_trials_share_one_decode_and_write_the_study(sample_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    decoded_roots: list[str] = []
    real_decode = data.decode_split

    def counting_decode(index, *args, **kwargs):
        decoded_roots.append(index.root.name)
        return real_decode(index, *args, **kwargs)

    monkeypatch.setattr(data, "decode_split", counting_decode)
    result = local_backend.tune_in_process(
        sample_data, tmp_path / "work", trials=3, epochs_max=2,
        base_hyperparameters={"image-size": "32", "weights": "none"})

    # train, valid and test decoded once for the whole study, not once per trial.
    assert sorted(decoded_roots) == ["test", "train", "valid"]
    assert result["mode"] == "in_process" and len(result["trials"]) == 3
    # The defaults: Hyperband on epochs over the full space, starting from the default recipe.
    assert result["pruner"] == {"name": "HyperbandPruner", "max_epochs": 2}
    assert result["trials"][0]["origin"] == "defaults"
    assert {"augment", "mixup-alpha", "ema-decay"} <= set(result["trials"][1]["hyperparameters"])
    assert result["counts"]["COMPLETE"] >= 1 and result["counts"]["FAIL"] == 0
    saved = json.loads((tmp_path / "work" / "tuning" / "bench-tune.json").read_text())
    assert saved["best_hyperparameters"] == result["best_hyperparameters"]
    assert Path(result["best_model_data"]).is_file()
    for trial in result["trials"]:
        log = Path(trial["dir"]) / local_backend.TRAIN_LOG
        assert log.read_text().count("epoch=") >= trial["epochs_completed"] >= 1
