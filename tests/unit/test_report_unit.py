"""`dogbreed report` pieces that need no training: a tuning study's page, a SageMaker job's
outputs fetched from S3 (moto) into the run layout, the LowGPUUtilization rule, the rule
parameters and the profiler summary."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import boto3
from botocore.stub import Stubber
from moto import mock_aws

from dogbreed import debugger_report, profiling
from dogbreed.debugger_report import builtin_rules as rules
from dogbreed.launcher import cli

REGION = "eu-west-1"
BUCKET = "dogbreed-test-bucket"


def _study(tmp_path: Path) -> Path:
    trials = [
        {"number": 0, "state": "COMPLETE", "value": 0.55, "score": 0.54, "epochs_completed": 3,
         "intermediate": [0.3, 0.45, 0.55], "hyperparameters": {"lr": "0.01"}, "seconds": 10},
        {"number": 1, "state": "PRUNED", "value": None, "epochs_completed": 1,
         "intermediate": [0.1], "hyperparameters": {"lr": "0.5"}, "seconds": 3},
        {"number": 2, "state": "COMPLETE", "value": 0.7, "score": 0.69, "epochs_completed": 3,
         "intermediate": [0.4, 0.6, 0.7], "hyperparameters": {"lr": "0.003"}, "seconds": 11},
        {"number": 3, "state": "FAIL", "value": None, "epochs_completed": 0, "intermediate": [],
         "hyperparameters": {"lr": "9"}, "seconds": 1, "failure": "boom"},
    ]
    path = tmp_path / "tuning" / "study-a.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"tuning_job": "study-a", "trials": trials, "best_trial": 2,
                                "best_objective": 0.7, "objective": {"metric": "valid_accuracy"},
                                "counts": {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1}}))
    return path


def test_study_report_leaderboard_and_every_trial_curve(tmp_path, capsys):
    study = _study(tmp_path)
    # By name through the local work dir, as `dogbreed report study-a --local` finds it.
    assert cli.main(["report", "--local", "--workdir", str(tmp_path), "study-a"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruned"] == [1] and result["best_trial"] == 2
    html = Path(result["report"]).read_text()
    assert Path(result["report"]) == study.parent / "study-a" / debugger_report.REPORT_FILE
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>(\w+)</td>", html)
    assert rows == [("1", "2", "COMPLETE"), ("2", "0", "COMPLETE"), ("3", "1", "PRUNED"),
                    ("4", "3", "FAIL")]  # best first; pruned and failed after
    assert 'id="trial-curves"' in html and "data:image/png;base64," in html


def test_a_run_trained_without_the_hook_says_so_for_every_debugger_rule(tmp_path, capsys):
    """The demo's runs train without smdebug: every rule used to say Error."""
    data_dir = tmp_path / "job" / "output" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "metrics.json").write_text(json.dumps({"metrics": {"valid_accuracy": 0.2}}))
    assert cli.main(["report", str(tmp_path / "job")]) == 0
    verdicts = json.loads(capsys.readouterr().out)["verdicts"]
    assert verdicts.pop("LowGPUUtilization") == rules.NOT_APPLICABLE
    assert set(verdicts.values()) == {rules.NO_TENSORS}
    saved = json.loads((data_dir / debugger_report.VERDICTS_FILE).read_text())
    assert all("trained without the smdebug hook" in v["message"] and "--debugger" in v["message"]
               for v in saved if v["rule"] != "LowGPUUtilization")


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", "--local", "--workdir", str(tmp_path), str(tmp_path)]) == cli.EXIT_USAGE
    assert "not a training run" in capsys.readouterr().err


