"""The README's SageMaker Python SDK v3 recipe (``ModelTrainer``, what ``pip install sagemaker``
installs now), run as written against moto, its CreateTrainingJob checked against the contract.

v3 cannot share the venv with v2 (the dev extra's ``sagemaker<3``, which the Estimator /
HyperparameterTuner / MultiDataModel recipes need): its ``sagemaker-train`` wheel ships its own
``sagemaker/__init__.py`` and needs ``sagemaker-core>=2``, where v2 pins ``sagemaker-core<2``. So
the two v3 packages the recipe imports are installed without dependencies into a folder of
their own under ``.venv/`` (once; everything else they import is already in the venv), and the
recipe runs in a subprocess with that folder first on ``PYTHONPATH``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed import contract
from dogbreed.metrics import METRIC_DEFINITIONS

ROOT = Path(__file__).resolve().parents[2]
V3_DIR = ROOT / ".venv" / "sagemaker-v3"
# The versions the recipe was written against (PyPI's newest when it was).
V3_PACKAGES = ("sagemaker-train==1.27.0", "sagemaker-core==2.27.0")
REGION = "eu-west-1"
BUCKET = "dogbreed-sdk-v3-bucket"
TRAIN_IMAGE = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/dogbreed-train:abc1234"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"

# The README recipe, with the test's bucket, image and a moto-backed boto3 session.
RECIPE = '''
import json, os
import boto3
from moto import mock_aws

sent = {}
with mock_aws():
    boto3.client("s3", region_name=REGION).create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    boto_session = boto3.session.Session(region_name=REGION)
    boto_session.events.register(
        "before-parameter-build.sagemaker",
        lambda params, model, **kw: sent.__setitem__(model.name, json.loads(json.dumps(params, default=str))))

    # --- the README's v3 recipe ---
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.shapes import MetricDefinition
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import CheckpointConfig, Compute, InputData, OutputDataConfig, StoppingCondition
    from dogbreed.metrics import METRIC_DEFINITIONS

    trainer = ModelTrainer(
        training_image=train_image, role=role, sagemaker_session=Session(boto_session=boto_session),
        compute=Compute(instance_type="ml.g6.xlarge", instance_count=1),
        hyperparameters={"model": "resnet18", "epochs": 10, "lr": 0.01},
        stopping_condition=StoppingCondition(max_runtime_in_seconds=4 * 3600),
        output_data_config=OutputDataConfig(s3_output_path=f"s3://{bucket}/dogbreed/output"),
        checkpoint_config=CheckpointConfig(s3_uri=f"s3://{bucket}/dogbreed/checkpoints/sdk-v3/",
                                           local_path="/opt/ml/checkpoints"),
        base_job_name="dogbreed-train",
    ).with_metric_definitions([MetricDefinition(name=m["Name"], regex=m["Regex"])
                               for m in METRIC_DEFINITIONS])
    trainer.train(input_data_config=[InputData(channel_name="training",
                                               data_source=f"s3://{bucket}/dogbreed/data")],
                  wait=False, logs=False)
    # --- end of recipe ---
    import sagemaker.train
    print(json.dumps({"request": sent["CreateTrainingJob"], "module": sagemaker.train.__file__}))
'''


@pytest.fixture(scope="module")
def v3_path() -> Path:
    if not (V3_DIR / "sagemaker" / "train" / "model_trainer.py").is_file():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                 "--target", str(V3_DIR), *V3_PACKAGES],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"SageMaker SDK v3 not installable here (needs PyPI): {result.stderr[-500:]}")
    return V3_DIR


def test_model_trainer_recipe_sends_a_training_job_the_image_accepts(v3_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(v3_path), str(ROOT / "src")]),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION,
           # v3 checks the role's permissions with IAM SimulatePrincipalPolicy, which moto lacks.
           "SAGEMAKER_VALIDATE_ROLE": "false"}
    prelude = (f"REGION, BUCKET = {REGION!r}, {BUCKET!r}\nbucket, role, train_image = "
               f"BUCKET, {ROLE!r}, {TRAIN_IMAGE!r}\n")
    result = subprocess.run([sys.executable, "-c", prelude + RECIPE], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["module"].startswith(str(v3_path))  # v3's ModelTrainer, not a v2 leftover
    job = answer["request"]
    assert job["AlgorithmSpecification"]["TrainingImage"] == TRAIN_IMAGE
    assert job["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert job["InputDataConfig"][0]["ChannelName"] == contract.TRAINING_CHANNEL
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/dogbreed/checkpoints/sdk-v3/"
    # No Debugger service feature rides along (closed to new customers).
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"} & set(job)
    hps = contract.parse_hyperparameters(job["HyperParameters"])
    assert (hps.model, hps.epochs, hps.lr) == ("resnet18", 10, 0.01)
