"""Resuming from checkpoints through the real training loop (tiny runs: 32 px, no weights)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dogbreed import contract, data, distributed, recipe, train

pytestmark = pytest.mark.slow  # trains: about a dozen 32 px epochs in all

HPS = {"model": "resnet18", "batch-size": "16", "lr": "0.01", "image-size": "32",
       "weights": "none", "channels-last": "false"}  # fixed layout: losses compare exactly
DECODED = data.DecodeCache()  # the runs here train on the same images: decode them once


@pytest.fixture(scope="module")
def sample_data(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every class of the sample, fewer images (4 train, 1 valid, 1 test each): resuming does not
    depend on how many batches an epoch has, and the dozen epochs here cost a fifth as much."""
    root = tmp_path_factory.mktemp("few-dogs")
    for split, keep in (("train", 4), ("valid", 1), ("test", 1)):
        for folder in sorted((sample_data / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.jpg"))[:keep]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


def _job(base: Path, sample_data: Path, **hps: str) -> tuple[contract.Hyperparameters, contract.Paths]:
    values = {**HPS, **hps}
    paths = contract.prepare_local_job(base, values, {"training": sample_data})
    return contract.parse_hyperparameters(values), paths


def _run(hp: contract.Hyperparameters, paths: contract.Paths, stop_after_epoch: int = 0,
         stop: train.StopFlag | None = None) -> train.TrainResult:
    """train.run; with ``stop_after_epoch`` a SIGTERM arrives as that epoch ends."""
    stop = stop or train.StopFlag()

    def on_epoch(result: train.EpochResult) -> None:
        if result.epoch == stop_after_epoch:
            stop.requested = True

    return train.run(hp, paths, stop, on_epoch=on_epoch, device=torch.device("cpu"), cache=DECODED)


def _fresh_lrs(hp: contract.Hyperparameters) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=hp.lr)
    scheduler = recipe.make_scheduler(hp, optimizer)
    lrs = []
    for _ in range(hp.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup", ["0", "2"])
def test_a_resume_with_more_epochs_follows_the_schedule_of_the_new_count(
        tmp_path: Path, sample_data: Path, warmup: str):
    # 1 planned epoch: cosine over 1 (warmup clamped to 0); then 3: warmup, cosine over 3 - warmup.
    short, paths = _job(tmp_path, sample_data, epochs="1", **{"warmup-epochs": warmup})
    _run(short, paths)
    longer, paths = _job(tmp_path, sample_data, epochs="3", **{"warmup-epochs": warmup})
    result = _run(longer, paths)
    assert [h.epoch for h in result.history] == [1, 2, 3]
    resumed_lrs = [h.lr for h in result.history[1:]]
    assert resumed_lrs == pytest.approx(_fresh_lrs(longer)[1:], rel=1e-12)
    assert all(lr > 0 for lr in resumed_lrs)  # the old schedule hit 0 at epoch 2, then climbed


def test_an_interrupted_run_resumes_exactly_where_the_uninterrupted_one_would_be(
        tmp_path: Path, sample_data: Path):
    hp, whole = _job(tmp_path / "whole", sample_data, epochs="2", **{"warmup-epochs": "1"})
    expected = _run(hp, whole).history
    _, paths = _job(tmp_path / "interrupted", sample_data, epochs="2", **{"warmup-epochs": "1"})
    with pytest.raises(train.Interrupted) as stopped:
        _run(hp, paths, stop_after_epoch=1)
    assert stopped.value.checkpointed_epochs == 1
    resumed = _run(hp, paths).history
    fields = [(h.epoch, h.train_loss, h.valid_loss, h.lr) for h in resumed]
    assert fields == [(h.epoch, h.train_loss, h.valid_loss, h.lr) for h in expected]


def test_a_new_job_resumes_a_stopped_jobs_checkpoint_with_the_same_hyperparameters(
        tmp_path: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    """AWS resumes a stopped job as a new job (new name) on the same checkpoint prefix."""
    caplog.set_level(logging.INFO, logger="dogbreed.train")
    hp, paths = _job(tmp_path, sample_data, epochs="2")
    monkeypatch.setenv(train.TRAINING_JOB_NAME_ENV, "job-a")
    with pytest.raises(train.Interrupted):
        _run(hp, paths, stop_after_epoch=1)
    job_a = paths.checkpoints_dir / "checkpoint-job-a.pt"
    assert job_a.is_file()

    # Job C: another learning rate, same checkpoint dir; it must not pick up job A's epoch.
    other_lr, paths = _job(tmp_path, sample_data, epochs="1", lr="0.02")
    monkeypatch.setenv(train.TRAINING_JOB_NAME_ENV, "job-c")
    caplog.clear()
    assert [h.epoch for h in _run(other_lr, paths).history] == [1]
    assert f"event=checkpoint_mismatch path={job_a} differs=lr action=skip" in caplog.text
    assert "event=resume" not in caplog.text

    # Job B: job A's hyperparameters with more epochs; job C's newer file (lr differs) is skipped.
    more_epochs, paths = _job(tmp_path, sample_data, epochs="3")
    monkeypatch.setenv(train.TRAINING_JOB_NAME_ENV, "job-b")
    caplog.clear()
    result = _run(more_epochs, paths)
    job_b = paths.checkpoints_dir / "checkpoint-job-b.pt"
    assert f"event=resume checkpoint={job_b} completed_epochs=1 from={job_a}" in caplog.text
    assert f"path={paths.checkpoints_dir / 'checkpoint-job-c.pt'} differs=lr action=skip" in caplog.text
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert torch.load(job_b, weights_only=True)["epoch"] == 3  # B writes its own file
    assert torch.load(job_a, weights_only=True)["epoch"] == 1

    # A tuning trial (the service adds _tuning_objective_metric) never adopts another trial's
    # file, though job A's matches: its result must be an independent sample of its point.
    trial, paths = _job(tmp_path, sample_data, epochs="2", _tuning_objective_metric="valid_accuracy")
    assert contract.is_tuning_trial(paths, env={})
    monkeypatch.setenv(train.TRAINING_JOB_NAME_ENV, "tuning-trial-1")
    caplog.clear()
    assert [h.epoch for h in _run(trial, paths).history] == [1, 2]
    assert "event=resume" not in caplog.text
    # Finished, it removes its own file (so the shared prefix does not carry it into the next
    # trials) and no other job's.
    assert not (paths.checkpoints_dir / "checkpoint-tuning-trial-1.pt").exists()
    assert "event=checkpoint_removed" in caplog.text
    assert sorted(p.name for p in paths.checkpoints_dir.glob("*.pt")) == [
        "checkpoint-job-a.pt", "checkpoint-job-b.pt", "checkpoint-job-c.pt"]


def test_sigterm_before_the_first_epoch_says_there_is_nothing_to_resume(
        tmp_path: Path, sample_data: Path):
    hp, paths = _job(tmp_path, sample_data, epochs="2")
    stop = train.StopFlag()
    stop.requested = True  # SIGTERM during decode: the first batch sees it
    with pytest.raises(train.Interrupted) as stopped:
        _run(hp, paths, stop=stop)
    assert not any(paths.checkpoints_dir.glob("*.pt"))
    reason = train.interrupted_reason(stopped.value, distributed.ONE_PROCESS, paths.checkpoints_dir)
    assert "before the first epoch completed" in reason and "nothing to resume" in reason
    assert "last completed epoch" not in reason

    # One completed epoch: the message points at its checkpoint.
    with pytest.raises(train.Interrupted) as stopped:
        _run(hp, paths, stop_after_epoch=1)
    reason = train.interrupted_reason(stopped.value, distributed.ONE_PROCESS, paths.checkpoints_dir)
    assert f"last completed epoch (1) is checkpointed in {paths.checkpoints_dir}" in reason


def test_a_checkpoint_write_cut_short_leaves_nothing_behind_at_the_next_start(
        tmp_path: Path, sample_data: Path, caplog: pytest.LogCaptureFixture):
    """A SIGKILL during save_checkpoint leaves atomic_write's temp file (6-59 MB), which
    SageMaker's checkpoint sync would upload and copy into every later job: the next start
    removes it, saying so, and resumes the complete checkpoint beside it."""
    hp, paths = _job(tmp_path, sample_data, epochs="1")
    _run(hp, paths)
    complete = paths.checkpoints_dir / train.CHECKPOINT_FILE
    partials = [paths.checkpoints_dir / ".checkpoint.pt.k1ll3d",  # this job's
                paths.checkpoints_dir / ".checkpoint-earlier-job.pt.x9y8z7"]  # a stopped job's
    for partial in partials:
        partial.write_bytes(complete.read_bytes()[:1000])
    caplog.set_level(logging.INFO, logger="dogbreed.train")
    more, _ = _job(tmp_path, sample_data, epochs="2")
    assert [h.epoch for h in _run(more, paths).history] == [1, 2]
    assert not any(p.exists() for p in partials)
    for partial in partials:
        assert f"event=partial_checkpoint_removed path={partial} bytes=1000" in caplog.text
    assert "event=resume" in caplog.text


def test_a_tuning_trial_removes_only_its_own_partial_checkpoints(tmp_path: Path):
    """Trials share one checkpoint prefix and run at the same time: another trial's temp file
    may be a write in progress."""
    own = tmp_path / "checkpoint-trial-1.pt"
    mine, theirs = tmp_path / ".checkpoint-trial-1.pt.abc", tmp_path / ".checkpoint-trial-2.pt.def"
    for path in (mine, theirs, own):
        path.write_bytes(b"x")
    assert train.remove_partial_checkpoints(own, every_job=False) == [mine]
    assert theirs.exists() and own.exists()
    assert train.remove_partial_checkpoints(own) == [theirs]
    assert own.exists()


def test_an_absurd_epoch_is_skipped_not_fatal(sample_data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """From scratch at small sizes one epoch's validation loss can spike far past a uniform
    guess's (BatchNorm's running statistics, 160-180 for 5 classes) and the run recovers: that
    epoch is neither checkpointed nor saved, and the job goes on. Only a run with no sane epoch
    is Diverged (tests/reliability: lr=1)."""
    import dataclasses

    real_evaluate = train.evaluate
    calls = []

    def first_validation_absurd(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        calls.append(result.loss)
        return dataclasses.replace(result, loss=1e9) if len(calls) == 1 else result

    monkeypatch.setattr(train, "evaluate", first_validation_absurd)
    caplog.set_level(logging.WARNING, logger="dogbreed.train")
    hp, paths = _job(tmp_path, sample_data, epochs="2")
    result = _run(hp, paths)
    assert result.best_epoch == 2 and (paths.model_dir / "model.pt").is_file()
    assert "event=diverged_epoch epoch=1 loss=1e+09" in caplog.text
    assert [r.valid_loss for r in result.history][0] == 1e9
