"""The `dogbreed` CLI: --help everywhere, --dry-run request JSON, settings precedence, local flows."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import FAKE_EPOCH_SECONDS_ENV, FAKE_TRAIN_COMMAND

from dogbreed import train
from dogbreed.launcher import cli, search_space
from dogbreed.launcher import settings as settings_mod
from dogbreed.launcher.local import backend as local_backend
from dogbreed.launcher.local import runs as local_runs
from dogbreed.launcher.sagemaker.requests import validate_request

SUBCOMMANDS = ["upload-data", "tune", "train", "deploy", "add-model", "invoke", "status",
               "cleanup", "demo"]
AWS = ["--region", "us-west-2", "--role-arn", "arn:aws:iam::123456789012:role/sm",
       "--bucket", "my-bucket", "--train-image", "acct.dkr.ecr.us-west-2.amazonaws.com/t:1",
       "--serve-image", "acct.dkr.ecr.us-west-2.amazonaws.com/s:1"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(settings_mod.FIELDS) + ["config"]:
        monkeypatch.delenv(settings_mod.env_name(name), raising=False)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    """``run(*argv)`` → (exit code, stdout parsed as JSON, stderr + log events)."""
    caplog.set_level("INFO")

    def runner(*argv: str) -> tuple[int, object, str]:
        caplog.clear()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        try:
            payload = json.loads(out) if out.strip() else None
        except json.JSONDecodeError:
            payload = out
        return code, payload, err + caplog.text

    return runner


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out or command is None
    assert "usage: dogbreed" in out


def test_tune_dry_run_prints_the_tuning_request(run) -> None:
    code, request, err = run("tune", "--dry-run", *AWS, "--trials", "10",
                             "--max-parallel", "2", "--strategy", "Random", "--image-size", "224",
                             "--name", "dogbreed-tune-x", "--poll-seconds", "5")
    assert code == 0, err
    assert request["service"] == "sagemaker" and request["operation"] == "CreateHyperParameterTuningJob"
    body = request["request"]
    validate_request("sagemaker", "CreateHyperParameterTuningJob", body)
    config = body["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Random"
    # --space full (the default): the seeds' ranges and the recipe knobs, as the local tuner.
    assert config["ParameterRanges"] == search_space.to_sagemaker(search_space.named("full"))
    assert config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 10
    definition = body["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == train.METRIC_DEFINITIONS
    assert definition["RoleArn"] == AWS[3]
    assert definition["StaticHyperParameters"] == {"image-size": "224"}
    assert definition["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://my-bucket/dogbreed/data"


def test_tune_dry_run_space_and_time_budget(run) -> None:
    code, request, err = run("tune", "--dry-run", *AWS, "--space", "seeds", "--time-budget", "1.5h",
                             "--strategy", "Hyperband", "--epochs-max", "9", "--name", "t")
    assert code == 0, err
    body = request["request"]
    validate_request("sagemaker", "CreateHyperParameterTuningJob", body)
    config = body["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"] == search_space.to_sagemaker(
        search_space.without(search_space.SEARCH_SPACE, "epochs"))
    assert config["ResourceLimits"]["MaxRuntimeInSeconds"] == 5400
    assert config["StrategyConfig"]["HyperbandStrategyConfig"]["MaxResource"] == 9
    code, _, err = run("tune", "--dry-run", *AWS, "--time-budget", "5m", "--max-tuning-runtime", "60")
    assert code == cli.EXIT_USAGE and "give one" in err
    code, _, err = run("tune", "--dry-run", *AWS, "--time-budget", "soon")
    assert code == cli.EXIT_USAGE and "90s, 5m, 1.5h" in err
    code, _, err = run("tune", "--dry-run", *AWS, "--storage", "sqlite:///x.db")
    assert code == cli.EXIT_USAGE and "local only" in err


def test_tune_dry_run_without_settings_shows_placeholders(run) -> None:
    code, request, err = run("tune", "--dry-run")
    assert code == 0, err
    assert request["operation"] == "CreateHyperParameterTuningJob"
    assert "<role-arn" in request["request"]["TrainingJobDefinition"]["RoleArn"]
    assert "event=dry_run_backend" in err


def test_tune_dry_run_local_shows_the_optuna_plan(run) -> None:
    code, plan, err = run("tune", "--local", "--dry-run", "--trials", "6", "--epochs-max", "3",
                          "--weights", "none", "--pruner", "median")
    assert code == 0, err
    assert plan["backend"] == "local" and plan["pruner"]["name"] == "MedianPruner"
    assert plan["sampler"]["name"] == "TPESampler"
    assert plan["search_space"][2] == {"name": "epochs", "type": "integer", "low": 2, "high": 3,
                                       "log": False}
    # The default: Hyperband with epochs as its resource, the full space, SQLite storage.
    code, plan, err = run("tune", "--local", "--dry-run", "--time-budget", "5m", "--epochs-max", "9",
                          "--weights", "none", "--workdir", "/tmp/w")
    assert code == 0, err
    assert plan["pruner"] == {"name": "HyperbandPruner", "min_resource": 1, "max_resource": 9,
                              "reduction_factor": 3}
    assert "epochs" not in {p["name"] for p in plan["search_space"]}
    assert plan["static_hyperparameters"]["epochs"] == "9" and plan["space"] == "full"
    assert plan["time_budget_seconds"] == 300 and plan["trials"] is None
    assert plan["storage"] == "sqlite:////tmp/w/tuning/optuna.db"


@pytest.mark.parametrize(("argv", "operations"), [
    (["train", "--epochs", "5", "--lr", "0.02", "--spot"], ["CreateTrainingJob"]),
    (["train", "--from-tuning-job", "dogbreed-tune-x"], ["DescribeHyperParameterTuningJob", "CreateTrainingJob"]),
    (["deploy"], ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]),
    (["deploy", "--update", "--instance-count", "2", "--autoscale", "2:6"],
     ["DescribeEndpoint", "CreateModel", "CreateEndpointConfig", "DescribeScalableTargets",
      "DeleteScalingPolicy", "DeregisterScalableTarget", "UpdateEndpoint",
      "RegisterScalableTarget", "PutScalingPolicy"]),
    (["tune", "--spot", "--warm-start-from", "dogbreed-tune-a,dogbreed-tune-b", "--max-runtime",
      "3600"], ["CreateHyperParameterTuningJob"]),
    (["logs", "dogbreed-train-x"], ["DescribeLogStreams", "GetLogEvents"]),
    (["add-model", "dogs", "--job", "dogbreed-train-x"], ["DescribeTrainingJob", "CopyObject"]),
    (["add-model", "dogs", "--model-data", "s3://b/k/model.tar.gz"], ["CopyObject"]),
    # Cleanup removes the variant's autoscaling first (a deleted endpoint keeps its target).
    (["cleanup", "--delete-models"], ["DescribeEndpoint", "DescribeScalableTargets", "DeleteScalingPolicy",
                                      "DeregisterScalableTarget", "DeleteEndpoint",
                                      "DeleteEndpointConfig", "DeleteModel", "ListObjectsV2",
                                      "DeleteObjects"]),
])
def test_every_command_dry_runs(argv: list[str], operations: list[str],
                                run) -> None:
    code, payload, err = run(*argv, "--dry-run", *AWS)
    assert code == 0, err
    items = payload if isinstance(payload, list) else [payload]
    assert [i["operation"] for i in items] == operations
    for item in items:
        if not item["request"].get("Key", "").startswith("<"):
            validate_request(item["service"], item["operation"], item["request"])
    if argv[0] == "deploy":
        model = next(i["request"] for i in items if i["operation"] == "CreateModel")
        assert model["PrimaryContainer"]["Mode"] == "MultiModel"
        assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://my-bucket/dogbreed/models/"
    if argv[:2] == ["deploy", "--update"]:
        assert items[2]["request"]["ProductionVariants"][0]["InitialInstanceCount"] == 2
        assert items[6]["request"] == {"EndpointName": "dogbreed-mme",
                                       "EndpointConfigName": items[2]["request"]["EndpointConfigName"]}
        assert (items[7]["request"]["MinCapacity"], items[7]["request"]["MaxCapacity"]) == (2, 6)
        assert items[8]["request"]["TargetTrackingScalingPolicyConfiguration"][
            "PredefinedMetricSpecification"] == {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    if argv[:2] == ["tune", "--spot"]:
        request = items[0]["request"]
        assert request["WarmStartConfig"] == {
            "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": "dogbreed-tune-a"},
                                               {"HyperParameterTuningJobName": "dogbreed-tune-b"}],
            "WarmStartType": "IdenticalDataAndAlgorithm"}
        definition = request["TrainingJobDefinition"]
        assert definition["CheckpointConfig"]["S3Uri"].startswith("s3://my-bucket/dogbreed/checkpoints/")
        assert definition["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
        assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600,
                                                   "MaxWaitTimeInSeconds": 7200}
    if argv[:2] == ["train", "--epochs"]:
        request = items[0]["request"]
        assert request["HyperParameters"] == {"epochs": "5", "lr": "0.02"}
        assert request["EnableManagedSpotTraining"] is True
        assert "DebugRuleConfigurations" not in request  # only with --debugger-rules


def test_invoke_and_upload_dry_run(run, tmp_path: Path,
                                   sample_data: Path) -> None:
    image = next((sample_data / "test").rglob("*.jpg"))
    code, payload, err = run("invoke", str(image), "--target-model", "dogs/model.tar.gz",
                             "--dry-run", *AWS)
    assert code == 0, err
    assert payload["operation"] == "InvokeEndpoint"
    assert payload["request"]["TargetModel"] == "dogs/model.tar.gz"
    assert payload["request"]["ContentType"] == "image/jpeg"
    code, payload, err = run("upload-data", "--data", str(sample_data), "--dry-run", *AWS)
    assert code == 0, err
    assert payload[0]["operation"] == "PutObject" and "120 files" in payload[-1]["request"]["summary"]


def test_invoke_prints_json_named_by_the_target_model(run, sample_data: Path) -> None:
    """The README promises JSON on stdout; `invoke` printed text lines naming the model by the
    endpoint's internal hashed name (`dogs_model-1a2b3c4d`) instead of the TargetModel asked for."""
    import http.server
    import threading

    seen = {}

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # what the local router answers for /endpoints/<name>/invocations
            seen["path"] = self.path
            seen["target"] = self.headers.get("X-Amzn-SageMaker-Target-Model")
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"model": "dogs_model-1a2b3c4d", "arch": "resnet18", "predictions": [
                {"label": "Beagle", "class_name": "001.Beagle", "index": 0, "probability": 0.9}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = str(next((sample_data / "test").rglob("*.jpg")))
        url = f"http://127.0.0.1:{server.server_port}"
        code, payload, err = run("invoke", image, "--target-model", "dogs/model.tar.gz", "--local",
                                 "--endpoint-url", url)
        assert code == 0, err
        assert seen["target"] == "dogs/model.tar.gz"
        assert payload == {"target_model": "dogs/model.tar.gz", "model": "dogs/model.tar.gz",
                           "arch": "resnet18", "server_model_name": "dogs_model-1a2b3c4d",
                           "predictions": [{"label": "Beagle", "class_name": "001.Beagle",
                                            "index": 0, "probability": 0.9}]}
        code, text, err = run("invoke", image, "--target-model", "dogs/model.tar.gz", "--local",
                              "--endpoint-url", url, "--text")
        assert code == 0 and text.startswith("model=dogs/model.tar.gz arch=resnet18"), (text, err)
    finally:
        server.shutdown()
        server.server_close()


def test_errors_are_one_line_and_exit_non_zero(run) -> None:
    code, _, err = run("tune", "--dry-run", *AWS, "--hp", "lr=0.1")
    assert code == cli.EXIT_USAGE and "tuned" in err
    code, _, err = run("train", "--dry-run", *AWS, "--hp", "nonsense")
    assert code == cli.EXIT_USAGE and "NAME=VALUE" in err
    code, _, err = run("train", "--sagemaker", "--region", "us-east-1")
    assert code == cli.EXIT_USAGE and "--role-arn" in err
    code, _, err = run("invoke", "/no/such.jpg", "--target-model", "x", "--local")
    assert code == cli.EXIT_USAGE and "no such image" in err


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "dogbreed.toml"
    config.write_text('region = "eu-west-1"\nbucket = "from-file"\nprefix = "p"\nport = 9000\n')
    loaded = settings_mod.load({}, cwd=tmp_path, env={})
    assert (loaded.region, loaded.bucket, loaded.prefix, loaded.port) == ("eu-west-1", "from-file", "p", 9000)
    env = {"DOGBREED_BUCKET": "from-env", "AWS_REGION": "us-east-2"}
    loaded = settings_mod.load({}, cwd=tmp_path, env=env)
    assert loaded.bucket == "from-env" and loaded.region == "eu-west-1"  # the file names a region
    loaded = settings_mod.load({"bucket": "from-flag", "region": None}, cwd=tmp_path, env=env)
    assert loaded.bucket == "from-flag"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"role-arn": "arn:aws:iam::1:role/x"}))
    loaded = settings_mod.load({}, config_file=str(other), env={"AWS_DEFAULT_REGION": "ap-south-1"})
    assert loaded.role_arn == "arn:aws:iam::1:role/x" and loaded.region == "ap-south-1"
    other.write_text(json.dumps({"bukket": "typo"}))
    with pytest.raises(settings_mod.SettingsError, match="bukket"):
        settings_mod.load({}, config_file=str(other), env={})
    assert settings_mod.Settings(bucket="b", prefix="x/").models_uri == "s3://b/x/models/"


