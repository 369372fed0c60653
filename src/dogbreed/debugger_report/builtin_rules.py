"""The seeds' SageMaker Debugger rules, evaluated offline on a run's smdebug tensors.

Why these classes exist: the built-in rules' code ships only inside AWS's closed
``sagemaker-debugger-rules`` evaluator image; no smdebug release on PyPI (0.4 … 1.0.34) contains
``VanishingGradient``, ``Overfit``, ``Overtraining``, ``PoorWeightInitialization`` or
``LossNotDecreasing``, and ``smdebug-rulesconfig`` holds only their names and hook collections
(its ``ruleConfigs.json`` sets no parameters). So each rule here is a subclass of smdebug's own
:class:`smdebug.rules.Rule`, reads tensors through smdebug's trial API and is run by smdebug's
:func:`smdebug.rules.rule_invoker.invoke_rule` — the same machinery the evaluator image runs —
implementing the behaviour and **default parameters documented by AWS** ("List of Debugger
built-in rules", SageMaker Developer Guide), overridden by the project's own rule parameters
(:data:`dogbreed.debugger_config.DEBUG_RULES`, e.g. ``LossNotDecreasing mode=TRAIN``).

Verdicts use SageMaker's ``RuleEvaluationStatus`` words: ``IssuesFound``, ``NoIssuesFound``,
``Error``; plus ``NotApplicable`` where the run has nothing the rule can look at (e.g.
LowGPUUtilization on a CPU run), ``NotEnoughData`` where the tensors are there but the run was
shorter than the rule's window (LossNotDecreasing compares means of ``num_steps`` steps), and
``NoTensors`` for a run trained without the smdebug hook.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dogbreed.debugger_config import DEBUG_RULES, PROFILER_RULES

log = logging.getLogger(__name__)

ISSUES = "IssuesFound"
NO_ISSUES = "NoIssuesFound"
ERROR = "Error"
NOT_APPLICABLE = "NotApplicable"
NOT_ENOUGH_DATA = "NotEnoughData"
NO_TENSORS = "NoTensors"

# AWS's documented defaults (SageMaker Developer Guide, "List of Debugger built-in rules",
# debugger-built-in-rules.md; LossNotDecreasing's diff_percent/increase_threshold_percent as the
# current page lists them).
AWS_DEFAULTS: dict[str, dict[str, Any]] = {
    "VanishingGradient": {"threshold": 0.0000001},
    "Overfit": {"start_step": 0, "patience": 1, "ratio_threshold": 0.1},
    "Overtraining": {"patience_train": 5, "patience_validation": 10, "delta": 0.1},
    "PoorWeightInitialization": {"activation_inputs_regex": ".*relu_input", "threshold": 10.0,
                                 "distribution_range": 0.001, "patience": 5, "steps": 10},
    "LossNotDecreasing": {"num_steps": 10, "diff_percent": 0.1,
                          "increase_threshold_percent": 5, "mode": None},
    # smdebug's open-source profiler rule (sagemaker-debugger smdebug/profiler/analysis/rules).
    "LowGPUUtilization": {"threshold_p95": 70, "threshold_p5": 10, "window": 500,
                          "patience": 1000},
}


@dataclasses.dataclass
class Verdict:
    rule: str
    status: str
    step: int | None
    message: str
    parameters: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rule_parameters(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """AWS's defaults for ``name`` with the project's rule parameters (strings, as SageMaker
    passes them) and ``overrides`` on top."""
    params = dict(AWS_DEFAULTS[name])
    project = {**DEBUG_RULES, **PROFILER_RULES}.get(name, {})
    for key, value in {**project, **(overrides or {})}.items():
        if key in params and params[key] is not None and isinstance(value, str):
            value = type(params[key])(float(value)) if isinstance(params[key], (int, float)) else value
        params[key] = value
    return params


def required_collections(name: str) -> list[str]:
    """The hook collections smdebug-rulesconfig pairs with the built-in rule ``name``."""
    import smdebug_rulesconfig  # optional (launcher extra); only this message needs it

    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    config = getattr(smdebug_rulesconfig, snake)()
    return [c["CollectionName"] for c in config.get("CollectionConfigurations", [])]


def _loss_names(trial: Any, regex: str | None = None) -> list[str]:
    names = trial.tensor_names(collection="losses")
    if regex:
        names = [n for n in names if any(re.match(p.strip(), n) for p in regex.split(","))]
    return names


def _loss_series(trial: Any, name: str, mode: Any) -> list[tuple[int, float]]:
    """(global step, value) of one loss tensor in ``mode``, in step order."""
    tensor = trial.tensor(name)
    return [(trial.global_step(mode, s), float(tensor.value(s, mode=mode)))
            for s in tensor.steps(mode=mode)]


def _eval_passes(trial: Any, name: str, modes: Any) -> list[dict[str, Any]]:
    """Each evaluation pass (consecutive EVAL steps) with the mean TRAIN loss since the one before.

    One pass is one evaluation of the validation split, so its mean is the epoch's validation
    loss; per-batch values only differ by which images the batch holds. ``modes``: smdebug's
    ``ModeKeys`` (imported by :func:`make_rules`).
    """
    points = sorted([(g, "train", v) for g, v in _loss_series(trial, name, modes.TRAIN)]
                    + [(g, "eval", v) for g, v in _loss_series(trial, name, modes.EVAL)])
    passes: list[dict[str, Any]] = []
    train_losses: list[float] = []
    current: list[tuple[int, float]] = []
    for step, mode, value in points + [(None, "end", None)]:
        if mode == "eval":
            current.append((step, value))
            continue
        if current:
            passes.append({"end_step": current[-1][0], "steps": len(current),
                           "valid_loss": float(np.mean([v for _, v in current])),
                           "train_loss": float(np.mean(train_losses)) if train_losses else None})
            current, train_losses = [], []
        if mode == "train":
            train_losses.append(value)
    return passes


class _DogbreedRule:
    """Mixin: a ``detail`` the report shows and a count of the steps that had data; a rule that
    needs a run of some length sets ``steps_needed`` and ``steps_available``."""

    detail = ""
    evaluated = 0
    steps_needed: int | None = None
    steps_available: int | None = None


def make_rules(trial: Any, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The five debugger rules as smdebug ``Rule`` objects over ``trial``."""
    # smdebug takes seconds to import: only a report with tensors to read loads it.
    from smdebug.core.modes import ModeKeys
    from smdebug.rules.rule import Rule

    overrides = overrides or {}

    class VanishingGradient(_DogbreedRule, Rule):
        """True when the mean absolute value of a gradient tensor falls below ``threshold``."""

        def __init__(self, base_trial: Any, threshold: float) -> None:
            super().__init__(base_trial, action_str="")
            self.threshold = threshold
            self.names = base_trial.tensor_names(collection="gradients")

        def invoke_at_step(self, step: int) -> bool:
            for name in self.names:
                tensor = self.base_trial.tensor(name)
                if step not in tensor.steps():
                    continue
                self.evaluated += 1
                mean_abs = float(np.mean(np.abs(tensor.value(step))))
                if mean_abs < self.threshold:
                    self.detail = f"{name}: mean |gradient| {mean_abs:.3g} < {self.threshold:g}"
                    return True
            return False

    class Overfit(_DogbreedRule, Rule):
        """True when (mean validation loss - mean training loss) / mean training loss exceeds
        ``ratio_threshold`` for ``patience`` evaluations in a row, from ``start_step``."""

        def __init__(self, base_trial: Any, start_step: int, patience: int,
                     ratio_threshold: float, tensor_regex: str | None = None) -> None:
            super().__init__(base_trial, action_str="")
            self.start_step, self.patience, self.ratio_threshold = start_step, patience, ratio_threshold
            self.passes = {p["end_step"]: p for name in _loss_names(base_trial, tensor_regex)
                           for p in _eval_passes(base_trial, name, ModeKeys) if p["train_loss"]}
            self.exceeded = 0

        def invoke_at_step(self, step: int) -> bool:
            evaluation = self.passes.get(step)
            if evaluation is None or step < self.start_step:
                return False
            self.evaluated += 1
            ratio = (evaluation["valid_loss"] - evaluation["train_loss"]) / evaluation["train_loss"]
            self.exceeded = self.exceeded + 1 if ratio > self.ratio_threshold else 0
            if self.exceeded >= self.patience:
                self.detail = (f"validation loss {evaluation['valid_loss']:.4g} vs training loss "
                               f"{evaluation['train_loss']:.4g}: ratio {ratio:.3g} > "
                               f"{self.ratio_threshold:g} for {self.exceeded} evaluation(s)")
                return True
            return False

    class Overtraining(_DogbreedRule, Rule):
        """True when the training loss has not improved by ``delta`` for ``patience_train``
        saved training steps, or the validation loss for ``patience_validation`` evaluation
        steps (a pass's mean counts as that pass's steps)."""

        def __init__(self, base_trial: Any, patience_train: int, patience_validation: int,
                     delta: float) -> None:
            super().__init__(base_trial, action_str="")
            self.patience_train, self.patience_validation, self.delta = (
                patience_train, patience_validation, delta)
            names = _loss_names(base_trial)
            self.train = dict(_loss_series(base_trial, names[0], ModeKeys.TRAIN)) if names else {}
            self.passes = ({p["end_step"]: p for p in _eval_passes(base_trial, names[0], ModeKeys)
                            if p["train_loss"] is not None} if names else {})
            self.best_train = self.best_valid = float("inf")
            self.train_stall = self.valid_stall = 0

        def invoke_at_step(self, step: int) -> bool:
            if step in self.train:
                self.evaluated += 1
                loss = self.train[step]
                if loss < self.best_train - self.delta:
                    self.best_train, self.train_stall = loss, 0
                else:
                    self.train_stall += 1
                if self.train_stall >= self.patience_train:
                    self.detail = (f"training loss has not improved by {self.delta:g} for "
                                   f"{self.train_stall} steps (best {self.best_train:.4g})")
                    return True
            evaluation = self.passes.get(step)
            if evaluation is not None:
                self.evaluated += 1
                if evaluation["valid_loss"] < self.best_valid - self.delta:
                    self.best_valid, self.valid_stall = evaluation["valid_loss"], 0
                else:
                    self.valid_stall += evaluation["steps"]
                if self.valid_stall >= self.patience_validation:
                    self.detail = (f"validation loss has not improved by {self.delta:g} for "
                                   f"{self.valid_stall} steps (best {self.best_valid:.4g})")
                    return True
            return False

    class PoorWeightInitialization(_DogbreedRule, Rule):
        """Over the first ``steps`` training steps: True when max/min variance of the
        activation inputs across layers exceeds ``threshold``, when the 5th-95th percentile
        range of the gradients is below ``distribution_range``, or when the loss does not
        decrease for ``patience`` saved steps."""

        def __init__(self, base_trial: Any, activation_inputs_regex: str, threshold: float,
                     distribution_range: float, patience: int, steps: int) -> None:
            super().__init__(base_trial, action_str="")
            self.threshold, self.distribution_range = threshold, distribution_range
            self.patience, self.steps = patience, steps
            pattern = re.compile(activation_inputs_regex)
            self.activations = [n for n in base_trial.tensor_names() if pattern.match(n)]
            self.gradients = base_trial.tensor_names(collection="gradients")
            names = _loss_names(base_trial)
            train_steps = base_trial.steps(mode=ModeKeys.TRAIN)
            self.last_step = (base_trial.global_step(ModeKeys.TRAIN, train_steps[min(steps, len(train_steps)) - 1])
                              if train_steps else -1)
            self.loss = dict(_loss_series(base_trial, names[0], ModeKeys.TRAIN)) if names else {}
            self.best_loss, self.stall = float("inf"), 0

        def _values(self, names: Sequence[str], step: int) -> list[np.ndarray]:
            values = []
            for name in names:
                tensor = self.base_trial.tensor(name)
                if step in tensor.steps():
                    values.append(np.asarray(tensor.value(step), dtype=np.float64))
            return values

        def invoke_at_step(self, step: int) -> bool:
            if step > self.last_step:
                return False
            activations = self._values(self.activations, step)
            variances = [float(np.var(a)) for a in activations if a.size > 1]
            if len(variances) > 1:
                self.evaluated += 1
                ratio = max(variances) / max(min(variances), 1e-30)
                if ratio > self.threshold:
                    self.detail = (f"activation-input variance ratio across {len(variances)} "
                                   f"layers {ratio:.3g} > {self.threshold:g} at step {step}")
                    return True
            gradients = self._values(self.gradients, step)
            if gradients:
                self.evaluated += 1
                flat = np.concatenate([g.ravel() for g in gradients])
                p5, p95 = np.percentile(flat, [5, 95])
                if p95 - p5 < self.distribution_range:
                    self.detail = (f"gradient 5th-95th percentile range {p95 - p5:.3g} < "
                                   f"{self.distribution_range:g} at step {step}")
                    return True
            if step in self.loss:
                self.evaluated += 1
                if self.loss[step] < self.best_loss:
                    self.best_loss, self.stall = self.loss[step], 0
                else:
                    self.stall += 1
                if self.stall >= self.patience:
                    self.detail = f"loss did not decrease for {self.stall} of the first steps"
                    return True
            return False

    class LossNotDecreasing(_DogbreedRule, Rule):
        """Every ``num_steps`` steps of ``mode`` (EVAL, then TRAIN, then GLOBAL when unset):
        True when the mean loss of the last ``num_steps`` steps is not at least
        ``diff_percent`` % below the mean of the ``num_steps`` before, or has risen more than
        ``increase_threshold_percent`` % above the lowest such mean so far. Window means,
        not single batches: one batch's loss is too noisy to compare across 10 steps."""

        def __init__(self, base_trial: Any, num_steps: int, diff_percent: float,
                     increase_threshold_percent: float, mode: str | None = None,
                     tensor_regex: str | None = None) -> None:
            super().__init__(base_trial, action_str="")
            self.num_steps, self.diff_percent = int(num_steps), diff_percent
            self.increase_threshold_percent = increase_threshold_percent
            names = _loss_names(base_trial, tensor_regex)
            candidates = ([ModeKeys[str(mode).upper()]] if mode
                          else [ModeKeys.EVAL, ModeKeys.TRAIN, ModeKeys.GLOBAL])
            self.mode, self.series = None, []
            longest = 0
            for candidate in candidates:
                series = _loss_series(base_trial, names[0], candidate) if names else []
                longest = max(longest, len(series))
                if len(series) > 1:
                    self.mode, self.series = candidate, series
                    break
            if names:  # a loss was saved: a run too short for one window is not an error
                self.steps_needed, self.steps_available = self.num_steps, len(self.series) or longest
            self.by_step = {g: i for i, (g, _) in enumerate(self.series)}
            self.previous: float | None = None
            self.lowest = float("inf")
            self.next_check = self.num_steps

        def invoke_at_step(self, step: int) -> bool:
            index = self.by_step.get(step)
            if index is None or index + 1 < self.next_check:
                return False
            window = [v for _, v in self.series[index + 1 - self.num_steps:index + 1]]
            self.next_check = index + 1 + self.num_steps
            current = float(np.mean(window))
            self.evaluated += 1
            previous, self.previous = self.previous, current
            self.lowest = min(self.lowest, current)
            if current > self.lowest * (1 + self.increase_threshold_percent / 100):
                self.detail = (f"mean {self.mode.name} loss {current:.4g} rose more than "
                               f"{self.increase_threshold_percent:g}% above {self.lowest:.4g}")
                return True
            if previous is not None and current > previous * (1 - self.diff_percent / 100):
                self.detail = (f"mean {self.mode.name} loss {current:.4g} over steps up to {step} "
                               f"is not {self.diff_percent:g}% below {previous:.4g}")
                return True
            return False

    classes = {"VanishingGradient": VanishingGradient, "Overfit": Overfit,
               "Overtraining": Overtraining, "PoorWeightInitialization": PoorWeightInitialization,
               "LossNotDecreasing": LossNotDecreasing}
    rules = {}
    for name, cls in classes.items():
        params = rule_parameters(name, overrides.get(name))
        rules[name] = (cls, params)
    return rules


