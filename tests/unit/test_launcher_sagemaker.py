"""The SageMaker backend: every boto3 request goes through a real client, validated against
botocore's service model — by moto (S3, ECR, STS and the SageMaker operations moto implements)
or by botocore's Stubber (which validates parameters the same way) where moto has no useful
answer (a tuning job's best trial, invoke_endpoint)."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws

from dogbreed import contract, debugger_config, train
from dogbreed.launcher import search_space
from dogbreed.launcher.sagemaker import requests as smr
from dogbreed.launcher.sagemaker.backend import SageMakerBackend
from dogbreed.launcher.settings import Settings, SettingsError

REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/dogbreed-sagemaker"
BUCKET = "dogbreed-test-bucket"
TRAIN_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dogbreed-train:latest"
SERVE_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dogbreed-serve:latest"
SEED_RULES = {"VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization",
              "LossNotDecreasing"}
SEED_PROFILER_RULES = {"LowGPUUtilization", "ProfilerReport"}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def settings() -> Settings:
    return Settings(region=REGION, role_arn=ROLE, bucket=BUCKET, train_image=TRAIN_IMAGE,
                    serve_image=SERVE_IMAGE, poll_seconds=0)


@pytest.fixture
def aws(aws_env):
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield


def backend(settings: Settings, **kwargs) -> SageMakerBackend:
    return SageMakerBackend(settings, session=boto3.session.Session(region_name=REGION),
                            progress=None, **kwargs)


# --- the tuning job --------------------------------------------------------------------------------
def test_tuning_request_carries_the_search_space_metrics_and_objective(settings: Settings) -> None:
    request = smr.tuning_request(settings, name="dogbreed-tune-1", train_image=TRAIN_IMAGE,
                                 static_hyperparameters={"model": "resnet18", "image-size": "224"},
                                 max_jobs=20, max_parallel=3)
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize",
                                                          "MetricName": "valid_accuracy"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 20, "MaxParallelTrainingJobs": 3}
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                       "ScalingType": "Logarithmic"}],
        "IntegerParameterRanges": [{"Name": "epochs", "MinValue": "2", "MaxValue": "10",
                                    "ScalingType": "Linear"}],
        "CategoricalParameterRanges": [{"Name": "batch-size",
                                        "Values": ["16", "32", "64", "128", "256"]}],
    }
    definition = request["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == train.METRIC_DEFINITIONS
    assert definition["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert definition["StaticHyperParameters"] == {"model": "resnet18", "image-size": "224"}
    assert definition["InputDataConfig"][0]["ChannelName"] == contract.TRAINING_CHANNEL
    assert definition["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == \
        f"s3://{BUCKET}/dogbreed/data"
    smr.validate_request("sagemaker", "CreateHyperParameterTuningJob", request)


def test_every_metric_regex_matches_a_real_epoch_line() -> None:
    import re

    line = ("epoch=3 train_loss=0.8100 train_accuracy=0.7000 valid_loss=0.9000 "
            "valid_accuracy=0.7100 images_per_sec=912.0 epoch_seconds=1.25 lr=0.01")
    names = [m["Name"] for m in train.METRIC_DEFINITIONS]
    assert train.OBJECTIVE_METRIC in names
    for metric in train.METRIC_DEFINITIONS:
        if metric["Name"].startswith("test_"):
            continue
        assert re.search(metric["Regex"], line), metric


@pytest.mark.parametrize("strategy", ["Random", "Hyperband"])
def test_tuning_strategies(settings: Settings, strategy: str) -> None:
    request = smr.tuning_request(settings, name="t", train_image=TRAIN_IMAGE,
                                 static_hyperparameters={}, strategy=strategy, epochs_max=6)
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == strategy
    if strategy == "Hyperband":
        # Hyperband owns the epoch budget and stops trials itself.
        assert config["StrategyConfig"] == {"HyperbandStrategyConfig": {"MinResource": 1,
                                                                        "MaxResource": 6}}
        assert config["TrainingJobEarlyStoppingType"] == "Off"
        assert "IntegerParameterRanges" not in config["ParameterRanges"]
        assert request["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"] == "6"
    else:
        assert config["ParameterRanges"]["IntegerParameterRanges"][0]["MaxValue"] == "6"
    smr.validate_request("sagemaker", "CreateHyperParameterTuningJob", request)


def test_tuning_request_refuses_bad_input(settings: Settings) -> None:
    with pytest.raises(SettingsError, match="tuned"):
        smr.tuning_request(settings, name="t", train_image="i", static_hyperparameters={"lr": "0.1"})
    with pytest.raises(contract.ContractError):
        smr.tuning_request(settings, name="t", train_image="i", static_hyperparameters={"modle": "x"})
    with pytest.raises(SettingsError):
        smr.tuning_request(settings, name="x" * 33, train_image="i", static_hyperparameters={})
    with pytest.raises(SettingsError):
        smr.tuning_request(settings, name="t", train_image="i", static_hyperparameters={},
                           max_jobs=2, max_parallel=3)


def test_tune_with_moto_creates_a_valid_job_and_reports_the_best(aws, settings: Settings) -> None:
    sm = backend(settings)
    result = sm.tune(name="dogbreed-tune-moto", static_hyperparameters={"image-size": "224"},
                     max_jobs=4, max_parallel=2)
    assert result["tuning_job"] == "dogbreed-tune-moto" and result["status"] == "Completed"
    described = boto3.client("sagemaker", region_name=REGION).describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="dogbreed-tune-moto")
    config = described["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"] == search_space.to_sagemaker(search_space.SEARCH_SPACE)
    assert described["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"] == \
        train.METRIC_DEFINITIONS
    assert [r.operation for r in sm.recorded] == ["CreateHyperParameterTuningJob"]


def test_best_hyperparameters_from_a_tuning_job(settings: Settings) -> None:
    """moto's best job is a placeholder: stub DescribeHyperParameterTuningJob with a real answer."""
    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x",
                          aws_secret_access_key="x")
    sm = backend(settings)
    sm._clients["sagemaker"] = client
    now = dt.datetime(2026, 1, 1)
    definition = smr.tuning_request(settings, name="t", train_image=TRAIN_IMAGE,
                                    static_hyperparameters={"image-size": "224"})["TrainingJobDefinition"]
    definition["StaticHyperParameters"]["_tuning_objective_metric"] = "valid_accuracy"
    with Stubber(client) as stub:
        stub.add_response("describe_hyper_parameter_tuning_job", {
            "HyperParameterTuningJobName": "t",
            "HyperParameterTuningJobArn": "arn:aws:sagemaker:eu-west-1:123456789012:hyper-parameter-tuning-job/t",
            "HyperParameterTuningJobConfig": {"Strategy": "Bayesian",
                                              "ResourceLimits": {"MaxParallelTrainingJobs": 1}},
            "TrainingJobDefinition": definition,
            "HyperParameterTuningJobStatus": "Completed",
            "CreationTime": now,
            "TrainingJobStatusCounters": {"Completed": 4},
            "ObjectiveStatusCounters": {"Succeeded": 4},
            "BestTrainingJob": {
                "TrainingJobName": "t-003-abc", "TrainingJobArn": "arn:aws:sagemaker:eu-west-1:1:training-job/t-003",
                "CreationTime": now, "TrainingJobStatus": "Completed",
                "TunedHyperParameters": {"lr": "0.0123", "batch-size": '"64"', "epochs": "7"},
                "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "valid_accuracy",
                                                               "Value": 0.83}},
        }, {"HyperParameterTuningJobName": "t"})
        hps = sm.best_hyperparameters("t")
        stub.assert_no_pending_responses()
    assert hps == {"image-size": "224", "lr": "0.0123", "batch-size": "64", "epochs": "7"}