def test_sagemaker_job_outputs_are_downloaded_into_the_run_layout(tmp_path, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    job = "dogbreed-train-1"
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, body in {"metrics.json": b'{"metrics": {"valid_accuracy": 0.5}, "history": []}',
                               "profile.json": b'{"device": "cuda:0", "steps": [], "samples": []}'}.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        s3.put_object(Bucket=BUCKET, Key=f"dogbreed/output/training/{job}/output/output.tar.gz",
                      Body=buffer.getvalue())
        tensor_keys = ["index/000000000/000000000000_worker_0.json",
                       "events/000000000000/000000000000_worker_0.tfevents",
                       "collections/000000000/worker_0_collections.json"]
        for key in tensor_keys:
            s3.put_object(Bucket=BUCKET, Key=f"dogbreed/debug/{job}/debug-output/{key}", Body=b"x")
        s3.put_object(Bucket=BUCKET, Key=f"dogbreed/debug/{job}-other/debug-output/index/x", Body=b"y")
        sagemaker = boto3.client("sagemaker", region_name=REGION)
        with Stubber(sagemaker) as stub:
            stub.add_response("describe_training_job", {
                "TrainingJobName": job, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:1:training-job/{job}",
                "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed",
                "AlgorithmSpecification": {"TrainingInputMode": "File"},
                "ResourceConfig": {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1,
                                   "VolumeSizeInGB": 30},
                "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
                "CreationTime": "2026-01-01T00:00:00Z",
                "HyperParameters": {"model": "resnet18"},
                "ModelArtifacts": {"S3ModelArtifacts":
                                   f"s3://{BUCKET}/dogbreed/output/training/{job}/output/model.tar.gz"},
                "DebugHookConfig": {"S3OutputPath": f"s3://{BUCKET}/dogbreed/debug"},
            }, {"TrainingJobName": job})
            run = debugger_report.download_training_job(sagemaker, s3, job, tmp_path / job)
    assert json.loads((run / "output/data/metrics.json").read_text())["metrics"]["valid_accuracy"] == 0.5
    assert (run / "output/data/profile.json").is_file()
    downloaded = sorted(str(p.relative_to(run / "output/tensors"))
                        for p in (run / "output/tensors").rglob("*") if p.is_file())
    assert downloaded == sorted(tensor_keys)  # this job's tensors only
    assert debugger_report.tensors_dir(run) == run / "output/tensors"
    assert json.loads((run / "input/config/hyperparameters.json").read_text()) == {"model": "resnet18"}


def test_low_gpu_utilization_follows_smdebugs_quantile_rule():
    params = {"patience": "10", "window": "20"}  # as strings, the way SageMaker passes them
    busy = [{"gpu_percent": 95.0}] * 40
    assert rules.low_gpu_utilization(busy, params).status == rules.NO_ISSUES
    idle = [{"gpu_percent": 30.0}] * 40
    verdict = rules.low_gpu_utilization(idle, params)
    assert verdict.status == rules.ISSUES and "p95" in verdict.message and verdict.step == 10
    spiky = [{"gpu_percent": 99.0 if i % 2 else 0.0} for i in range(40)]
    assert "fluctuates" in rules.low_gpu_utilization(spiky, params).message
    assert rules.low_gpu_utilization(idle[:5], params).status == rules.NO_ISSUES  # < patience
    assert rules.low_gpu_utilization([{"cpu_percent": 50.0}]).status == rules.NOT_APPLICABLE


def test_rule_parameters_are_aws_defaults_under_the_projects_own():
    assert rules.rule_parameters("Overfit") == {"start_step": 0, "patience": 1, "ratio_threshold": 0.1}
    assert rules.rule_parameters("LossNotDecreasing")["mode"] == "TRAIN"  # launcher/rules.py
    assert rules.rule_parameters("Overtraining", {"patience_train": "7"})["patience_train"] == 7


def test_required_collections_come_from_smdebug_rulesconfig():
    assert rules.required_collections("VanishingGradient") == ["gradients"]
    assert rules.required_collections("PoorWeightInitialization") == ["relu_input"]
    assert rules.required_collections("LossNotDecreasing") == ["losses"]
    # Every one the rules need is in the hook config a local run gets.
    from dogbreed.debugger_config import COLLECTIONS

    hooked = {c["CollectionName"] for c in COLLECTIONS}
    for name in rules.AWS_DEFAULTS:
        if name != "LowGPUUtilization":
            assert set(rules.required_collections(name)) <= hooked, name


def test_step_recorder_and_profiler_summary(tmp_path):
    import torch

    recorder = profiling.StepRecorder(torch.device("cpu"))
    for epoch in (1, 2):
        recorder.epoch(epoch)
        for _ in range(3):
            recorder.start()
            torch.randn(64, 64) @ torch.randn(64, 64)
            recorder.data_ready()
            torch.randn(256, 256) @ torch.randn(256, 256)
            recorder.end(8)
    path = recorder.write(tmp_path)
    profile = json.loads(path.read_text())
    assert [s["epoch"] for s in profile["steps"]] == [1, 1, 1, 2, 2, 2]
    summary = debugger_report.profiler_summary(profile)
    assert summary["steps"] == 6 and summary["images"] == 48
    assert summary["step_ms_p50"] > 0 and 0 < summary["data_fraction"] < 1
    assert not recorder._sampler.is_alive()  # write() stopped it
    # A run that raised never writes: dropping the recorder stops its sampler thread.
    import gc

    abandoned = profiling.StepRecorder(torch.device("cpu"))
    sampler = abandoned._sampler
    del abandoned
    gc.collect()
    sampler.join(timeout=2)
    assert not sampler.is_alive()
    # The default recorder of train_one_epoch callers that do not profile records nothing.
    profiling.NO_STEPS.start()
    profiling.NO_STEPS.data_ready()
    profiling.NO_STEPS.end(8)
    assert profiling.NO_STEPS.steps() == []


def test_report_of_a_sagemaker_job_without_debugger_evaluates_its_in_job_tensors(tmp_path, monkeypatch, capsys):
    """The default job (no DebugHookConfig: Debugger is closed to new customers) saves its
    tensors under output/data; SageMaker uploads them in output.tar.gz, and `dogbreed report JOB`
    fetches that (moto) and runs the same five rules offline."""
    import torch
    from torch import nn

    from dogbreed import contract, debugger
    from dogbreed.launcher.sagemaker import requests as smr
    from dogbreed.launcher.settings import Settings

    job = "dogbreed-train-260101-000000"
    # 1. What the container does: the trainer's own hook, in a SageMaker job, no hook config.
    paths = contract.prepare_local_job(tmp_path / "container", {}, {})
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    monkeypatch.delenv(contract.USE_SMDEBUG_ENV, raising=False)
    monkeypatch.setenv(contract.TRAINING_JOB_NAME_ENV, job)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(3, 8))
    model.add_module("relu", nn.ReLU())
    model.add_module("fc2", nn.Linear(8, 2))
    loss_fn = nn.CrossEntropyLoss()
    # Outside capsys: smdebug's logger keeps the stream it first sees, and capsys closes its own
    # at the end of this test (later tests' smdebug lines would hit a closed file).
    with capsys.disabled():
        hook = debugger.create_hook(paths, model, loss_fn)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 3), (torch.arange(16) % 2)
        for _ in range(3):  # epochs: training steps, then validation steps
            debugger.set_mode(hook, train=True)
            for _ in range(40):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
            debugger.set_mode(hook, train=False)
            with torch.no_grad():
                for _ in range(4):
                    loss_fn(model(x), y)
        debugger.close(hook)
    monkeypatch.delenv(contract.TRAINING_JOB_NAME_ENV)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:  # SageMaker's output.tar.gz
        tar.add(paths.output_data_dir, arcname=".")

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    settings = Settings(role_arn="arn:aws:iam::123456789012:role/dogbreed", bucket=BUCKET, region=REGION)
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        request = smr.training_request(settings, name=job, train_image="img", region=REGION,
                                       hyperparameters={"epochs": "3"})
        assert "DebugHookConfig" not in request
        boto3.client("sagemaker", region_name=REGION).create_training_job(**request)
        s3.put_object(Bucket=BUCKET, Key=f"dogbreed/output/training/{job}/output/output.tar.gz",
                      Body=buffer.getvalue())
        code = cli.main(["report", job, "--sagemaker", "--workdir", str(tmp_path / "work"),
                         "--bucket", BUCKET, "--region", REGION,
                         "--role-arn", "arn:aws:iam::123456789012:role/dogbreed"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    run = tmp_path / "work" / "reports" / job
    assert debugger_report.tensors_dir(run) == run / "output" / "data" / "tensors"
    verdicts = result["verdicts"]
    for rule in ("VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization",
                 "LossNotDecreasing"):
        assert verdicts[rule] in (rules.ISSUES, rules.NO_ISSUES), (rule, verdicts)
