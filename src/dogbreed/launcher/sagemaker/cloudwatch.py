"""CloudWatch log streaming for SageMaker jobs and endpoints (the SDK's ``logs=True``).

SageMaker writes a training job's container output to the log group
``/aws/sagemaker/TrainingJobs``, one stream per instance named ``<job>/algo-<n>-<epoch>``;
a tuning job's trials are training jobs named ``<tuning job>-<nnn>-<hash>``; an endpoint's
containers log to ``/aws/sagemaker/Endpoints/<endpoint>`` in streams
``<variant>/<instance id>``. :class:`LogTail` follows every stream under a prefix with
``DescribeLogStreams`` + ``GetLogEvents`` (forward tokens), as the SageMaker Python SDK's
``logs_for_job`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
ENDPOINT_LOG_GROUP = "/aws/sagemaker/Endpoints/{endpoint}"
KINDS = ("training", "tuning", "endpoint")


def log_source(kind: str, name: str, variant: str = "AllTraffic") -> tuple[str, str]:
    """(log group, stream prefix) of a training job, a tuning job's trials or an endpoint."""
    if kind == "training":
        return TRAINING_LOG_GROUP, f"{name}/"
    if kind == "tuning":
        return TRAINING_LOG_GROUP, f"{name}-"
    if kind == "endpoint":
        return ENDPOINT_LOG_GROUP.format(endpoint=name), f"{variant}/"
    raise ValueError(f"log kind {kind!r}: one of {', '.join(KINDS)}")


class LogTail:
    """Follows every log stream of ``group`` under ``prefix``; :meth:`poll` emits what is new."""

    def __init__(self, client: Any, group: str, prefix: str,
                 emit: Callable[[str], None]) -> None:
        self.client = client
        self.group = group
        self.prefix = prefix
        self.emit = emit
        self.tokens: dict[str, str | None] = {}  # stream -> nextForwardToken

    def streams(self) -> list[str]:
        names: list[str] = []
        request: dict[str, Any] = {"logGroupName": self.group, "logStreamNamePrefix": self.prefix}
        try:
            while True:
                page = self.client.describe_log_streams(**request)
                names += [s["logStreamName"] for s in page.get("logStreams", [])]
                if not page.get("nextToken"):
                    return sorted(names)
                request["nextToken"] = page["nextToken"]
        except self.client.exceptions.ResourceNotFoundException:
            return []  # the group appears with the job's first log line

    def poll(self) -> int:
        """Emit every event written since the last poll; returns how many."""
        count = 0
        for stream in self.streams():
            token = self.tokens.get(stream)
            while True:
                request: dict[str, Any] = {"logGroupName": self.group, "logStreamName": stream,
                                           "startFromHead": True}
                if token:
                    request["nextToken"] = token
                page = self.client.get_log_events(**request)
                for item in page.get("events", []):
                    self.emit(f"[{stream}] {item['message'].rstrip()}")
                    count += 1
                # The forward token stays the same once the end of the stream is reached.
                next_token = page.get("nextForwardToken")
                if not page.get("events") or next_token == token:
                    token = next_token or token
                    break
                token = next_token
            self.tokens[stream] = token
        return count