def test_backend_choice(run, monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["status"])
    assert cli._backend_name(args, settings_mod.Settings()) == "local"
    assert cli._backend_name(args, settings_mod.Settings(role_arn="r", bucket="b")) == "sagemaker"
    args = cli.build_parser().parse_args(["status", "--local"])
    assert cli._backend_name(args, settings_mod.Settings(role_arn="r", bucket="b")) == "local"


def test_local_train_add_model_and_status(run, sample_data: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_runs, "TRAIN_COMMAND", FAKE_TRAIN_COMMAND)
    # The fake trainer's weights are placeholders; add-model's validation of real archives is
    # tested in tests/reliability/test_archive_attacks.py.
    monkeypatch.setattr(local_backend, "validate_model_archive", lambda archive: None)
    work = str(tmp_path / "work")
    code, job, err = run("train", "--local", "--data", str(sample_data), "--epochs", "2",
                         "--weights", "none", "--name", "job-a", "--workdir", work)
    assert code == 0, err
    assert job["status"] == "Completed" and Path(job["model_data"]).is_file()
    assert "epoch=2 " in err  # the entry point's own lines are passed through
    code, added, err = run("add-model", "dogs", "--job", "job-a", "--local", "--workdir", work)
    assert code == 0 and added["target_model"] == "dogs/model.tar.gz"
    code, status, _ = run("status", "--local", "--workdir", work)
    assert status["models"] == ["dogs/model.tar.gz"] and status["training_jobs"] == ["job-a"]
    assert status["endpoint"] is None
    code, _, err = run("invoke", str(next(sample_data.rglob("*.jpg"))), "--local",
                       "--target-model", "dogs/model.tar.gz", "--workdir", work)
    assert code == cli.EXIT_USAGE and "deploy --local" in err


