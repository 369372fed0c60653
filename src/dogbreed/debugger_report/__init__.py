"""``dogbreed report``: the debugger and profiler report of a training run or a tuning study, offline.

A run directory is the ``/opt/ml`` layout a job leaves behind (a local job under
``<workdir>/jobs/<job>``, or a SageMaker job downloaded by :func:`download_training_job`):

    output/data/metrics.json    per-epoch history, final metrics, test confusion matrix
    output/data/profile.json    per-step data/compute timings, NVML/psutil samples (profiling.py)
    output/tensors/             smdebug tensors (local LocalPath; a SageMaker job's come from
                                its output.tar.gz, output/data/tensors/, or with
                                --debugger-rules from DebugHookConfig's debug-output/)

The seeds' debugger rules run on the tensors (:mod:`dogbreed.debugger_report.builtin_rules`), LowGPUUtilization
on the samples; everything lands in one HTML page with embedded PNG plots, by default
``output/data/report.html``. A tuning study (the local tuner's ``tuning/<study>.json``) gets a
leaderboard and every trial's curve instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dogbreed import artifacts, output_data, profiling
from dogbreed.debugger_report import builtin_rules as rules_mod
from dogbreed.debugger_report import page

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SMDEBUG_LOG_LEVEL_ENV = "SMDEBUG_LOG_LEVEL"  # smdebug's own (smdebug/core/logger.py)
VERDICTS_FILE = "rule_verdicts.json"
# Local jobs' LocalPath; the in-job hook of a SageMaker job without DebugHookConfig (uploaded in
# output.tar.gz, unpacked into output/data); DebugHookConfig's S3 prefix, as downloaded.
TENSORS_DIRS = ("output/tensors", "output/data/tensors", "debug-output")


class ReportError(ValueError):
    """The path is neither a run directory nor a study; the message says what was looked for."""


# --- what is in a run dir -------------------------------------------------------------------------
def output_data_dir(run_dir: Path) -> Path:
    return run_dir / "output" / "data"


def tensors_dir(run_dir: Path) -> Path | None:
    for relative in TENSORS_DIRS:
        candidate = run_dir / relative
        if (candidate / "index").is_dir() or (candidate / "events").is_dir():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None


def profiler_summary(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Step time split into data and compute, images/s, utilisation and memory."""
    steps = profile.get("steps") or []
    samples = profile.get("samples") or []
    summary: dict[str, Any] = {"device": profile.get("device"), "steps": len(steps)}
    if steps:
        data = np.array([s["data_s"] for s in steps])
        compute = np.array([s["compute_s"] for s in steps])
        total = data + compute
        images = sum(s["images"] for s in steps)
        summary.update(
            step_ms_p50=round(1000 * float(np.median(total)), 2),
            step_ms_p95=round(1000 * float(np.percentile(total, 95)), 2),
            data_ms_mean=round(1000 * float(data.mean()), 2),
            compute_ms_mean=round(1000 * float(compute.mean()), 2),
            data_fraction=round(float(data.sum() / max(total.sum(), 1e-12)), 3),
            images_per_sec=round(images / max(float(total.sum()), 1e-12), 1),
            images=images)
    gpu = [s["gpu_percent"] for s in samples if "gpu_percent" in s]
    if gpu:
        summary.update(gpu_name=profile.get("gpu_name"), gpu_util_mean=round(float(np.mean(gpu)), 1),
                       gpu_util_p95=round(float(np.percentile(gpu, 95)), 1),
                       gpu_memory_peak_mb=max(s.get("gpu_memory_mb", 0) for s in samples))
    if profile.get("cuda_max_memory_allocated_mb") is not None:
        summary["cuda_max_memory_allocated_mb"] = profile["cuda_max_memory_allocated_mb"]
    rss = [s["rss_mb"] for s in samples if "rss_mb" in s]
    if rss:
        summary["rss_peak_mb"] = max(rss)
        summary["cpu_percent_mean"] = round(float(np.mean([s.get("cpu_percent", 0) for s in samples])), 1)
    summary["samples"] = len(samples)
    return summary


@contextlib.contextmanager
def smdebug_logs_to_stderr() -> Iterator[None]:
    """While smdebug reads tensors, its log lines go to stderr, not stdout.

    smdebug's logger (smdebug/core/logger.py) gets a ``StreamHandler(sys.stdout)`` when smdebug
    is first imported; ``SMDEBUG_LOG_ALL_TO_STDOUT=false`` moves only ERROR and above to
    stderr. Its INFO lines (``RULE_JOB_STOP_SIGNAL_FILENAME: None``, …, ~22 per report) used to
    come before the JSON ``dogbreed report`` prints on stdout. ``SMDEBUG_LOG_LEVEL`` still sets
    how much it says; unset, only its warnings show (its INFO lines are set-up chatter such as
    ``RULE_JOB_STOP_SIGNAL_FILENAME: None``, ~23 per report)."""
    from smdebug.core.logger import get_logger  # seconds to import: only where tensors are read

    logger = get_logger()
    level = logger.level
    if not os.environ.get(SMDEBUG_LOG_LEVEL_ENV):
        logger.setLevel(max(level, logging.WARNING))
    moved = []
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            moved.append((handler, handler.stream))
            handler.setStream(sys.stderr)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler, stream in moved:
            handler.setStream(stream)


