"""The local tuner's study: pruning decisions, Hyperband rungs, curves in storage, the budget.

Trials run the fake entry point (``tests/fakes.py``: the real metric lines in
milliseconds), so these tests exercise the study machinery, not torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
from fakes import FAKE_EPOCH_SECONDS_ENV, FAKE_SECONDS_PER_IMAGE_ENV, FAKE_TRAIN_COMMAND

from dogbreed.launcher import events
from dogbreed.launcher.local import tuning as local_tuning
from dogbreed.launcher.local.backend import LocalBackend
from dogbreed.launcher.local.runs import LocalError
from dogbreed.launcher.settings import Settings

FAKE_TRAIN = ["python", FAKE_TRAIN_COMMAND[1]]


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    import sys

    return LocalBackend(Settings(workdir=str(tmp_path / "work")),
                        train_command=[sys.executable, *FAKE_TRAIN[1:]])


def _study(backend: LocalBackend, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name,
                             storage=local_tuning.default_storage(backend.workdir / "tuning" / name))


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


@pytest.mark.parametrize("text, seconds", [("300", 300), ("45s", 45), ("5m", 300), ("1.5h", 5400),
                                           (" 2M ", 120)])
def test_durations(text: str, seconds: float) -> None:
    assert local_tuning.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-1m", "0", "m"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="90s, 5m, 1.5h"):
        local_tuning.parse_duration(text)


def test_a_trial_is_never_pruned_after_its_last_epoch(backend: LocalBackend, sample_data: Path) -> None:
    """The bug: a pruner asked at the final epoch marked a finished 10-epoch trial PRUNED."""
    one_epoch = backend.tuning(name="last", static_hyperparameters={}, trials=2, epochs_max=1,
                               space="seeds", pruner="none")
    one_epoch.pruner = AlwaysPrune()
    result = one_epoch.run(sample_data, progress=events.Progress(enabled=False))
    assert result["counts"]["COMPLETE"] == 2 and result["counts"]["PRUNED"] == 0

    three = backend.tuning(name="early", static_hyperparameters={}, trials=2, epochs_max=3,
                           space="seeds", pruner="hyperband")
    three.pruner = AlwaysPrune()
    result = three.run(sample_data, progress=events.Progress(enabled=False))
    assert result["best_trial"] is None and "no trial of early completed" in result["error"]
    trials = _study(backend, "early").trials
    # Stopped at the first epoch, not after the third: the decision came before the last epoch.
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert [list(t.intermediate_values) for t in trials] == [[1], [1]]


def test_hyperband_gives_every_trial_the_most_epochs_and_stops_the_weak_at_rungs(
        backend: LocalBackend, sample_data: Path) -> None:
    result = backend.tune(name="hb", data=sample_data, static_hyperparameters={}, trials=8,
                          epochs_max=3, space="seeds", pruner="hyperband", seed=3)
    assert result["pruner"] == {"name": "HyperbandPruner", "max_epochs": 3}
    assert result["static_hyperparameters"]["epochs"] == "3"
    assert result["counts"]["COMPLETE"] + result["counts"]["PRUNED"] == 8
    assert result["counts"]["PRUNED"] >= 1, [t["intermediate"] for t in result["trials"]]
    for trial in result["trials"]:
        assert set(trial["hyperparameters"]) == {"lr", "batch-size"}  # epochs is the resource
        expected = 3 if trial["state"] == "COMPLETE" else 1  # the rungs: 1 (then 3 = the end)
        assert trial["epochs_completed"] == expected == len(trial["intermediate"])
        assert [p["epoch"] for p in trial["curve"]] == list(range(1, expected + 1))
    # The curves live in the storage: intermediate values per epoch and the curve attribute.
    stored = {t.number: t for t in _study(backend, "hb").trials}
    for trial in result["trials"]:
        frozen = stored[trial["number"]]
        assert sorted(frozen.intermediate_values) == list(range(1, trial["epochs_completed"] + 1))
        assert frozen.user_attrs["curve"] == trial["curve"]
    # The best model is packed (add-model --file; the fake trainer's is not loadable, the
    # integration test adds a real one); the others' weights are gone.
    best_archive = Path(result["best_model_data"])
    assert best_archive.is_file() and Path(result["best_model_dir"]).is_dir()
    assert result["next"].endswith(f"--file {best_archive}")
    others = [t for t in result["trials"] if t["number"] != result["best_trial"]]
    assert not any((Path(t["dir"]) / "model").exists() for t in others)


def test_a_new_study_starts_from_the_defaults_then_the_seeds_point(backend: LocalBackend,
                                                                    sample_data: Path) -> None:
    tuning = backend.tuning(name="start", static_hyperparameters={"weights": "none"}, trials=3,
                            epochs_max=2, space="full", pruner="none")
    assert tuning.plan()["seeds_trial"] == {  # the seeds' values the full space holds
        "optimizer": "adamw", "lr": "0.001", "batch-size": "32", "lr-schedule": "none", "augment": "flip",
        "label-smoothing": "0.0", "random-erasing": "0.0", "mixup-alpha": "0.0", "cutmix-alpha": "0.0",
        "ema-decay": "0.0", "warmup-epochs": "0"}  # weight-decay 0 is outside its log range: sampled
    result = tuning.run(sample_data, progress=events.Progress(enabled=False))
    first, second, third = result["trials"]
    assert (first["origin"], second["origin"], third.get("origin")) == ("defaults", "seeds", None)
    assert {k: second["hyperparameters"][k] for k in tuning.plan()["seeds_trial"]} == tuning.plan()["seeds_trial"]
    # The scratch defaults (weights=none): AdamW at its own lr, batch 16.
    assert {k: first["hyperparameters"][k] for k in ("optimizer", "lr", "batch-size")} == {
        "optimizer": "adamw", "lr": "0.001", "batch-size": "16"}
    # The seeds' space tunes lr alone, which keeps SGD from scratch: its defaults are SGD's.
    sgd = backend.tuning(name="sgd", static_hyperparameters={"weights": "none"}, trials=1, epochs_max=2,
                         space="seeds", pruner="none")
    assert sgd.plan()["default_trial"] == {"lr": "0.01", "batch-size": "16"}  # epochs 10: over 2
    # Without the known-good points, the sampler chooses from the first trial.
    bare = backend.tuning(name="bare", static_hyperparameters={}, trials=1, epochs_max=2,
                          space="full", pruner="none", default_trial=False)
    assert bare.plan()["default_trial"] == bare.plan()["seeds_trial"] == {}


def test_the_budget_stops_a_running_trial_instead_of_waiting(backend: LocalBackend, sample_data: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_EPOCH_SECONDS_ENV, "1.5")  # a trial would take 4.5 s + start-up
    started = time.monotonic()
    with pytest.raises(LocalError, match="no trial of budget completed.*--resume budget"):
        backend.tune(name="budget", data=sample_data, static_hyperparameters={}, time_budget=2.5,
                     epochs_max=3, space="seeds", pruner="none")
    assert time.monotonic() - started < 2.5 + 4.0  # stopped at the budget, not after 4.5 s
    # Nothing finished, yet the result file is written (every trial, why each stopped).
    saved = json.loads((backend.workdir / "tuning" / "budget.json").read_text())
    assert saved["best_trial"] is None and saved["trials"][0]["stopped"] == "time_budget"
    # The one trial that ran; the seeds' point, enqueued behind it, waits for a --resume.
    ran = [t for t in _study(backend, "budget").trials if t.state.name != "WAITING"]
    (trial,) = ran
    assert trial.state.name == "PRUNED" and trial.user_attrs["stopped"] == "time_budget"
    assert len(trial.user_attrs.get("curve", [])) <= 1  # none yet on a loaded machine


def test_a_study_refuses_to_join_one_with_another_definition(backend: LocalBackend,
                                                              sample_data: Path) -> None:
    backend.tune(name="same", data=sample_data, static_hyperparameters={}, trials=1, epochs_max=2,
                 space="seeds", pruner="none")
    with pytest.raises(local_tuning.SettingsError, match="different definition"):
        backend.tune(name="same", data=sample_data, static_hyperparameters={"image-size": "64"},
                     trials=1, epochs_max=2, space="seeds", pruner="none", resume=True)
    with pytest.raises(local_tuning.SettingsError, match="no study 'other' to resume"):
        backend.tune(name="other", data=sample_data, static_hyperparameters={}, trials=1,
                     space="seeds", resume=True)
    again = backend.tune(name="same", data=sample_data, static_hyperparameters={}, trials=1,
                         epochs_max=2, space="seeds", pruner="none", resume=True)
    assert [t["number"] for t in again["trials"]] == [0, 1] and again["this_process"]["trials"] == [1]


def test_storage_passwords_stay_out_of_results() -> None:
    assert local_tuning._redact("postgresql://tuner:s3cret@db:5432/hpo") == "postgresql://tuner:***@db:5432/hpo"
    assert local_tuning._redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_a_definition_mismatch_names_the_fields_that_differ(backend: LocalBackend) -> None:
    """The bug: the refusal dumped the whole stored definition and left the diff to the reader."""
    backend.tuning(name="defs", static_hyperparameters={}, trials=1, epochs_max=2, space="seeds",
                   pruner="none").open_study()
    other = backend.tuning(name="defs", static_hyperparameters={"image-size": "64"}, trials=1,
                           epochs_max=3, space="seeds", pruner="median", resume=True)
    with pytest.raises(local_tuning.SettingsError, match="different definition") as refused:
        other.open_study()
    message = str(refused.value)
    assert 'static_hyperparameters.image-size: stored (unset), given "64"' in message
    assert "space.epochs.high: stored 2, given 3" in message
    assert 'pruner: stored "none", given "median"' in message
    assert "space.lr" not in message and "--space/--pruner/--epochs-max" in message


def test_the_tune_answer_comes_first_with_exact_next_commands(backend: LocalBackend, sample_data: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`tune --local` printed 880 lines of JSON, search space first, and a `next` hint with a
    literal NAME and no --workdir (so it missed a non-default workdir's study)."""
    import shlex

    from dogbreed.launcher import cli
    from dogbreed.launcher.local.backend import tune_answer

    result = backend.tune(name="answer", data=sample_data, static_hyperparameters={}, trials=2,
                          epochs_max=2, space="seeds", pruner="none")
    answer = tune_answer(result)
    assert list(answer)[:6] == ["tuning_job", "best_trial", "best_objective", "best_test_accuracy",
                                "best_model_data", "next"]
    assert "trials" not in answer and "search_space" not in answer  # in result_file
    assert len(json.dumps(answer, indent=2).splitlines()) < 40
    saved = json.loads(Path(answer["result_file"]).read_text())
    assert len(saved["trials"]) == 2 and saved["next"] == answer["next"]
    assert "NAME" not in answer["next"] and f"--workdir {backend.workdir}" in answer["next"]
    assert "trial's own model" in answer["which_model"]
    # Both commands run as printed (dry run: the plan, nothing done).
    for command in (answer["next"], answer["retrain"]):
        assert f"--workdir {backend.workdir}" in command
        assert cli.main([*shlex.split(command)[1:], "--dry-run"]) == 0, command
        plan = json.loads(capsys.readouterr().out)
        assert plan["backend"] == "local"
    assert plan["hyperparameters"]["lr"] == answer["best_hyperparameters"]["lr"]


