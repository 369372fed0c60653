"""SageMaker Debugger: the seeds' built-in rules, hook collections and the rule-evaluator images.

Without the SageMaker SDK a training job must name the rule-evaluator image itself, in the
region the job runs in (the region of the boto3 session that sends ``CreateTrainingJob``).
Rule parameters follow ``smdebug_rulesconfig``'s built-in rule configs.
"""

from __future__ import annotations

from typing import Any

RULES_REPOSITORY = "sagemaker-debugger-rules"
RULES_TAG = "latest"

# The account that hosts the rule-evaluator image in each region where Debugger rules run.
# Source (maintained): the SageMaker Python SDK's image-uri config
# ``sagemaker-core/src/sagemaker/core/image_uri_config/debugger.json`` (aws/sagemaker-python-sdk,
# last changed in commit 3203e49, 2025-11-20: ap-northeast-3 moved to 479947661362), which the
# SDK's ``image_uris.retrieve("debugger", region)`` reads. ``smdebug-rulesconfig`` carries no
# account table. Refresh: copy ``versions.latest.registries`` from that file.
RULE_EVALUATOR_ACCOUNTS: dict[str, str] = {
    "af-south-1": "314341159256",
    "ap-east-1": "199566480951",
    "ap-northeast-1": "430734990657",
    "ap-northeast-2": "578805364391",
    "ap-northeast-3": "479947661362",
    "ap-south-1": "904829902805",
    "ap-southeast-1": "972752614525",
    "ap-southeast-2": "184798709955",
    "ca-central-1": "519511493484",
    "cn-north-1": "618459771430",
    "cn-northwest-1": "658757709296",
    "eu-central-1": "482524230118",
    "eu-north-1": "314864569078",
    "eu-south-1": "563282790590",
    "eu-west-1": "929884845733",
    "eu-west-2": "250201462417",
    "eu-west-3": "447278800020",
    "me-south-1": "986000313247",
    "sa-east-1": "818342061345",
    "us-east-1": "503895931360",
    "us-east-2": "915447279597",
    "us-gov-west-1": "515509971035",
    "us-west-1": "685455198987",
    "us-west-2": "895741380848",
}
# The flags that turn rules off (training without rules works in every SageMaker region).
NO_RULES_FLAGS = "--no-debugger --no-profiler"

# Debugger (tensor) rules of the seeds and the hook collections each one reads.
DEBUG_RULES: dict[str, dict[str, str]] = {
    "VanishingGradient": {},
    "Overfit": {},
    "Overtraining": {},
    "PoorWeightInitialization": {},
    "LossNotDecreasing": {"mode": "TRAIN"},
}
# Profiler rules of the seeds. ProfilerReport runs every profiler rule and writes the report.
PROFILER_RULES: dict[str, dict[str, str]] = {
    "LowGPUUtilization": {},
    "ProfilerReport": {},
}
# Short names the seeds' notebooks used.
ALIASES = {"PoorWeightInit": "PoorWeightInitialization"}

# What the rules above need saved (smdebug_rulesconfig's collection configs).
COLLECTIONS: list[dict[str, Any]] = [
    {"CollectionName": "weights", "CollectionParameters": {"save_interval": "500"}},
    {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "500"}},
    {"CollectionName": "losses", "CollectionParameters": {"save_interval": "500"}},
    {"CollectionName": "relu_input",
     "CollectionParameters": {"include_regex": ".*relu_input", "save_interval": "500"}},
]

RULE_INSTANCE_TYPE = "ml.t3.medium"
PROFILER_INTERVAL_MS = 500


class UnknownRegionError(ValueError):
    pass


def rule_evaluator_image(region: str) -> str:
    try:
        account = RULE_EVALUATOR_ACCOUNTS[region]
    except KeyError:
        raise UnknownRegionError(
            f"no SageMaker Debugger rule-evaluator image known for region {region!r}; known: "
            f"{', '.join(sorted(RULE_EVALUATOR_ACCOUNTS))}; train without rules there with "
            f"{NO_RULES_FLAGS}"
        ) from None
    return f"{account}.dkr.ecr.{region}.{ecr_domain(region)}/{RULES_REPOSITORY}:{RULES_TAG}"


def ecr_domain(region: str) -> str:
    """The DNS suffix of ECR in ``region`` (the China partition has its own)."""
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def _rule(name: str, params: dict[str, str], image: str, instance_type: str) -> dict[str, Any]:
    return {"RuleConfigurationName": name, "RuleEvaluatorImage": image,
            "InstanceType": instance_type, "VolumeSizeInGB": 0,
            "RuleParameters": {"rule_to_invoke": name, **params}}


def debug_rule_configurations(region: str, instance_type: str = RULE_INSTANCE_TYPE) -> list[dict[str, Any]]:
    image = rule_evaluator_image(region)
    return [_rule(n, p, image, instance_type) for n, p in DEBUG_RULES.items()]


def profiler_rule_configurations(region: str, instance_type: str = RULE_INSTANCE_TYPE) -> list[dict[str, Any]]:
    image = rule_evaluator_image(region)
    return [_rule(n, p, image, instance_type) for n, p in PROFILER_RULES.items()]


def debug_hook_config(s3_output_path: str) -> dict[str, Any]:
    return {"S3OutputPath": s3_output_path, "CollectionConfigurations": COLLECTIONS}


def profiler_config(s3_output_path: str) -> dict[str, Any]:
    return {"S3OutputPath": s3_output_path,
            "ProfilingIntervalInMilliseconds": PROFILER_INTERVAL_MS,
            "DisableProfiler": False}
