"""The SageMaker backend: plain boto3 requests (no SageMaker SDK).

Every request is built by a pure function (``*_request``) so tests and ``--dry-run`` see exactly
what would be sent; :class:`SageMakerBackend` sends them, or — in a dry run — records them
without touching AWS after checking each one against botocore's service model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import mimetypes
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dogbreed import contract
from dogbreed.launcher import events, rules, search_space
from dogbreed.launcher.settings import SERVE_REPOSITORY, TRAIN_REPOSITORY, Settings, SettingsError

# Grid is left out: SageMaker grid search takes categorical ranges only, and lr is continuous.
STRATEGIES = ("Bayesian", "Random", "Hyperband")
VARIANT_NAME = "AllTraffic"
TAGS = [{"Key": "project", "Value": "dogbreed"}]
# The container paths SageMaker mounts, as the contract knows them.
CONTAINER_PATHS = contract.Paths.from_env({})
TUNING_JOB_NAME_MAX = 32
JOB_NAME_MAX = 63
TERMINAL_JOB_STATES = ("Completed", "Failed", "Stopped")


class BackendError(RuntimeError):
    """A SageMaker request failed or a job ended badly; the message says what to do."""


def timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%y%m%d-%H%M%S")


def job_name(kind: str, now: dt.datetime | None = None, limit: int = JOB_NAME_MAX) -> str:
    """``dogbreed-<kind>-yymmdd-hhmmss``: unique per second, valid for every SageMaker name."""
    name = f"dogbreed-{kind}-{timestamp(now)}"
    if len(name) > limit:
        raise ValueError(f"job name {name!r} is longer than {limit} characters")
    return name


def _check_name(name: str, limit: int, what: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", name) or len(name) > limit:
        raise SettingsError(f"{what} {name!r}: use letters, digits and single dashes, at most {limit} characters")
    return name


# --- request builders (pure) ------------------------------------------------------------------
def _role(settings: Settings) -> str:
    return settings.role_arn or "<role-arn: set --role-arn or DOGBREED_ROLE_ARN>"


def _region(settings: Settings) -> str:
    return settings.region or "us-east-1"


def training_channel(data_uri: str) -> dict[str, Any]:
    return {"ChannelName": contract.TRAINING_CHANNEL,
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": data_uri,
                                            "S3DataDistributionType": "FullyReplicated"}},
            "InputMode": "File"}


def resource_config(settings: Settings, instance_type: str | None = None) -> dict[str, Any]:
    return {"InstanceType": instance_type or settings.train_instance_type,
            "InstanceCount": settings.train_instance_count,
            "VolumeSizeInGB": settings.train_volume_gb}


def stopping_condition(settings: Settings, spot: bool, max_wait: int | None = None) -> dict[str, Any]:
    condition = {"MaxRuntimeInSeconds": settings.max_run_seconds}
    if spot:
        condition["MaxWaitTimeInSeconds"] = max(max_wait or 2 * settings.max_run_seconds,
                                                settings.max_run_seconds)
    return condition


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
) -> dict[str, Any]:
    """``CreateHyperParameterTuningJob`` over :data:`search_space.SEARCH_SPACE`."""
    from dogbreed.train import METRIC_DEFINITIONS, OBJECTIVE_METRIC

    if strategy not in STRATEGIES:
        raise SettingsError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 1 <= max_parallel <= max_jobs:
        raise SettingsError("need 1 <= max-parallel <= max-jobs")
    _check_name(name, TUNING_JOB_NAME_MAX, "tuning job name")
    space = search_space.with_epochs_max(search_space.SEARCH_SPACE, epochs_max)
    static = dict(static_hyperparameters)
    config: dict[str, Any] = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel},
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
        "RoleArn": _role(settings),
        "InputDataConfig": [training_channel(data_uri or settings.data_uri)],
        "OutputDataConfig": {"S3OutputPath": settings.s3_uri("output", "tuning")},
        "ResourceConfig": resource_config(settings, instance_type),
        "StoppingCondition": stopping_condition(settings, spot),
        "EnableManagedSpotTraining": spot,
    }
    return {"HyperParameterTuningJobName": name, "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": definition, "Tags": TAGS}


def training_request(
    settings: Settings,
    *,
    name: str,
    train_image: str,
    hyperparameters: Mapping[str, str],
    debugger: bool = True,
    profiler: bool = True,
    spot: bool = False,
    max_wait: int | None = None,
    checkpoints: bool = True,
    data_uri: str | None = None,
    instance_type: str | None = None,
) -> dict[str, Any]:
    """``CreateTrainingJob`` with the seeds' debugger rules, profiler and checkpoints."""
    from dogbreed.train import METRIC_DEFINITIONS

    _check_name(name, JOB_NAME_MAX, "training job name")
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "HyperParameters": check_hyperparameters(hyperparameters),
        "AlgorithmSpecification": {"TrainingImage": train_image, "TrainingInputMode": "File",
                                   "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS],
                                   "EnableSageMakerMetricsTimeSeries": True},
        "RoleArn": _role(settings),
        "InputDataConfig": [training_channel(data_uri or settings.data_uri)],
        "OutputDataConfig": {"S3OutputPath": settings.s3_uri("output", "training")},
        "ResourceConfig": resource_config(settings, instance_type),
        "StoppingCondition": stopping_condition(settings, spot, max_wait),
        "EnableManagedSpotTraining": spot,
        "Tags": TAGS,
    }
    if checkpoints or spot:
        request["CheckpointConfig"] = {"S3Uri": settings.s3_uri("checkpoints", name),
                                       "LocalPath": str(CONTAINER_PATHS.checkpoints_dir)}
    if debugger:
        request["DebugHookConfig"] = rules.debug_hook_config(settings.s3_uri("debug"))
        request["DebugRuleConfigurations"] = rules.debug_rule_configurations(_region(settings))
    if profiler:
        request["ProfilerConfig"] = rules.profiler_config(settings.s3_uri("profiler"))
        request["ProfilerRuleConfigurations"] = rules.profiler_rule_configurations(_region(settings))
    return request


