"""Invoking an endpoint with boto3's own ``sagemaker-runtime`` client (SageMaker or local).

The same ``invoke_endpoint`` call serves both: against the local endpoint only ``endpoint_url``
differs (and dummy credentials, which the local router ignores).
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any


def content_type_for(path: Path) -> str:
    guessed = mimetypes.guess_type(path.name)[0]
    return guessed if guessed in ("image/jpeg", "image/png") else "application/x-image"


def top_k_attributes(top_k: int) -> str:
    return f"top_k={top_k}"


def runtime_client(endpoint_url: str | None, region: str | None) -> Any:
    """boto3's own sagemaker-runtime client; pointed at a local endpoint with dummy credentials."""
    import boto3  # boto3 only when a request is sent

    if endpoint_url:
        return boto3.client("sagemaker-runtime", region_name=region or "us-east-1",
                            endpoint_url=endpoint_url, aws_access_key_id="local",
                            aws_secret_access_key="local")
    return boto3.client("sagemaker-runtime", region_name=region)


def invoke_request(endpoint: str, target_model: str, image: Path, top_k: int) -> dict[str, Any]:
    """The ``InvokeEndpoint`` parameters for one image and one model of a multi-model endpoint."""
    image = Path(image)
    return {"EndpointName": endpoint, "TargetModel": target_model,
            "ContentType": content_type_for(image), "Accept": "application/json",
            "CustomAttributes": top_k_attributes(top_k), "Body": image.read_bytes()}


def invoke_runtime(client: Any, endpoint: str, target_model: str, image: Path, top_k: int) -> Any:
    response = client.invoke_endpoint(**invoke_request(endpoint, target_model, image, top_k))
    return json.loads(response["Body"].read())


def invoke_result(target_model: str, answer: Any) -> dict[str, Any]:
    """What ``dogbreed invoke`` prints: the answer under the TargetModel the caller asked for.

    The container names a model by whatever the platform loaded it as (SageMaker's MME and the
    local router load ``dogs/model.tar.gz`` under an internal hashed name), which the caller
    never chose; that name is kept as ``server_model_name``."""
    if not isinstance(answer, dict):
        return {"target_model": target_model, "answer": answer}
    result = {"target_model": target_model, **answer, "model": target_model}
    if "model" in answer and answer["model"] != target_model:
        result["server_model_name"] = answer["model"]
    return result


def format_predictions(answer: Any) -> str:
    if not isinstance(answer, dict) or "predictions" not in answer:
        return json.dumps(answer, indent=2)
    lines = [f"model={answer.get('model')} arch={answer.get('arch')}"]
    for rank, item in enumerate(answer["predictions"], 1):
        lines.append(f"  {rank}. {item.get('label', item.get('class_name'))}  {item['probability']:.4f}")
    return "\n".join(lines)
