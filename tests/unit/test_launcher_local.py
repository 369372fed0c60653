"""The local backend with a fake training entry point (same contract, milliseconds per run)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from fakes import FAKE_FAIL_ENV, FAKE_TRAIN_COMMAND, METADATA_FILE, WEIGHTS_FILE, fake_accuracy

from dogbreed import artifacts, contract, metrics, train
from dogbreed.launcher import search_space
from dogbreed.launcher.local import backend as local_backend
from dogbreed.launcher.local import runs as local_runs
from dogbreed.launcher.local import tuning as local_tuning
from dogbreed.launcher.local.backend import LocalBackend, LocalError, TrainingRun
from dogbreed.launcher.local.endpoint import STATE_FILE
from dogbreed.launcher.settings import Settings, SettingsError
from dogbreed.metrics import parse_best, parse_metrics

FAKE_TRAIN = list(FAKE_TRAIN_COMMAND)


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(Settings(workdir=str(tmp_path / "work")), train_command=FAKE_TRAIN)


def test_launcher_uses_the_real_artifact_names() -> None:
    assert (WEIGHTS_FILE, METADATA_FILE) == (artifacts.WEIGHTS_FILE, artifacts.METADATA_FILE)
    assert local_backend.ARCHIVE_NAME == artifacts.ARCHIVE_NAME
    # The trainer's metric definitions are the torch-free module's (one definition).
    assert train.OBJECTIVE_METRIC == metrics.OBJECTIVE_METRIC == local_tuning.OBJECTIVE_METRIC
    assert train.METRIC_DEFINITIONS is metrics.METRIC_DEFINITIONS


def test_metric_lines_parse_with_the_sagemaker_metric_definitions() -> None:
    line = ("epoch=3 train_loss=0.8100 train_accuracy=0.7000 valid_loss=0.9000 "
            "valid_accuracy=0.7100 images_per_sec=912.0 epoch_seconds=1.25 lr=0.01")
    metrics = parse_metrics(line)
    assert metrics["valid_accuracy"] == 0.71 and metrics["train_loss"] == 0.81
    assert set(metrics) == {d["Name"] for d in train.METRIC_DEFINITIONS} - {"test_loss", "test_accuracy"}
    # The closing line is no objective value (Hyperband would count it as one more epoch); the
    # local runner reads it on its own.
    assert parse_metrics("best_epoch=2 best_valid_loss=1.5 best_valid_accuracy=0.35") == {}
    assert parse_best("best_epoch=2 best_valid_loss=1.5 best_valid_accuracy=0.35") == {
        "valid_loss": 1.5, "valid_accuracy": 0.35}
    assert parse_metrics("2026-01-01 INFO event=start model=resnet18") == {}


def test_training_run_lays_out_opt_ml_and_streams_epochs(tmp_path: Path, sample_data: Path) -> None:
    seen = []
    run = TrainingRun(tmp_path / "job", {"epochs": "3", "lr": "0.01"}, sample_data,
                      train_command=FAKE_TRAIN, on_epoch=lambda e, m: seen.append(e) and False)
    result = run.run()
    assert result.returncode == 0 and seen == [1, 2, 3]
    assert result.objective == fake_accuracy(0.01, 3, 3)
    paths = result.paths
    assert json.loads(paths.hyperparameters_file.read_text()) == {"epochs": "3", "lr": "0.01"}
    assert contract.resolve_splits(paths)["train"].resolve() == (sample_data / "train").resolve()
    assert "fake training done" in (paths.base / local_runs.TRAIN_LOG).read_text()


def test_stopping_a_run_sends_sigterm(tmp_path: Path, sample_data: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGBREED_FAKE_EPOCH_SECONDS", "0.2")
    run = TrainingRun(tmp_path / "job", {"epochs": "10"}, sample_data, train_command=FAKE_TRAIN,
                      on_epoch=lambda epoch, _m: epoch >= 1)
    result = run.run()
    assert result.pruned and result.returncode == 143 and len(result.epochs) == 1
    assert "SIGTERM" in result.failure()


def test_local_train_packs_model_and_add_model_fills_the_store(backend: LocalBackend,
                                                               sample_data: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake trainer's weights are placeholders: add-model's validation (which loads the
    # model for real) is tested with real archives in tests/reliability/test_archive_attacks.py.
    monkeypatch.setattr(local_backend, "validate_model_archive", lambda archive: None)
    job = backend.train(name="job-1", hyperparameters={"epochs": "2", "model": "mobilenet_v2"},
                        data=sample_data, echo=False)
    archive = Path(job["model_data"])
    assert archive.name == "model.tar.gz" and archive.parent.name == "output"
    # The saved (best) epoch's figures and the last epoch's, each named by its epoch: the last
    # epoch's training loss used to sit beside the best epoch's validation figures.
    assert job["final_metrics"]["best_epoch"]["valid_accuracy"] == fake_accuracy(0.01, 2, 2)
    assert job["final_metrics"]["best_epoch"]["epoch"] == 2
    assert set(job["final_metrics"]["last_epoch"]) == {"epoch", "train_loss", "train_accuracy",
                                                       "valid_loss", "valid_accuracy"}

    added = backend.add_model("dogs", training_job="job-1")
    assert added["target_model"] == "dogs/model.tar.gz"
    assert backend.store.targets() == ["dogs/model.tar.gz"]
    with pytest.raises(SettingsError):
        backend.add_model("dogs", training_job="no-such-job")
    with pytest.raises(SettingsError):
        backend.add_model("../escape", training_job="job-1")


def test_final_metrics_name_the_epoch_each_figure_is_from() -> None:
    epochs = [{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.1, "valid_loss": 1.5, "valid_accuracy": 0.2},
              {"epoch": 2, "train_loss": 1.0, "train_accuracy": 0.5, "valid_loss": 1.2, "valid_accuracy": 0.4},
              {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "valid_loss": 1.4, "valid_accuracy": 0.4}]
    final = {"train_loss": 0.5, "train_accuracy": 0.8, "valid_loss": 1.2, "valid_accuracy": 0.4,
             "test_loss": 1.3, "test_accuracy": 0.35}
    assert local_backend.final_metrics(epochs, final) == {
        "best_epoch": {"epoch": 2, "valid_loss": 1.2, "valid_accuracy": 0.4, "test_loss": 1.3,
                       "test_accuracy": 0.35},
        "last_epoch": {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "valid_loss": 1.4,
                       "valid_accuracy": 0.4}}


def test_failed_training_reports_the_failure_file(backend: LocalBackend, sample_data: Path) -> None:
    with pytest.raises(contract.ContractError):
        backend.train(name="bad", hyperparameters={"epochs": "zero"}, data=sample_data)
    run = TrainingRun(backend.workdir / "jobs" / "bad", {"epochs": "zero"}, sample_data,
                      train_command=FAKE_TRAIN)
    result = run.run()
    assert result.returncode == 1 and "epochs" in result.failure()


def test_local_tune_prunes_and_saves_the_best(backend: LocalBackend, sample_data: Path,
                                              tmp_path: Path) -> None:
    result = backend.tune(name="study", data=sample_data, static_hyperparameters={"image-size": "64"},
                          trials=8, epochs_max=3, seed=1, space="seeds", pruner="median")
    assert result["counts"]["COMPLETE"] + result["counts"]["PRUNED"] == 8
    assert result["counts"]["PRUNED"] >= 1
    for trial in result["trials"]:
        hps = trial["hyperparameters"]
        assert set(hps) == {"lr", "batch-size", "epochs"}
        assert 1e-3 <= float(hps["lr"]) <= 1e-1 and hps["batch-size"] in {"16", "32", "64", "128", "256"}
        assert 2 <= int(hps["epochs"]) <= 3
        if trial["state"] == "PRUNED":
            assert 1 <= trial["epochs_completed"] <= int(hps["epochs"]) and trial["value"] is None
    complete = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert result["best_objective"] == max(t["value"] for t in complete)
    assert result["best_hyperparameters"]["image-size"] == "64"
    saved = json.loads(Path(result["result_file"]).read_text())
    assert saved["best_hyperparameters"] == result["best_hyperparameters"]
    assert Path(result["best_model_data"]).is_file()
    # train --from-tuning-job reads it back (by name or by file).
    assert backend.best_hyperparameters("study") == result["best_hyperparameters"]
    assert backend.best_hyperparameters(result["result_file"]) == result["best_hyperparameters"]


def test_tune_refuses_fixing_a_tuned_hyperparameter(backend: LocalBackend, sample_data: Path) -> None:
    with pytest.raises(SettingsError, match="lr"):
        backend.tune(name="s", data=sample_data, static_hyperparameters={"lr": "0.1"}, trials=1)


def test_tune_with_every_trial_failing_is_an_error(backend: LocalBackend, sample_data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_FAIL_ENV, "WeightsError: no network")
    with pytest.raises(LocalError, match="no trial.*WeightsError: no network"):
        backend.tune(name="s", data=sample_data, static_hyperparameters={}, trials=2)


def test_default_weights_fall_back_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_runs, "imagenet_weights_cached", lambda arch: False)
    assert local_runs.default_weights({}, explicit=False)["weights"] == "none"
    assert local_runs.default_weights({"weights": "imagenet"}, explicit=True)["weights"] == "imagenet"
    monkeypatch.setattr(local_runs, "imagenet_weights_cached", lambda arch: True)
    assert "weights" not in local_runs.default_weights({}, explicit=False)


def test_imagenet_weights_cache_is_found_without_torch(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch-free check looks where torch.hub.get_dir() does ($TORCH_HOME/hub/checkpoints)."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert local_runs.torch_hub_dir() == Path(torch.hub.get_dir())
    assert not local_runs.imagenet_weights_cached("resnet18")
    (local_runs.torch_hub_dir() / "checkpoints").mkdir(parents=True)
    (local_runs.torch_hub_dir() / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    assert local_runs.imagenet_weights_cached("resnet18")
    assert not local_runs.imagenet_weights_cached("resnet50")


def test_docker_mode_runs_the_train_image(tmp_path: Path, sample_data: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--docker`: docker run --network host, /opt/ml mounted, data as the training channel."""
    record = tmp_path / "docker-args.json"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
