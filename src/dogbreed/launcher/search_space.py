"""The hyperparameter search space: one definition, two renderings.

The seeds tuned ``lr`` (continuous, 1e-3..1e-1, log scale), ``batch-size`` (categorical
16/32/64/128/256) and ``epochs`` (integer 2..10). :data:`SEARCH_SPACE` says so once;
:func:`to_sagemaker` renders it as a tuning job's ``ParameterRanges`` and :func:`suggest`
asks an Optuna trial for the same values, so the SageMaker and local tuners cannot drift apart.
Names are the dashed hyperparameter names of :mod:`dogbreed.contract`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from dogbreed import contract

EPOCHS = "epochs"


@dataclasses.dataclass(frozen=True)
class Continuous:
    name: str
    low: float
    high: float
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Integer:
    name: str
    low: int
    high: int
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Categorical:
    name: str
    values: tuple[Any, ...]


Parameter = Continuous | Integer | Categorical

SEARCH_SPACE: tuple[Parameter, ...] = (
    Continuous("lr", 1e-3, 1e-1, log=True),
    Categorical("batch-size", (16, 32, 64, 128, 256)),
    Integer(EPOCHS, 2, 10),
)
# The training-recipe knobs (dogbreed.recipe) on top of the seeds' space. Ranges follow
# torchvision's reference recipe (label smoothing 0.1, mixup 0.2, cutmix 1.0, random erasing
# 0.1, EMA, warmup) with room either side; every one is a SageMaker-expressible range.
RECIPE_SPACE: tuple[Parameter, ...] = (
    Categorical("optimizer", ("sgd", "adamw")),
    Continuous("weight-decay", 1e-5, 1e-3, log=True),
    Categorical("lr-schedule", contract.LR_SCHEDULES),  # the seeds kept lr constant ("none")
    Categorical("augment", ("flip", "trivialaugment")),
    Continuous("label-smoothing", 0.0, 0.2),
    Continuous("random-erasing", 0.0, 0.4),
    Continuous("mixup-alpha", 0.0, 0.4),
    Continuous("cutmix-alpha", 0.0, 1.0),
    Categorical("ema-decay", (0.0, 0.9, 0.99, 0.999)),
    Integer("warmup-epochs", 0, 2),
)
SPACES: dict[str, tuple[Parameter, ...]] = {"seeds": SEARCH_SPACE, "full": SEARCH_SPACE + RECIPE_SPACE}

# What the seeds (the Udacity dog-breed SageMaker projects) trained with once tuned: Adam at
# 1e-3, batch 32, a constant learning rate, random resized crop + flip, nothing else; they
# froze the pretrained backbone. AdamW with weight decay 0 is Adam.
SEEDS_HYPERPARAMETERS: dict[str, str] = {
    "optimizer": "adamw", "lr": "0.001", "weight-decay": "0", "batch-size": "32",
    "lr-schedule": "none", "augment": "flip", "label-smoothing": "0", "random-erasing": "0",
    "mixup-alpha": "0", "cutmix-alpha": "0", "ema-decay": "0", "warmup-epochs": "0",
}


def named(name: str) -> tuple[Parameter, ...]:
    """``seeds`` (lr, batch-size, epochs) or ``full`` (+ the recipe knobs)."""
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}: choose one of {', '.join(SPACES)}") from None


class TrialLike(Protocol):  # the part of optuna.Trial used here
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def _string(value: Any) -> str:
    # repr keeps full float precision; SageMaker passes every hyperparameter as a string.
    return repr(value) if isinstance(value, float) else str(value)


def with_epochs_max(space: Sequence[Parameter], epochs_max: int | None) -> tuple[Parameter, ...]:
    """Cap the ``epochs`` range at ``epochs_max`` (a short run: ``--epochs-max 3`` → 2..3)."""
    if epochs_max is None:
        return tuple(space)
    if epochs_max < 1:
        raise ValueError("epochs-max must be at least 1")
    capped: list[Parameter] = []
    for param in space:
        if isinstance(param, Integer) and param.name == EPOCHS:
            param = dataclasses.replace(param, low=min(param.low, epochs_max), high=epochs_max)
        capped.append(param)
    return tuple(capped)


def without(space: Sequence[Parameter], name: str) -> tuple[Parameter, ...]:
    return tuple(p for p in space if p.name != name)


def get(space: Sequence[Parameter], name: str) -> Parameter | None:
    return next((p for p in space if p.name == name), None)


def validate(space: Sequence[Parameter]) -> None:
    """Every name is a hyperparameter the training contract accepts, with valid bounds."""
    names = [p.name for p in space]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in search space: {names}")
    for param in space:
        if isinstance(param, Categorical):
            samples = list(param.values)
            if not samples:
                raise ValueError(f"{param.name}: no values")
        else:
            if param.low > param.high:
                raise ValueError(f"{param.name}: low {param.low} > high {param.high}")
            samples = [param.low, param.high]
        for value in samples:
            contract.parse_hyperparameters({param.name: _string(value)})  # raises ContractError


def to_sagemaker(space: Sequence[Parameter]) -> dict[str, list[dict[str, Any]]]:
    """Render as ``HyperParameterTuningJobConfig.ParameterRanges`` (every value a string)."""
    ranges: dict[str, list[dict[str, Any]]] = {
        "ContinuousParameterRanges": [], "IntegerParameterRanges": [], "CategoricalParameterRanges": []}
    for param in space:
        if isinstance(param, Categorical):
            ranges["CategoricalParameterRanges"].append(
                {"Name": param.name, "Values": [_string(v) for v in param.values]})
            continue
        key = "ContinuousParameterRanges" if isinstance(param, Continuous) else "IntegerParameterRanges"
        ranges[key].append({"Name": param.name, "MinValue": _string(param.low),
                            "MaxValue": _string(param.high),
                            "ScalingType": "Logarithmic" if param.log else "Linear"})
    return {k: v for k, v in ranges.items() if v}


def to_sdk(space: Sequence[Parameter] = SEARCH_SPACE) -> dict[str, Any]:
    """The space as the SageMaker Python SDK's ``hyperparameter_ranges`` (imports ``sagemaker``)."""
    from sagemaker.tuner import (  # the SageMaker SDK is optional
        CategoricalParameter,
        ContinuousParameter,
        IntegerParameter,
    )

    ranges: dict[str, Any] = {}
    for param in space:
        if isinstance(param, Categorical):
            ranges[param.name] = CategoricalParameter([_string(v) for v in param.values])
        else:
            kind = ContinuousParameter if isinstance(param, Continuous) else IntegerParameter
            ranges[param.name] = kind(param.low, param.high,
                                      scaling_type="Logarithmic" if param.log else "Linear")
    return ranges


def suggest(trial: TrialLike, space: Sequence[Parameter]) -> dict[str, Any]:
    """Ask an Optuna trial for one point of ``space``; native values keyed by dashed name."""
    values: dict[str, Any] = {}
    for param in space:
        if isinstance(param, Continuous):
            values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.log)
        elif isinstance(param, Integer):
            values[param.name] = trial.suggest_int(param.name, param.low, param.high, log=param.log)
        else:
            values[param.name] = trial.suggest_categorical(param.name, list(param.values))
    return values


def to_strings(values: dict[str, Any]) -> dict[str, str]:
    return {k: _string(v) for k, v in values.items()}


def describe(space: Sequence[Parameter]) -> list[dict[str, Any]]:
    """A JSON-friendly description (for dry runs and result files)."""
    out = []
    for param in space:
        item: dict[str, Any] = {"name": param.name, "type": type(param).__name__.lower()}
        if isinstance(param, Categorical):
            item["values"] = list(param.values)
        else:
            item.update(low=param.low, high=param.high, log=param.log)
        out.append(item)
    return out
