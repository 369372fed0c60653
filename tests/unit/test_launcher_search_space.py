"""One search space, two renderings: SageMaker ParameterRanges and Optuna suggestions agree."""

from __future__ import annotations

import math

import optuna
import pytest

from dogbreed import contract
from dogbreed.launcher import search_space
from dogbreed.launcher.search_space import SEARCH_SPACE, Categorical, Continuous, Integer


def test_the_seeds_search_space() -> None:
    assert SEARCH_SPACE == (
        Continuous("lr", 1e-3, 1e-1, log=True),
        Categorical("batch-size", (16, 32, 64, 128, 256)),
        Integer("epochs", 2, 10),
    )
    search_space.validate(SEARCH_SPACE)  # every name and bound is a valid hyperparameter


def test_sagemaker_rendering() -> None:
    assert search_space.to_sagemaker(SEARCH_SPACE) == {
        "ContinuousParameterRanges": [
            {"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}],
        "IntegerParameterRanges": [
            {"Name": "epochs", "MinValue": "2", "MaxValue": "10", "ScalingType": "Linear"}],
        "CategoricalParameterRanges": [
            {"Name": "batch-size", "Values": ["16", "32", "64", "128", "256"]}],
    }


def test_optuna_rendering_samples_inside_the_same_space() -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    seen_batch, seen_epochs, lrs = set(), set(), []
    for _ in range(60):
        trial = study.ask()
        values = search_space.suggest(trial, SEARCH_SPACE)
        study.tell(trial, 0.0)
        assert set(values) == {"lr", "batch-size", "epochs"}
        lrs.append(values["lr"])
        seen_batch.add(values["batch-size"])
        seen_epochs.add(values["epochs"])
        contract.parse_hyperparameters(search_space.to_strings(values))
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs)
    # log scale: about half of the samples fall below the geometric midpoint 1e-2.
    assert 15 <= sum(lr < 1e-2 for lr in lrs) <= 45
    assert seen_batch == {16, 32, 64, 128, 256}
    assert seen_epochs <= set(range(2, 11)) and len(seen_epochs) > 4
    distributions = study.trials[0].distributions
    assert distributions["lr"].log and math.isclose(distributions["lr"].low, 1e-3)
    assert distributions["epochs"].low == 2 and distributions["epochs"].high == 10


def test_epochs_max_caps_both_renderings() -> None:
    capped = search_space.with_epochs_max(SEARCH_SPACE, 3)
    assert search_space.get(capped, "epochs") == Integer("epochs", 2, 3)
    assert search_space.to_sagemaker(capped)["IntegerParameterRanges"][0]["MaxValue"] == "3"
    assert search_space.get(search_space.with_epochs_max(SEARCH_SPACE, 1), "epochs") == Integer("epochs", 1, 1)
    assert search_space.with_epochs_max(SEARCH_SPACE, None) == SEARCH_SPACE
    with pytest.raises(ValueError):
        search_space.with_epochs_max(SEARCH_SPACE, 0)


def test_validate_refuses_what_the_entry_point_would_refuse() -> None:
    with pytest.raises(contract.ContractError):
        search_space.validate([Continuous("learn-rate", 0.1, 1.0)])  # a typo, no alias
    with pytest.raises(contract.ContractError):
        search_space.validate([Integer("epochs", 0, 3)])
    with pytest.raises(ValueError):
        search_space.validate([Integer("epochs", 5, 3)])


def test_full_space_adds_the_recipe_knobs_in_both_renderings() -> None:
    full = search_space.named("full")
    assert search_space.named("seeds") == SEARCH_SPACE and full[:len(SEARCH_SPACE)] == SEARCH_SPACE
    search_space.validate(full)  # every knob and bound is a valid hyperparameter
    ranges = search_space.to_sagemaker(full)
    names = {r["Name"] for group in ranges.values() for r in group}
    assert names == {p.name for p in full} >= {"augment", "mixup-alpha", "ema-decay", "warmup-epochs"}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        contract.parse_hyperparameters(search_space.to_strings(search_space.suggest(trial, full)))
        study.tell(trial, 0.0)
    contract.parse_hyperparameters(search_space.SEEDS_HYPERPARAMETERS)
    with pytest.raises(ValueError, match="seeds, full"):
        search_space.named("huge")