# --- the training job --------------------------------------------------------------------------------
def test_training_request_by_default_uses_no_debugger_service_feature(settings: Settings) -> None:
    """Debugger is closed to new customers: by default no hook config, no rules, and profiling
    off the way the API defines it (ProfilerConfig.DisableProfiler); checkpoints and spot as asked."""
    request = smr.training_request(settings, name="dogbreed-train-1", train_image=TRAIN_IMAGE, region=REGION,
                                   hyperparameters={"lr": "0.01", "epochs": "5"}, spot=True)
    assert request["HyperParameters"] == {"lr": "0.01", "epochs": "5"}
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == train.METRIC_DEFINITIONS
    for key in ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations", "Environment"):
        assert key not in request, key
    assert request["ProfilerConfig"] == {"DisableProfiler": True}
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] >= request["StoppingCondition"]["MaxRuntimeInSeconds"]
    # A trailing "/": SageMaker syncs every key under the prefix, and without it the checkpoints
    # of dogbreed-train-10, -11, ... would come down into dogbreed-train-1.
    assert request["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/dogbreed/checkpoints/dogbreed-train-1/",
                                           "LocalPath": "/opt/ml/checkpoints"}
    smr.validate_request("sagemaker", "CreateTrainingJob", request)
    # The field this relies on is in the service model as a boolean.
    import botocore.session

    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model(
        "CreateTrainingJob").input_shape.members["ProfilerConfig"]
    assert shape.members["DisableProfiler"].type_name == "boolean"


