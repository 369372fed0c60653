"""The SageMaker loop beyond one job: the session's region (rule images), endpoint updates,
autoscaling and CloudWatch logs. moto where it implements the operation (autoscaling), botocore's
Stubber (parameters and responses validated against the service model) where it does not
(UpdateEndpoint, CloudWatch log events)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from dogbreed import debugger_config
from dogbreed.launcher import cli
from dogbreed.launcher.sagemaker import backend as smb
from dogbreed.launcher.sagemaker import cloudwatch
from dogbreed.launcher.sagemaker import requests as smr
from dogbreed.launcher.sagemaker.backend import SageMakerBackend
from dogbreed.launcher.settings import Settings

ROLE = "arn:aws:iam::123456789012:role/dogbreed-sagemaker"
BUCKET = "dogbreed-loop-bucket"
IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dogbreed-serve@sha256:" + "a" * 64
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
NEW = "dogbreed-mme-260102-030405"
RESOURCE = "endpoint/dogbreed-mme/variant/AllTraffic"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"

# One region per group (partition / geography), with the account AWS publishes for it
# (the SDK's image_uri_config/debugger.json), written out here independently of rules.py.
REGION_GROUPS = {
    "us-east-1": ("503895931360", "amazonaws.com"),        # US (commercial)
    "eu-west-1": ("929884845733", "amazonaws.com"),        # Europe
    "ap-northeast-3": ("479947661362", "amazonaws.com"),   # Asia Pacific (account moved in 2025)
    "sa-east-1": ("818342061345", "amazonaws.com"),        # South America
    "ca-central-1": ("519511493484", "amazonaws.com"),     # Canada
    "me-south-1": ("986000313247", "amazonaws.com"),       # Middle East
    "af-south-1": ("314341159256", "amazonaws.com"),       # Africa
    "cn-north-1": ("618459771430", "amazonaws.com.cn"),    # China partition
    "us-gov-west-1": ("515509971035", "amazonaws.com"),    # GovCloud partition
}


def _settings(**changes) -> Settings:
    values = dict(role_arn=ROLE, bucket=BUCKET, train_image="train-image", serve_image=IMAGE,
                  poll_seconds=0)
    values.update(changes)
    return Settings(**values)


def _client(service: str, region: str = "eu-west-1"):
    return boto3.client(service, region_name=region, aws_access_key_id="x",
                        aws_secret_access_key="x")


# --- rule images follow the session's region ---------------------------------------------------------
@pytest.mark.parametrize("region", sorted(REGION_GROUPS))
def test_rule_images_are_the_sessions_region(region: str) -> None:
    """No --region: the boto3 session's region decides, for the rule images as for the clients."""
    account, domain = REGION_GROUPS[region]
    sm = SageMakerBackend(_settings(), dry_run=True,
                          session=boto3.session.Session(region_name=region))
    sm.train(name="dogbreed-train-r", hyperparameters={}, debugger_rules=True)
    request = sm.recorded[0].request
    smr.validate_request("sagemaker", "CreateTrainingJob", request)
    images = {r["RuleEvaluatorImage"] for r in request["DebugRuleConfigurations"]
              + request["ProfilerRuleConfigurations"]}
    assert images == {f"{account}.dkr.ecr.{region}.{domain}/sagemaker-debugger-rules:latest"}


def test_the_profiles_region_reaches_the_rule_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The case that broke: region only in the AWS profile, not in --region or AWS_REGION."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = eu-north-1\n")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    code = cli.main(["train", "--sagemaker", "--dry-run", "--debugger-rules", "--role-arn", ROLE,
                     "--bucket", BUCKET, "--train-image", "i", "--workdir", str(tmp_path)])
    assert code == 0
    request = json.loads(capsys.readouterr().out)["request"]
    assert request["DebugRuleConfigurations"][0]["RuleEvaluatorImage"] == \
        "314864569078.dkr.ecr.eu-north-1.amazonaws.com/sagemaker-debugger-rules:latest"


def test_a_region_without_rule_images_names_flags_that_exist() -> None:
    with pytest.raises(debugger_config.UnknownRegionError) as error:
        debugger_config.rule_evaluator_image("mars-north-1")
    flags = re.findall(r"--[a-z][a-z-]+", str(error.value))
    train = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                 if a[0] == "train")[1]
    assert flags and set(flags) <= set(train._option_string_actions)


def test_rules_table_is_the_sdks() -> None:
    assert len(debugger_config.RULE_EVALUATOR_ACCOUNTS) == 24
    for region, (account, _) in REGION_GROUPS.items():
        assert debugger_config.RULE_EVALUATOR_ACCOUNTS[region] == account