def _loss_points(tensors: Path) -> dict[str, list[tuple[int, float]]]:
    with smdebug_logs_to_stderr():  # importing smdebug.trials logs a line already
        from smdebug.core.modes import ModeKeys

        trial = rules_mod.open_trial(str(tensors), name="dogbreed-report-losses")
        names = trial.tensor_names(collection="losses")
        if not names:
            return {}
        return {mode.name: rules_mod._loss_series(trial, names[0], mode)
                for mode in (ModeKeys.TRAIN, ModeKeys.EVAL)}


# --- the run report --------------------------------------------------------------------------------
def build_run_report(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Evaluate the rules, summarise the profile and write the HTML page; returns a summary."""
    run_dir = Path(run_dir)
    data_dir = output_data_dir(run_dir)
    metrics = _read_json(data_dir / output_data.METRICS_FILE)
    profile = _read_json(data_dir / profiling.PROFILE_FILE)
    tensors = tensors_dir(run_dir)
    if metrics is None and profile is None and tensors is None:
        raise ReportError(f"{run_dir} is not a training run: no output/data/{output_data.METRICS_FILE}, "
                          f"output/data/{profiling.PROFILE_FILE} or smdebug tensors "
                          f"({' or '.join(TENSORS_DIRS)})")
    hyperparameters = _read_json(run_dir / "input" / "config" / "hyperparameters.json") or {}

    verdicts: list[rules_mod.Verdict]
    if tensors is not None:
        with smdebug_logs_to_stderr():
            verdicts = rules_mod.evaluate_debugger_rules(str(tensors))
    else:
        verdicts = rules_mod.no_tensor_verdicts()
    verdicts.append(rules_mod.low_gpu_utilization((profile or {}).get("samples") or []))
    verdict_dicts = [v.to_dict() for v in verdicts]
    summary = profiler_summary(profile) if profile else None

    sections: list[tuple[str, str]] = []
    overview = [("run", run_dir.resolve())]
    if metrics:
        overview += [(k, v) for k, v in metrics.get("metrics", {}).items()]
    overview += [(f"hp {k}", v) for k, v in hyperparameters.items()]
    sections.append(("Run", page.table(overview)))
    rows = [(v["rule"], page.status_badge(v["status"]), "" if v["step"] is None else v["step"],
             v["message"], json.dumps(v["parameters"])) for v in verdict_dicts]
    sections.append(("Debugger and profiler rules",
                     page.image("rule-verdicts", page.verdict_chart(verdict_dicts), "rule verdicts")
                     + page.table(rows, ("rule", "verdict", "step", "detail", "parameters"),
                                  raw_columns=(1,))
                     + '<p class="note">Rules re-implemented on smdebug\'s Rule API with AWS\'s '
                       'documented default parameters; see dogbreed/debugger_report/builtin_rules.py.</p>'))
    if metrics and metrics.get("history"):
        curves = page.image("epoch-curves", page.epoch_curves(metrics["history"]), "training curves")
        sections.append(("Training curves", curves))
    if tensors is not None:
        points = _loss_points(tensors)
        if any(points.values()):
            sections.append(("Loss per step (smdebug)",
                             page.image("step-losses", page.step_losses(points), "loss per step")))
    if metrics and metrics.get("test_confusion_matrix"):
        sections.append(("Test confusion matrix", page.image(
            "confusion-matrix", page.confusion(metrics["test_confusion_matrix"],
                                               metrics["class_names"]), "confusion matrix")))
    elif (data_dir / output_data.CONFUSION_FILE).is_file():
        sections.append(("Test confusion matrix", page.image(
            "confusion-matrix", (data_dir / output_data.CONFUSION_FILE).read_bytes(), "confusion matrix")))
    if profile:
        content = page.table(list(summary.items()))
        if profile.get("steps"):
            content += page.image("step-time", page.step_time_breakdown(profile["steps"]),
                                  "step time breakdown")
        if profile.get("samples"):
            content += page.image("device-samples", page.device_samples(profile["samples"]),
                                  "utilisation and memory")
        sections.append(("Profiler summary", content))
    out = Path(out) if out else data_dir / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page.document(f"dogbreed report: {run_dir.name}", sections), encoding="utf-8")
    (out.parent / VERDICTS_FILE).write_text(json.dumps(verdict_dicts, indent=2, default=str) + "\n")
    return {"report": str(out), "verdicts": {v["rule"]: v["status"] for v in verdict_dicts},
            "profiler": summary}


# --- the study report -----------------------------------------------------------------------------
def find_study(path: Path) -> Path | None:
    """The result JSON of a local tuning study given it, its trial folder or its name's folder."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path.with_suffix(".json"),
                                                         path.parent / f"{path.name}.json"]
    for candidate in candidates:
        if candidate.is_file():
            content = _read_json(candidate)
            if isinstance(content, dict) and "trials" in content:
                return candidate
    return None