def test_debugger_rules_opt_in_brings_rules_profiler_and_hook_parameters(settings: Settings) -> None:
    request = smr.training_request(settings, name="dogbreed-train-1", train_image=TRAIN_IMAGE, region=REGION,
                                   hyperparameters={}, debugger_rules=True)
    debug = {r["RuleConfigurationName"] for r in request["DebugRuleConfigurations"]}
    profiler = {r["RuleConfigurationName"] for r in request["ProfilerRuleConfigurations"]}
    assert debug == SEED_RULES and profiler == SEED_PROFILER_RULES
    image = f"{debugger_config.RULE_EVALUATOR_ACCOUNTS[REGION]}.dkr.ecr.{REGION}.amazonaws.com/sagemaker-debugger-rules:latest"
    for rule in request["DebugRuleConfigurations"] + request["ProfilerRuleConfigurations"]:
        assert rule["RuleEvaluatorImage"] == image
        assert rule["RuleParameters"]["rule_to_invoke"] == rule["RuleConfigurationName"]
    hook = request["DebugHookConfig"]
    # At least the seeds' density: train every 100 steps (dogImages: ~105 an epoch at batch 64),
    # every validation step (4 an epoch at eval batch 256; the seeds' 10 would give <1 an epoch).
    assert hook["HookParameters"] == {"train.save_interval": "100", "eval.save_interval": "1"}
    collections = {c["CollectionName"]: c["CollectionParameters"] for c in hook["CollectionConfigurations"]}
    assert {"gradients", "losses", "relu_input"} <= set(collections)
    assert int(collections["losses"]["train.save_interval"]) <= 10
    assert hook["S3OutputPath"] == f"s3://{BUCKET}/dogbreed/debug"
    assert request["ProfilerConfig"]["S3OutputPath"] == f"s3://{BUCKET}/dogbreed/profiler"
    assert request["ProfilerConfig"]["DisableProfiler"] is False
    smr.validate_request("sagemaker", "CreateTrainingJob", request)


def test_training_request_without_the_in_job_hook(settings: Settings) -> None:
    request = smr.training_request(settings, name="j", train_image="i", region=REGION, hyperparameters={},
                                   smdebug_hook=False, checkpoints=False)
    assert request["Environment"] == {contract.USE_SMDEBUG_ENV: "0"}
    for key in ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations",
                "CheckpointConfig"):
        assert key not in request
    with pytest.raises(SettingsError, match="--debugger-rules"):
        smr.training_request(settings, name="j", train_image="i", region=REGION, hyperparameters={},
                             smdebug_hook=False, debugger_rules=True)


def test_training_request_refuses_a_bad_hyperparameter(settings: Settings) -> None:
    with pytest.raises(contract.ContractError):
        smr.training_request(settings, name="j", train_image="i", region=REGION,
                             hyperparameters={"lr": "-1"})