# --- endpoint update without downtime ----------------------------------------------------------------
def test_deploy_on_an_existing_endpoint_updates_it_and_keeps_autoscaling() -> None:
    """New model + config, UpdateEndpoint, the old config/model deleted once InService; the
    variant's scaling target is taken off during the update and put back with the new bounds."""
    sm = SageMakerBackend(_settings(region="eu-west-1"))
    sagemaker, scaling = _client("sagemaker"), _client("application-autoscaling")
    sm._clients.update({"sagemaker": sagemaker, "application-autoscaling": scaling})
    created = dict(EndpointArn="arn:aws:sagemaker:eu-west-1:123456789012:endpoint/dogbreed-mme",
                   CreationTime=NOW, LastModifiedTime=NOW, EndpointName="dogbreed-mme")
    with Stubber(sagemaker) as sm_stub, Stubber(scaling) as as_stub:
        sm_stub.add_response("describe_endpoint", {**created, "EndpointConfigName": "old-config",
                                                   "EndpointStatus": "InService"},
                             {"EndpointName": "dogbreed-mme"})
        sm_stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:eu-west-1:1:model/m"},
                             {"ModelName": NEW, "ExecutionRoleArn": ROLE, "PrimaryContainer": ANY,
                              "Tags": ANY})
        sm_stub.add_response("create_endpoint_config",
                             {"EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/c"},
                             {"EndpointConfigName": NEW, "ProductionVariants": [
                                 {"VariantName": "AllTraffic", "ModelName": NEW,
                                  "InitialInstanceCount": 2, "InstanceType": "ml.m5.xlarge",
                                  "InitialVariantWeight": 1.0}], "Tags": ANY})
        as_stub.add_response("describe_scalable_targets", {"ScalableTargets": [
            {"ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION,
             "MinCapacity": 1, "MaxCapacity": 3, "RoleARN": ROLE, "CreationTime": NOW}]},
            {"ServiceNamespace": "sagemaker", "ResourceIds": [RESOURCE], "ScalableDimension": DIMENSION})
        as_stub.add_response("describe_scaling_policies", {"ScalingPolicies": [
            {"PolicyARN": "arn:aws:autoscaling:p", "PolicyName": "old-policy",
             "ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION,
             "PolicyType": "TargetTrackingScaling", "CreationTime": NOW}]},
            {"ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION})
        as_stub.add_response("delete_scaling_policy", {}, {
            "PolicyName": "old-policy", "ServiceNamespace": "sagemaker", "ResourceId": RESOURCE,
            "ScalableDimension": DIMENSION})
        as_stub.add_response("deregister_scalable_target", {}, {
            "ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION})
        sm_stub.add_response("update_endpoint", {"EndpointArn": created["EndpointArn"]},
                             {"EndpointName": "dogbreed-mme", "EndpointConfigName": NEW})
        sm_stub.add_response("describe_endpoint", {**created, "EndpointConfigName": "old-config",
                                                   "EndpointStatus": "Updating"},
                             {"EndpointName": "dogbreed-mme"})
        sm_stub.add_response("describe_endpoint", {**created, "EndpointConfigName": NEW,
                                                   "EndpointStatus": "InService"},
                             {"EndpointName": "dogbreed-mme"})
        sm_stub.add_response("describe_endpoint_config", {
            "EndpointConfigName": "old-config", "EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/old-config",
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "old-model"}],
            "CreationTime": NOW}, {"EndpointConfigName": "old-config"})
        sm_stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "old-config"})
        sm_stub.add_response("delete_model", {}, {"ModelName": "old-model"})
        as_stub.add_response("register_scalable_target", {}, {
            "ServiceNamespace": "sagemaker", "ResourceId": RESOURCE, "ScalableDimension": DIMENSION,
            "MinCapacity": 2, "MaxCapacity": 5})
        as_stub.add_response("put_scaling_policy", {"PolicyARN": "arn:aws:autoscaling:new"}, {
            "PolicyName": "dogbreed-mme-invocations-per-instance", "ServiceNamespace": "sagemaker",
            "ResourceId": RESOURCE, "ScalableDimension": DIMENSION,
            "PolicyType": "TargetTrackingScaling", "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": 100.0, "ScaleInCooldown": 300, "ScaleOutCooldown": 60,
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}}})
        result = sm.deploy(now=NOW, instance_count=2, autoscale=(2, 5), target_invocations=100)
        sm_stub.assert_no_pending_responses()
        as_stub.assert_no_pending_responses()
    assert result["updated"] is True and result["status"] == "InService"
    assert result["replaced"] == {"endpoint_config": "old-config", "models": ["old-model"]}
    assert result["autoscaling"]["min"] == 2 and result["autoscaling"]["max"] == 5


