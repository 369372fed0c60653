"""Every SageMaker request the launcher sends, built by a pure function (``*_request``), and
:func:`validate_request`, which checks one against botocore's service model as a real client
does first. Tests and ``--dry-run`` see exactly what would be sent;
:class:`~dogbreed.launcher.sagemaker.backend.SageMakerBackend` sends them. Batch transform and
Clarify build theirs in :mod:`~dogbreed.launcher.local.batch` and :mod:`~dogbreed.launcher.sagemaker.clarify`
from the same helpers (:func:`check_name`, :func:`role_arn`, :data:`TAGS`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dogbreed import contract, debugger_config
from dogbreed.launcher import search_space
from dogbreed.launcher.settings import Settings, SettingsError, check_model_name
from dogbreed.metrics import METRIC_DEFINITIONS, OBJECTIVE_METRIC

# Grid is left out: SageMaker grid search takes categorical ranges only, and lr is continuous.
STRATEGIES = ("Bayesian", "Random", "Hyperband")
VARIANT_NAME = "AllTraffic"
TAGS = [{"Key": "project", "Value": "dogbreed"}]
# The container paths SageMaker mounts, as the contract knows them.
CONTAINER_PATHS = contract.Paths.from_env({})
TUNING_JOB_NAME_MAX = 32
JOB_NAME_MAX = 63
WARM_START_TYPES = ("IdenticalDataAndAlgorithm", "TransferLearning")
WARM_START_PARENTS_MAX = 5  # CreateHyperParameterTuningJob's limit on parent tuning jobs
# Application Auto Scaling of an endpoint variant: target tracking on invocations per instance
# (the metric AWS's guide suggests for real-time endpoints).
SCALING_NAMESPACE = "sagemaker"
SCALING_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"
SCALE_IN_COOLDOWN_S = 300
SCALE_OUT_COOLDOWN_S = 60


def timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%y%m%d-%H%M%S")


def job_name(kind: str, now: dt.datetime | None = None, limit: int = JOB_NAME_MAX) -> str:
    """``dogbreed-<kind>-yymmdd-hhmmss``: unique per second, valid for every SageMaker name."""
    name = f"dogbreed-{kind}-{timestamp(now)}"
    if len(name) > limit:
        raise ValueError(f"job name {name!r} is longer than {limit} characters")
    return name


def check_name(name: str, limit: int, what: str) -> str:
    """A SageMaker resource name: letters, digits and single dashes, at most ``limit`` long."""
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", name) or len(name) > limit:
        raise SettingsError(f"{what} {name!r}: use letters, digits and single dashes, at most {limit} characters")
    return name


# --- request builders ------------------------------------------------------------------
def is_name(name: str, limit: int = JOB_NAME_MAX) -> bool:
    """Whether ``name`` passes :func:`check_name`: only such a name is looked up as a local job or
    study folder, so ``..``, ``.``, ``/`` or an absolute path never reaches one outside it."""
    try:
        check_name(name, limit, "name")
    except SettingsError:
        return False
    return True


def role_arn(settings: Settings) -> str:
    """The execution role; a dry run without one shows where to set it."""
    return settings.role_arn or "<role-arn: set --role-arn or DOGBREED_ROLE_ARN>"


def training_channel(data_uri: str) -> dict[str, Any]:
    return {"ChannelName": contract.TRAINING_CHANNEL,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": data_uri,
                                            "S3DataDistributionType": "FullyReplicated"}},
            "InputMode": "File"}


def resource_config(settings: Settings, instance_type: str | None = None,
                    instance_count: int | None = None) -> dict[str, Any]:
    """Instances for a training job or every tuning trial. More than one instance trains one
    model data-parallel (the entry point reads the hosts from resourceconfig.json)."""
    # `is None`, not `or`: an explicit 0 is refused, not turned into the default.
    count = settings.train_instance_count if instance_count is None else instance_count
    if count < 1:
        raise SettingsError(f"instance count {count} (--instance-count): need at least 1")
    return {"InstanceType": instance_type or settings.train_instance_type,
            "InstanceCount": count,
            "VolumeSizeInGB": settings.train_volume_gb}


def stopping_condition(settings: Settings, spot: bool, max_wait: int | None = None,
                       max_runtime: int | None = None) -> dict[str, Any]:
    runtime = settings.max_run_seconds if max_runtime is None else max_runtime
    if runtime < 1:
        raise SettingsError(f"--max-runtime {runtime}: at least 1 second")
    condition = {"MaxRuntimeInSeconds": runtime}
    if not spot:
        if max_wait is not None:  # it would be dropped: only spot jobs wait for capacity
            raise SettingsError("--max-wait is for managed spot training: add --spot, or drop it")
        return condition
    wait = 2 * runtime if max_wait is None else max_wait
    if wait < runtime:  # SageMaker refuses it; lengthening it quietly would hide the mistake
        of = f"--max-runtime {runtime}" if max_runtime is not None else \
            f"the default --max-runtime {runtime}"
        raise SettingsError(f"--max-wait {wait} is shorter than {of}: spot jobs need "
                            "MaxWaitTimeInSeconds >= MaxRuntimeInSeconds")
    condition["MaxWaitTimeInSeconds"] = wait
    return condition


def checkpoint_config(settings: Settings, *parts: str) -> dict[str, Any]:
    """Where SageMaker syncs ``/opt/ml/checkpoints``: the trainer resumes from it after a spot
    interruption. A tuning job's trials share its prefix (each writes its own file, named after
    its training job: :func:`dogbreed.train.checkpoint_file`; see :func:`tuning_request`)."""
    # The trailing "/" matters: SageMaker syncs every key under the prefix, and ".../job-1"
    # would also match ".../job-10/".
    return {"S3Uri": settings.s3_uri("checkpoints", *parts) + "/",
            "LocalPath": str(CONTAINER_PATHS.checkpoints_dir)}


def warm_start_config(parents: Sequence[str], warm_start_type: str) -> dict[str, Any]:
    """``WarmStartConfig``: start from up to five earlier tuning jobs' results."""
    if warm_start_type not in WARM_START_TYPES:
        raise SettingsError(f"warm start type {warm_start_type!r}: one of {', '.join(WARM_START_TYPES)}")
    if not 1 <= len(parents) <= WARM_START_PARENTS_MAX:
        raise SettingsError(f"--warm-start-from: 1 to {WARM_START_PARENTS_MAX} tuning jobs")
    for parent in parents:
        check_name(parent, TUNING_JOB_NAME_MAX, "warm-start tuning job name")
    return {"ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": p} for p in parents],
            "WarmStartType": warm_start_type}