def test_rule_evaluator_image_per_region() -> None:
    assert debugger_config.rule_evaluator_image("us-east-1") == \
        "503895931360.dkr.ecr.us-east-1.amazonaws.com/sagemaker-debugger-rules:latest"
    assert debugger_config.rule_evaluator_image("cn-north-1").endswith(".amazonaws.com.cn/sagemaker-debugger-rules:latest")
    assert len(debugger_config.RULE_EVALUATOR_ACCOUNTS) >= 20
    with pytest.raises(debugger_config.UnknownRegionError):
        debugger_config.rule_evaluator_image("mars-north-1")
    assert debugger_config.ALIASES["PoorWeightInit"] in debugger_config.DEBUG_RULES


def test_train_with_moto(aws, settings: Settings) -> None:
    sm = backend(settings)
    result = sm.train(name="dogbreed-train-moto", hyperparameters={"epochs": "3"})
    assert result["status"] == "Completed"
    assert result["model_data"].endswith("dogbreed-train-moto/output/model.tar.gz")
    described = boto3.client("sagemaker", region_name=REGION).describe_training_job(
        TrainingJobName="dogbreed-train-moto")
    assert described["HyperParameters"] == {"epochs": "3"}
    assert described["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE


def test_image_uri_defaults_to_the_accounts_ecr_repository(aws, settings: Settings) -> None:
    import dataclasses

    # `:latest` only when asked (--latest-images); by default the images `make push` recorded.
    sm = backend(dataclasses.replace(settings, train_image=None), latest_images=True)
    with pytest.raises(SettingsError, match="make build push"):
        sm.image_uri("train")
    ecr = boto3.client("ecr", region_name=REGION)
    ecr.create_repository(repositoryName="dogbreed-train")
    ecr.put_image(repositoryName="dogbreed-train", imageTag="latest", imageManifest=json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "config": {"digest": "sha256:" + "0" * 64, "size": 1, "mediaType": "x"}, "layers": []}))
    account = boto3.client("sts", region_name=REGION).get_caller_identity()["Account"]
    assert sm.image_uri("train") == f"{account}.dkr.ecr.{REGION}.amazonaws.com/dogbreed-train:latest"


# --- data, endpoint, models ------------------------------------------------------------------------
def test_upload_data_is_idempotent(aws, settings: Settings, sample_data: Path) -> None:
    sm = backend(settings)
    first = sm.upload_data(sample_data, workers=4)
    files = [p for p in sample_data.rglob("*.jpg") if p.is_file()]
    assert first["files"] == len(files)
    second = sm.upload_data(sample_data)
    assert second["files"] == 0 and second["skipped"] == len(files)
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=BUCKET, Prefix="dogbreed/data/train/")
    assert listed["KeyCount"] == 80


def test_deploy_add_model_status_cleanup_with_moto(aws, settings: Settings) -> None:
    sm = backend(settings)
    deployed = sm.deploy(now=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert deployed["status"] == "InService" and deployed["endpoint"] == "dogbreed-mme"
    client = boto3.client("sagemaker", region_name=REGION)
    model = client.describe_model(ModelName=deployed["model"])
    assert model["PrimaryContainer"]["Mode"] == "MultiModel"
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/dogbreed/models/"
    assert model["PrimaryContainer"]["Image"] == SERVE_IMAGE
    config = client.describe_endpoint_config(EndpointConfigName=deployed["endpoint_config"])
    assert config["ProductionVariants"][0]["ModelName"] == deployed["model"]

    # add-model: a finished training job's model.tar.gz is copied under the models prefix.
    sm.train(name="dogbreed-train-a", hyperparameters={})
    job = client.describe_training_job(TrainingJobName="dogbreed-train-a")
    src_bucket, src_key = smr.split_s3_uri(job["ModelArtifacts"]["S3ModelArtifacts"])
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=src_bucket, Key=src_key, Body=b"a model archive")
    added = sm.add_model("dog-breed-classifier", training_job="dogbreed-train-a")
    assert added["target_model"] == "dog-breed-classifier/model.tar.gz"
    body = s3.get_object(Bucket=BUCKET, Key="dogbreed/models/dog-breed-classifier/model.tar.gz")["Body"]
    assert body.read() == b"a model archive"

    status = sm.status()
    assert status["endpoint"]["status"] == "InService"
    assert status["models"] == ["dog-breed-classifier/model.tar.gz"]
    assert {"name": "dogbreed-train-a", "status": "Completed"} in status["training_jobs"]

    deleted = sm.cleanup(delete_models=True)
    assert deleted["models"] == [deployed["model"]] and deleted["model_files"] == 1
    assert client.list_endpoints()["Endpoints"] == []
    assert client.list_models()["Models"] == []
    assert sm.status()["endpoint"] is None


