"""``dogbreed batch`` on SageMaker: ``CreateModel`` (the serve image, single-model mode, the
model.tar.gz) and ``CreateTransformJob`` over an S3 prefix with one record per file —
``SplitType=None``, ``BatchStrategy=SingleRecord`` — so SageMaker writes ``<input name>.out`` per
input under the output prefix, as batch transform always names them; then waits.
:mod:`dogbreed.launcher.local.batch` is the same transform on this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dogbreed import artifacts, contract
from dogbreed.launcher import events
from dogbreed.launcher.sagemaker.backend import BackendError, Recorded
from dogbreed.launcher.sagemaker.requests import (
    JOB_NAME_MAX,
    TAGS,
    check_name,
    role_arn,
    split_s3_uri,
)

MAX_PAYLOAD_MB = contract.MAX_PAYLOAD_BYTES // 1024**2  # what the server accepts per request
LOG_GROUP = "/aws/sagemaker/TransformJobs"


def model_request(settings: Any, *, name: str, serve_image: str, model_data: str) -> dict[str, Any]:
    """``CreateModel``: the serve image in single-model mode with one model.tar.gz."""
    return {"ModelName": check_name(name, JOB_NAME_MAX, "model name"),
            "ExecutionRoleArn": role_arn(settings),
            "PrimaryContainer": {"Image": serve_image, "Mode": "SingleModel",
                                 "ModelDataUrl": model_data},
            "Tags": TAGS}


def transform_request(settings: Any, *, name: str, model_name: str, input_uri: str,
                      output_uri: str, instance_type: str | None = None,
                      max_concurrent: int | None = None) -> dict[str, Any]:
    """``CreateTransformJob``: every object under ``input_uri`` is one record."""
    request: dict[str, Any] = {
        "TransformJobName": check_name(name, JOB_NAME_MAX, "transform job name"),
        "ModelName": model_name,
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": MAX_PAYLOAD_MB,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": contract.BATCH_RECORD_CONTENT_TYPE, "CompressionType": "None", "SplitType": "None"},
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": "application/json",
                            "AssembleWith": "None"},
        "TransformResources": {"InstanceType": instance_type or settings.serve_instance_type,
                               "InstanceCount": 1},
        "Tags": TAGS,
    }
    if max_concurrent:
        request["MaxConcurrentTransforms"] = max_concurrent
    return request


def model_data_uri(sm: Any, model: str, *prefix: str) -> str:
    """The S3 URI of MODEL: itself (s3://…), a local model.tar.gz uploaded to
    ``<prefix>/.../model.tar.gz``, or a training job's ModelArtifacts."""
    if model.startswith("s3://"):
        return model
    if Path(model).is_file():
        bucket, key = split_s3_uri(sm.settings.s3_uri(*prefix, artifacts.ARCHIVE_NAME))
        if sm.dry_run:
            sm.send("s3", "put_object", {"Bucket": bucket, "Key": key,
                                         "Body": f"<{Path(model).stat().st_size} bytes of {model}>"})
        else:
            sm.recorded.append(Recorded("s3", "PutObject", {"Bucket": bucket, "Key": key}))
            sm.client("s3").upload_file(str(model), bucket, key)
        return f"s3://{bucket}/{key}"
    if sm.dry_run:
        sm.send("sagemaker", "describe_training_job", {"TrainingJobName": model})
        return f"s3://<ModelArtifacts.S3ModelArtifacts of {model}>"
    description = sm.client("sagemaker").describe_training_job(TrainingJobName=model)
    if description["TrainingJobStatus"] != "Completed":
        raise BackendError(f"training job {model} is {description['TrainingJobStatus']}")
    return description["ModelArtifacts"]["S3ModelArtifacts"]


def sagemaker_batch(sm: Any, *, model: str, input_uri: str, output_uri: str | None, name: str,
                    instance_type: str | None = None, max_concurrent: int | None = None,
                    wait: bool = True) -> dict[str, Any] | None:
    """MODEL: an S3 URI of a model.tar.gz, a local model.tar.gz (uploaded first) or a
    training job name (its ModelArtifacts). Sends CreateModel + CreateTransformJob."""

    sm.require("role_arn", "bucket")
    if not input_uri.startswith("s3://"):
        raise ValueError(f"INPUT must be an S3 prefix (s3://bucket/prefix/), got {input_uri!r}; "
                         "for a local folder use --local")
    output_uri = output_uri or sm.settings.s3_uri("batch", name, "output")
    if not output_uri.startswith("s3://"):
        raise ValueError(f"OUTPUT must be an S3 prefix, got {output_uri!r}")
    model_data = model_data_uri(sm, model, "batch", name)
    sm.send("sagemaker", "create_model",
            model_request(sm.settings, name=name, serve_image=sm.image_uri("serve"),
                          model_data=model_data))
    sm.send("sagemaker", "create_transform_job",
            transform_request(sm.settings, name=name, model_name=name, input_uri=input_uri,
                              output_uri=output_uri, instance_type=instance_type,
                              max_concurrent=max_concurrent))
    if sm.dry_run:
        return None
    events.event("transform_job_created", name=name, input=input_uri, output=output_uri)
    result = {"transform_job": name, "model": name, "model_data": model_data,
              "output": output_uri, "logs": f"CloudWatch {LOG_GROUP}, streams {name}/*"}
    if not wait:
        return {**result, "status": "InProgress"}
    client = sm.client("sagemaker")
    description = sm.wait_until_completed(
        lambda: client.describe_transform_job(TransformJobName=name), "TransformJobStatus",
        f"transform job {name}", hint=f"; logs: {result['logs']}")
    result["status"] = description["TransformJobStatus"]
    return result
