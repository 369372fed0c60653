"""The README's SageMaker Python SDK recipes, run as written against moto: the SDK builds and sends
its real requests (validated by botocore against the service model); each request is captured as
sent (moto answers some describes with canned values) and checked against what the images expect.

What cannot run here: the SDK's local mode (``instance_type="local"``) starts the containers with
docker compose on a bridge network (``sagemaker-local``), which this machine forbids; the
images' own contract is tested with ``docker run --network host`` in tests/docker instead."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

sagemaker = pytest.importorskip("sagemaker", reason="the dev extra installs the SageMaker SDK")

from dogbreed import contract  # noqa: E402
from dogbreed.launcher import search_space  # noqa: E402
from dogbreed.metrics import METRIC_DEFINITIONS, OBJECTIVE_METRIC  # noqa: E402

REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"
BUCKET = "dogbreed-sdk-bucket"
REGISTRY = f"123456789012.dkr.ecr.{REGION}.amazonaws.com"
TRAIN_IMAGE = f"{REGISTRY}/dogbreed-train:abc1234"
SERVE_IMAGE = f"{REGISTRY}/dogbreed-serve:abc1234"


class Sent(dict):
    """Operation name -> the parameters of its last request, as the SDK built them."""

    def capture(self, params: dict, model, **kwargs) -> None:
        self[model.name] = json.loads(json.dumps(params, default=str))


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch, sent: Sent):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
                        "SAGEMAKER_SUPPRESS_V2_WARNING": "1"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        boto_session = boto3.session.Session(region_name=REGION)
        boto_session.events.register("before-parameter-build.sagemaker", sent.capture)
        yield sagemaker.Session(boto_session=boto_session, default_bucket=BUCKET)


def _estimator(session, **kwargs):
    from sagemaker.estimator import Estimator

    return Estimator(image_uri=TRAIN_IMAGE, role=ROLE, instance_count=1,
                     instance_type="ml.g4dn.xlarge", sagemaker_session=session,
                     output_path=f"s3://{BUCKET}/dogbreed/output",
                     hyperparameters={"model": "resnet18", "image-size": 224},
                     metric_definitions=METRIC_DEFINITIONS, **kwargs)


def test_estimator_fit_sends_a_training_job_the_image_accepts(session, sent: Sent) -> None:
    estimator = _estimator(session, use_spot_instances=True, max_run=3600, max_wait=7200,
                           checkpoint_s3_uri=f"s3://{BUCKET}/dogbreed/checkpoints/sdk-1/")
    estimator.set_hyperparameters(epochs=3, lr=0.01)
    estimator.fit({"training": f"s3://{BUCKET}/dogbreed/data"}, job_name="dogbreed-sdk-1",
                  wait=False, logs=False)
    job = sent["CreateTrainingJob"]
    assert boto3.client("sagemaker", region_name=REGION).describe_training_job(
        TrainingJobName="dogbreed-sdk-1")["TrainingJobStatus"]
    assert job["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert job["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert job["InputDataConfig"][0]["ChannelName"] == contract.TRAINING_CHANNEL
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/dogbreed/checkpoints/sdk-1/"
    # The SDK sends every value as a string (JSON-encoded for strings); the entry point's
    # contract reads exactly what SageMaker will write into hyperparameters.json.
    hps = contract.parse_hyperparameters(job["HyperParameters"])
    assert (hps.model, hps.epochs, hps.lr, hps.image_size) == ("resnet18", 3, 0.01, 224)


def test_hyperparameter_tuner_uses_the_projects_metrics_and_space(session, sent: Sent) -> None:
    from sagemaker.tuner import HyperparameterTuner

    tuner = HyperparameterTuner(_estimator(session), objective_metric_name=OBJECTIVE_METRIC,
                                hyperparameter_ranges=search_space.to_sdk(),
                                metric_definitions=METRIC_DEFINITIONS, objective_type="Maximize",
                                max_jobs=6, max_parallel_jobs=2, strategy="Bayesian")
    tuner.fit({"training": f"s3://{BUCKET}/dogbreed/data"}, job_name="dogbreed-sdk-tune",
              wait=False)
    job = sent["CreateHyperParameterTuningJob"]
    config = job["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize",
                                                          "MetricName": "valid_accuracy"}
    # The same ranges the launcher sends (the SDK spells the same space).
    expected = search_space.to_sagemaker(search_space.SEARCH_SPACE)
    for kind, ranges in expected.items():
        assert config["ParameterRanges"][kind] == ranges
    definition = job["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    static = {k: v for k, v in definition["StaticHyperParameters"].items()
              if not k.startswith(contract.IGNORED_HYPERPARAMETER_PREFIXES)}
    assert contract.parse_hyperparameters(static).model == "resnet18"


def test_model_deploy_and_multi_data_model(session, sent: Sent) -> None:
    from sagemaker.model import Model
    from sagemaker.multidatamodel import MultiDataModel

    client = boto3.client("sagemaker", region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    s3.put_object(Bucket=BUCKET, Key="dogbreed/output/job-1/output/model.tar.gz", Body=b"archive")

    # One model, one endpoint: the serve image in single-model mode (/opt/ml/model).
    Model(image_uri=SERVE_IMAGE, role=ROLE, sagemaker_session=session, name="dogbreed-single",
          model_data=f"s3://{BUCKET}/dogbreed/output/job-1/output/model.tar.gz").deploy(
        initial_instance_count=1, instance_type="ml.m5.xlarge", endpoint_name="dogbreed-single",
        wait=False)
    single = sent["CreateModel"]["PrimaryContainer"]
    assert single["Image"] == SERVE_IMAGE and single.get("Mode", "SingleModel") == "SingleModel"
    assert sent["CreateEndpoint"]["EndpointName"] == "dogbreed-single"

    # Many models behind one endpoint: Mode=MultiModel over the launcher's models prefix.
    mdm = MultiDataModel(name="dogbreed-mme-sdk", model_data_prefix=f"s3://{BUCKET}/dogbreed/models/",
                         image_uri=SERVE_IMAGE, role=ROLE, sagemaker_session=session)
    mdm.deploy(initial_instance_count=1, instance_type="ml.m5.xlarge",
               endpoint_name="dogbreed-mme-sdk", wait=False)
    multi = sent["CreateModel"]["PrimaryContainer"]
    assert multi["Mode"] == "MultiModel"
    assert multi["ModelDataUrl"] == f"s3://{BUCKET}/dogbreed/models/"
    assert client.describe_endpoint(EndpointName="dogbreed-mme-sdk")["EndpointStatus"] == "InService"
    mdm.add_model(model_data_source=f"s3://{BUCKET}/dogbreed/output/job-1/output/model.tar.gz",
                  model_data_path="dog-breed-classifier/model.tar.gz")
    assert list(mdm.list_models()) == ["dog-breed-classifier/model.tar.gz"]
    copied = s3.get_object(Bucket=BUCKET, Key="dogbreed/models/dog-breed-classifier/model.tar.gz")
    assert copied["Body"].read() == b"archive"