def test_add_model_from_a_file_and_an_s3_uri(aws, settings: Settings, tmp_path: Path) -> None:
    sm = backend(settings)
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"archive")
    sm.add_model("from-file", file=archive)
    sm.add_model("from-s3", model_data=f"s3://{BUCKET}/dogbreed/models/from-file/model.tar.gz")
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.get_object(Bucket=BUCKET, Key="dogbreed/models/from-s3/model.tar.gz")["Body"].read() == b"archive"
    with pytest.raises(SettingsError):
        sm.add_model("../up", file=archive)


def test_invoke_sends_target_model_and_prints_top_k(settings: Settings, tmp_path: Path) -> None:
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"\xff\xd8\xff fake jpeg")
    client = boto3.client("sagemaker-runtime", region_name=REGION, aws_access_key_id="x",
                          aws_secret_access_key="x")
    sm = backend(settings)
    sm._clients["sagemaker-runtime"] = client
    answer = {"model": "m", "predictions": [{"label": "Beagle", "probability": 0.9}]}
    payload = json.dumps(answer).encode()
    with Stubber(client) as stub:
        stub.add_response("invoke_endpoint",
                          {"Body": StreamingBody(io.BytesIO(payload), len(payload)),
                           "ContentType": "application/json"},
                          {"EndpointName": "dogbreed-mme", "TargetModel": "dogs/model.tar.gz",
                           "ContentType": "image/jpeg", "Accept": "application/json",
                           "CustomAttributes": "top_k=3", "Body": image.read_bytes()})
        assert sm.invoke("dogs/model.tar.gz", image, top_k=3) == answer


def test_requests_without_a_role_are_refused(settings: Settings) -> None:
    import dataclasses

    sm = SageMakerBackend(dataclasses.replace(settings, role_arn=None))
    with pytest.raises(SettingsError, match="role-arn"):
        sm.train(name="j", hyperparameters={})
    assert sm.recorded == [] and sm._clients == {}


