"""The SageMaker backend: plain boto3 requests (no SageMaker SDK).

:class:`SageMakerBackend` sends the requests :mod:`~dogbreed.launcher.sagemaker.requests` builds
(pure functions, so tests and ``--dry-run`` see exactly what would be sent), or — in a dry run —
records them without touching AWS after checking each one against botocore's service model; it
waits for jobs and endpoints, follows their logs, uploads data and cleans up. The region is
the boto3 session's (``--region`` / ``AWS_REGION`` / the profile's): the images, the rule
evaluators and every client use that one region.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dogbreed import contract, debugger_config
from dogbreed.launcher import events
from dogbreed.launcher.invoke import content_type_for, invoke_request, top_k_attributes  # noqa: F401
from dogbreed.launcher.sagemaker import cloudwatch, images, instances
from dogbreed.launcher.sagemaker.requests import (
    JOB_NAME_MAX,
    SCALING_DIMENSION,
    SCALING_METRIC,
    SCALING_NAMESPACE,
    VARIANT_NAME,
    endpoint_config_request,
    endpoint_request,
    model_request,
    scalable_target_request,
    scaling_policy_name,
    scaling_policy_request,
    scaling_resource_id,
    split_s3_uri,
    target_model_key,
    timestamp,
    training_request,
    tuning_request,
    update_endpoint_request,
    validate_request,
)
from dogbreed.launcher.settings import SERVE_REPOSITORY, TRAIN_REPOSITORY, Settings, SettingsError

TERMINAL_JOB_STATES = ("Completed", "Failed", "Stopped")
TERMINAL_ENDPOINT_STATES = ("InService", "Failed", "OutOfService")
# Dry runs without any region configured show this one (a real run refuses: no region).
DRY_RUN_REGION = "us-east-1"


class BackendError(RuntimeError):
    """A SageMaker request failed or a job ended badly; the message says what to do."""


def _pascal(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


@dataclasses.dataclass
class Recorded:
    service: str
    operation: str
    request: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "operation": self.operation, "request": self.request}


class SageMakerBackend:
    def __init__(self, settings: Settings, *, dry_run: bool = False, session: Any = None,
                 poll_seconds: float | None = None, progress: events.Progress | None = None,
                 latest_images: bool = False) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.latest_images = latest_images
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
                import boto3  # boto3 on the first real call: --dry-run never loads it

                self._session = boto3.session.Session(region_name=self.settings.region)
            if not (self.settings.region or self._session.region_name):
                raise SettingsError("no AWS region: pass --region or set AWS_REGION")
            self._clients[service] = self._session.client(service, region_name=self.settings.region)
        return self._clients[service]

    @functools.cached_property
    def region(self) -> str:
        """The region every request goes to: ``--region``/settings, else the boto3 session's
        (``AWS_REGION``/``AWS_DEFAULT_REGION``/the profile's). Rule images and default image
        URIs follow it."""
        if self.settings.region:
            return self.settings.region
        if self.dry_run:
            if self._session is None:
                import boto3  # boto3 on the first real call: --dry-run never loads it

                self._session = boto3.session.Session()
            if self._session.region_name:
                return self._session.region_name
            events.warning("dry_run_region", region=DRY_RUN_REGION,
                           note="no region configured (--region, AWS_REGION or a profile); "
                                "a real run refuses")
            return DRY_RUN_REGION
        return self.client("sagemaker").meta.region_name

    def send(self, service: str, operation: str, request: dict[str, Any],
             shown: dict[str, Any] | None = None) -> Any:
        """Send (or, in a dry run, validate and record) one request; returns the response.
        ``shown``: what a dry run prints instead, where a value is only known when the real run
        reads it (e.g. ``"<DesiredInstanceCount of ...>"``); ``request`` is what is validated."""
        record = Recorded(service, _pascal(operation),
                          shown if shown is not None and self.dry_run else request)
        self.recorded.append(record)
        if self.dry_run:
            validate_request(service, record.operation, request)
            return None
        events.event("aws_request", service=service, operation=record.operation)
        from botocore.exceptions import (  # botocore with the first real call
            BotoCoreError,
            ClientError,
        )

        try:
            return getattr(self.client(service), operation)(**request)
        except (BotoCoreError, ClientError) as exc:
            raise BackendError(f"{service} {record.operation} failed: {exc}") from exc

    def dry_run_output(self) -> Any:
        items = [r.to_dict() for r in self.recorded]
        return items[0] if len(items) == 1 else items

    def wait_until_completed(self, describe: Callable[[], dict[str, Any]], status_key: str,
                             what: str, hint: str = "") -> dict[str, Any]:
        """Wait for a job (transform, processing, ...) to end; anything but Completed is a
        :class:`BackendError` with its FailureReason (and ``hint``, e.g. where the logs are)."""
        description = self._wait(describe, status_key, TERMINAL_JOB_STATES, what,
                                 lambda d: d[status_key])
        status = description[status_key]
        if status != "Completed":
            raise BackendError(f"{what} ended {status}: "
                               f"{description.get('FailureReason', 'no reason given')}{hint}")
        return description

    def _wait(self, describe: Callable[[], dict[str, Any]], status_key: str,
              terminal: Sequence[str], what: str, summary: Callable[[dict[str, Any]], str],
              logs: cloudwatch.LogTail | None = None,
              count: Callable[[dict[str, Any]], tuple[int, int]] | None = None) -> dict[str, Any]:
        """Poll until ``status_key`` is terminal: a status event per change, on a TTY a bar with
        the status and the elapsed time (``count``: done/total, e.g. trials), and with ``logs``
        the job's new CloudWatch lines each round."""
        last_status = None
        with self.progress.bar(what) as bar:
            while True:
                description = describe()
                status = description[status_key]
                if status != last_status:
                    events.event("status", resource=what, status=status)
                    last_status = status
                if count is not None:
                    bar.set(*count(description))
                bar.status(summary(description))
                if logs is not None:
                    logs.poll()
                if status in terminal:
                    return description
                time.sleep(self.poll_seconds)

    def log_tail(self, kind: str, name: str, bar: events.Bar | None = None) -> cloudwatch.LogTail:
        """Follows a job's (or the endpoint's) CloudWatch streams; lines go to stderr."""
        group, prefix = cloudwatch.log_source(kind, name, VARIANT_NAME)

        def emit(line: str) -> None:
            if bar is not None and self.progress.enabled:
                bar.write(line)
            else:
                print(line, file=sys.stderr, flush=True)

        return cloudwatch.LogTail(self.client("logs"), group, prefix, emit)

    def logs(self, name: str, *, kind: str = "training", follow: bool = False) -> dict[str, Any]:
        """Print a job's (or the endpoint's) log events; ``follow``: until the job ends."""
        if self.dry_run:
            group, prefix = cloudwatch.log_source(kind, name, VARIANT_NAME)
            self.send("logs", "describe_log_streams", {"logGroupName": group,
                                                      "logStreamNamePrefix": prefix})
            self.send("logs", "get_log_events", {"logGroupName": group,
                                                "logStreamName": f"{prefix}<each stream>",
                                                "startFromHead": True})
            return {}
        tail = self.log_tail(kind, name)
        lines = tail.poll()
        if follow and kind != "endpoint":
            sm = self.client("sagemaker")
            if kind == "training":
                def describe() -> dict[str, Any]:
                    return sm.describe_training_job(TrainingJobName=name)
                key = "TrainingJobStatus"
            else:
                def describe() -> dict[str, Any]:
                    return sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
                key = "HyperParameterTuningJobStatus"
            while describe()[key] not in TERMINAL_JOB_STATES:
                time.sleep(self.poll_seconds)
                lines += tail.poll()
            lines += tail.poll()
        return {"log_group": tail.group, "streams": sorted(tail.tokens), "events": lines}

    # -- images
    def image_uri(self, kind: str) -> str:
        """The train or serve image: as configured, else what ``make push`` recorded (pinned by
        digest), else — only with ``--latest-images`` — ``<account>``'s ECR repo ``:latest``."""
        configured = self.settings.train_image if kind == "train" else self.settings.serve_image
        if configured:
            return configured
        repository = TRAIN_REPOSITORY if kind == "train" else SERVE_REPOSITORY
        host = f"{{account}}.dkr.ecr.{self.region}.{debugger_config.ecr_domain(self.region)}"
        if not self.latest_images:
            path = images.record_path(self.settings)
            record = images.load_record(path)
            if record is not None:
                return images.pushed_reference(record, kind, self.region, path)
            if self.dry_run:
                return f"{host.format(account='<account>')}/{repository}:<tag recorded by make push>"
            raise SettingsError(f"no pushed images recorded ({path} is missing): run `make push`, "
                                f"pass --{kind}-image, or --latest-images for {repository}:latest")
        if self.dry_run:
            return f"{host.format(account='<account>')}/{repository}:latest"
        account = self.client("sts").get_caller_identity()["Account"]
        ecr = self.client("ecr")
        try:
            ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": "latest"}])
        except Exception as exc:
            raise SettingsError(
                f"no image {repository}:latest in ECR for account {account} in {self.region} "
                f"({exc}); run `make build push` or pass --{kind}-image") from None
        return f"{host.format(account=account)}/{repository}:latest"

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
        with self.progress.bar(f"upload {self.settings.data_uri}", total=total_bytes,
                               bytes_=True) as bar:
            # boto3's transfer callback reports bytes as they go (from the worker threads;
            # tqdm's update is thread-safe).
            def upload(item: tuple[Path, str]) -> None:
                s3.upload_file(str(item[0]), bucket, item[1], Callback=bar.advance)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(upload, todo))
        events.event("uploaded", files=len(todo), skipped=len(files) - len(todo), bytes=total_bytes,
                     uri=self.settings.data_uri)
        return {"files": len(todo), "skipped": len(files) - len(todo), "bytes": total_bytes,
                "uri": self.settings.data_uri}

    # -- tuning
    def tune(self, *, wait: bool = True, logs: bool = False, **kwargs: Any) -> dict[str, Any] | None:
        self.require("role_arn", "bucket")
        request = tuning_request(self.settings, **kwargs,
                                 train_image=instances.checked_train_image(self, kwargs.get("instance_type")))
        name = request["HyperParameterTuningJobName"]
        self.send("sagemaker", "create_hyper_parameter_tuning_job", request)
        if self.dry_run:
            return None
        events.event("tuning_job_created", name=name, strategy=kwargs.get("strategy", "Bayesian"))
        if not wait:
            return {"tuning_job": name, "status": "InProgress"}
        return self.tuning_result(name, wait=True, logs=logs)

    def tuning_result(self, name: str, wait: bool = False, logs: bool = False) -> dict[str, Any]:
        sm = self.client("sagemaker")

        def describe() -> dict[str, Any]:
            return sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)

        def summary(d: dict[str, Any]) -> str:
            counters = d.get("TrainingJobStatusCounters", {})
            best = (d.get("BestTrainingJob") or {}).get(
                "FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
            return f"{d['HyperParameterTuningJobStatus']} " + " ".join(
                f"{k}={v}" for k, v in counters.items()) + f" best={best}"

        def count(d: dict[str, Any]) -> tuple[int, int]:
            counters = d.get("TrainingJobStatusCounters", {})
            done = sum(counters.get(k, 0) for k in ("Completed", "Stopped", "NonRetryableError",
                                                    "RetryableError"))
            limits = (d.get("HyperParameterTuningJobConfig") or {}).get("ResourceLimits", {})
            return done, limits.get("MaxNumberOfTrainingJobs", done)

        description = (self._wait(describe, "HyperParameterTuningJobStatus", TERMINAL_JOB_STATES,
                                  f"tuning job {name}", summary, count=count,
                                  logs=self.log_tail("tuning", name) if logs else None)
                       if wait else describe())
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
    def train(self, *, wait: bool = True, logs: bool = False, **kwargs: Any) -> dict[str, Any] | None:
        self.require("role_arn", "bucket")
        request = training_request(self.settings, region=self.region, **kwargs,
                                   train_image=instances.checked_train_image(self, kwargs.get("instance_type")))
        name = request["TrainingJobName"]
        self.send("sagemaker", "create_training_job", request)
        if self.dry_run:
            return None
        events.event("training_job_created", name=name)
        if not wait:
            return {"training_job": name, "status": "InProgress"}
        return self.training_result(name, wait=True, logs=logs)

    def training_result(self, name: str, wait: bool = False, logs: bool = False) -> dict[str, Any]:
        sm = self.client("sagemaker")

        def describe() -> dict[str, Any]:
            return sm.describe_training_job(TrainingJobName=name)

        def summary(d: dict[str, Any]) -> str:
            return f"{d['TrainingJobStatus']} / {d.get('SecondaryStatus', '')}"

        description = (self._wait(describe, "TrainingJobStatus", TERMINAL_JOB_STATES,
                                  f"training job {name}", summary,
                                  logs=self.log_tail("training", name) if logs else None)
                       if wait else describe())
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
    def deploy(self, *, wait: bool = True, now: dt.datetime | None = None,
               instance_count: int | None = None, autoscale: tuple[int, int] | None = None,
               target_invocations: float = 70.0, update: bool | None = None,
               logs: bool = False) -> dict[str, Any] | None:
        """A new model + endpoint config; then ``CreateEndpoint``, or — the endpoint exists —
        ``UpdateEndpoint`` (no downtime; the old config and model are deleted once the endpoint
        is InService on the new one). ``autoscale=(min, max)``: target tracking on invocations
        per instance. ``update``: None = whether the endpoint exists (a dry run shows create
        unless ``update``)."""
        self.require("role_arn", "bucket")
        endpoint = self.settings.endpoint_name
        if autoscale is not None and not wait:
            raise SettingsError("--autoscale needs the endpoint InService: drop --no-wait")
        if self.dry_run:
            previous = None
            if update:  # the read the real run makes first
                self.send("sagemaker", "describe_endpoint", {"EndpointName": endpoint})
        else:
            previous = self._endpoint_description(endpoint)
        if update is None:
            update = previous is not None
        elif update and previous is None and not self.dry_run:
            raise BackendError(f"endpoint {endpoint} does not exist; deploy without --update")
        stamp = timestamp(now)
        model_name = f"{endpoint}-{stamp}"[:JOB_NAME_MAX].rstrip("-")
        self.send("sagemaker", "create_model",
                  model_request(self.settings, name=model_name, serve_image=self.image_uri("serve")))
        shown_count = None
        if update and instance_count is None:
            # An update keeps the instances the endpoint runs now (autoscaling may have added
            # some): the new config starting at 1, or the flag's default, would shrink it at peak.
            if self.dry_run:
                shown_count = f"<DesiredInstanceCount of {endpoint}>"
                instance_count = 1  # validated in its place
            else:
                instance_count = _desired_instance_count(previous)
                events.event("endpoint_instance_count", endpoint=endpoint, kept=instance_count)
        config = endpoint_config_request(self.settings, name=model_name, model_name=model_name,
                                         instance_count=instance_count)
        shown_config = None
        if shown_count is not None:
            shown_config = json.loads(json.dumps(config))
            shown_config["ProductionVariants"][0]["InitialInstanceCount"] = shown_count
        self.send("sagemaker", "create_endpoint_config", config, shown=shown_config)
        scaling = self._scaling_of(endpoint) if update else None
        shown_bounds = None
        if scaling is not None:
            # A variant under autoscaling may not change underneath it: deregister, update,
            # then register again (with --autoscale's bounds, else the previous ones). A dry
            # run shows these calls as made for an endpoint under autoscaling.
            self._remove_scaling(endpoint, scaling)
            if autoscale is None:
                autoscale = (scaling["MinCapacity"], scaling["MaxCapacity"])
                if self.dry_run:
                    shown_bounds = (f"<MinCapacity of {scaling_resource_id(endpoint)}>",
                                    f"<MaxCapacity of {scaling_resource_id(endpoint)}>")
        if update:
            self.send("sagemaker", "update_endpoint",
                      update_endpoint_request(name=endpoint, config_name=model_name))
        else:
            self.send("sagemaker", "create_endpoint",
                      endpoint_request(self.settings, name=endpoint, config_name=model_name))
        if self.dry_run:
            if autoscale is not None:
                self._apply_scaling(endpoint, autoscale, target_invocations, shown_bounds)
            return None
        events.event("endpoint_updating" if update else "endpoint_created", endpoint=endpoint,
                     model=model_name, models_uri=self.settings.models_uri)
        result: dict[str, Any] = {"endpoint": endpoint, "model": model_name,
                                  "endpoint_config": model_name, "updated": update,
                                  "models_uri": self.settings.models_uri}
        if not wait:
            return result
        sm = self.client("sagemaker")
        description = self._wait(lambda: sm.describe_endpoint(EndpointName=endpoint),
                                 "EndpointStatus", TERMINAL_ENDPOINT_STATES,
                                 f"endpoint {endpoint}", lambda d: d["EndpointStatus"],
                                 logs=self.log_tail("endpoint", endpoint) if logs else None)
        result["status"] = description["EndpointStatus"]
        if result["status"] != "InService":
            raise BackendError(f"endpoint {endpoint} is {result['status']}: "
                               f"{description.get('FailureReason', 'no reason given')}")
        if update and previous is not None:
            if description.get("EndpointConfigName") != model_name:
                raise BackendError(f"endpoint {endpoint} is InService on "
                                   f"{description.get('EndpointConfigName')}, not {model_name}: "
                                   "the update was rolled back")
            result["replaced"] = self._delete_config_and_models(previous["EndpointConfigName"])
        if autoscale is not None:
            result["autoscaling"] = self._apply_scaling(endpoint, autoscale, target_invocations)
        return result

    def _endpoint_description(self, endpoint: str) -> dict[str, Any] | None:
        try:
            return self.client("sagemaker").describe_endpoint(EndpointName=endpoint)
        except Exception as exc:  # a missing endpoint is a ClientError (ValidationException)
            if "Could not find" in str(exc) or "ValidationException" in str(exc):
                return None
            raise

    def _delete_config_and_models(self, config: str) -> dict[str, Any]:
        variants = self.client("sagemaker").describe_endpoint_config(
            EndpointConfigName=config)["ProductionVariants"]
        models = [v["ModelName"] for v in variants]
        self.send("sagemaker", "delete_endpoint_config", {"EndpointConfigName": config})
        for model in models:
            self.send("sagemaker", "delete_model", {"ModelName": model})
        return {"endpoint_config": config, "models": models}

    # -- autoscaling (Application Auto Scaling)
    def _scaling_of(self, endpoint: str) -> dict[str, Any] | None:
        """The variant's scalable target, if registered. A dry run records the read and answers
        as for an endpoint under autoscaling (1..1 stand for the bounds the real run reads)."""
        if self.dry_run:
            self.send("application-autoscaling", "describe_scalable_targets",
                      {"ServiceNamespace": SCALING_NAMESPACE,
                       "ResourceIds": [scaling_resource_id(endpoint)],
                       "ScalableDimension": SCALING_DIMENSION})
            return {"MinCapacity": 1, "MaxCapacity": 1}
        targets = self.client("application-autoscaling").describe_scalable_targets(
            ServiceNamespace=SCALING_NAMESPACE, ResourceIds=[scaling_resource_id(endpoint)],
            ScalableDimension=SCALING_DIMENSION)["ScalableTargets"]
        return targets[0] if targets else None

    def _apply_scaling(self, endpoint: str, bounds: tuple[int, int], target_invocations: float,
                       shown_bounds: tuple[str, str] | None = None) -> dict[str, Any]:
        low, high = bounds
        request = scalable_target_request(endpoint, low, high)
        shown = None
        if shown_bounds is not None:
            shown = {**request, "MinCapacity": shown_bounds[0], "MaxCapacity": shown_bounds[1]}
        self.send("application-autoscaling", "register_scalable_target", request, shown=shown)
        self.send("application-autoscaling", "put_scaling_policy",
                  scaling_policy_request(endpoint, target_invocations))
        if not self.dry_run:
            events.event("autoscaling", endpoint=endpoint, min=low, max=high,
                         target_invocations_per_instance=target_invocations)
        return {"min": low, "max": high, "policy": scaling_policy_name(endpoint),
                "metric": SCALING_METRIC, "target": target_invocations}

    def _remove_scaling(self, endpoint: str, target: dict[str, Any] | None) -> list[str]:
        """Delete the variant's scaling policies and deregister it; returns the policy names."""
        resource = scaling_resource_id(endpoint)
        if self.dry_run:
            policies = [scaling_policy_name(endpoint)]
        elif target is None:
            return []
        else:
            policies = [p["PolicyName"] for p in self.client("application-autoscaling")
                        .describe_scaling_policies(ServiceNamespace=SCALING_NAMESPACE,
                                                   ResourceId=resource,
                                                   ScalableDimension=SCALING_DIMENSION)
                        ["ScalingPolicies"]]
        for policy in policies:
            self.send("application-autoscaling", "delete_scaling_policy",
                      {"PolicyName": policy, "ServiceNamespace": SCALING_NAMESPACE,
                       "ResourceId": resource, "ScalableDimension": SCALING_DIMENSION})
        self.send("application-autoscaling", "deregister_scalable_target",
                  {"ServiceNamespace": SCALING_NAMESPACE, "ResourceId": resource,
                   "ScalableDimension": SCALING_DIMENSION})
        return policies

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
        request = invoke_request(self.settings.endpoint_name, target_model, Path(image), top_k)
        body = request["Body"]
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
            deleted["scaling_policies"] = self._remove_scaling(endpoint, self._scaling_of(endpoint))
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


def _desired_instance_count(description: dict[str, Any]) -> int:
    """The instance count ``DescribeEndpoint`` reports for the variant: desired (what
    autoscaling or the last update asked for), else current."""
    variants = description.get("ProductionVariants") or []
    variant = next((v for v in variants if v.get("VariantName") == VARIANT_NAME),
                   variants[0] if variants else {})
    count = variant.get("DesiredInstanceCount") or variant.get("CurrentInstanceCount")
    if not count:
        raise BackendError(f"endpoint {description.get('EndpointName')} reports no instance count "
                           "for its variant; pass --instance-count")
    return int(count)


def _unquote(value: str) -> str:
    """Tuned categorical values may come back JSON-quoted ("\\"64\\""); pass plain strings on."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value
