"""The budget check's arithmetic (dogbreed.launcher.budget) and the trainer's timing line.

Pure functions: what an epoch costs from the first timed batches, whether the epochs a trial
needs fit in the budget left, and which --epochs-max / --image-size / --time-budget would.
"""

from __future__ import annotations

import pytest

from dogbreed import metrics
from dogbreed.launcher import budget


def test_an_epoch_is_the_training_pass_plus_a_validation_pass_at_a_third() -> None:
    # dogs-medium: 419 train and 75 valid images; 0.5 s a training image (224 px, 2 CPU cores).
    assert budget.epoch_seconds(0.5, 419, 75) == pytest.approx(0.5 * (419 + 75 / 3))
    assert budget.epoch_seconds(0.0, 419, 75) == 0.0
    with pytest.raises(ValueError, match="must not be negative"):
        budget.epoch_seconds(-0.1, 419, 75)


def test_the_reported_case_does_not_fit_and_names_what_would() -> None:
    """dogs-medium at 224 px, 10 epochs, in 5 minutes: ~90 s an epoch, ~15 minutes a trial."""
    verdict = budget.fit(epoch_seconds=90.0, epochs=10, seconds_left=300.0, image_size=224,
                         finish_seconds=30.0)
    assert not verdict.fits
    assert verdict.needed_seconds == pytest.approx(930.0)
    # 80% of 300 s less the 30 s finish = 210 s: 2 epochs of 90 s.
    assert verdict.epochs_that_fit == 2
    # 210 s for 10 epochs is 0.233 of 900 s: 224 * sqrt(0.233) = 108 -> 96 (a multiple of 32).
    assert verdict.image_size_that_fits == 96
    assert verdict.budget_that_fits == pytest.approx(930.0 / 0.8)
    assert verdict.suggestions() == ["--epochs-max 2", "--image-size 96", "--time-budget 20m"]
    message = verdict.message()
    assert "10 epochs at image-size 224 need about 15.5 min" in message
    assert "more than the 5.0 min available" in message
    assert message.endswith("--epochs-max 2 or --image-size 96 or --time-budget 20m")


def test_a_suggested_image_size_fits_by_the_pixel_scaling_it_assumes() -> None:
    verdict = budget.fit(epoch_seconds=90.0, epochs=10, seconds_left=300.0, image_size=224)
    size = verdict.image_size_that_fits
    assert size is not None and size % budget.IMAGE_SIZE_STEP == 0
    scaled = budget.fit(epoch_seconds=90.0 * (size / 224) ** 2, epochs=10, seconds_left=300.0,
                        image_size=size)
    assert scaled.fits


@pytest.mark.parametrize("seconds_left, fits", [(100.0, True), (99.9, False)])
def test_fits_exactly_when_the_epochs_and_the_finish_fit(seconds_left: float, fits: bool) -> None:
    verdict = budget.fit(epoch_seconds=30.0, epochs=3, seconds_left=seconds_left, image_size=64,
                         finish_seconds=10.0)
    assert verdict.fits is fits
    if fits:
        assert "fit in" in verdict.message()


def test_nothing_smaller_is_suggested_when_not_even_the_smallest_would_fit() -> None:
    # Less left than the finish alone: no epoch count or image size fits, only a larger budget.
    verdict = budget.fit(epoch_seconds=5.0, epochs=3, seconds_left=10.0, image_size=64,
                         finish_seconds=20.0)
    assert not verdict.fits and verdict.epochs_that_fit == 0 and verdict.image_size_that_fits is None
    assert verdict.suggestions() == ["--time-budget 44s"]  # (15 + 20) / 0.8 = 43.75
    # At the smallest image size already, a smaller one is never suggested.
    smallest = budget.fit(epoch_seconds=5.0, epochs=10, seconds_left=20.0, image_size=32)
    assert smallest.image_size_that_fits is None and smallest.epochs_that_fit == 3


@pytest.mark.parametrize("kwargs", [dict(epoch_seconds=0.0), dict(epoch_seconds=float("nan")),
                                    dict(epochs=0), dict(image_size=0)])
def test_refuses_inputs_it_cannot_judge(kwargs: dict) -> None:
    args = dict(epoch_seconds=10.0, epochs=3, seconds_left=60.0, image_size=64) | kwargs
    with pytest.raises(ValueError):
        budget.fit(**args)


def test_the_timing_line_round_trips_and_no_metric_regex_reads_it() -> None:
    line = metrics.timing_line(3, 96, 12.0, False, 419, 75, 100, 224)
    logged = f"2026-01-01 00:00:00,000 INFO dogbreed.train {line}"
    timing = metrics.parse_timing(logged)
    assert timing == {"batches": 3, "images": 96, "seconds": 12.0, "seconds_per_image": 0.125,
                      "warmup_included": False, "train_images": 419, "valid_images": 75,
                      "test_images": 100, "image_size": 224}
    # SageMaker applies MetricDefinitions to every log line: this one is no metric value.
    assert metrics.parse_metrics(logged) == {} and metrics.parse_best(logged) == {}
    assert metrics.parse_timing("epoch=1 train_loss=1.0") is None
