"""``dogbreed``: tune, train, deploy and invoke the dog-breed classifier on SageMaker or locally.

    dogbreed upload-data --data DIR            # S3: <bucket>/<prefix>/data/
    dogbreed tune  [--local] ...               # SageMaker HPO job, or Optuna trials here
    dogbreed tune --local --time-budget 5m     #   (budgeted, Hyperband; --resume NAME continues)
    dogbreed train [--local] [--from-tuning-job NAME] ...
    dogbreed deploy [--local]                  # multi-model endpoint (updated in place if it exists)
    dogbreed add-model NAME --job JOB          # <models prefix>/NAME/model.tar.gz
    dogbreed invoke --target-model NAME/model.tar.gz IMAGE
    dogbreed logs JOB                          # the job's CloudWatch log events
    dogbreed status | cleanup [--local]
    dogbreed demo --data DIR                   # everything above, locally, in a few minutes

Backend: ``--local`` or ``--sagemaker``; otherwise SageMaker when a role ARN and a bucket are
configured (flags, ``DOGBREED_*`` env, or a config file), else local. ``--dry-run`` prints the
exact request JSON instead of sending it (SageMaker requests unless ``--local``, which prints
the local plan; one request prints as an object, several as a list). Results go to stdout,
one-line key=value events to stderr (and progress bars, on a terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dogbreed import contract
from dogbreed.contract import ContractError
from dogbreed.launcher import events, workflows
from dogbreed.launcher import settings as settings_mod
from dogbreed.launcher.settings import non_negative_int, port_number, positive_float, positive_int

EXIT_ERROR = 1
EXIT_USAGE = 2
HP_FLAGS = ("model", "epochs", "batch_size", "lr", "image_size", "weights")


class CliError(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it takes Ctrl-C's cleanup path (a local job's process
    group is killed, a server stopped) and :func:`main` exits 143."""

    def __init__(self) -> None:
        super().__init__("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM's default action ends the launcher at once and orphans what it started (the
    trainer runs in its own session); raised as :class:`Terminated`, it cleans up as Ctrl-C does.
    Commands that stop gracefully (tune, deploy --foreground) install their own handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# --- shared flags ---------------------------------------------------------------------------------
def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    where = parent.add_argument_group("backend")
    backend = where.add_mutually_exclusive_group()
    backend.add_argument("--local", dest="backend", action="store_const", const="local",
                         help="run on this machine (default without AWS settings)")
    backend.add_argument("--sagemaker", dest="backend", action="store_const", const="sagemaker",
                         help="use SageMaker (default when a role ARN and bucket are set)")
    where.add_argument("--dry-run", action="store_true",
                       help="print the request JSON (or local plan) it would send, send nothing")
    where.add_argument("--config", help="settings file (TOML or JSON); default $DOGBREED_CONFIG "
                                        "or ./dogbreed.toml")
    aws = parent.add_argument_group("settings (flag > DOGBREED_<NAME> env > config file)")
    for name, help_text in [
        ("region", "AWS region (default: the boto3 session's: AWS_REGION or the profile's)"),
        ("role_arn", "SageMaker execution role ARN"),
        ("bucket", "S3 bucket"),
        ("prefix", "S3 key prefix (default dogbreed)"),
        ("train_image", "training image URI (default: what `make push` recorded)"),
        ("serve_image", "serving image URI (default: what `make push` recorded)"),
        ("pushed_images", "the `make push` record (default <workdir>/pushed-images.json)"),
        ("train_instance_type", "default ml.g6.xlarge"),
        ("serve_instance_type", "default ml.m5.xlarge"),
        ("endpoint_name", "default dogbreed-mme"),
        ("workdir", "local work dir (default .dogbreed)"),
    ]:
        aws.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text)
    aws.add_argument("--latest-images", action="store_true",
                     help="use <account>'s ECR dogbreed-train/-serve:latest instead of the pushed "
                          "record")
    aws.add_argument("--poll-seconds", dest="poll_seconds", type=positive_float,
                     help="how often to poll SageMaker while waiting (default 30)")
    return parent