def check_hyperparameters(values: Mapping[str, str]) -> dict[str, str]:
    """Refuse what the training entry point would refuse, before a job is paid for."""
    contract.parse_hyperparameters(values)
    return {k.replace("_", "-"): str(v) for k, v in values.items()}


def tuning_request(
    settings: Settings,
    *,
    name: str,
    train_image: str,
    static_hyperparameters: Mapping[str, str],
    strategy: str = "Bayesian",
    max_jobs: int = 12,
    max_parallel: int = 2,
    early_stopping: bool = True,
    epochs_max: int | None = None,
    spot: bool = False,
    data_uri: str | None = None,
    instance_type: str | None = None,
    random_seed: int | None = None,
    max_wait: int | None = None,
    max_runtime: int | None = None,
    max_tuning_runtime: int | None = None,
    warm_start_from: Sequence[str] = (),
    warm_start_type: str = "IdenticalDataAndAlgorithm",
    instance_count: int | None = None,
    space: str = "seeds",
) -> dict[str, Any]:
    """``CreateHyperParameterTuningJob`` over the search space ``space`` (``seeds`` or ``full``:
    :func:`search_space.named`, the ranges the local tuner searches).

    Trials checkpoint only with ``spot`` (an interrupted trial resumes instead of starting over),
    stop after ``max_runtime`` seconds (the tuning job after ``max_tuning_runtime``) and may
    warm-start from earlier tuning jobs.

    Why only with spot: the tuning job's one ``TrainingJobDefinition.CheckpointConfig`` is every
    trial's (the API has no per-trial path), and SageMaker copies everything under its S3 URI
    into each job's checkpoint dir at start (page ``model-checkpoints``: "Existing checkpoints in
    S3 are written to the SageMaker container at the start of the job"), so trial n would
    download every earlier trial's checkpoint (134 MB each for ResNet18). Without spot nothing
    resumes a trial, so there is no CheckpointConfig. With spot the trainer keeps the damage
    small: a trial never adopts another's file, and a finished trial deletes its own (deleted in
    the container is deleted in S3, same page), so a trial downloads only the files of trials
    still running or stopped."""
    if strategy not in STRATEGIES:
        raise SettingsError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 1 <= max_parallel <= max_jobs:
        raise SettingsError("need 1 <= max-parallel <= max-jobs")
    check_name(name, TUNING_JOB_NAME_MAX, "tuning job name")
    try:
        space = search_space.with_epochs_max(search_space.named(space), epochs_max)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    static = dict(static_hyperparameters)
    config: dict[str, Any] = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel,
                           **({"MaxRuntimeInSeconds": max_tuning_runtime} if max_tuning_runtime else {})},
        "TrainingJobEarlyStoppingType": "Auto" if early_stopping else "Off",
    }
    if strategy == "Hyperband":
        # Hyperband stops trials itself (early stopping must be Off) and owns the epoch budget:
        # epochs leaves the ranges, its maximum becomes MaxResource and a static value.
        epochs = search_space.get(space, search_space.EPOCHS)
        max_resource = epochs.high if isinstance(epochs, search_space.Integer) else int(
            static.get(search_space.EPOCHS, contract.Hyperparameters().epochs))
        space = search_space.without(space, search_space.EPOCHS)
        static[search_space.EPOCHS] = str(max_resource)
        config["TrainingJobEarlyStoppingType"] = "Off"
        config["StrategyConfig"] = {"HyperbandStrategyConfig": {"MinResource": 1,
                                                                "MaxResource": max_resource}}
    overlap = sorted(set(static) & {p.name for p in space})
    if overlap:
        raise SettingsError(f"hyperparameter(s) {', '.join(overlap)} are tuned; do not also fix them")
    search_space.validate(space)
    config["ParameterRanges"] = search_space.to_sagemaker(space)
    if random_seed is not None:
        config["RandomSeed"] = random_seed
    definition: dict[str, Any] = {
        "StaticHyperParameters": check_hyperparameters(static),
        "AlgorithmSpecification": {"TrainingImage": train_image, "TrainingInputMode": "File",
                                   "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS]},
        "RoleArn": role_arn(settings),
        "InputDataConfig": [training_channel(data_uri or settings.data_uri)],
        "OutputDataConfig": {"S3OutputPath": settings.s3_uri("output", "tuning")},
        "ResourceConfig": resource_config(settings, instance_type, instance_count),
        "StoppingCondition": stopping_condition(settings, spot, max_wait, max_runtime),
        "EnableManagedSpotTraining": spot,
    }
    if spot:
        definition["CheckpointConfig"] = checkpoint_config(settings, name)
    request = {"HyperParameterTuningJobName": name, "HyperParameterTuningJobConfig": config,
               "TrainingJobDefinition": definition, "Tags": TAGS}
    if warm_start_from:
        request["WarmStartConfig"] = warm_start_config(list(warm_start_from), warm_start_type)
    return request


def training_request(
    settings: Settings,
    *,
    name: str,
    train_image: str,
    region: str,
    hyperparameters: Mapping[str, str],
    debugger_rules: bool = False,
    smdebug_hook: bool = True,
    spot: bool = False,
    max_wait: int | None = None,
    checkpoints: bool = True,
    data_uri: str | None = None,
    instance_type: str | None = None,
    max_runtime: int | None = None,
    instance_count: int | None = None,
) -> dict[str, Any]:
    """``CreateTrainingJob`` with checkpoints and none of Debugger's service features (closed to
    new customers): profiling off as the API defines it, no hook config, no rules. The job's own
    smdebug hook still saves its tensors with its output (``smdebug_hook=False``: USE_SMDEBUG=0).
    ``debugger_rules`` (accounts that still have Debugger): DebugHookConfig with the same hook
    parameters, the seeds' five rules, profiling and its rules, the rule evaluators ``region``'s
    (the region the request is sent to)."""
    check_name(name, JOB_NAME_MAX, "training job name")
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "HyperParameters": check_hyperparameters(hyperparameters),
        "AlgorithmSpecification": {"TrainingImage": train_image, "TrainingInputMode": "File",
                                   "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS],
                                   "EnableSageMakerMetricsTimeSeries": True},
        "RoleArn": role_arn(settings),
        "InputDataConfig": [training_channel(data_uri or settings.data_uri)],
        "OutputDataConfig": {"S3OutputPath": settings.s3_uri("output", "training")},
        "ResourceConfig": resource_config(settings, instance_type, instance_count),
        "StoppingCondition": stopping_condition(settings, spot, max_wait, max_runtime),
        "EnableManagedSpotTraining": spot,
        "Tags": TAGS,
    }
    if checkpoints or spot:
        request["CheckpointConfig"] = checkpoint_config(settings, name)
    if not smdebug_hook:
        if debugger_rules:
            raise SettingsError("--debugger-rules reads the smdebug hook's tensors: drop --no-debugger")
        request["Environment"] = {contract.USE_SMDEBUG_ENV: "0"}
    if debugger_rules:
        request["DebugHookConfig"] = debugger_config.debug_hook_config(settings.s3_uri("debug"))
        request["DebugRuleConfigurations"] = debugger_config.debug_rule_configurations(region)
        request["ProfilerConfig"] = debugger_config.profiler_config(settings.s3_uri("profiler"))
        request["ProfilerRuleConfigurations"] = debugger_config.profiler_rule_configurations(region)
    else:
        request["ProfilerConfig"] = debugger_config.profiler_off()
    return request


