"""Whether a tuning budget can finish what a study needs, from a trial's first timed batches.

A trial's cost is measured, not guessed: the trainer times its first batches after a warm-up
batch (:func:`dogbreed.metrics.timing_line`), and its first epoch line gives the whole epoch
(training + validation). :func:`epoch_seconds` turns the batches into an epoch,
:func:`fit` says whether the epochs a trial needs fit in the budget left and, when they do not,
which ``epochs-max`` or ``image-size`` would, and what budget the current settings need.
Pure functions: the tuner (:mod:`dogbreed.launcher.local.tuning`) measures and decides.
"""

from __future__ import annotations

import dataclasses
import math

# Evaluating an image (forward only) costs about a third of training on it (forward and a
# backward of twice the forward's work): what a validation pass adds before it is measured.
EVAL_COST_RATIO = 1 / 3
# Suggested settings aim at this share of the budget left: the estimate comes from a few batches.
SUGGESTION_SHARE = 0.8
# ResNets downsample by 32: sizes that are a multiple of it waste no pixels; 32 is the trainer's
# smallest image-size (contract's range).
IMAGE_SIZE_STEP = 32
MIN_IMAGE_SIZE = 32


def epoch_seconds(seconds_per_image: float, train_images: int, valid_images: int) -> float:
    """One epoch from the measured training cost per image: the training pass over
    ``train_images`` plus a validation pass over ``valid_images`` at :data:`EVAL_COST_RATIO`."""
    if seconds_per_image < 0 or train_images < 0 or valid_images < 0:
        raise ValueError("seconds per image and image counts must not be negative")
    return seconds_per_image * (train_images + EVAL_COST_RATIO * valid_images)


@dataclasses.dataclass(frozen=True)
class Fit:
    """The verdict for ``epochs`` epochs of ``epoch_seconds`` (+ ``finish_seconds``) against
    ``seconds_left``; when they do not fit, the settings that would (None: none would)."""

    fits: bool
    epochs: int
    epoch_seconds: float
    needed_seconds: float
    seconds_left: float
    image_size: int
    epochs_that_fit: int  # at this image size (0: not one epoch)
    image_size_that_fits: int | None  # at this many epochs
    budget_that_fits: float  # seconds: what these settings need, with the estimate's margin

    def message(self) -> str:
        """One sentence: the verdict and, when it does not fit, what would."""
        plural = "s" if self.epochs != 1 else ""
        extra = self.needed_seconds - self.epochs * self.epoch_seconds
        need = (f"{self.epochs} epoch{plural} at image-size {self.image_size} need about "
                f"{_duration(self.needed_seconds)} (about {_duration(self.epoch_seconds)} an epoch"
                f"{f', plus {_duration(extra)} before and after' if extra >= 1 else ''})")
        if self.fits:
            return f"{need}: they fit in {_duration(self.seconds_left)}"
        return (f"{need}, more than the {_duration(self.seconds_left)} available; what fits: "
                + " or ".join(self.suggestions()))

    def suggestions(self) -> list[str]:
        """The settings that would fit, as the flags to pass."""
        out = []
        if self.epochs_that_fit >= 1:
            out.append(f"--epochs-max {self.epochs_that_fit}")
        if self.image_size_that_fits is not None:
            out.append(f"--image-size {self.image_size_that_fits}")
        out.append(f"--time-budget {_budget_flag(self.budget_that_fits)}")
        return out


def fit(*, epoch_seconds: float, epochs: int, seconds_left: float, image_size: int,
        finish_seconds: float = 0.0) -> Fit:
    """Whether ``epochs`` epochs (then ``finish_seconds`` of final evaluation and export) fit in
    ``seconds_left``; if not, the most epochs that fit at ``image_size``, the largest image size
    (a multiple of :data:`IMAGE_SIZE_STEP`) at which ``epochs`` fit, assuming an epoch's cost
    scales with the pixels (ResNet convolutions do), and the budget these settings need."""
    if epochs < 1 or image_size < 1:
        raise ValueError("epochs and image size must be at least 1")
    if epoch_seconds <= 0 or not math.isfinite(epoch_seconds):
        raise ValueError(f"epoch seconds must be positive and finite, not {epoch_seconds!r}")
    finish_seconds = max(finish_seconds, 0.0)
    needed = epochs * epoch_seconds + finish_seconds
    usable = max(seconds_left, 0.0) * SUGGESTION_SHARE - finish_seconds
    epochs_that_fit = max(int(usable // epoch_seconds), 0) if usable > 0 else 0
    size: int | None = None
    if usable > 0:
        scale = usable / (epochs * epoch_seconds)
        candidate = int(image_size * math.sqrt(scale)) // IMAGE_SIZE_STEP * IMAGE_SIZE_STEP
        if MIN_IMAGE_SIZE <= candidate < image_size:
            size = candidate
    return Fit(fits=needed <= seconds_left, epochs=epochs, epoch_seconds=epoch_seconds,
               needed_seconds=needed, seconds_left=seconds_left, image_size=image_size,
               epochs_that_fit=min(epochs_that_fit, epochs), image_size_that_fits=size,
               budget_that_fits=needed / SUGGESTION_SHARE)


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _budget_flag(seconds: float) -> str:
    """A ``--time-budget`` value at least ``seconds``, in whole minutes (seconds under 2 min)."""
    return f"{math.ceil(seconds / 60)}m" if seconds >= 120 else f"{math.ceil(seconds)}s"