json.dump(sys.argv[1:], open({str(record)!r}, "w"))
base = sys.argv[sys.argv.index("-v") + 1].split(":")[0]
os.environ["SAGEMAKER_BASE_DIR"] = base
sys.path.insert(0, {str(Path(FAKE_TRAIN_COMMAND[1]).parent)!r})
from fakes import fake_train_main
sys.exit(fake_train_main())
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    backend = LocalBackend(Settings(workdir=str(tmp_path / "work")), docker_image="dogbreed-train:latest")
    job = backend.train(name="in-docker", hyperparameters={"epochs": "1"}, data=sample_data, echo=False)
    args = json.loads(record.read_text())
    assert args[:4] == ["run", "--rm", "--network", "host"]
    assert args[-2:] == ["dogbreed-train:latest", "train"]
    base = backend.workdir / "jobs" / "in-docker"
    assert f"{base}:/opt/ml" in args
    assert f"{sample_data.resolve()}:/opt/ml/input/data/training:ro" in args
    # The channel is a plain mount point in docker mode, not a link to a host path.
    assert (base / "input" / "data" / "training").is_dir()
    assert not (base / "input" / "data" / "training").is_symlink()
    assert Path(job["model_data"]).is_file()


def test_search_space_is_the_one_definition() -> None:
    assert [p.name for p in search_space.SEARCH_SPACE] == ["lr", "batch-size", "epochs"]


