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
# "\b": a name only where it starts a word, so the closing ``best_valid_accuracy=`` line is not
# one more objective value. Hyperband counts every value of the objective as one epoch of its
# resource (MaxResource = epochs): exactly one per epoch, or it stops trials early.
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": name, "Regex": f"\\b{name}={_NUMBER}"} for name in METRIC_NAMES
]
OBJECTIVE_METRIC = "valid_accuracy"
EPOCH_LINE = re.compile(r"^epoch=(\d+)\s")
# The closing line: the saved (best) epoch's score, under names no MetricDefinitions regex reads.
BEST_LINE = re.compile(rf"^best_epoch=(\d+) best_valid_loss={_NUMBER} best_valid_accuracy={_NUMBER}")
# The seeds' tuning jobs read their objective ("average test loss", Minimize) with this regex
# (PyTorch's MNIST example's line, which their training scripts printed once per epoch); the
# trainer prints that line after each epoch line, with the validation loss, so a seed-style
# tuner definition runs unchanged, one value per epoch.
SEED_OBJECTIVE_METRIC = "average test loss"
SEED_OBJECTIVE_REGEX = r"Test set: Average loss: ([0-9\.]+)"


def seed_objective_line(valid_loss: float, valid_accuracy: float) -> str:
    return f"Test set: Average loss: {valid_loss:.4f}, Accuracy: {100 * valid_accuracy:.2f}%"


def best_line(epoch: int, valid_loss: float, valid_accuracy: float) -> str:
    return f"best_epoch={epoch} best_valid_loss={valid_loss:.4f} best_valid_accuracy={valid_accuracy:.4f}"


def parse_best(line: str) -> dict[str, float]:
    """The closing line's score as ``valid_loss``/``valid_accuracy`` (the saved model's)."""
    match = BEST_LINE.match(line)
    return {"valid_loss": float(match.group(2)), "valid_accuracy": float(match.group(3))} if match else {}
_PATTERNS = [(d["Name"], re.compile(d["Regex"])) for d in METRIC_DEFINITIONS]


def parse_metrics(line: str) -> dict[str, float]:
    """The metrics in one log line, found with the SageMaker ``MetricDefinitions`` regexes."""
    found = {}
    for name, pattern in _PATTERNS:
        match = pattern.search(line)
        if match:
            found[name] = float(match.group(1))
    return found


# The first timed batches of a run: what the local tuner estimates an epoch's cost from, before
# the first epoch ends. An event line, so no MetricDefinitions regex reads it (none of its names
# is a metric name).
TIMING_EVENT = "batch_timing"
TIMING_LINE = re.compile(
    rf"\bevent={TIMING_EVENT} batches=(\d+) images=(\d+) seconds={_NUMBER} warmup_included=(\w+) "
    r"train_images=(\d+) valid_images=(\d+) test_images=(\d+) image_size=(\d+)")


def timing_line(batches: int, images: int, seconds: float, warmup_included: bool,
                train_images: int, valid_images: int, test_images: int, image_size: int) -> str:
    return (f"event={TIMING_EVENT} batches={batches} images={images} seconds={seconds:.4f} "
            f"warmup_included={str(warmup_included).lower()} train_images={train_images} "
            f"valid_images={valid_images} test_images={test_images} image_size={image_size}")


def parse_timing(line: str) -> dict[str, float] | None:
    """The timing line's numbers (``seconds_per_image`` worked out), or None for another line."""
    match = TIMING_LINE.search(line)
    if not match:
        return None
    batches, images, seconds = int(match.group(1)), int(match.group(2)), float(match.group(3))
    return {"batches": batches, "images": images, "seconds": seconds,
            "seconds_per_image": seconds / max(images, 1),
            "warmup_included": match.group(4) == "true", "train_images": int(match.group(5)),
            "valid_images": int(match.group(6)), "test_images": int(match.group(7)),
            "image_size": int(match.group(8))}
