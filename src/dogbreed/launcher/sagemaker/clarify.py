"""``dogbreed clarify``: SageMaker Clarify's computer-vision explainability (SHAP over superpixels).

Clarify runs as a processing job in AWS's ``sagemaker-clarify-processing`` image. It reads an
analysis config (``/opt/ml/processing/input/config/analysis_config.json``) and the images
(``/opt/ml/processing/input/data``), stands up a shadow endpoint from a SageMaker *model* (our
serve image, single-model mode), and writes per-image SHAP heat maps and a report to
``/opt/ml/processing/output``. Requests sent, in order: CreateModel, PutObject (the config),
CreateProcessingJob.

The analysis config follows Clarify's documented fields for image data: ``dataset_type``
``application/x-image``, ``methods.shap.image_config`` with ``model_type``
``IMAGE_CLASSIFICATION``, and a ``predictor`` naming the model, content/accept types and the
JMESPath that turns our answer into Clarify's per-class probability vector. The server answers
top-k sorted by probability; asking for every class (``custom_attributes`` ``top_k=N``) and
sorting by class index gives the vector in ``label_headers`` order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dogbreed.artifacts import breed_name
from dogbreed.launcher.sagemaker import batch_transform
from dogbreed.launcher.sagemaker.requests import (
    JOB_NAME_MAX,
    TAGS,
    check_name,
    role_arn,
    split_s3_uri,
)

# SageMaker Python SDK src/sagemaker/image_uri_config/clarify.json (processing, version 1.0),
# aws/sagemaker-python-sdk@088b7acbee152313ca3db05dd24be518ebdfb36d.
CLARIFY_REPOSITORY = "sagemaker-clarify-processing"
CLARIFY_VERSION = "1.0"
CLARIFY_ACCOUNTS: dict[str, str] = {
    "af-south-1": "811711786498",
    "ap-east-1": "098760798382",
    "ap-northeast-1": "377024640650",
    "ap-northeast-2": "263625296855",
    "ap-northeast-3": "364406365360",
    "ap-south-1": "452307495513",
    "ap-southeast-1": "834264404009",
    "ap-southeast-2": "007051062584",
    "ca-central-1": "675030665977",
    "cn-north-1": "122526803553",
    "cn-northwest-1": "122578899357",
    "eu-central-1": "017069133835",
    "eu-north-1": "763603941244",
    "eu-south-1": "638885417683",
    "eu-west-1": "131013547314",
    "eu-west-2": "440796970383",
    "eu-west-3": "341593696636",
    "me-south-1": "835444307964",
    "sa-east-1": "520018980103",
    "us-east-1": "205585389593",
    "us-east-2": "211330385671",
    "us-west-1": "740489534195",
    "us-west-2": "306415355426",
}
PROCESSING_ROOT = "/opt/ml/processing"
CONFIG_INPUT = f"{PROCESSING_ROOT}/input/config"
DATA_INPUT = f"{PROCESSING_ROOT}/input/data"
RESULT_OUTPUT = f"{PROCESSING_ROOT}/output"
CONFIG_FILE = "analysis_config.json"
DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
DEFAULT_NUM_SAMPLES = 500  # SHAP samples per image; Clarify's examples for CV use 500
DEFAULT_SEGMENTS = 20


def clarify_image(region: str) -> str:
    try:
        account = CLARIFY_ACCOUNTS[region]
    except KeyError:
        raise ValueError(f"no SageMaker Clarify image known for region {region!r}; known: "
                         f"{', '.join(sorted(CLARIFY_ACCOUNTS))}") from None
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{CLARIFY_REPOSITORY}:{CLARIFY_VERSION}"


def analysis_config(*, model_name: str, class_names: Sequence[str], instance_type: str,
                    num_segments: int = DEFAULT_SEGMENTS, num_samples: int = DEFAULT_NUM_SAMPLES,
                    content_type: str = "image/jpeg") -> dict[str, Any]:
    """Clarify's analysis config for SHAP explanations of an image classifier."""
    return {
        "dataset_type": "application/x-image",
        "methods": {
            "shap": {
                "num_samples": num_samples,
                "image_config": {"model_type": "IMAGE_CLASSIFICATION",
                                 "num_segments": num_segments,
                                 "feature_extraction_method": "segmentation",
                                 "segment_compactness": 5},
            },
            "report": {"name": "report", "title": "dogbreed: SHAP explanations of breed predictions"},
        },
        "predictor": {
            "model_name": model_name,
            "instance_type": instance_type,
            "initial_instance_count": 1,
            "content_type": content_type,
            "accept_type": "application/json",
            "custom_attributes": f"top_k={len(class_names)}",
            "probability": "sort_by(predictions, &index)[*].probability",
            "label_headers": [breed_name(c) for c in class_names],
        },
    }