def test_tuning_score_breaks_accuracy_ties_by_loss() -> None:
    score = local_tuning.tuning_score
    assert score({"valid_accuracy": 0.25, "valid_loss": 9.0}) > score({"valid_accuracy": 0.2, "valid_loss": 0.1})
    assert score({"valid_accuracy": 0.2, "valid_loss": 1.0}) > score({"valid_accuracy": 0.2, "valid_loss": 2.0})
    assert score({"valid_accuracy": 0.2}) < 0.2 and score({"valid_loss": 1.0}) is None
    assert 0.2 - local_tuning.TIE_BREAK < score({"valid_accuracy": 0.2, "valid_loss": 1e9}) < 0.2


def test_a_stale_endpoint_state_is_ignored(backend: LocalBackend) -> None:
    """A state file whose pid is dead, or now belongs to another program, is never signalled."""
    import subprocess

    state_file = backend.endpoint_dir / STATE_FILE
    state_file.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        state_file.write_text(json.dumps({"pid": other.pid, "url": "http://127.0.0.1:1"}))
        assert backend.state() is None and backend.stop_endpoint() is None
        assert other.poll() is None  # not killed
    finally:
        other.kill()
        other.wait()
    state_file.write_text(json.dumps({"pid": 2**22 + 12345, "url": "http://127.0.0.1:1"}))
    assert backend.state() is None