def model_request(settings: Settings, *, name: str, serve_image: str) -> dict[str, Any]:
    """``CreateModel`` for a multi-model endpoint: every model under ``models_uri`` is servable."""
    return {
        "ModelName": _check_name(name, JOB_NAME_MAX, "model name"),
        "ExecutionRoleArn": _role(settings),
        "PrimaryContainer": {"Image": serve_image, "Mode": "MultiModel",
                             "ModelDataUrl": settings.models_uri,
                             "Environment": {contract.SAGEMAKER_MULTI_MODEL: "true"}},
        "Tags": TAGS,
    }


def endpoint_config_request(settings: Settings, *, name: str, model_name: str) -> dict[str, Any]:
    return {
        "EndpointConfigName": _check_name(name, JOB_NAME_MAX, "endpoint config name"),
        "ProductionVariants": [{"VariantName": VARIANT_NAME, "ModelName": model_name,
                                "InitialInstanceCount": settings.serve_instance_count,
                                "InstanceType": settings.serve_instance_type,
                                "InitialVariantWeight": 1.0}],
        "Tags": TAGS,
    }


def endpoint_request(settings: Settings, *, name: str, config_name: str) -> dict[str, Any]:
    return {"EndpointName": _check_name(name, JOB_NAME_MAX, "endpoint name"),
            "EndpointConfigName": config_name, "Tags": TAGS}


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if not match:
        raise SettingsError(f"not an S3 URI: {uri!r}")
    return match.group(1), match.group(2)


def target_model_key(settings: Settings, model_name: str) -> tuple[str, str, str]:
    """(bucket, key, TargetModel) of a model in the endpoint's model prefix."""
    _check_model_name(model_name)
    bucket, prefix = split_s3_uri(settings.models_uri)
    target = f"{model_name}/model.tar.gz"
    return bucket, prefix + target, target