# smdebug's own setting (smdebug/core/config_constants.py): seconds a trial waits, once it sees the
# end-of-training marker, before a last look for late files (default 1, per trial). That suits a
# trial read while a job still uploads; a report reads an ended run, whose hook wrote the marker
# after closing its writers.
TRAINING_END_DELAY_ENV = "SMDEBUG_TRAINING_END_DELAY_REFRESH"


def open_trial(tensors_dir: str, name: str) -> Any:
    """smdebug's trial over a run's tensors, without the end-of-training wait unless
    :data:`TRAINING_END_DELAY_ENV` asks for one."""
    from smdebug.trials import create_trial  # smdebug: see make_rules

    if TRAINING_END_DELAY_ENV in os.environ:
        return create_trial(str(tensors_dir), name=name)
    os.environ[TRAINING_END_DELAY_ENV] = "0"  # read by the trial's constructor only
    try:
        return create_trial(str(tensors_dir), name=name)
    finally:
        del os.environ[TRAINING_END_DELAY_ENV]


def evaluate_debugger_rules(tensors_dir: str, overrides: Mapping[str, Mapping[str, Any]] | None = None
                            ) -> list[Verdict]:
    """Run every seed debugger rule over the smdebug trial at ``tensors_dir`` with
    :func:`smdebug.rules.rule_invoker.invoke_rule`; one :class:`Verdict` per rule."""
    # smdebug: see make_rules; imported inside the caller's smdebug_logs_to_stderr().
    from smdebug.exceptions import RuleEvaluationConditionMet
    from smdebug.rules.rule_invoker import invoke_rule

    trial = open_trial(str(tensors_dir), name="dogbreed-report")
    steps = trial.steps()
    verdicts = []
    for name, (cls, params) in make_rules(trial, overrides).items():
        shown = {k: v for k, v in params.items()}
        if not steps:
            verdicts.append(Verdict(name, ERROR, None, f"no smdebug steps in {tensors_dir}", shown))
            continue
        try:
            rule = cls(trial, **params)
            invoke_rule(rule, start_step=steps[0], end_step=steps[-1] + 1, raise_eval_cond=True)
        except RuleEvaluationConditionMet as met:
            verdicts.append(Verdict(name, ISSUES, int(met.step), rule.detail, shown))
            continue
        except Exception as exc:  # noqa: BLE001 - one broken rule must not hide the others
            log.warning("event=rule_error rule=%s error=%s", name, exc)
            verdicts.append(Verdict(name, ERROR, None, f"{type(exc).__name__}: {exc}", shown))
            continue
        if rule.evaluated == 0 and rule.steps_needed is not None \
                and (rule.steps_available or 0) < rule.steps_needed:
            verdicts.append(Verdict(name, NOT_ENOUGH_DATA, None,
                                    f"not enough data ({rule.steps_available} steps, rule needs "
                                    f"{rule.steps_needed})", shown))
        elif rule.evaluated == 0:
            needed = ", ".join(required_collections(name)) or "losses"
            verdicts.append(Verdict(name, ERROR, None, "the tensors this rule reads were not "
                                    f"saved: the hook needs the collections {needed}", shown))
        else:
            verdicts.append(Verdict(name, NO_ISSUES, None,
                                    f"checked {rule.evaluated} data points", shown))
    return verdicts