def test_nproc_asks_the_entry_point_for_ranks(tmp_path: Path, sample_data: Path) -> None:
    """`dogbreed train --local --nproc 2`: the entry point runs 2 gloo ranks (see
    tests/integration/test_distributed_train.py for the real run)."""
    from dogbreed import contract
    from dogbreed.launcher.local.runs import TrainingRun

    run = TrainingRun(tmp_path / "job", {"epochs": "1"}, sample_data, nproc=2)
    _, env = run.command(run.prepare())
    assert env[contract.NPROC_PER_HOST_ENV] == "2"
    docker = TrainingRun(tmp_path / "job2", {"epochs": "1"}, sample_data, nproc=2,
                         docker_image="dogbreed-train:latest")
    command, _ = docker.command(docker.prepare())
    assert f"{contract.NPROC_PER_HOST_ENV}=2" in command


@pytest.mark.parametrize("escape", ["..", ".", "../victim", "link"])
def test_a_run_never_deletes_a_folder_outside_its_parent(escape: str, tmp_path: Path,
                                                         sample_data: Path) -> None:
    """Defence in depth behind the name check: the run dir is rmtree'd and rebuilt, so one that
    resolves outside <workdir>/jobs (or a study's folder) is refused before anything is deleted."""
    jobs, victim = tmp_path / "jobs", tmp_path / "victim"
    (jobs / "a").mkdir(parents=True)
    (jobs / "a" / "keep").write_text("keep")
    victim.mkdir()
    (victim / "keep").write_text("keep")
    (jobs / "link").symlink_to(victim, target_is_directory=True)
    runs = [TrainingRun(jobs / escape, {"epochs": "1"}, sample_data, train_command=FAKE_TRAIN,
                        inside=jobs),
            local_runs.InProcessRun(jobs / escape, {"epochs": "1"}, sample_data, cache=None,
                                    inside=jobs)]
    for run in runs:
        with pytest.raises(SettingsError, match="is not inside"):
            run.run()
    assert (jobs / "a" / "keep").is_file() and (victim / "keep").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_local_job_and_study_names_are_checked_before_the_disk(backend: LocalBackend,
                                                                sample_data: Path) -> None:
    for name in ("../x", ".", "/abs", "a_b", "x" * 64):
        with pytest.raises(SettingsError, match="training job name"):
            backend.train(name=name, hyperparameters={"epochs": "1"}, data=sample_data)
        with pytest.raises(SettingsError, match="study name"):
            backend.tuning(name=name, static_hyperparameters={}, trials=1)
    with pytest.raises(SettingsError, match="at most 32"):  # a SageMaker tuning job's limit
        backend.tuning(name="x" * 33, static_hyperparameters={}, trials=1)
    assert not backend.workdir.exists()
