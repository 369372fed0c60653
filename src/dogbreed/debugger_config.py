"""SageMaker Debugger: the seeds' built-in rules, the hook's collections and the rule-evaluator images.

Debugger is closed to new customers ("close new customer access to Amazon SageMaker Debugger,
effective 7/30/26", atop every Debugger page of the developer guide, e.g.
``debugger-createtrainingjob-api``), so a request uses none of its service features unless asked
(``--debugger-rules``): :func:`profiler_off` is how the API turns profiling off. The smdebug hook
itself is open source and runs inside every SageMaker job regardless (:func:`hook_config`, the
same collections and intervals either way), so ``dogbreed report JOB`` evaluates these rules
offline on any account.

Without the SageMaker SDK a training job must name the rule-evaluator image itself, in the
region the job runs in (the region of the boto3 session that sends ``CreateTrainingJob``).
Rule parameters follow ``smdebug_rulesconfig``'s built-in rule configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dogbreed.contract import Paths

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
# The flag that asks for rules (training without them, the default, works in every region).
RULES_FLAG = "--debugger-rules"

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

# What the rules above need saved, and how often (smdebug's json_config keys; a collection's
# parameters override HOOK_PARAMETERS). The counts are dogImages' at the defaults: 6,680
# training images at batch-size 64 make ~105 training steps an epoch, and 835 validation images
# at eval-batch-size 256 make 4 evaluation steps an epoch (smdebug numbers steps per mode across
# the whole run). The seeds saved train every 100 and eval every 10 steps; at 500 (the previous
# setting) the loss rules saw 1-3 points in a 10-epoch job.
# - losses (scalars, free): train every 10 steps -> ~10 points an epoch, so LossNotDecreasing
#   (num_steps 10) checks within the first epoch; eval every step -> 4 points an epoch, 40 in 10
#   epochs, so Overtraining (patience_validation 10) and Overfit can decide at all.
# - gradients (one model's size per save: 45 MB for ResNet18): train every 100 steps, the seeds'
#   interval, ~1 point an epoch for VanishingGradient; no gradients exist in eval.
# - relu_input (activations: ~0.6 GB per save for ResNet18 at 224 px, batch 64): only the
#   first training step, which is what PoorWeightInitialization judges (the weights as
#   initialised); never in eval, where a step is 4x the batch.
# weights are not saved: no rule reads them, and they are as large as the gradients.
HOOK_PARAMETERS: dict[str, str] = {"train.save_interval": "100", "eval.save_interval": "1"}
COLLECTIONS: list[dict[str, Any]] = [
    {"CollectionName": "losses", "CollectionParameters": {"train.save_interval": "10"}},
    {"CollectionName": "gradients", "CollectionParameters": {}},
    {"CollectionName": "relu_input",
     "CollectionParameters": {"include_regex": ".*relu_input", "train.end_step": "1",
                              "eval.end_step": "0"}},
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
            f"{', '.join(sorted(RULE_EVALUATOR_ACCOUNTS))}; train without rules there: drop "
            f"{RULES_FLAG}"
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
    """``DebugHookConfig`` (``--debugger-rules``): the hook's tensors go to ``s3_output_path``
    for the rule containers, with the same parameters as the in-job hook."""
    return {"S3OutputPath": s3_output_path, "HookParameters": dict(HOOK_PARAMETERS),
            "CollectionConfigurations": [dict(c) for c in COLLECTIONS]}


def hook_config(local_path: str) -> dict[str, Any]:
    """The ``debughookconfig.json`` the trainer writes itself when SageMaker wrote none (no
    ``DebugHookConfig``): the file SageMaker would write, with ``LocalPath`` under
    ``/opt/ml/output/data`` so the tensors are uploaded with the job's output."""
    return {"LocalPath": local_path, "HookParameters": dict(HOOK_PARAMETERS),
            "CollectionConfigurations": [dict(c) for c in COLLECTIONS]}


def write_local_hook_config(paths: Paths, save_interval: int = 5,
                            losses_interval: int = 1) -> Path:
    """Turn smdebug on for a local job laid out at ``paths``: the seeds' collections (what the
    five rules read; weights are left out, no rule reads them and they are the largest), saved
    every ``save_interval`` steps, losses every ``losses_interval``, into ``output/tensors``.

    SageMaker writes this file itself from ``DebugHookConfig`` (with save_interval 500, which
    suits hours-long jobs, not a local run of a few hundred steps)."""
    collections = []
    for collection in COLLECTIONS:
        if collection["CollectionName"] == "weights":
            continue
        # Plain intervals only: the per-mode ones (train.save_interval...) are sized for
        # SageMaker jobs of thousands of steps and would win over these.
        params = {k: v for k, v in collection["CollectionParameters"].items() if k == "include_regex"}
        params["save_interval"] = str(losses_interval if collection["CollectionName"] == "losses"
                                      else save_interval)
        collections.append({"CollectionName": collection["CollectionName"],
                            "CollectionParameters": params})
    config = {"LocalPath": str(Path(paths.output_dir) / "tensors"),
              "CollectionConfigurations": collections}
    paths.input_config_dir.mkdir(parents=True, exist_ok=True)
    paths.debug_hook_config_file.write_text(json.dumps(config, indent=2))
    return paths.debug_hook_config_file


def profiler_config(s3_output_path: str) -> dict[str, Any]:
    return {"S3OutputPath": s3_output_path,
            "ProfilingIntervalInMilliseconds": PROFILER_INTERVAL_MS,
            "DisableProfiler": False}


def profiler_off() -> dict[str, Any]:
    """``ProfilerConfig`` that turns Debugger's monitoring and profiling off, explicitly rather
    than leaving it to a default: ``DisableProfiler: True`` is the API's switch
    (CreateTrainingJob's ProfilerConfig.DisableProfiler: "To turn it off, set to True"; page
    ``debugger-turn-off-profiling``), and what the SageMaker Python SDK v2 sends for
    ``disable_profiler=True`` (``estimator.py``: ``ProfilerConfig(disable_profiler=True)``)."""
    return {"DisableProfiler": True}
