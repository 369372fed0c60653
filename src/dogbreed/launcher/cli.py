"""``dogbreed``: tune, train, deploy and invoke the dog-breed classifier on SageMaker or locally.

    dogbreed upload-data --data DIR            # S3: <bucket>/<prefix>/data/
    dogbreed tune  [--local] ...               # SageMaker HPO job, or Optuna trials here
    dogbreed train [--local] [--from-tuning-job NAME] ...
    dogbreed deploy [--local]                  # multi-model endpoint
    dogbreed add-model NAME --job JOB          # <models prefix>/NAME/model.tar.gz
    dogbreed invoke --target-model NAME/model.tar.gz IMAGE
    dogbreed status | cleanup [--local]
    dogbreed demo --data DIR                   # everything above, locally, in a few minutes

Backend: ``--local`` or ``--sagemaker``; otherwise SageMaker when a role ARN and a bucket are
configured (flags, ``DOGBREED_*`` env, or a config file), else local. ``--dry-run`` prints the
exact request JSON instead of sending it (SageMaker requests unless ``--local``; one request
prints as an object, several as a list). Results go to stdout, one-line key=value events to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dogbreed.artifacts import ARCHIVE_NAME
from dogbreed.launcher import events, workflows
from dogbreed.launcher import settings as settings_mod

EXIT_ERROR = 1
EXIT_USAGE = 2
HP_FLAGS = ("model", "epochs", "batch_size", "lr", "image_size", "weights")


class CliError(Exception):
    pass


# --- argument parsing --------------------------------------------------------------------------
def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    where = parent.add_argument_group("backend")
    backend = where.add_mutually_exclusive_group()
    backend.add_argument("--local", dest="backend", action="store_const", const="local",
                         help="run on this machine (default without AWS settings)")
    backend.add_argument("--sagemaker", dest="backend", action="store_const", const="sagemaker",
                         help="use SageMaker (default when a role ARN and bucket are set)")
    where.add_argument("--dry-run", action="store_true",
                       help="print the request JSON it would send, send nothing")
    where.add_argument("--config", help="settings file (TOML or JSON); default $DOGBREED_CONFIG "
                                        "or ./dogbreed.toml")
    aws = parent.add_argument_group("settings (flag > DOGBREED_<NAME> env > config file)")
    for name, help_text in [
        ("region", "AWS region (also AWS_REGION)"),
        ("role_arn", "SageMaker execution role ARN"),
        ("bucket", "S3 bucket"),
        ("prefix", "S3 key prefix (default dogbreed)"),
        ("train_image", "training image URI (default <account>'s ECR dogbreed-train:latest)"),
        ("serve_image", "serving image URI (default <account>'s ECR dogbreed-serve:latest)"),
        ("train_instance_type", "default ml.g4dn.xlarge"),
        ("serve_instance_type", "default ml.m5.xlarge"),
        ("endpoint_name", "default dogbreed-mme"),
        ("workdir", "local work dir (default .dogbreed)"),
    ]:
        aws.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text)
    aws.add_argument("--poll-seconds", dest="poll_seconds", type=float,
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


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = argparse.ArgumentParser(prog="dogbreed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("upload-data", parents=[parent], help="upload a train/valid/test folder to S3")
    p.add_argument("--data", required=True, type=Path, help="folder with train/ valid/ test/")
    p.add_argument("--workers", type=int, default=8)

    p = sub.add_parser("tune", parents=[parent], help="hyperparameter tuning (SageMaker HPO or Optuna)",
                       description="Tune lr, batch-size and epochs (the one search space) for "
                                   "valid_accuracy. SageMaker: a tuning job; --local: Optuna TPE "
                                   "trials with median pruning on the per-epoch metric lines.")
    p.add_argument("--data", type=Path, help="local: the train/valid/test folder")
    p.add_argument("--data-uri", help="SageMaker: S3 prefix of the data (default <prefix>/data)")
    p.add_argument("--trials", "--max-jobs", dest="trials", type=int, default=6,
                   help="number of trials / training jobs (default 6)")
    p.add_argument("--max-parallel", type=int, default=2, help="SageMaker: parallel jobs (default 2)")
    p.add_argument("--strategy", default="Bayesian", choices=("Bayesian", "Random", "Hyperband"))
    p.add_argument("--epochs-max", type=int, help="cap the epochs range (e.g. 3 → 2..3)")
    p.add_argument("--no-early-stopping", dest="early_stopping", action="store_false",
                   help="SageMaker: TrainingJobEarlyStoppingType Off")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--prune-startup-trials", type=int, default=2,
                   help="local: trials that complete before pruning starts (default 2)")
    p.add_argument("--in-process", action="store_true",
                   help="local: run trials back to back in this process, sharing one decoded "
                        "image cache (fast on a GPU); default: one process per trial")
    p.add_argument("--prune-warmup-epochs", type=int, default=0,
                   help="local: epochs before a trial may be pruned (default 0)")
    p.add_argument("--name", help="tuning job / study name (default dogbreed-tune-<time>)")
    p.add_argument("--output", type=Path, help="where to save the result JSON")
    p.add_argument("--spot", action="store_true", help="SageMaker: managed spot training")
    p.add_argument("--instance-type", help="SageMaker: instance type for the trials")
    p.add_argument("--docker", metavar="IMAGE", nargs="?", const="dogbreed-train:latest",
                   help="local: run trials in the train image (default dogbreed-train:latest)")
    p.add_argument("--no-wait", dest="wait", action="store_false")
    _hyperparameter_flags(p, tuned=True)

    p = sub.add_parser("train", parents=[parent], help="one training job with the debugger",
                       description="Train once: hyperparameters from flags or a tuning job's best "
                                   "trial. SageMaker jobs get the seeds' debugger rules, profiler, "
                                   "checkpoints and optional managed spot.")
    p.add_argument("--data", type=Path, help="local: the train/valid/test folder")
    p.add_argument("--data-uri", help="SageMaker: S3 prefix of the data")
    p.add_argument("--from-tuning-job", metavar="NAME", help="start from this tuning job's best "
                   "hyperparameters (local: a study name or result JSON)")
    p.add_argument("--name", help="job name (default dogbreed-train-<time>)")
    p.add_argument("--no-debugger", dest="debugger", action="store_false",
                   help="SageMaker: no debug hook or rules")
    p.add_argument("--no-profiler", dest="profiler", action="store_false")
    p.add_argument("--no-checkpoints", dest="checkpoints", action="store_false")
    p.add_argument("--spot", action="store_true", help="SageMaker: managed spot training")
    p.add_argument("--max-wait", type=int, help="SageMaker spot: MaxWaitTimeInSeconds")
    p.add_argument("--instance-type", help="SageMaker: training instance type")
    p.add_argument("--docker", metavar="IMAGE", nargs="?", const="dogbreed-train:latest",
                   help="local: run the train image instead of the entry point")
    p.add_argument("--no-wait", dest="wait", action="store_false")
    _hyperparameter_flags(p)

    p = sub.add_parser("deploy", parents=[parent], help="create the multi-model endpoint",
                       description="SageMaker: model (Mode=MultiModel, the models prefix), endpoint "
                                   "config, endpoint. --local: MMS + the TargetModel router on "
                                   "127.0.0.1, in the background (--foreground to stay attached).")
    p.add_argument("--port", type=int, help="local: router port (default 8090; 0 = any free)")
    p.add_argument("--max-loaded-models", type=int, help="local: models kept loaded (default 4)")
    p.add_argument("--foreground", action="store_true", help="local: serve until Ctrl-C")
    p.add_argument("--no-wait", dest="wait", action="store_false")

    p = sub.add_parser("add-model", parents=[parent], help="put a model in the endpoint's model store")
    p.add_argument("name", help="model name: the TargetModel becomes NAME/model.tar.gz")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="a training job's model.tar.gz")
    source.add_argument("--model-data", help="SageMaker: an S3 URI of a model.tar.gz")
    source.add_argument("--file", type=Path, help="a local model.tar.gz")

    p = sub.add_parser("invoke", parents=[parent], help="predict with one model of the endpoint")
    p.add_argument("image", type=Path, help="a JPEG or PNG")
    p.add_argument("--target-model", required=True, help="e.g. dog-breed-classifier/model.tar.gz")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--endpoint-url", help="local: the router URL (default: the running local endpoint)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")

    sub.add_parser("status", parents=[parent], help="endpoint, models, recent jobs")

    p = sub.add_parser("cleanup", parents=[parent], help="delete/stop the endpoint")
    p.add_argument("--delete-models", action="store_true", help="also delete the model store")

    p = sub.add_parser("demo", parents=[parent],
                       help="train ResNet18 + MobileNetV2, serve both locally, invoke by TargetModel")
    p.add_argument("--data", type=Path, required=True, help="train/valid/test folder (the sample)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weights", default="none")
    workflows.register(sub, parent)  # report, explain, clarify, batch
    return parser


# --- helpers --------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> settings_mod.Settings:
    flags = {name: getattr(args, name, None) for name in settings_mod.FIELDS}
    return settings_mod.load(flags, config_file=args.config)


def _backend_name(args: argparse.Namespace, settings: settings_mod.Settings) -> str:
    if args.backend:
        return args.backend
    if settings.has_aws:
        return "sagemaker"
    if args.dry_run and args.command != "demo":
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
        hps[key.strip().replace("_", "-")] = value.strip()
    return hps


def _emit(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def _sagemaker(settings: settings_mod.Settings, args: argparse.Namespace) -> Any:
    from dogbreed.launcher.sagemaker_backend import SageMakerBackend

    return SageMakerBackend(settings, dry_run=args.dry_run)


def _local(settings: settings_mod.Settings, args: argparse.Namespace) -> Any:
    from dogbreed.launcher.local_backend import LocalBackend

    return LocalBackend(settings, docker_image=getattr(args, "docker", None))


def _require_data(args: argparse.Namespace) -> Path:
    if args.data is None:
        raise CliError("--local needs --data (a folder with train/ valid/ test/)")
    return args.data


# --- commands -------------------------------------------------------------------------------------
def cmd_upload_data(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "local":
        raise CliError("upload-data is for SageMaker; locally, pass --data to tune/train")
    sm = _sagemaker(settings, args)
    result = sm.upload_data(args.data, workers=args.workers)
    return sm.dry_run_output() if args.dry_run else result


def cmd_tune(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.sagemaker_backend import job_name

    name = args.name or job_name("tune", limit=32)
    static = _hyperparameters(args)
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        result = sm.tune(name=name, static_hyperparameters=static, strategy=args.strategy,
                         max_jobs=args.trials, max_parallel=min(args.max_parallel, args.trials),
                         early_stopping=args.early_stopping, epochs_max=args.epochs_max,
                         spot=args.spot, data_uri=args.data_uri, instance_type=args.instance_type,
                         random_seed=args.seed, wait=args.wait)
        if args.dry_run:
            return sm.dry_run_output()
        if result is not None and args.wait:
            path = args.output or settings.workdir_path / "tuning" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            result["result_file"] = str(path)
        return result
    from dogbreed.launcher import local_backend, search_space

    local = _local(settings, args)
    static = local_backend.default_weights(static, explicit="weights" in static)
    if args.dry_run:
        space = search_space.with_epochs_max(search_space.SEARCH_SPACE, args.epochs_max)
        return {"backend": "local", "tuning_job": name, "trials": args.trials,
                "sampler": {"name": "TPESampler", "seed": args.seed},
                "pruner": {"name": "MedianPruner", "n_startup_trials": args.prune_startup_trials,
                           "n_warmup_steps": args.prune_warmup_epochs},
                "objective": {"metric": "valid_accuracy", "direction": "maximize"},
                "search_space": search_space.describe(space), "static_hyperparameters": static,
                "data": str(args.data), "workdir": str(local.workdir), "docker": args.docker,
                "mode": "in_process" if args.in_process else "subprocess"}
    return local.tune(name=name, data=_require_data(args), static_hyperparameters=static,
                      trials=args.trials, epochs_max=args.epochs_max, seed=args.seed,
                      prune_startup_trials=args.prune_startup_trials,
                      prune_warmup_epochs=args.prune_warmup_epochs, output=args.output,
                      in_process=args.in_process)


def cmd_train(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.sagemaker_backend import job_name

    name = args.name or job_name("train")
    flags = _hyperparameters(args)
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        base = sm.best_hyperparameters(args.from_tuning_job) if args.from_tuning_job else {}
        hps = {**base, **flags}
        result = sm.train(name=name, hyperparameters=hps, debugger=args.debugger,
                          profiler=args.profiler, spot=args.spot, max_wait=args.max_wait,
                          checkpoints=args.checkpoints, data_uri=args.data_uri,
                          instance_type=args.instance_type, wait=args.wait)
        return sm.dry_run_output() if args.dry_run else result
    from dogbreed.launcher import local_backend

    local = _local(settings, args)
    base = local.best_hyperparameters(args.from_tuning_job) if args.from_tuning_job else {}
    merged = {**base, **flags}
    hps = local_backend.default_weights(merged, explicit="weights" in merged)
    if args.dry_run:
        return {"backend": "local", "training_job": name, "hyperparameters": hps,
                "data": str(args.data), "base_dir": str(local.workdir / "jobs" / name),
                "docker": args.docker}
    return local.train(name=name, hyperparameters=hps, data=_require_data(args))


def cmd_deploy(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        result = sm.deploy(wait=args.wait)
        return sm.dry_run_output() if args.dry_run else result
    local = _local(settings, args)
    if args.dry_run:
        return {"backend": "local", "endpoint_name": settings.endpoint_name,
                "store": str(local.store.root), "port": settings.port if args.port is None else args.port,
                "max_loaded_models": args.max_loaded_models or settings.max_loaded_models}
    if args.foreground:
        local.serve_forever(args.port, args.max_loaded_models)
        return None
    return local.deploy_detached(args.port, args.max_loaded_models)


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
        source = str(local.job_archive(args.job)) if args.job else str(args.file)
        return {"backend": "local", "copy": source,
                "to": str(local.store.root / args.name / ARCHIVE_NAME)}
    return local.add_model(args.name, training_job=args.job, file=args.file)


def runtime_client(endpoint_url: str | None, region: str | None) -> Any:
    """boto3's own sagemaker-runtime client; pointed at a local endpoint with dummy credentials."""
    import boto3

    if endpoint_url:
        return boto3.client("sagemaker-runtime", region_name=region or "us-east-1",
                            endpoint_url=endpoint_url, aws_access_key_id="local",
                            aws_secret_access_key="local")
    return boto3.client("sagemaker-runtime", region_name=region)