def test_a_rolled_back_update_is_an_error() -> None:
    sm = SageMakerBackend(_settings(region="eu-west-1"))
    sagemaker, scaling = _client("sagemaker"), _client("application-autoscaling")
    sm._clients.update({"sagemaker": sagemaker, "application-autoscaling": scaling})
    created = dict(EndpointArn="arn:aws:sagemaker:eu-west-1:1:endpoint/dogbreed-mme",
                   CreationTime=NOW, LastModifiedTime=NOW, EndpointName="dogbreed-mme",
                   EndpointConfigName="old-config", EndpointStatus="InService",
                   ProductionVariants=[{"VariantName": "AllTraffic", "CurrentInstanceCount": 1,
                                        "DesiredInstanceCount": 1}])
    with Stubber(sagemaker) as sm_stub, Stubber(scaling) as as_stub:
        sm_stub.add_response("describe_endpoint", created)
        sm_stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:eu-west-1:1:model/m"})
        sm_stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/c"})
        as_stub.add_response("describe_scalable_targets", {"ScalableTargets": []})
        sm_stub.add_response("update_endpoint", {"EndpointArn": created["EndpointArn"]})
        sm_stub.add_response("describe_endpoint", created)  # InService, still on the old config
        with pytest.raises(smb.BackendError, match="rolled back"):
            sm.deploy(now=NOW)


# --- autoscaling and cleanup (moto) --------------------------------------------------------------------
@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        yield


def test_autoscaling_is_registered_and_cleanup_removes_it(aws) -> None:
    sm = SageMakerBackend(_settings(region="eu-west-1"),
                          session=boto3.session.Session(region_name="eu-west-1"))
    deployed = sm.deploy(now=NOW, autoscale=(1, 4))
    assert deployed["updated"] is False and deployed["autoscaling"]["max"] == 4
    scaling = boto3.client("application-autoscaling", region_name="eu-west-1")
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [(RESOURCE, 1, 4)]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert [p["PolicyType"] for p in policies] == ["TargetTrackingScaling"]
    assert policies[0]["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"] == \
        {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}

    deleted = sm.cleanup()
    assert deleted["scaling_policies"] == [policies[0]["PolicyName"]]
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert boto3.client("sagemaker", region_name="eu-west-1").list_endpoints()["Endpoints"] == []


def test_autoscale_flag_is_checked() -> None:
    assert smr.parse_autoscale("2:8") == (2, 8)
    for bad in ("8:2", "0:3", "3", "a:b"):
        with pytest.raises(ValueError, match="MIN:MAX"):
            smr.parse_autoscale(bad)


# --- CloudWatch logs (Stubber) -------------------------------------------------------------------------
def _stream(name: str) -> dict:
    return {"logStreamName": name}


def test_log_tail_follows_every_stream_once() -> None:
    logs = _client("logs")
    lines: list[str] = []
    group = "/aws/sagemaker/TrainingJobs"
    with Stubber(logs) as stub:
        # First poll: the job has not logged yet (no group).
        stub.add_client_error("describe_log_streams", "ResourceNotFoundException",
                              expected_params={"logGroupName": group, "logStreamNamePrefix": "job-1/"})
        # Second poll: two instances' streams.
        stub.add_response("describe_log_streams", {"logStreams": [
            _stream("job-1/algo-1-1700000000"), _stream("job-1/algo-2-1700000000")]},
            {"logGroupName": group, "logStreamNamePrefix": "job-1/"})
        stub.add_response("get_log_events", {"events": [
            {"timestamp": 1, "message": "epoch=1 valid_accuracy=0.3\n"},
            {"timestamp": 2, "message": "epoch=2 valid_accuracy=0.5\n"}],
            "nextForwardToken": "f/2", "nextBackwardToken": "b/0"},
            {"logGroupName": group, "logStreamName": "job-1/algo-1-1700000000", "startFromHead": True})
        stub.add_response("get_log_events", {"events": [], "nextForwardToken": "f/2"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-1-1700000000",
                           "startFromHead": True, "nextToken": "f/2"})
        stub.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "hello"}],
                                             "nextForwardToken": "g/1"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-2-1700000000",
                           "startFromHead": True})
        stub.add_response("get_log_events", {"events": [], "nextForwardToken": "g/1"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-2-1700000000",
                           "startFromHead": True, "nextToken": "g/1"})
        # Third poll: one new line on algo-1, read from where the last poll stopped.
        stub.add_response("describe_log_streams", {"logStreams": [
            _stream("job-1/algo-1-1700000000"), _stream("job-1/algo-2-1700000000")]})
        stub.add_response("get_log_events", {"events": [{"timestamp": 3, "message": "done"}],
                                             "nextForwardToken": "f/3"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-1-1700000000",
                           "startFromHead": True, "nextToken": "f/2"})
        stub.add_response("get_log_events", {"events": [], "nextForwardToken": "f/3"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-1-1700000000",
                           "startFromHead": True, "nextToken": "f/3"})
        stub.add_response("get_log_events", {"events": [], "nextForwardToken": "g/1"},
                          {"logGroupName": group, "logStreamName": "job-1/algo-2-1700000000",
                           "startFromHead": True, "nextToken": "g/1"})
        tail = cloudwatch.LogTail(logs, *cloudwatch.log_source("training", "job-1"), lines.append)
        assert [tail.poll(), tail.poll(), tail.poll()] == [0, 3, 1]
        stub.assert_no_pending_responses()
    assert lines == ["[job-1/algo-1-1700000000] epoch=1 valid_accuracy=0.3",
                     "[job-1/algo-1-1700000000] epoch=2 valid_accuracy=0.5",
                     "[job-1/algo-2-1700000000] hello",
                     "[job-1/algo-1-1700000000] done"]