def processing_request(settings: Any, *, name: str, image_uri: str, data_uri: str,
                       config_uri: str, output_uri: str, instance_type: str) -> dict[str, Any]:
    """``CreateProcessingJob`` in the shape the SageMaker SDK's SageMakerClarifyProcessor sends."""
    def s3_input(input_name: str, uri: str, local: str) -> dict[str, Any]:
        return {"InputName": input_name, "AppManaged": False,
                "S3Input": {"S3Uri": uri, "LocalPath": local, "S3DataType": "S3Prefix",
                            "S3InputMode": "File", "S3DataDistributionType": "FullyReplicated",
                            "S3CompressionType": "None"}}

    return {
        "ProcessingJobName": check_name(name, JOB_NAME_MAX, "processing job name"),
        "ProcessingInputs": [s3_input("analysis_config", config_uri, CONFIG_INPUT),
                             s3_input("dataset", data_uri, DATA_INPUT)],
        "ProcessingOutputConfig": {"Outputs": [{
            "OutputName": "analysis_result", "AppManaged": False,
            "S3Output": {"S3Uri": output_uri, "LocalPath": RESULT_OUTPUT,
                         "S3UploadMode": "EndOfJob"}}]},
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": instance_type,
                                                  "VolumeSizeInGB": 30}},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3 * 3600},
        "AppSpecification": {"ImageUri": image_uri},
        "RoleArn": role_arn(settings),
        "Tags": TAGS,
    }


def run_clarify(sm: Any, *, model_data: str, class_names: Sequence[str], data_uri: str, name: str,
                instance_type: str | None = None, num_samples: int = DEFAULT_NUM_SAMPLES,
                wait: bool = True) -> dict[str, Any] | None:
    """CreateModel (serve image, ``model_data``), the config to S3, CreateProcessingJob."""
    sm.require("role_arn", "bucket")
    if not data_uri.startswith("s3://"):
        raise ValueError(f"--data must be an S3 prefix of images, got {data_uri!r}")
    instance_type = instance_type or DEFAULT_INSTANCE_TYPE
    sm.send("sagemaker", "create_model",
            batch_transform.model_request(sm.settings, name=name, serve_image=sm.image_uri("serve"),
                                          model_data=model_data))
    config = analysis_config(model_name=name, class_names=class_names,
                             instance_type=sm.settings.serve_instance_type or instance_type,
                             num_samples=num_samples)
    config_uri = sm.settings.s3_uri("clarify", name, "config", CONFIG_FILE)
    bucket, key = split_s3_uri(config_uri)
    sm.send("s3", "put_object", {"Bucket": bucket, "Key": key,
                                 "Body": json.dumps(config, indent=2)})
    output_uri = sm.settings.s3_uri("clarify", name, "output")
    request = processing_request(sm.settings, name=name, image_uri=clarify_image(sm.region),
                                 data_uri=data_uri, config_uri=config_uri.rsplit("/", 1)[0],
                                 output_uri=output_uri, instance_type=instance_type)
    sm.send("sagemaker", "create_processing_job", request)
    if sm.dry_run:
        return None
    result = {"processing_job": name, "model": name, "analysis_config": config_uri,
              "output": output_uri}
    if not wait:
        return {**result, "status": "InProgress"}
    client = sm.client("sagemaker")
    description = sm.wait_until_completed(
        lambda: client.describe_processing_job(ProcessingJobName=name), "ProcessingJobStatus",
        f"clarify job {name}")
    result["status"] = description["ProcessingJobStatus"]
    return result