def test_a_budget_too_small_for_one_trial_says_so_at_once(backend: LocalBackend, sample_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """`tune --time-budget 5m` on dogs-medium at 224 px ran its 5 minutes and ended with "no trial
    completed": a trial needed 15. The first timed batches now tell, and the study ends there."""
    # 1 s a training image: an epoch of the sample's 80 + 20/3 images takes 87 s, 3 take 4.3 min.
    monkeypatch.setenv(FAKE_SECONDS_PER_IMAGE_ENV, "1.0")
    monkeypatch.setenv(FAKE_EPOCH_SECONDS_ENV, "120")  # the fake's epoch ends early only if stopped
    with pytest.raises(LocalError, match="time budget too small for one full trial: 3 epochs at "
                                         r"image-size 224 need about 4\.\d min") as raised:
        backend.tune(name="short", data=sample_data, static_hyperparameters={}, time_budget=60,
                     epochs_max=3, space="seeds", pruner="hyperband")
    # Not one epoch of 87 s fits 80% of 60 s; a 64 px image (a twelfth of the pixels) does.
    assert "what fits: --image-size 64 or --time-budget 6m" in str(raised.value)
    (line,) = [r.getMessage() for r in caplog.records if "event=time_budget_short" in r.getMessage()]
    assert "trial=0 epochs_done=0 epochs_needed=3" in line and "action=study_ends" in line
    saved = json.loads((backend.workdir / "tuning" / "short.json").read_text())
    assert saved["best_trial"] is None
    assert saved["budget_short"]["suggestions"] == ["--image-size 64", "--time-budget 6m"]
    # The trial stopped before its first epoch; the seeds' point never started.
    ran = [t for t in _study(backend, "short").trials if t.state.name != "WAITING"]
    (trial,) = ran
    assert trial.state.name == "PRUNED" and trial.user_attrs["stopped"] == "time_budget"
    assert trial.user_attrs.get("curve", []) == []


def test_a_budget_that_fits_goes_on(backend: LocalBackend, sample_data: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(FAKE_SECONDS_PER_IMAGE_ENV, "0.0001")  # 9 ms an epoch
    result = backend.tune(name="roomy", data=sample_data, static_hyperparameters={}, time_budget=600,
                          trials=2, epochs_max=3, space="seeds", pruner="hyperband")
    assert result["counts"]["COMPLETE"] == 2 and "budget_short" not in result
    assert not any("time_budget_short" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pruner, complete, done, needed", [
    ("hyperband", 0, 0, 10),  # a lone trial is never pruned: it needs all its epochs
    ("hyperband", 1, 0, 1), ("hyperband", 1, 1, 3), ("hyperband", 1, 3, 9), ("hyperband", 1, 9, 10),
    ("median", 1, 0, 10),  # two start-up trials must complete before it prunes
    ("median", 2, 0, 1), ("median", 2, 4, 5),
    ("none", 5, 0, 10),
])
def test_the_epochs_a_trial_needs_follow_the_pruner(backend: LocalBackend, pruner: str, complete: int,
                                                    done: int, needed: int) -> None:
    tuning = backend.tuning(name="rungs", static_hyperparameters={}, trials=1, epochs_max=10,
                            space="seeds", pruner=pruner)

    class Study:
        def get_trials(self, deepcopy: bool = False) -> list:
            return [optuna.trial.create_trial(value=0.5, params={}, distributions={})] * complete

    assert tuning._epochs_needed(Study(), 10, done) == needed


@pytest.mark.parametrize("log, layout", [
    ("x\n2026-01-01 INFO dogbreed.train event=cpu_layout channels_last=True ms_per_step={}\n", "true"),
    ("event=cpu_layout channels_last=False ms_per_step=rank0\n", "false"),
    ("epoch=1 train_loss=1.0\n", None),  # channels-last given: no probe, nothing to pin
])
def test_a_pruned_trials_layout_comes_from_its_own_log(tmp_path: Path, log: str, layout: str | None) -> None:
    (tmp_path / "train.log").write_text(log)
    assert local_tuning.logged_layout(tmp_path / "train.log") == layout
    assert local_tuning.logged_layout(tmp_path / "missing.log") is None


def test_a_schema_race_on_a_new_sqlite_study_is_retried(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes opening a new SQLite study together (a second `tune --local`, or anything
    reading the study) race to create Optuna's tables; the loser's CREATE TABLE fails with "table
    ... already exists". Seen as a tuner dead at start-up under `make test`: it retries now."""
    import sqlite3

    import sqlalchemy.exc

    real = optuna.storages.RDBStorage
    calls: list[int] = []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE study_user_attributes", {},
                sqlite3.OperationalError("table study_user_attributes already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(local_tuning.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    tuning = backend.tuning(name="race", static_hyperparameters={}, trials=1, epochs_max=2, space="seeds")
    assert isinstance(tuning.storage(), real) and len(calls) == 2

    # Any other operational error (a locked or unreadable database) is not a race: raised at once.
    def unreadable(*args, **kwargs):
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("unable to open database file"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", unreadable)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="unable to open"):
        tuning.storage()
    assert len(calls) == 1