def model_request(settings: Settings, *, name: str, serve_image: str) -> dict[str, Any]:
    """``CreateModel`` for a multi-model endpoint: every model under ``models_uri`` is servable."""
    return {
        "ModelName": check_name(name, JOB_NAME_MAX, "model name"),
        "ExecutionRoleArn": role_arn(settings),
        "PrimaryContainer": {"Image": serve_image, "Mode": "MultiModel",
                             "ModelDataUrl": settings.models_uri,
                             "Environment": {contract.SAGEMAKER_MULTI_MODEL: "true"}},
        "Tags": TAGS,
    }


def endpoint_config_request(settings: Settings, *, name: str, model_name: str,
                            instance_count: int | None = None) -> dict[str, Any]:
    count = settings.serve_instance_count if instance_count is None else instance_count
    if count < 1:
        raise SettingsError(f"--instance-count {count}: at least 1")
    return {
        "EndpointConfigName": check_name(name, JOB_NAME_MAX, "endpoint config name"),
        "ProductionVariants": [{"VariantName": VARIANT_NAME, "ModelName": model_name,
                                "InitialInstanceCount": count,
                                "InstanceType": settings.serve_instance_type,
                                "InitialVariantWeight": 1.0}],
        "Tags": TAGS,
    }


def endpoint_request(settings: Settings, *, name: str, config_name: str) -> dict[str, Any]:
    return {"EndpointName": check_name(name, JOB_NAME_MAX, "endpoint name"),
            "EndpointConfigName": config_name, "Tags": TAGS}