def _hyperparameter_flags(parser: argparse.ArgumentParser, tuned: bool = False) -> None:
    group = parser.add_argument_group("hyperparameters (unset ones keep the entry point's defaults)")
    group.add_argument("--model", choices=("resnet18", "mobilenet_v2", "resnet50"))
    if not tuned:
        group.add_argument("--epochs", type=int)
        group.add_argument("--batch-size", type=int)
        group.add_argument("--lr", type=float)
    group.add_argument("--image-size", type=int)
    group.add_argument("--weights", help="imagenet, none or a .pth path (local default: none when "
                                         "ImageNet weights are not cached)")
    group.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                       help="any other hyperparameter (repeatable), e.g. --hp optimizer=adamw")


def _job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", dest="wait", action="store_false")
    parser.add_argument("--logs", action="store_true",
                        help="SageMaker: stream the CloudWatch log events while waiting")


# --- helpers --------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> settings_mod.Settings:
    flags = {name: getattr(args, name, None) for name in settings_mod.FIELDS}
    return settings_mod.load(flags, config_file=args.config)


def _backend_name(args: argparse.Namespace, settings: settings_mod.Settings) -> str:
    if args.backend:
        return args.backend
    if settings.has_aws:
        return "sagemaker"
    if args.dry_run:
        events.event("dry_run_backend", backend="sagemaker",
                     note="no AWS settings: showing SageMaker requests with placeholders; "
                          "--local shows the local plan")
        return "sagemaker"
    return "local"


def _hyperparameters(args: argparse.Namespace) -> dict[str, str]:
    hps: dict[str, str] = {}
    for name in HP_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            hps[name.replace("_", "-")] = repr(value) if isinstance(value, float) else str(value)
    for item in args.hp:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--hp {item!r}: expected NAME=VALUE")
        # A seeds' name (learning_rate, test-batch-size) becomes the field it names here, so a
        # tuned range and a static value cannot both set it under two names.
        name = contract.canonical_name(key) or key.strip()
        hps[name.replace("_", "-")] = value.strip()
    return hps