def no_tensor_verdicts() -> list[Verdict]:
    """Every debugger rule's verdict for a run trained without the smdebug hook."""
    return [Verdict(name, NO_TENSORS, None,
                    "the run was trained without the smdebug hook, so there are no tensors to "
                    "check; train with `dogbreed train --local --debugger` (SageMaker: "
                    "DebugHookConfig, the default) to have this rule evaluated",
                    rule_parameters(name))
            for name in AWS_DEFAULTS if name != "LowGPUUtilization"]


def low_gpu_utilization(samples: Sequence[Mapping[str, float]],
                        overrides: Mapping[str, Any] | None = None) -> Verdict:
    """smdebug's LowGPUUtilization on the trainer's NVML samples: after ``patience`` samples,
    IssuesFound when the 95th percentile of the last ``window`` is below ``threshold_p95``
    (under-used), or above it while the 5th percentile is below ``threshold_p5`` (fluctuating)."""
    params = rule_parameters("LowGPUUtilization", overrides)
    values = [s["gpu_percent"] for s in samples if "gpu_percent" in s]
    if not values:
        return Verdict("LowGPUUtilization", NOT_APPLICABLE, None,
                       "no GPU samples: the run trained on CPU (or NVML was unavailable)", params)
    patience, window = int(params["patience"]), int(params["window"])
    if len(values) <= patience:
        return Verdict("LowGPUUtilization", NO_ISSUES, None,
                       f"{len(values)} samples, not more than patience={patience}: the rule "
                       "waits that long before judging (start-up is expected to idle)", params)
    for end in range(patience + 1, len(values) + 1):
        recent = values[max(0, end - window):end]
        p5, p95 = np.percentile(recent, [5, 95])
        if p95 < params["threshold_p95"]:
            return Verdict("LowGPUUtilization", ISSUES, end - 1,
                           f"p95 GPU utilisation {p95:.0f}% < {params['threshold_p95']}%", params)
        if p5 < params["threshold_p5"]:
            return Verdict("LowGPUUtilization", ISSUES, end - 1,
                           f"GPU utilisation fluctuates: p95 {p95:.0f}%, p5 {p5:.0f}% < "
                           f"{params['threshold_p5']}%", params)
    return Verdict("LowGPUUtilization", NO_ISSUES, None,
                   f"{len(values)} samples, p95 >= {params['threshold_p95']}%", params)