def test_train_with_logs_streams_while_waiting(capsys: pytest.CaptureFixture[str]) -> None:
    """`dogbreed train --logs`: each status poll also prints the job's new log lines."""
    sm = SageMakerBackend(_settings(region="eu-west-1"))
    sagemaker, logs = _client("sagemaker"), _client("logs")
    sm._clients.update({"sagemaker": sagemaker, "logs": logs})
    job = {"TrainingJobName": "job-2", "TrainingJobArn": "arn:aws:sagemaker:eu-west-1:1:training-job/job-2",
           "ModelArtifacts": {"S3ModelArtifacts": "s3://b/k/model.tar.gz"},
           "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {
               "VolumeSizeInGB": 30}, "StoppingCondition": {}, "CreationTime": NOW,
           "SecondaryStatus": "Training"}
    with Stubber(sagemaker) as sm_stub, Stubber(logs) as logs_stub:
        sm_stub.add_response("describe_training_job", {**job, "TrainingJobStatus": "InProgress"})
        sm_stub.add_response("describe_training_job", {**job, "TrainingJobStatus": "Completed",
                                                       "SecondaryStatus": "Completed"})
        logs_stub.add_response("describe_log_streams", {"logStreams": [_stream("job-2/algo-1-1")]})
        logs_stub.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "epoch=1"}],
                                                  "nextForwardToken": "t1"})
        logs_stub.add_response("get_log_events", {"events": [], "nextForwardToken": "t1"})
        logs_stub.add_response("describe_log_streams", {"logStreams": [_stream("job-2/algo-1-1")]})
        logs_stub.add_response("get_log_events", {"events": [{"timestamp": 2, "message": "done"}],
                                                  "nextForwardToken": "t2"},
                               {"logGroupName": "/aws/sagemaker/TrainingJobs",
                                "logStreamName": "job-2/algo-1-1", "startFromHead": True,
                                "nextToken": "t1"})
        logs_stub.add_response("get_log_events", {"events": [], "nextForwardToken": "t2"})
        result = sm.training_result("job-2", wait=True, logs=True)
        logs_stub.assert_no_pending_responses()
    assert result["status"] == "Completed"
    assert capsys.readouterr().err.splitlines()[-2:] == ["[job-2/algo-1-1] epoch=1",
                                                         "[job-2/algo-1-1] done"]


def test_logs_command_reads_a_jobs_events(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    logs = _client("logs")
    monkeypatch.setattr(SageMakerBackend, "client", lambda self, service: logs)
    with Stubber(logs) as stub:
        stub.add_response("describe_log_streams", {"logStreams": [_stream("AllTraffic/i-0abc")]},
                          {"logGroupName": "/aws/sagemaker/Endpoints/dogbreed-mme",
                           "logStreamNamePrefix": "AllTraffic/"})
        stub.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "ready"}],
                                             "nextForwardToken": "t"})
        stub.add_response("get_log_events", {"events": [], "nextForwardToken": "t"})
        code = cli.main(["logs", "dogbreed-mme", "--kind", "endpoint", "--sagemaker",
                         "--region", "eu-west-1", "--role-arn", ROLE, "--bucket", BUCKET])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["events"] == 1 and "[AllTraffic/i-0abc] ready" in err