def _emit(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def _sagemaker(settings: settings_mod.Settings, args: argparse.Namespace) -> Any:
    from dogbreed.launcher.sagemaker.backend import (
        SageMakerBackend,  # lazy: each command loads its half
    )

    return SageMakerBackend(settings, dry_run=args.dry_run,
                            latest_images=getattr(args, "latest_images", False))


def _local(settings: settings_mod.Settings, args: argparse.Namespace) -> Any:
    from dogbreed.launcher.local.backend import LocalBackend  # lazy: each command loads its half

    return LocalBackend(settings, docker_image=getattr(args, "docker", None))


def _require_data(args: argparse.Namespace) -> Path:
    if args.data is None:
        raise CliError("--local needs --data (a folder with train/ valid/ test/)")
    return args.data


def _local_only(args: argparse.Namespace, *flags: str) -> None:
    given = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_"), None)]
    if given:
        raise CliError(f"{', '.join(given)}: local only (add --local)")


def _sagemaker_only(args: argparse.Namespace, backend: str, *flags: str) -> None:
    given = [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_"), None)]
    if backend == "local" and given:
        raise CliError(f"{', '.join(given)}: SageMaker only (drop --local)")


# --- commands (each: add_arguments(parser) + run(args, settings, backend)) -------------------------
def upload_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="folder with train/ valid/ test/")
    p.add_argument("--workers", type=positive_int, default=8)


def cmd_upload_data(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "local":
        raise CliError("upload-data is for SageMaker; locally, pass --data to tune/train")
    sm = _sagemaker(settings, args)
    result = sm.upload_data(args.data, workers=args.workers)
    return sm.dry_run_output() if args.dry_run else result


def tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="local: the train/valid/test folder")
    p.add_argument("--data-uri", help="SageMaker: S3 prefix of the data (default <prefix>/data)")
    p.add_argument("--trials", "--max-jobs", dest="trials", type=positive_int,
                   help="number of trials / training jobs (default 6; local with --time-budget: "
                        "as many as fit)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="wall clock for the whole study: 90s, 5m, 1.5h (local: no trial starts "
                        "after it and a running one is stopped; SageMaker: the tuning job's "
                        "MaxRuntimeInSeconds)")
    p.add_argument("--space", choices=("full", "seeds"), default="full",
                   help="full: lr, batch-size, epochs + the training-recipe knobs (default); "
                        "seeds: lr, batch-size, epochs only")
    p.add_argument("--max-parallel", type=positive_int, default=2,
                   help="SageMaker: parallel jobs (default 2)")
    p.add_argument("--strategy", default="Bayesian", choices=("Bayesian", "Random", "Hyperband"))
    p.add_argument("--epochs-max", type=positive_int, help="cap the epochs range (e.g. 3 → 2..3)")
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false",
                   help="SageMaker: TrainingJobEarlyStoppingType Off")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampler seed (default 0)")
    p.add_argument("--pruner", choices=("hyperband", "median", "none"), default="hyperband",
                   help="local: hyperband (default; epochs is the resource: every trial is set "
                        "up for --epochs-max epochs, the weaker ones stop at 1, 3, 9), median "
                        "(epochs searched, median pruning) or none")
    p.add_argument("--storage", metavar="URL",
                   help="local: Optuna RDB storage (any SQLAlchemy URL, e.g. postgresql://u:p@host/db "
                        "for several workers on one study; default sqlite:///<workdir>/tuning/optuna.db)")
    p.add_argument("--no-default-trial", dest="default_trial", action="store_false",
                   help="local: do not start a new study with the known-good points (the trainer's "
                        "default recipe, the seeds' hyperparameters)")
    p.add_argument("--resume", metavar="NAME",
                   help="local: continue study NAME (its finished trials count; same settings)")
    p.add_argument("--prune-startup-trials", type=non_negative_int, default=2,
                   help="local --pruner median: trials that complete before pruning starts (default 2)")
    p.add_argument("--in-process", action="store_true",
                   help="local: run trials back to back in this process, sharing one decoded "
                        "image cache (fast on a GPU); default: one process per trial")
    p.add_argument("--prune-warmup-epochs", type=non_negative_int, default=0,
                   help="local --pruner median: epochs before a trial may be pruned (default 0)")
    p.add_argument("--name", help="tuning job / study name (default dogbreed-tune-<time>)")
    p.add_argument("--output", type=Path, help="where to save the result JSON")
    p.add_argument("--spot", action="store_true", help="SageMaker: managed spot training "
                   "(only then do trials checkpoint to S3, to resume after an interruption; "
                   "the trials share one checkpoint prefix)")
    p.add_argument("--max-wait", type=positive_int, metavar="SECONDS",
                   help="SageMaker --spot: MaxWaitTimeInSeconds per trial, at least the max "
                        "runtime (default twice it)")
    p.add_argument("--max-runtime", type=positive_int, metavar="SECONDS",
                   help="SageMaker: MaxRuntimeInSeconds of each trial (default 4 h)")
    p.add_argument("--max-tuning-runtime", type=positive_int, metavar="SECONDS",
                   help="SageMaker: stop the whole tuning job after this long")
    p.add_argument("--warm-start-from", metavar="JOB[,JOB]",
                   help="SageMaker: start from these tuning jobs' results (up to 5)")
    p.add_argument("--warm-start-type", default="IdenticalDataAndAlgorithm",
                   choices=("IdenticalDataAndAlgorithm", "TransferLearning"),
                   help="TransferLearning when the data, image or static hyperparameters changed")
    p.add_argument("--instance-type", help="SageMaker: instance type for the trials")
    p.add_argument("--instance-count", type=positive_int,
                   help="SageMaker: instances per trial, training data-parallel (default 1)")
    p.add_argument("--docker", metavar="IMAGE", nargs="?", const="dogbreed-train:latest",
                   help="local: run trials in the train image (default dogbreed-train:latest)")
    _job_flags(p)
    _hyperparameter_flags(p, tuned=True)


def cmd_tune(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.local.tuning import parse_duration  # lazy: each command loads its half
    from dogbreed.launcher.sagemaker.requests import job_name  # lazy: each command loads its half

    if args.resume and args.name and args.resume != args.name:
        raise CliError("--resume NAME names the study: drop --name or give the same name")
    name = args.resume or args.name or job_name("tune", limit=32)
    static = _hyperparameters(args)
    budget = parse_duration(args.time_budget) if args.time_budget else None
    if backend == "sagemaker":
        _local_only(args, "--storage", "--resume")
        if budget is not None and args.max_tuning_runtime:
            raise CliError("--time-budget and --max-tuning-runtime both set the tuning job's "
                           "MaxRuntimeInSeconds: give one")
        trials = 6 if args.trials is None else args.trials
        sm = _sagemaker(settings, args)
        parents = [p.strip() for p in (args.warm_start_from or "").split(",") if p.strip()]
        result = sm.tune(name=name, static_hyperparameters=static, strategy=args.strategy,
                         max_jobs=trials, max_parallel=min(args.max_parallel, trials),
                         early_stopping=args.early_stopping, epochs_max=args.epochs_max,
                         spot=args.spot, max_wait=args.max_wait, max_runtime=args.max_runtime,
                         max_tuning_runtime=args.max_tuning_runtime or (
                             int(budget) if budget is not None else None),
                         space=args.space,
                         warm_start_from=parents, warm_start_type=args.warm_start_type,
                         data_uri=args.data_uri, instance_type=args.instance_type,
                         instance_count=args.instance_count, random_seed=args.seed, wait=args.wait,
                         logs=args.logs)
        if args.dry_run:
            return sm.dry_run_output()
        if result is not None and args.wait:
            path = args.output or settings.workdir_path / "tuning" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            result["result_file"] = str(path)
        return result
    _sagemaker_only(args, backend, "--warm-start-from", "--max-runtime", "--max-tuning-runtime",
                    "--spot", "--max-wait", "--instance-count", "--logs")
    from dogbreed.launcher.local.runs import default_weights  # lazy: each command loads its half

    local = _local(settings, args)
    static = default_weights(static, explicit="weights" in static)
    options = dict(name=name, static_hyperparameters=static, trials=args.trials,
                   time_budget=budget, space=args.space, pruner=args.pruner,
                   epochs_max=args.epochs_max, seed=args.seed, storage=args.storage,
                   resume=bool(args.resume), default_trial=args.default_trial,
                   prune_startup_trials=args.prune_startup_trials,
                   prune_warmup_epochs=args.prune_warmup_epochs, in_process=args.in_process)
    if args.dry_run:
        return local.plan_tune(data=args.data, **options)
    from dogbreed.launcher.local.backend import tune_answer  # lazy: each command loads its half

    result = local.tune(data=_require_data(args), output=args.output, **options)
    if result.get("interrupted"):
        _emit(tune_answer(result))  # the best so far, then the exit status of the signal
        raise KeyboardInterrupt(result["interrupted"])
    return tune_answer(result)


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="local: the train/valid/test folder")
    p.add_argument("--data-uri", help="SageMaker: S3 prefix of the data")
    p.add_argument("--from-tuning-job", metavar="NAME", help="start from this tuning job's best "
                   "hyperparameters (local: a study name or result JSON)")
    p.add_argument("--name", help="job name (default dogbreed-train-<time>)")
    p.add_argument("--debugger", dest="debugger", action="store_true", default=None,
                   help="local: smdebug hook on (for `dogbreed report`); SageMaker: the default "
                        "(the job saves its tensors with its output)")
    p.add_argument("--no-debugger", dest="debugger", action="store_false",
                   help="SageMaker: no smdebug hook in the job (USE_SMDEBUG=0)")
    p.add_argument("--debugger-rules", action="store_true",
                   help="SageMaker, for accounts that still have Debugger (closed to new "
                        "customers): DebugHookConfig, the seeds' five rules, profiling and its "
                        "rules (default: none of them, profiling off)")
    p.add_argument("--no-checkpoints", dest="checkpoints", action="store_false")
    p.add_argument("--spot", action="store_true", help="SageMaker: managed spot training")
    p.add_argument("--max-wait", type=positive_int, metavar="SECONDS",
                   help="SageMaker --spot: MaxWaitTimeInSeconds, at least the max runtime "
                        "(default twice it)")
    p.add_argument("--max-runtime", type=positive_int, metavar="SECONDS",
                   help="SageMaker: MaxRuntimeInSeconds (default 4 h)")
    p.add_argument("--instance-type", help="SageMaker: training instance type")
    p.add_argument("--instance-count", type=positive_int,
                   help="SageMaker: instances training one model data-parallel (DDP; default 1)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="local: training processes (DDP over gloo on the CPU; default 1)")
    p.add_argument("--docker", metavar="IMAGE", nargs="?", const="dogbreed-train:latest",
                   help="local: run the train image instead of the entry point")
    _job_flags(p)
    _hyperparameter_flags(p)


def cmd_train(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.sagemaker.requests import job_name  # lazy: each command loads its half

    name = args.name or job_name("train")
    flags = _hyperparameters(args)
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        base = sm.best_hyperparameters(args.from_tuning_job) if args.from_tuning_job else {}
        hps = {**base, **flags}
        result = sm.train(name=name, hyperparameters=hps, smdebug_hook=args.debugger is not False,
                          debugger_rules=args.debugger_rules, spot=args.spot, max_wait=args.max_wait,
                          max_runtime=args.max_runtime, checkpoints=args.checkpoints,
                          data_uri=args.data_uri, instance_type=args.instance_type,
                          instance_count=args.instance_count, wait=args.wait, logs=args.logs)
        return sm.dry_run_output() if args.dry_run else result
    _sagemaker_only(args, backend, "--spot", "--max-wait", "--max-runtime", "--instance-count",
                    "--logs", "--debugger-rules")
    from dogbreed.launcher.local.runs import default_weights  # lazy: each command loads its half

    local = _local(settings, args)
    base = local.best_hyperparameters(args.from_tuning_job) if args.from_tuning_job else {}
    merged = {**base, **flags}
    hps = default_weights(merged, explicit="weights" in merged)
    if args.dry_run:
        return local.plan_train(name=name, hyperparameters=hps, data=args.data, nproc=args.nproc)
    return local.train(name=name, hyperparameters=hps, data=_require_data(args), nproc=args.nproc,
                       debugger=bool(args.debugger))


def deploy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instance-count", type=positive_int, help="SageMaker: instances (default 1)")
    p.add_argument("--autoscale", metavar="MIN:MAX",
                   help="SageMaker: Application Auto Scaling between MIN and MAX instances, "
                        "target tracking on invocations per instance")
    p.add_argument("--target-invocations", type=positive_float, default=70.0,
                   help="SageMaker --autoscale: invocations per instance per minute to hold "
                        "(default 70)")
    p.add_argument("--update", action="store_true",
                   help="SageMaker: expect an existing endpoint (a real run detects it; a dry "
                        "run shows UpdateEndpoint only with this)")
    p.add_argument("--port", type=port_number,
                   help="local: router port (default 8090; 0 = any free)")
    p.add_argument("--max-loaded-models", type=positive_int,
                   help="local: models kept loaded (default 4)")
    p.add_argument("--foreground", action="store_true", help="local: serve until Ctrl-C")
    p.add_argument("--docker", metavar="IMAGE", nargs="?", const="dogbreed-serve:latest",
                   help="local: the model server is the serve image, `docker run -d` "
                        "(default dogbreed-serve:latest)")
    _job_flags(p)


def cmd_deploy(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "sagemaker":
        _local_only(args, "--docker")
        from dogbreed.launcher.sagemaker.requests import (
            parse_autoscale,  # lazy: each command loads its half
        )

        sm = _sagemaker(settings, args)
        result = sm.deploy(wait=args.wait, instance_count=args.instance_count,
                           autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
                           target_invocations=args.target_invocations,
                           update=True if args.update else None, logs=args.logs)
        return sm.dry_run_output() if args.dry_run else result
    _sagemaker_only(args, backend, "--instance-count", "--autoscale", "--update", "--logs")
    local = _local(settings, args)
    if args.dry_run:
        return local.plan_deploy(args.port, args.max_loaded_models)
    if args.foreground:
        local.serve_forever(args.port, args.max_loaded_models)
        return None
    return local.deploy_detached(args.port, args.max_loaded_models)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="model name: the TargetModel becomes NAME/model.tar.gz")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="a training job's model.tar.gz")
    source.add_argument("--model-data", help="SageMaker: an S3 URI of a model.tar.gz")
    source.add_argument("--file", type=Path, help="a local model.tar.gz")


def cmd_add_model(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        result = sm.add_model(args.name, training_job=args.job, model_data=args.model_data,
                              file=args.file)
        return sm.dry_run_output() if args.dry_run else result
    if args.model_data:
        raise CliError("--model-data is an S3 URI: use --file or --job with --local")
    local = _local(settings, args)
    if args.dry_run:
        return local.plan_add_model(args.name, training_job=args.job, file=args.file)
    return local.add_model(args.name, training_job=args.job, file=args.file)


def invoke_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="a JPEG or PNG")
    p.add_argument("--target-model", required=True, help="e.g. dog-breed-classifier/model.tar.gz")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--endpoint-url", help="local: the router URL (default: the running local endpoint)")
    p.add_argument("--text", action="store_true",
                   help="print the top-k as lines of text instead of JSON")
    p.add_argument("--json", action="store_true",
                   help="JSON on stdout (the default; kept for older scripts)")


def cmd_invoke(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.invoke import (  # lazy: invoke only
        format_predictions,
        invoke_result,
        invoke_runtime,
        runtime_client,
    )

    if not args.image.is_file():
        raise CliError(f"no such image {args.image}")
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        answer = sm.invoke(args.target_model, args.image, args.top_k)
        if args.dry_run:
            return sm.dry_run_output()
    else:
        url = args.endpoint_url
        if url is None:
            state = _local(settings, args).state()
            if state is None:
                raise CliError("no local endpoint is running: `dogbreed deploy --local` first")
            url = state["url"]
        if args.dry_run:
            return {"backend": "local", "endpoint_url": url, "target_model": args.target_model,
                    "image": str(args.image)}
        answer = invoke_runtime(runtime_client(url, settings.region), settings.endpoint_name,
                                args.target_model, args.image, args.top_k)
    result = invoke_result(args.target_model, answer)
    if args.text and not args.json:
        print(format_predictions(result))
        return None
    return result


def logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a training job, a tuning job (--kind tuning: its trials) or an "
                                "endpoint (--kind endpoint)")
    p.add_argument("--kind", choices=("training", "tuning", "endpoint"), default="training")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")


def cmd_logs(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "local":
        raise CliError("logs reads CloudWatch (SageMaker); local jobs log to "
                       f"{settings.workdir_path}/jobs/<job>/train.log")
    sm = _sagemaker(settings, args)
    result = sm.logs(args.name, kind=args.kind, follow=args.follow)
    return sm.dry_run_output() if args.dry_run else result


def cmd_status(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if args.dry_run:
        return {"backend": backend, "note": "status only reads; nothing to dry-run"}
    if backend == "sagemaker":
        return _sagemaker(settings, args).status()
    return _local(settings, args).status()


def cleanup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delete-models", action="store_true", help="also delete the model store")


def cmd_cleanup(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        result = sm.cleanup(delete_models=args.delete_models)
        return sm.dry_run_output() if args.dry_run else result
    local = _local(settings, args)
    if args.dry_run:
        return local.plan_cleanup(args.delete_models)
    return local.cleanup(args.delete_models)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="train/valid/test folder (the sample)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, help="default: the trainer's for --weights")
    p.add_argument("--lr", type=float, help="default: the trainer's for --weights")
    p.add_argument("--weights", default="none")


def cmd_demo(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.demo import run_demo  # lazy: each command loads its half

    if args.dry_run:
        return {"backend": "local", "demo": "train resnet18 + mobilenet_v2, serve, invoke",
                "data": str(args.data), "epochs": args.epochs, "image_size": args.image_size}
    run_demo(settings, data=args.data, epochs=args.epochs, image_size=args.image_size,
             batch_size=args.batch_size, lr=args.lr, weights=args.weights)
    return None  # the demo prints its own readable report


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One ``dogbreed`` subcommand: adding one is one entry in :data:`SUBCOMMANDS`."""

    name: str
    help: str
    run: Callable[[argparse.Namespace, settings_mod.Settings, str], Any]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None
    local_only: bool = False  # always the local backend (no SageMaker variant)


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("upload-data", "upload a train/valid/test folder to S3", cmd_upload_data,
               upload_data_arguments),
    Subcommand("tune", "hyperparameter tuning (SageMaker HPO or Optuna)", cmd_tune, tune_arguments,
               "Tune lr, batch-size, epochs and (--space full) the training-recipe knobs for "
               "valid_accuracy: one search space for both backends. SageMaker: a tuning job "
               "(trials checkpoint only with --spot; --warm-start-from earlier jobs). --local: Optuna TPE trials "
               "with Hyperband pruning on the per-epoch metric lines, within --trials or a "
               "--time-budget; the study lives in --storage (SQLite under the workdir by default; "
               "PostgreSQL for several workers) and --resume NAME continues it."),
    Subcommand("train", "one training job", cmd_train, train_arguments,
               "Train once: hyperparameters from flags or a tuning job's best trial. SageMaker "
               "jobs get checkpoints, optional managed spot, and the smdebug hook saving its "
               "tensors with the job's output (`dogbreed report JOB`); Debugger's rules and "
               "profiling only with --debugger-rules."),
    Subcommand("deploy", "create or update the multi-model endpoint", cmd_deploy, deploy_arguments,
               "SageMaker: model (Mode=MultiModel, the models prefix) and endpoint config, then "
               "CreateEndpoint, or UpdateEndpoint when the endpoint exists (no downtime); "
               "--autoscale MIN:MAX adds target tracking. --local: MMS + the TargetModel router "
               "on 127.0.0.1, in the background (--foreground to stay attached)."),
    Subcommand("add-model", "put a model in the endpoint's model store", cmd_add_model,
               add_model_arguments),
    Subcommand("invoke", "predict with one model of the endpoint", cmd_invoke, invoke_arguments),
    Subcommand("logs", "a SageMaker job's (or the endpoint's) CloudWatch log events", cmd_logs,
               logs_arguments),
    Subcommand("status", "endpoint, models, recent jobs", cmd_status),
    Subcommand("cleanup", "delete/stop the endpoint (and its autoscaling)", cmd_cleanup,
               cleanup_arguments),
    Subcommand("demo", "train ResNet18 + MobileNetV2, serve both locally, invoke by TargetModel",
               cmd_demo, demo_arguments, local_only=True),
    Subcommand("report", "debugger + profiler report of a run, or a study's",
               workflows.cmd_report, workflows.report_arguments,
               "Evaluate the seeds' debugger rules (VanishingGradient, Overfit, Overtraining, "
               "PoorWeightInitialization, LossNotDecreasing) on the run's smdebug tensors, "
               "LowGPUUtilization and a profiler summary on its step timings, and write one HTML "
               "page with plots. RUN is a run directory (the /opt/ml layout), a local job or "
               "tuning study name, a tuning result JSON, or (SageMaker) a training job name whose "
               "outputs are downloaded first."),
    Subcommand("explain", "Grad-CAM overlay PNGs for images (Captum)", workflows.cmd_explain,
               workflows.explain_arguments,
               "Predict each image with MODEL (a model dir or model.tar.gz) through the serving "
               "transform and write <image>.gradcam.png: the photo and one Grad-CAM overlay per "
               "top-k class, titled with label and probability.", local_only=True),
    Subcommand("clarify", "SageMaker Clarify SHAP explanations of images", workflows.cmd_clarify,
               workflows.clarify_arguments,
               "CreateModel (serve image, single-model) + the Clarify analysis config "
               "(application/x-image, SHAP image_config IMAGE_CLASSIFICATION) on S3 + "
               "CreateProcessingJob in the region's sagemaker-clarify-processing image."),
    Subcommand("batch", "batch transform: predict every image of a folder", workflows.cmd_batch,
               workflows.batch_arguments,
               "SageMaker: CreateModel (serve image, single-model) + CreateTransformJob over an "
               "S3 prefix, one record per file (SplitType None, SingleRecord), <input name>.out "
               "per input; waits. --local is the same on this machine."),
]
COMMANDS = {c.name: c for c in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = argparse.ArgumentParser(prog="dogbreed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, parents=[parent], help=command.help,
                           description=command.description or command.help)
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    events.configure()
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: ~0.2 s

    command = COMMANDS[args.command]
    try:
        with _sigterm_as_interrupt(), events.lines_above_bars():
            settings = _settings(args)
            backend = "local" if command.local_only else _backend_name(args, settings)
            result = command.run(args, settings, backend)
    except (CliError, settings_mod.SettingsError, ContractError, ValueError) as exc:
        events.event("error", 40, command=args.command, error=str(exc))
        print(f"dogbreed {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ClientError, BotoCoreError) as exc:  # AWS, jobs, servers
        events.event("error", 40, command=args.command, error=f"{type(exc).__name__}: {exc}")
        print(f"dogbreed {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        events.event("interrupted", command=args.command, signal=str(exc) or "SIGINT")
        return 143 if str(exc) == "SIGTERM" else 130
    if result is not None:
        _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