def _check_model_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
        raise SettingsError(f"model name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def content_type_for(path: Path) -> str:
    guessed = mimetypes.guess_type(path.name)[0]
    return guessed if guessed in ("image/jpeg", "image/png") else "application/x-image"


def top_k_attributes(top_k: int) -> str:
    return f"top_k={top_k}"


# --- the backend -------------------------------------------------------------------------------
def _pascal(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


@dataclasses.dataclass
class Recorded:
    service: str
    operation: str
    request: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "operation": self.operation, "request": self.request}


@functools.cache
def _service_model(service: str) -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model(service)


def validate_request(service: str, operation: str, request: Mapping[str, Any]) -> None:
    """Check ``request`` against botocore's service model (what a real client does first)."""
    from botocore.validate import validate_parameters

    validate_parameters(dict(request), _service_model(service).operation_model(operation).input_shape)


class SageMakerBackend:
    def __init__(self, settings: Settings, *, dry_run: bool = False, session: Any = None,
                 poll_seconds: float | None = None, progress: events.Progress | None = None) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self._session = session
        self._clients: dict[str, Any] = {}
        self.recorded: list[Recorded] = []
        self.poll_seconds = settings.poll_seconds if poll_seconds is None else poll_seconds
        self.progress = progress or events.Progress()

    def require(self, *names: str) -> None:
        """Refuse early (before any request) when a setting an operation needs is missing."""
        if self.dry_run:
            return  # a dry run shows placeholders instead
        missing = [n for n in names if not getattr(self.settings, n)]
        if missing:
            raise SettingsError(
                "SageMaker needs " + " and ".join(f"--{m.replace('_', '-')}" for m in missing)
                + " (or DOGBREED_" + " / DOGBREED_".join(m.upper() for m in missing)
                + ", or a config file); use --local to run on this machine")

    # -- plumbing
    def client(self, service: str) -> Any:
        if service not in self._clients:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session(region_name=self.settings.region)
            if not (self.settings.region or self._session.region_name):
                raise SettingsError("no AWS region: pass --region or set AWS_REGION")
            self._clients[service] = self._session.client(service, region_name=self.settings.region)
        return self._clients[service]

    @property
    def region(self) -> str:
        if self.settings.region:
            return self.settings.region
        if self.dry_run:
            return _region(self.settings)
        return self.client("sagemaker").meta.region_name

    def send(self, service: str, operation: str, request: dict[str, Any]) -> Any:
        """Send (or, in a dry run, validate and record) one request; returns the response."""
        record = Recorded(service, _pascal(operation), request)
        self.recorded.append(record)
        if self.dry_run:
            validate_request(service, record.operation, request)
            return None
        events.event("aws_request", service=service, operation=record.operation)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client(service), operation)(**request)
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(f"{service} {record.operation} failed: {exc}") from exc

    def dry_run_output(self) -> Any:
        items = [r.to_dict() for r in self.recorded]
        return items[0] if len(items) == 1 else items

    def _wait(self, describe: Callable[[], dict[str, Any]], status_key: str,
              terminal: Sequence[str], what: str, summary: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        last_status = None
        try:
            while True:
                description = describe()
                status = description[status_key]
                if status != last_status:
                    events.event("status", resource=what, status=status)
                    last_status = status
                self.progress.update(f"{what}: {summary(description)}")
                if status in terminal:
                    return description
                time.sleep(self.poll_seconds)
        finally:
            self.progress.close()

    # -- images
    def image_uri(self, kind: str) -> str:
        """The train or serve image: as configured, else ``<account>``'s ECR repo ``:latest``."""
        configured = self.settings.train_image if kind == "train" else self.settings.serve_image
        if configured:
            return configured
        repository = TRAIN_REPOSITORY if kind == "train" else SERVE_REPOSITORY
        if self.dry_run:
            return f"<account>.dkr.ecr.{self.region}.amazonaws.com/{repository}:latest"
        account = self.client("sts").get_caller_identity()["Account"]
        ecr = self.client("ecr")
        try:
            ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": "latest"}])
        except Exception as exc:
            raise SettingsError(
                f"no image {repository}:latest in ECR for account {account} in {self.region} "
                f"({exc}); run `make build push` or pass --{kind}-image") from None
        return f"{account}.dkr.ecr.{self.region}.amazonaws.com/{repository}:latest"

    # -- data
    def upload_data(self, source: Path, workers: int = 8) -> dict[str, Any]:
        """Upload a dogImages-style folder to ``data_uri`` (skips files already there, same size)."""
        self.require("bucket")
        source = Path(source)
        if not (source / "train").is_dir():
            raise SettingsError(f"{source} has no train/ folder (expected train/ valid/ test/)")
        bucket, prefix = split_s3_uri(self.settings.data_uri)
        # Only the splits the training channel reads (train/ valid/ test/), not READMEs.
        splits = [a for aliases in contract.SPLIT_CHANNELS.values() for a in aliases]
        files = sorted(p for split in splits if (source / split).is_dir()
                       for p in (source / split).rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        existing: dict[str, int] = {}
        if not self.dry_run:
            paginator = self.client("s3").get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
                for item in page.get("Contents", []):
                    existing[item["Key"]] = item["Size"]
        todo = []
        for path in files:
            key = f"{prefix}/{path.relative_to(source).as_posix()}"
            if existing.get(key) != path.stat().st_size:
                todo.append((path, key))
        total_bytes = sum(p.stat().st_size for p, _ in todo)
        if self.dry_run:
            for path, key in todo[:3]:
                self.send("s3", "put_object", {"Bucket": bucket, "Key": key,
                                               "Body": f"<{path.stat().st_size} bytes of {path}>"})
            self.recorded.append(Recorded("s3", "PutObject", {
                "summary": f"{len(todo)} files, {total_bytes} bytes to {self.settings.data_uri}/"}))
            return {"files": len(todo), "bytes": total_bytes, "uri": self.settings.data_uri}
        s3 = self.client("s3")
        done = 0

        def upload(item: tuple[Path, str]) -> None:
            s3.upload_file(str(item[0]), bucket, item[1])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(upload, todo):
                done += 1
                self.progress.update(f"uploaded {done}/{len(todo)} files")
        self.progress.close()
        events.event("uploaded", files=len(todo), skipped=len(files) - len(todo), bytes=total_bytes,
                     uri=self.settings.data_uri)
        return {"files": len(todo), "skipped": len(files) - len(todo), "bytes": total_bytes,
                "uri": self.settings.data_uri}

    # -- tuning
    def tune(self, *, wait: bool = True, **kwargs: Any) -> dict[str, Any] | None:
        self.require("role_arn", "bucket")
        request = tuning_request(self.settings, train_image=self.image_uri("train"), **kwargs)
        name = request["HyperParameterTuningJobName"]
        self.send("sagemaker", "create_hyper_parameter_tuning_job", request)
        if self.dry_run:
            return None
        events.event("tuning_job_created", name=name, strategy=kwargs.get("strategy", "Bayesian"))
        if not wait:
            return {"tuning_job": name, "status": "InProgress"}
        return self.tuning_result(name, wait=True)

    def tuning_result(self, name: str, wait: bool = False) -> dict[str, Any]:
        sm = self.client("sagemaker")

        def describe() -> dict[str, Any]:
            return sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)

        def summary(d: dict[str, Any]) -> str:
            counters = d.get("TrainingJobStatusCounters", {})
            return f"{d['HyperParameterTuningJobStatus']} " + " ".join(
                f"{k}={v}" for k, v in counters.items())

        description = (self._wait(describe, "HyperParameterTuningJobStatus", TERMINAL_JOB_STATES,
                                  f"tuning job {name}", summary) if wait else describe())
        best = description.get("BestTrainingJob") or {}
        result = {
            "tuning_job": name,
            "status": description["HyperParameterTuningJobStatus"],
            "training_jobs": description.get("TrainingJobStatusCounters", {}),
            "best_training_job": best.get("TrainingJobName"),
            "best_objective": best.get("FinalHyperParameterTuningJobObjectiveMetric"),
            "best_hyperparameters": best.get("TunedHyperParameters", {}),
        }
        if description.get("FailureReason"):
            result["failure_reason"] = description["FailureReason"]
        return result

    def best_hyperparameters(self, tuning_job: str) -> dict[str, str]:
        """Static + tuned hyperparameters of a tuning job's best training job."""
        if self.dry_run:
            self.send("sagemaker", "describe_hyper_parameter_tuning_job",
                      {"HyperParameterTuningJobName": tuning_job})
            return {}
        description = self.client("sagemaker").describe_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=tuning_job)
        best = description.get("BestTrainingJob")
        if not best:
            raise BackendError(f"tuning job {tuning_job} has no best training job yet "
                               f"(status {description['HyperParameterTuningJobStatus']})")
        static = (description.get("TrainingJobDefinition") or {}).get("StaticHyperParameters", {})
        merged = {**static, **best["TunedHyperParameters"]}
        return {k: _unquote(v) for k, v in merged.items()
                if not k.startswith(contract.IGNORED_HYPERPARAMETER_PREFIXES)}

    # -- training
    def train(self, *, wait: bool = True, **kwargs: Any) -> dict[str, Any] | None:
        self.require("role_arn", "bucket")
        request = training_request(self.settings, train_image=self.image_uri("train"), **kwargs)
        name = request["TrainingJobName"]
        self.send("sagemaker", "create_training_job", request)
        if self.dry_run:
            return None
        events.event("training_job_created", name=name)
        if not wait:
            return {"training_job": name, "status": "InProgress"}
        return self.training_result(name, wait=True)

    def training_result(self, name: str, wait: bool = False) -> dict[str, Any]:
        sm = self.client("sagemaker")

        def describe() -> dict[str, Any]:
            return sm.describe_training_job(TrainingJobName=name)

        def summary(d: dict[str, Any]) -> str:
            return f"{d['TrainingJobStatus']} / {d.get('SecondaryStatus', '')}"

        description = (self._wait(describe, "TrainingJobStatus", TERMINAL_JOB_STATES,
                                  f"training job {name}", summary) if wait else describe())
        result = {
            "training_job": name,
            "status": description["TrainingJobStatus"],
            "model_data": (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts"),
            "final_metrics": {m["MetricName"]: m["Value"]
                              for m in description.get("FinalMetricDataList", [])},
            "rules": {r["RuleConfigurationName"]: r["RuleEvaluationStatus"]
                      for r in (description.get("DebugRuleEvaluationStatuses", [])
                                + description.get("ProfilerRuleEvaluationStatuses", []))},
        }
        if description.get("FailureReason"):
            result["failure_reason"] = description["FailureReason"]
        if wait and result["status"] != "Completed":
            raise BackendError(f"training job {name} ended {result['status']}: "
                               f"{result.get('failure_reason', 'no reason given')}")
        return result

    # -- endpoint
    def deploy(self, *, wait: bool = True, now: dt.datetime | None = None) -> dict[str, Any] | None:
        self.require("role_arn", "bucket")
        endpoint = self.settings.endpoint_name
        if not self.dry_run and self._endpoint_exists(endpoint):
            raise BackendError(f"endpoint {endpoint} already exists; add models with "
                               "`dogbreed add-model`, or run `dogbreed cleanup` first")
        stamp = timestamp(now)
        model_name = f"{endpoint}-{stamp}"[:JOB_NAME_MAX].rstrip("-")
        self.send("sagemaker", "create_model",
                  model_request(self.settings, name=model_name, serve_image=self.image_uri("serve")))
        self.send("sagemaker", "create_endpoint_config",
                  endpoint_config_request(self.settings, name=model_name, model_name=model_name))
        self.send("sagemaker", "create_endpoint",
                  endpoint_request(self.settings, name=endpoint, config_name=model_name))
        if self.dry_run:
            return None
        events.event("endpoint_created", endpoint=endpoint, model=model_name,
                     models_uri=self.settings.models_uri)
        result = {"endpoint": endpoint, "model": model_name, "endpoint_config": model_name,
                  "models_uri": self.settings.models_uri}
        if wait:
            sm = self.client("sagemaker")
            description = self._wait(lambda: sm.describe_endpoint(EndpointName=endpoint),
                                     "EndpointStatus", ("InService", "Failed", "OutOfService"),
                                     f"endpoint {endpoint}", lambda d: d["EndpointStatus"])
            result["status"] = description["EndpointStatus"]
            if result["status"] != "InService":
                raise BackendError(f"endpoint {endpoint} is {result['status']}: "
                                   f"{description.get('FailureReason', 'no reason given')}")
        return result

    def _endpoint_exists(self, endpoint: str) -> bool:
        try:
            self.client("sagemaker").describe_endpoint(EndpointName=endpoint)
        except Exception as exc:
            if "Could not find" in str(exc) or "ValidationException" in str(exc):
                return False
            raise
        return True

    def add_model(self, name: str, *, training_job: str | None = None,
                  model_data: str | None = None, file: Path | None = None) -> dict[str, Any]:
        """Put a model.tar.gz at ``<models_uri>/<name>/model.tar.gz`` (the MME picks it up)."""
        self.require("bucket")
        if sum(x is not None for x in (training_job, model_data, file)) != 1:
            raise SettingsError("give exactly one of --job, --model-data or --file")
        bucket, key, target = target_model_key(self.settings, name)
        if file is not None:
            size = Path(file).stat().st_size
            if self.dry_run:
                self.send("s3", "put_object",
                          {"Bucket": bucket, "Key": key, "Body": f"<{size} bytes of {file}>"})
            else:
                self.recorded.append(Recorded("s3", "PutObject", {"Bucket": bucket, "Key": key}))
                self.client("s3").upload_file(str(file), bucket, key)
        else:
            if training_job is not None:
                if self.dry_run:
                    self.send("sagemaker", "describe_training_job", {"TrainingJobName": training_job})
                    model_data = f"<ModelArtifacts.S3ModelArtifacts of {training_job}>"
                else:
                    description = self.client("sagemaker").describe_training_job(
                        TrainingJobName=training_job)
                    if description["TrainingJobStatus"] != "Completed":
                        raise BackendError(f"training job {training_job} is "
                                           f"{description['TrainingJobStatus']}, not Completed")
                    model_data = description["ModelArtifacts"]["S3ModelArtifacts"]
            assert model_data is not None
            if self.dry_run and model_data.startswith("<"):
                source = model_data
            else:
                # The wire form of CopySource: "bucket/url-quoted key" (what boto3 sends).
                src_bucket, src_key = split_s3_uri(model_data)
                source = f"{src_bucket}/{urllib.parse.quote(src_key, safe='/~')}"
            self.send("s3", "copy_object", {"Bucket": bucket, "Key": key, "CopySource": source})
        uri = f"s3://{bucket}/{key}"
        if not self.dry_run:
            events.event("model_added", name=name, uri=uri, target_model=target)
        return {"model": name, "uri": uri, "target_model": target}

    def invoke(self, target_model: str, image: Path, top_k: int = 5) -> Any:
        body = Path(image).read_bytes()
        request = {"EndpointName": self.settings.endpoint_name, "TargetModel": target_model,
                   "ContentType": content_type_for(Path(image)), "Accept": "application/json",
                   "CustomAttributes": top_k_attributes(top_k), "Body": body}
        if self.dry_run:
            validate_request("sagemaker-runtime", "InvokeEndpoint", request)
            self.recorded.append(Recorded("sagemaker-runtime", "InvokeEndpoint",
                                          {**request, "Body": f"<{len(body)} bytes of {image}>"}))
            return None
        response = self.send("sagemaker-runtime", "invoke_endpoint", request)
        self.recorded[-1].request = {**request, "Body": f"<{len(body)} bytes>"}
        payload = response["Body"].read()
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return {"content_type": response.get("ContentType"), "bytes": len(payload)}

    # -- status and cleanup
    def status(self) -> dict[str, Any]:
        self.require("bucket")
        sm = self.client("sagemaker")
        out: dict[str, Any] = {"endpoint": None, "models": [], "training_jobs": [], "tuning_jobs": []}
        try:
            d = sm.describe_endpoint(EndpointName=self.settings.endpoint_name)
            out["endpoint"] = {"name": d["EndpointName"], "status": d["EndpointStatus"],
                               "config": d["EndpointConfigName"]}
        except Exception as exc:  # a missing endpoint is a ClientError (ValidationException)
            if "Could not find" not in str(exc) and "ValidationException" not in str(exc):
                raise
        bucket, prefix = split_s3_uri(self.settings.models_uri)
        for page in self.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out["models"] += [item["Key"][len(prefix):] for item in page.get("Contents", [])
                              if item["Key"].endswith("/model.tar.gz")]
        jobs = sm.list_training_jobs(NameContains="dogbreed", SortBy="CreationTime",
                                     SortOrder="Descending", MaxResults=10)
        out["training_jobs"] = [{"name": j["TrainingJobName"], "status": j["TrainingJobStatus"]}
                                for j in jobs.get("TrainingJobSummaries", [])]
        tunings = sm.list_hyper_parameter_tuning_jobs(NameContains="dogbreed", SortBy="CreationTime",
                                                      SortOrder="Descending", MaxResults=10)
        out["tuning_jobs"] = [{"name": j["HyperParameterTuningJobName"],
                               "status": j["HyperParameterTuningJobStatus"]}
                              for j in tunings.get("HyperParameterTuningJobSummaries", [])]
        return out

    def cleanup(self, delete_models: bool = False) -> dict[str, Any]:
        """Delete the endpoint, its endpoint config and model (and, asked to, the model files)."""
        endpoint = self.settings.endpoint_name
        deleted: dict[str, Any] = {"endpoint": None, "endpoint_config": None, "models": [],
                                   "model_files": 0}
        if self.dry_run:
            config, models = f"<EndpointConfigName of {endpoint}>", [f"<ModelName of {endpoint}>"]
            self.send("sagemaker", "describe_endpoint", {"EndpointName": endpoint})
        else:
            sm = self.client("sagemaker")
            try:
                config = sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
            except Exception as exc:
                if "Could not find" not in str(exc) and "ValidationException" not in str(exc):
                    raise
                config = None
            models = []
            if config:
                variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
                models = [v["ModelName"] for v in variants]
        if config:
            self.send("sagemaker", "delete_endpoint", {"EndpointName": endpoint})
            self.send("sagemaker", "delete_endpoint_config", {"EndpointConfigName": config})
            for model in models:
                self.send("sagemaker", "delete_model", {"ModelName": model})
            deleted.update(endpoint=endpoint, endpoint_config=config, models=models)
        if delete_models:
            deleted["model_files"] = self._delete_prefix(self.settings.models_uri)
        if not self.dry_run:
            events.event("cleaned_up", **{k: v if not isinstance(v, list) else ",".join(v) or "none"
                                          for k, v in deleted.items()})
        return deleted

    def _delete_prefix(self, uri: str) -> int:
        bucket, prefix = split_s3_uri(uri)
        if self.dry_run:
            self.send("s3", "list_objects_v2", {"Bucket": bucket, "Prefix": prefix})
            self.send("s3", "delete_objects", {"Bucket": bucket, "Delete": {
                "Objects": [{"Key": f"<each key under {prefix}>"}]}})
            return 0
        s3 = self.client("s3")
        count = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.send("s3", "delete_objects", {"Bucket": bucket, "Delete": {"Objects": keys}})
                count += len(keys)
        return count


def _unquote(value: str) -> str:
    """Tuned categorical values may come back JSON-quoted ("\\"64\\""); pass plain strings on."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def merge_hyperparameters(*sources: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for source in sources:
        items = source.items() if isinstance(source, Mapping) else source
        for key, value in items:
            merged[key.replace("_", "-")] = str(value)
    return merged