def test_tuning_trials_share_a_prefix_but_not_a_checkpoint_file(tmp_path: Path) -> None:
    """Trials of one tuning job sync the same CheckpointConfig.S3Uri; each resumes its own file."""
    from dogbreed import contract
    from dogbreed.train import checkpoint_file

    request = smr.tuning_request(_settings(), name="dogbreed-tune-ck", train_image="i",
                                 static_hyperparameters={}, spot=True)
    assert request["TrainingJobDefinition"]["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/dogbreed/checkpoints/dogbreed-tune-ck/",
        "LocalPath": "/opt/ml/checkpoints"}
    paths = contract.Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path)})
    assert checkpoint_file(paths, {}).name == "checkpoint.pt"  # local runs, as before
    trial = {"TRAINING_JOB_NAME": "dogbreed-tune-ck-003-1a2b3c4d"}
    assert checkpoint_file(paths, trial) == paths.checkpoints_dir / "checkpoint-dogbreed-tune-ck-003-1a2b3c4d.pt"


def test_an_update_keeps_the_endpoints_desired_instance_count() -> None:
    """Autoscaling took the endpoint to 4 instances: an update without --instance-count starts
    the new config at 4 (it started at 1, shrinking the endpoint at peak load)."""
    sm = SageMakerBackend(_settings(region="eu-west-1"))
    sagemaker, scaling = _client("sagemaker"), _client("application-autoscaling")
    sm._clients.update({"sagemaker": sagemaker, "application-autoscaling": scaling})
    endpoint = dict(EndpointArn="arn:aws:sagemaker:eu-west-1:1:endpoint/dogbreed-mme",
                    CreationTime=NOW, LastModifiedTime=NOW, EndpointName="dogbreed-mme",
                    EndpointConfigName="old-config", EndpointStatus="InService",
                    ProductionVariants=[{"VariantName": "AllTraffic", "CurrentInstanceCount": 3,
                                         "DesiredInstanceCount": 4}])
    with Stubber(sagemaker) as sm_stub, Stubber(scaling) as as_stub:
        sm_stub.add_response("describe_endpoint", endpoint, {"EndpointName": "dogbreed-mme"})
        sm_stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:eu-west-1:1:model/m"})
        sm_stub.add_response("create_endpoint_config",
                             {"EndpointConfigArn": "arn:aws:sagemaker:eu-west-1:1:endpoint-config/c"},
                             {"EndpointConfigName": NEW, "ProductionVariants": [
                                 {"VariantName": "AllTraffic", "ModelName": NEW,
                                  "InitialInstanceCount": 4, "InstanceType": "ml.m5.xlarge",
                                  "InitialVariantWeight": 1.0}], "Tags": ANY})
        as_stub.add_response("describe_scalable_targets", {"ScalableTargets": []})
        sm_stub.add_response("update_endpoint", {"EndpointArn": endpoint["EndpointArn"]},
                             {"EndpointName": "dogbreed-mme", "EndpointConfigName": NEW})
        result = sm.deploy(now=NOW, wait=False)
        sm_stub.assert_no_pending_responses()
    assert result["updated"] is True


def test_update_dry_run_shows_the_count_it_keeps_and_the_autoscaling_calls(capsys) -> None:
    """The dry run of an update prints what the real run does: the endpoint read, the config at
    the endpoint's desired count, the scaling target taken off, the update, the target put back."""
    code = cli.main(["deploy", "--update", "--dry-run", "--sagemaker", "--region", "eu-west-1",
                     "--role-arn", ROLE, "--bucket", BUCKET, "--serve-image", IMAGE])
    assert code == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["operation"] for i in items] == [
        "DescribeEndpoint", "CreateModel", "CreateEndpointConfig", "DescribeScalableTargets",
        "DeleteScalingPolicy", "DeregisterScalableTarget", "UpdateEndpoint",
        "RegisterScalableTarget", "PutScalingPolicy"]
    variant = items[2]["request"]["ProductionVariants"][0]
    assert variant["InitialInstanceCount"] == "<DesiredInstanceCount of dogbreed-mme>"
    register = items[7]["request"]
    assert register["ResourceId"] == RESOURCE and register["ScalableDimension"] == DIMENSION
    assert register["MinCapacity"].startswith("<MinCapacity of ")
    assert items[8]["request"]["PolicyType"] == "TargetTrackingScaling"
