"""The metric lines the trainer prints and the regexes that read them (torch-free).

The trainer prints ``epoch=3 train_loss=0.8100 ... valid_accuracy=0.7100`` lines; SageMaker
(``MetricDefinitions`` of a training or tuning job), Optuna pruning in the local launcher and the
SageMaker Python SDK (``HyperparameterTuner(metric_definitions=...)``) read them with the regexes
below. The launcher imports this module, never :mod:`dogbreed.train` (which imports torch: 8 s of
start-up for a dry run).
"""

from __future__ import annotations

import re

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
METRIC_NAMES = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "test_loss",
                "test_accuracy", "images_per_sec", "epoch_seconds")
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": name, "Regex": f"{name}={_NUMBER}"} for name in METRIC_NAMES
]
OBJECTIVE_METRIC = "valid_accuracy"
EPOCH_LINE = re.compile(r"^epoch=(\d+)\s")
_PATTERNS = [(d["Name"], re.compile(d["Regex"])) for d in METRIC_DEFINITIONS]


def parse_metrics(line: str) -> dict[str, float]:
    """The metrics in one log line, found with the SageMaker ``MetricDefinitions`` regexes."""
    found = {}
    for name, pattern in _PATTERNS:
        match = pattern.search(line)
        if match:
            found[name] = float(match.group(1))
    return found