def test_dry_run_sends_nothing_and_validates(settings: Settings) -> None:
    sm = SageMakerBackend(Settings(), dry_run=True)  # no settings at all: placeholders
    sm.tune(name="dogbreed-tune-dry", static_hyperparameters={})
    sm.train(name="dogbreed-train-dry", hyperparameters={"epochs": "2"})
    sm.deploy(now=dt.datetime(2026, 1, 1))
    sm.add_model("m", training_job="dogbreed-train-dry")
    sm.cleanup()
    assert sm._clients == {}
    ops = [r.operation for r in sm.recorded]
    assert ops == ["CreateHyperParameterTuningJob", "CreateTrainingJob", "CreateModel",
                   "CreateEndpointConfig", "CreateEndpoint", "DescribeTrainingJob", "CopyObject",
                   "DescribeEndpoint", "DescribeScalableTargets", "DeleteScalingPolicy",
                   "DeregisterScalableTarget",
                   "DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]
    tuning = sm.recorded[0].request
    assert tuning["TrainingJobDefinition"]["RoleArn"].startswith("<role-arn")
    assert tuning["TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"] == \
        "<account>.dkr.ecr.us-east-1.amazonaws.com/dogbreed-train:<tag recorded by make push>"
    json.dumps([r.to_dict() for r in sm.recorded])  # all JSON-serialisable


def test_instance_count_trains_one_model_on_several_instances(settings: Settings) -> None:
    request = smr.training_request(settings, name="dogbreed-train-2", train_image=TRAIN_IMAGE,
                                   region=REGION, hyperparameters={"epochs": "5"}, instance_count=2)
    assert request["ResourceConfig"]["InstanceCount"] == 2
    # Every host reads the whole data set; the entry point shards each epoch across the ranks.
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"] == "FullyReplicated"
    smr.validate_request("sagemaker", "CreateTrainingJob", request)
    tuning = smr.tuning_request(settings, name="dogbreed-tune-2", train_image=TRAIN_IMAGE,
                                static_hyperparameters={}, instance_count=3)
    assert tuning["TrainingJobDefinition"]["ResourceConfig"]["InstanceCount"] == 3
    smr.validate_request("sagemaker", "CreateHyperParameterTuningJob", tuning)
    assert smr.training_request(settings, name="j", train_image="i", region=REGION, hyperparameters={})[
        "ResourceConfig"]["InstanceCount"] == settings.train_instance_count
    with pytest.raises(SettingsError, match="instance count"):
        smr.resource_config(Settings(train_instance_count=0))


def test_cli_instance_count_reaches_the_requests(capsys: pytest.CaptureFixture[str]) -> None:
    from dogbreed.launcher import cli

    cli.main(["train", "--sagemaker", "--dry-run", "--instance-count", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    assert '"InstanceCount": 2' in out
    cli.main(["tune", "--sagemaker", "--dry-run", "--instance-count", "2", "--trials", "2"])
    assert '"InstanceCount": 2' in capsys.readouterr().out


def test_stopping_condition_refuses_instead_of_changing_values(settings: Settings) -> None:
    """The bug: MaxWait below MaxRuntime was silently raised to it, and --max-wait without --spot
    or an instance count of 0 silently replaced (`or`)."""
    assert smr.stopping_condition(settings, True, max_wait=7200, max_runtime=3600) == {
        "MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert smr.stopping_condition(settings, True, max_runtime=3600)["MaxWaitTimeInSeconds"] == 7200
    with pytest.raises(SettingsError, match="--max-wait 60 is shorter than --max-runtime 3600"):
        smr.stopping_condition(settings, True, max_wait=60, max_runtime=3600)
    with pytest.raises(SettingsError, match="add --spot"):
        smr.stopping_condition(settings, False, max_wait=7200)
    with pytest.raises(SettingsError, match="--max-runtime 0"):
        smr.stopping_condition(settings, False, max_runtime=0)
    with pytest.raises(SettingsError, match="instance count 0"):
        smr.resource_config(settings, instance_count=0)
    with pytest.raises(SettingsError, match="--instance-count 0"):
        smr.endpoint_config_request(settings, name="c", model_name="m", instance_count=0)


def test_tuning_trials_share_no_checkpoint_prefix_unless_spot(settings: Settings) -> None:
    """One CheckpointConfig serves every trial, and SageMaker copies its whole prefix into each
    trial at start: without spot (nothing to resume) a tuning job has none; with spot the trials
    need it to resume after an interruption."""
    plain = smr.tuning_request(settings, name="dogbreed-tune-1", train_image=TRAIN_IMAGE,
                               static_hyperparameters={})
    assert "CheckpointConfig" not in plain["TrainingJobDefinition"]
    smr.validate_request("sagemaker", "CreateHyperParameterTuningJob", plain)
    spot = smr.tuning_request(settings, name="dogbreed-tune-1", train_image=TRAIN_IMAGE,
                              static_hyperparameters={}, spot=True)
    assert spot["TrainingJobDefinition"]["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/dogbreed/checkpoints/dogbreed-tune-1/", "LocalPath": "/opt/ml/checkpoints"}
    smr.validate_request("sagemaker", "CreateHyperParameterTuningJob", spot)