def update_endpoint_request(*, name: str, config_name: str) -> dict[str, Any]:
    """``UpdateEndpoint``: SageMaker brings up the new config's instances, shifts traffic, then
    retires the old ones (no downtime)."""
    return {"EndpointName": check_name(name, JOB_NAME_MAX, "endpoint name"),
            "EndpointConfigName": config_name}


def scaling_resource_id(endpoint: str, variant: str = VARIANT_NAME) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` instances, 1 <= MIN <= MAX."""
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = (0, -1)
    if not sep or not 1 <= bounds[0] <= bounds[1]:
        raise SettingsError(f"--autoscale {text!r}: expected MIN:MAX instances, 1 <= MIN <= MAX")
    return bounds


def scalable_target_request(endpoint: str, min_capacity: int, max_capacity: int) -> dict[str, Any]:
    """Application Auto Scaling ``RegisterScalableTarget`` for the endpoint's variant."""
    return {"ServiceNamespace": SCALING_NAMESPACE, "ResourceId": scaling_resource_id(endpoint),
            "ScalableDimension": SCALING_DIMENSION, "MinCapacity": min_capacity,
            "MaxCapacity": max_capacity}


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def scaling_policy_request(endpoint: str, target_invocations: float) -> dict[str, Any]:
    """``PutScalingPolicy``: target tracking on invocations per instance (per minute)."""
    return {"PolicyName": scaling_policy_name(endpoint), "ServiceNamespace": SCALING_NAMESPACE,
            "ResourceId": scaling_resource_id(endpoint), "ScalableDimension": SCALING_DIMENSION,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": float(target_invocations),
                "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
                "ScaleInCooldown": SCALE_IN_COOLDOWN_S, "ScaleOutCooldown": SCALE_OUT_COOLDOWN_S}}


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match:
        raise SettingsError(f"not an S3 URI: {uri!r}")
    return match.group(1), match.group(2)


def target_model_key(settings: Settings, model_name: str) -> tuple[str, str, str]:
    """(bucket, key, TargetModel) of a model in the endpoint's model prefix."""
    check_model_name(model_name)
    bucket, prefix = split_s3_uri(settings.models_uri)
    target = f"{model_name}/model.tar.gz"
    return bucket, prefix + target, target


# --- the backend -------------------------------------------------------------------------------
@functools.cache
def _service_model(service: str) -> Any:
    import botocore.session  # botocore's service models load on the first check only

    return botocore.session.get_session().get_service_model(service)


def validate_request(service: str, operation: str, request: Mapping[str, Any]) -> None:
    """Check ``request`` against botocore's service model (what a real client does first)."""
    from botocore.validate import validate_parameters  # with the models above

    validate_parameters(dict(request), _service_model(service).operation_model(operation).input_shape)