def test_local_tune_then_train_from_it(run, sample_data: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_runs, "TRAIN_COMMAND", FAKE_TRAIN_COMMAND)
    work = str(tmp_path / "work")
    out = tmp_path / "best.json"
    code, result, err = run("tune", "--local", "--data", str(sample_data), "--trials", "4",
                            "--epochs-max", "3", "--weights", "none", "--name", "study",
                            "--output", str(out), "--workdir", work)
    assert code == 0, err
    assert json.loads(out.read_text())["best_hyperparameters"] == result["best_hyperparameters"]
    assert err.count("event=trial ") == 4
    code, plan, err = run("train", "--local", "--from-tuning-job", "study", "--dry-run",
                          "--epochs", "4", "--workdir", work, "--data", str(sample_data))
    assert code == 0, err
    expected = {**result["best_hyperparameters"], "epochs": "4"}
    assert plan["hyperparameters"] == expected


def test_local_dry_runs_are_the_backends_own_plans(run, sample_data: Path, tmp_path: Path) -> None:
    work = str(tmp_path / "work")
    code, plan, err = run("tune", "--local", "--dry-run", "--data", str(sample_data), "--trials",
                          "9", "--pruner", "median", "--prune-warmup-epochs", "1", "--seed", "7",
                          "--workdir", work)
    assert code == 0, err
    # Read off the Optuna objects the study would use, not restated by the CLI.
    assert plan["sampler"] == {"name": "TPESampler", "seed": 7, "n_startup_trials": 3}
    assert plan["pruner"]["n_warmup_steps"] == 1 and plan["pruner"]["percentile"] == 50.0
    code, plan, err = run("deploy", "--local", "--dry-run", "--port", "0", "--workdir", work)
    assert code == 0, err
    assert plan["port"] == 0 and plan["store"].endswith("/work/models") and plan["running"] is None
    code, plan, err = run("cleanup", "--local", "--dry-run", "--delete-models", "--workdir", work)
    assert code == 0 and plan["delete_models"].endswith("/work/models")
    code, _, err = run("add-model", "--local", "--dry-run", "../up", "--file", "x.tar.gz",
                       "--workdir", work)
    assert code == cli.EXIT_USAGE and "model name '../up'" in err