def invoke_runtime(client: Any, endpoint: str, target_model: str, image: Path, top_k: int) -> Any:
    from dogbreed.launcher.sagemaker_backend import content_type_for, top_k_attributes

    response = client.invoke_endpoint(EndpointName=endpoint, TargetModel=target_model,
                                      ContentType=content_type_for(image), Accept="application/json",
                                      CustomAttributes=top_k_attributes(top_k),
                                      Body=image.read_bytes())
    return json.loads(response["Body"].read())


def format_predictions(answer: Any) -> str:
    if not isinstance(answer, dict) or "predictions" not in answer:
        return json.dumps(answer, indent=2)
    lines = [f"model={answer.get('model')} arch={answer.get('arch')}"]
    for rank, item in enumerate(answer["predictions"], 1):
        lines.append(f"  {rank}. {item.get('label', item.get('class_name'))}  {item['probability']:.4f}")
    return "\n".join(lines)


def cmd_invoke(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
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
    if args.json:
        return answer
    print(format_predictions(answer))
    return None


def cmd_status(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if args.dry_run:
        return {"backend": backend, "note": "status only reads; nothing to dry-run"}
    if backend == "sagemaker":
        return _sagemaker(settings, args).status()
    return _local(settings, args).status()


def cmd_cleanup(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    if backend == "sagemaker":
        sm = _sagemaker(settings, args)
        result = sm.cleanup(delete_models=args.delete_models)
        return sm.dry_run_output() if args.dry_run else result
    local = _local(settings, args)
    if args.dry_run:
        state = local.state()
        return {"backend": "local", "stop": state, "delete_models": args.delete_models and
                str(local.store.root)}
    stopped = local.stop_endpoint()
    if args.delete_models:
        import shutil

        shutil.rmtree(local.store.root, ignore_errors=True)
    return {"stopped": stopped, "deleted_models": bool(args.delete_models)}


def cmd_demo(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.demo import run_demo

    if args.dry_run:
        return {"backend": "local", "demo": "train resnet18 + mobilenet_v2, serve, invoke",
                "data": str(args.data), "epochs": args.epochs, "image_size": args.image_size}
    run_demo(settings, data=args.data, epochs=args.epochs, image_size=args.image_size,
             batch_size=args.batch_size, lr=args.lr, weights=args.weights)
    return None  # the demo prints its own readable report


COMMANDS = {"upload-data": cmd_upload_data, "tune": cmd_tune, "train": cmd_train,
            "deploy": cmd_deploy, "add-model": cmd_add_model, "invoke": cmd_invoke,
            "status": cmd_status, "cleanup": cmd_cleanup, "demo": cmd_demo, **workflows.COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    events.configure()
    from botocore.exceptions import BotoCoreError, ClientError

    from dogbreed.contract import ContractError

    try:
        settings = _settings(args)
        backend = "local" if args.command == "demo" else _backend_name(args, settings)
        result = COMMANDS[args.command](args, settings, backend)
    except (CliError, settings_mod.SettingsError, ContractError, ValueError) as exc:
        events.event("error", 40, command=args.command, error=str(exc))
        print(f"dogbreed {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ClientError, BotoCoreError) as exc:  # AWS, jobs, servers
        events.event("error", 40, command=args.command, error=f"{type(exc).__name__}: {exc}")
        print(f"dogbreed {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        events.event("interrupted", command=args.command)
        return 130
    if result is not None:
        _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