def build_study_report(study_file: Path, out: Path | None = None) -> dict[str, Any]:
    study = _read_json(Path(study_file))
    trials: Sequence[Mapping[str, Any]] = study["trials"]
    metric = study.get("objective", {}).get("metric", "valid_accuracy")
    ranked = sorted(trials, key=lambda t: (t["state"] != "COMPLETE",
                                           -(t.get("score") if t.get("score") is not None
                                             else t.get("value") or -1e9)))
    names = sorted({k for t in trials for k in t.get("hyperparameters", {})})
    rows = [(rank, t["number"], t["state"], "" if t.get("value") is None else f"{t['value']:.4f}",
             t.get("epochs_completed", ""), t.get("seconds", ""),
             *[t.get("hyperparameters", {}).get(n, "") for n in names])
            for rank, t in enumerate(ranked, 1)]
    counts = study.get("counts") or {}
    sections = [
        ("Study", page.table([("study", study.get("tuning_job")), ("trials", len(trials)),
                              ("complete / pruned / failed",
                               f"{counts.get('COMPLETE', 0)} / {counts.get('PRUNED', 0)} / "
                               f"{counts.get('FAIL', 0)}"),
                              ("best trial", study.get("best_trial")),
                              (f"best {metric}", study.get("best_objective")),
                              ("seconds", study.get("seconds"))])),
        ("Leaderboard", page.table(rows, ("rank", "trial", "state", metric, "epochs", "seconds",
                                          *names))),
        ("Trial curves", page.image("trial-curves", page.trial_curves(trials, metric),
                                    "every trial's curve")),
    ]
    study_file = Path(study_file)
    out = Path(out) if out else study_file.parent / study_file.stem / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page.document(f"dogbreed tuning study: {study.get('tuning_job')}", sections),
                   encoding="utf-8")
    return {"report": str(out), "trials": len(trials), "best_trial": study.get("best_trial"),
            "pruned": [t["number"] for t in trials if t["state"] == "PRUNED"]}


def build_report(path: Path, out: Path | None = None) -> dict[str, Any]:
    """A study when ``path`` is (or names) a tuning result JSON, else a run directory."""
    study = find_study(Path(path))
    if study is not None:
        return build_study_report(study, out)
    if not Path(path).is_dir():
        raise ReportError(f"{path}: no such run directory or tuning study")
    return build_run_report(Path(path), out)


# --- SageMaker: fetch a job's outputs first ----------------------------------------------------
def _split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ReportError(f"not an S3 URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def download_training_job(sagemaker: Any, s3: Any, job: str, dest: Path) -> Path:
    """Lay out ``dest`` as the job's ``/opt/ml``: ``output/data`` from ``output.tar.gz`` (what
    SageMaker packs from /opt/ml/output/data), ``output/tensors`` from the debug hook's
    ``<S3OutputPath>/<job>/debug-output/``, and the hyperparameters. Returns ``dest``."""
    description = sagemaker.describe_training_job(TrainingJobName=job)
    dest = Path(dest)
    config = dest / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(
        json.dumps(description.get("HyperParameters", {}), indent=2))
    data_dir = output_data_dir(dest)
    data_dir.mkdir(parents=True, exist_ok=True)
    model_uri = description.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if model_uri:
        bucket, key = _split_s3(model_uri)
        output_key = key.rsplit("/", 1)[0] + "/output.tar.gz"
        archive = dest / "output" / "output.tar.gz"
        try:
            s3.download_file(bucket, output_key, str(archive))
        except Exception as exc:  # noqa: BLE001 - a job without output data still has tensors
            log.warning("event=report_no_output_data uri=s3://%s/%s error=%s", bucket, output_key, exc)
        else:
            # Refuses tar-slip, links and bombs (the archive comes from the job's bucket).
            artifacts.safe_extract(archive, data_dir)
    hook = description.get("DebugHookConfig", {}).get("S3OutputPath")
    if hook:
        bucket, prefix = _split_s3(hook.rstrip("/") + f"/{job}/debug-output/")
        tensors = dest / "output" / "tensors"
        count = 0
        for listing in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in listing.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if not relative or relative.endswith("/") or ".." in Path(relative).parts:
                    continue
                target = tensors / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
                count += 1
        log.info("event=report_tensors_downloaded job=%s files=%d", job, count)
    return dest