@pytest.mark.parametrize("argv", [
    ["deploy", "--autoscale", "1:2"], ["tune", "--warm-start-from", "a"], ["train", "--logs"],
])
def test_sagemaker_only_flags_are_refused_locally(run, argv: list[str]) -> None:
    code, _, err = run(*argv, "--local", "--dry-run")
    assert code == cli.EXIT_USAGE and "SageMaker only" in err


def test_a_subcommand_is_one_registry_entry() -> None:
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert names == set(cli.COMMANDS) >= {"tune", "train", "deploy", "logs", "status", "cleanup"}


@pytest.mark.parametrize(("argv", "says"), [
    (["train", "--name", "../victim"], "training job name (--name) '../victim'"),
    (["train", "--name", "."], "training job name (--name) '.'"),
    (["train", "--name", "{victim}"], "training job name (--name)"),
    (["tune", "--name", "../victim", "--trials", "1"], "study name (--name/--resume) '../victim'"),
    (["tune", "--resume", "../victim", "--trials", "1"], "study name (--name/--resume) '../victim'"),
    (["train", "--from-tuning-job", "../victim"], "study name (--from-tuning-job)"),
    (["add-model", "m", "--job", "../victim"], "training job name (--job) '../victim'"),
    (["report", "../victim"], "not a job or study name"),
])
def test_local_names_never_reach_outside_the_workdir(argv: list[str], says: str, run,
                                                     sample_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug: `train --local --name ../victim` deleted <workdir>/victim (the job dir is
    rmtree'd before a run), `--name .` every job, and tune wrote outside tuning/."""
    monkeypatch.setattr(local_runs, "TRAIN_COMMAND", FAKE_TRAIN_COMMAND)
    work = tmp_path / "work"
    for kept in (work / "victim" / "keep", work / "jobs" / "a" / "keep"):
        kept.parent.mkdir(parents=True)
        kept.write_text("keep")
    argv = [a.replace("{victim}", str(work / "victim")) for a in argv]
    extra = {"train": ["--data", str(sample_data), "--epochs", "1"],
             "tune": ["--data", str(sample_data), "--epochs-max", "2"]}.get(argv[0], [])
    for dry_run in ([], ["--dry-run"]):
        code, _, err = run(*argv, *extra, *dry_run, "--local", "--workdir", str(work))
        assert code == cli.EXIT_USAGE and says in err, err
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == [
        "jobs", "jobs/a", "jobs/a/keep", "victim", "victim/keep"]


def test_sigterm_stops_a_local_training_job_like_ctrl_c(sample_data: Path, tmp_path: Path) -> None:
    """The bug: SIGTERM ended the launcher (exit 143) and left the trainer, in its own session,
    training; now it takes Ctrl-C's path: the trainer's process group is killed first."""
    proc_dir = Path("/proc")
    if not (proc_dir / "self" / "stat").is_file():
        pytest.skip("finds the trainer through /proc")
    launcher = ("import sys; from dogbreed.launcher import cli; from dogbreed.launcher.local import runs as local_runs; "
                f"local_runs.TRAIN_COMMAND = {FAKE_TRAIN_COMMAND!r}; "
                "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, FAKE_EPOCH_SECONDS_ENV: "0.5"}  # 50 epochs: 25 s unless stopped
    with open(tmp_path / "launcher.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", launcher, "train", "--local", "--data",
                                 str(sample_data), "--workdir", str(tmp_path / "work"), "--name",
                                 "sig", "--epochs", "50", "--weights", "none"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        trainer = None
        deadline = time.monotonic() + 60
        while trainer is None and time.monotonic() < deadline and proc.poll() is None:
            for stat in proc_dir.glob("[0-9]*/stat"):
                with contextlib.suppress(OSError):
                    ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                    if ppid == proc.pid and FAKE_TRAIN_COMMAND[1].encode() in (
                            stat.parent / "cmdline").read_bytes():
                        trainer = int(stat.parent.name)
            time.sleep(0.1)
        assert trainer is not None, (tmp_path / "launcher.err").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:  # gone, or a zombie (nothing runs) waiting for a reaper
            if (proc_dir / str(trainer) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.kill(trainer, signal.SIGKILL)
        pytest.fail("the trainer outlived the launcher")
    assert "event=interrupted command=train signal=SIGTERM" in (tmp_path / "launcher.err").read_text()


@pytest.mark.parametrize(("argv", "flag"), [
    (["tune", "--sagemaker", "--trials", "0"], "--trials/--max-jobs"),
    (["tune", "--max-parallel", "0"], "--max-parallel"),
    (["tune", "--seed", "-1"], "--seed"),
    (["tune", "--local", "--prune-warmup-epochs", "-1"], "--prune-warmup-epochs"),
    (["train", "--instance-count", "0"], "--instance-count"),
    (["deploy", "--instance-count", "0"], "--instance-count"),
    (["train", "--spot", "--max-wait", "0"], "--max-wait"),
    (["train", "--max-runtime", "-5"], "--max-runtime"),
    (["deploy", "--autoscale", "1:2", "--target-invocations", "-5"], "--target-invocations"),
    (["train", "--local", "--nproc", "-2"], "--nproc"),
    (["train", "--local", "--nproc", "0"], "--nproc"),
    (["invoke", "x.jpg", "--target-model", "m/model.tar.gz", "--top-k", "0"], "--top-k"),
    (["explain", "m.tar.gz", "x.jpg", "--top-k", "-1"], "--top-k"),
    (["deploy", "--local", "--max-loaded-models", "0"], "--max-loaded-models"),
    (["deploy", "--local", "--port", "70000"], "--port"),
    (["batch", "--local", "m.tar.gz", "in", "out", "--workers", "-1"], "--workers"),
    (["batch", "--local", "m.tar.gz", "in", "out", "--workers", "0"], "--workers"),
    (["upload-data", "--data", ".", "--workers", "0"], "--workers"),
    (["status", "--poll-seconds", "nan"], "--poll-seconds"),
])
def test_numeric_flags_are_refused_at_parse_time(argv: list[str], flag: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The bug: 0 became the default (`or`), a negative failed after a server started."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--dry-run"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert f"argument {flag}: expected " in capsys.readouterr().err


def test_spot_max_wait_is_checked_not_silently_changed(run) -> None:
    code, _, err = run("train", "--dry-run", *AWS, "--spot", "--max-wait", "60", "--max-runtime", "3600")
    assert code == cli.EXIT_USAGE and "--max-wait 60 is shorter than --max-runtime 3600" in err
    code, _, err = run("tune", "--dry-run", *AWS, "--spot", "--max-wait", "60")
    assert code == cli.EXIT_USAGE and "shorter than the default --max-runtime 14400" in err
    code, _, err = run("train", "--dry-run", *AWS, "--max-wait", "7200")
    assert code == cli.EXIT_USAGE and "add --spot" in err
    code, _, err = run("train", "--local", "--dry-run", "--max-wait", "7200")
    assert code == cli.EXIT_USAGE and "SageMaker only" in err
    code, request, err = run("train", "--dry-run", *AWS, "--spot", "--max-wait", "3600",
                             "--max-runtime", "3600")
    assert code == 0, err
    assert request["request"]["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600,
                                                       "MaxWaitTimeInSeconds": 3600}


@pytest.mark.parametrize("command", ["tune", "train", "deploy", "invoke", "explain", "batch",
                                     "clarify", "report", "logs"])
def test_help_of_every_command_still_reads(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: dogbreed {command}" in capsys.readouterr().out


def test_train_dry_run_sends_no_debugger_features_unless_asked(run) -> None:
    """Debugger is closed to new customers: the default request has no hook config, no rules and
    profiling off; --debugger-rules brings them back with HookParameters."""
    code, payload, err = run("train", "--dry-run", *AWS)
    assert code == 0, err
    request = payload["request"]
    for key in ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"):
        assert key not in request
    assert request["ProfilerConfig"] == {"DisableProfiler": True}
    code, payload, err = run("train", "--dry-run", "--debugger-rules", *AWS)
    assert code == 0, err
    request = payload["request"]
    assert len(request["DebugRuleConfigurations"]) == 5
    assert {r["RuleConfigurationName"] for r in request["ProfilerRuleConfigurations"]} == {
        "LowGPUUtilization", "ProfilerReport"}
    assert request["DebugHookConfig"]["HookParameters"]["train.save_interval"] == "100"
    assert request["ProfilerConfig"]["DisableProfiler"] is False
    code, _, err = run("train", "--local", "--dry-run", "--debugger-rules")
    assert code == 2 and "SageMaker only" in err
