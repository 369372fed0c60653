"""The after-training workflows' subcommands: ``report``, ``explain``, ``clarify``, ``batch``.

Listed in :data:`dogbreed.launcher.cli.SUBCOMMANDS` (one entry each); each command
has the CLI's ``(args, settings, backend) -> result`` shape.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path
from typing import Any

from dogbreed import artifacts
from dogbreed.launcher import events
from dogbreed.launcher import settings as settings_mod
from dogbreed.launcher.settings import positive_int


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run dir, local job/study name, tuning JSON or SageMaker job")
    p.add_argument("--out", type=Path, help="HTML file (default <run>/output/data/report.html)")


def explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model dir (model.json + model.pt) or model.tar.gz")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG files")
    p.add_argument("--top-k", type=positive_int, default=3)
    p.add_argument("--out", type=Path, default=Path("explanations"),
                   help="folder for the PNGs (default ./explanations)")


def clarify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local model.tar.gz (uploaded), its S3 URI or a training job")
    p.add_argument("--data", dest="data_uri", required=True, help="S3 prefix of the images")
    p.add_argument("--labels-from", type=Path,
                   help="model.json or model.tar.gz with the class names (default: MODEL if local)")
    p.add_argument("--name", help="job name (default dogbreed-clarify-<time>)")
    p.add_argument("--instance-type", help="processing instance (default ml.m5.xlarge)")
    p.add_argument("--num-samples", type=positive_int, default=500, help="SHAP samples per image")
    p.add_argument("--no-wait", dest="wait", action="store_false")


def batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model.tar.gz (local or S3 URI) or a training job name")
    p.add_argument("input", help="S3 prefix (SageMaker) or folder (--local) of images")
    p.add_argument("output", nargs="?", help="S3 prefix or folder (default <prefix>/batch/<job>/output)")
    p.add_argument("--name", help="transform job name (default dogbreed-batch-<time>)")
    p.add_argument("--instance-type", help="SageMaker: transform instance (default: serve type)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="SageMaker: MaxConcurrentTransforms; --local: model workers of the local "
                   "server, and as many concurrent requests (its /execution-parameters)")
    p.add_argument("--logs", action="store_true",
                   help="SageMaker: say where the container logs are (CloudWatch)")
    p.add_argument("--no-wait", dest="wait", action="store_false")


def _local_candidates(name: str, workdir: Path) -> list[Path]:
    return [workdir / "jobs" / name, workdir / "tuning" / f"{name}.json"]


def cmd_report(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed import debugger_report  # torch and smdebug

    path = Path(args.run)
    if not path.exists():
        from dogbreed.launcher.sagemaker.requests import (
            is_name,  # lazy: each command loads its half
        )

        if not is_name(args.run):  # only a name is looked up under (or downloaded into) the workdir
            raise debugger_report.ReportError(f"{args.run}: no such run directory, and not a job or study "
                                     "name (letters, digits and single dashes)")
        local = [c for c in _local_candidates(args.run, settings.workdir_path) if c.exists()]
        if local:
            path = local[0]
        elif backend == "sagemaker":
            from dogbreed.launcher.sagemaker.backend import (
                SageMakerBackend,  # lazy: each command loads its half
            )

            dest = settings.workdir_path / "reports" / args.run
            if args.dry_run:
                return {"backend": "sagemaker", "training_job": args.run, "download_to": str(dest),
                        "requests": ["sagemaker DescribeTrainingJob",
                                     "s3 GetObject output.tar.gz (the job's own smdebug tensors: "
                                     "output/data/tensors)",
                                     "s3 ListObjectsV2 + GetObject <DebugHookConfig>/<job>/debug-output/ "
                                     "(a job trained with --debugger-rules)"]}
            sm = SageMakerBackend(settings)
            path = debugger_report.download_training_job(sm.client("sagemaker"), sm.client("s3"), args.run, dest)
            events.event("report_downloaded", training_job=args.run, to=path)
        else:
            raise debugger_report.ReportError(f"{args.run}: no such run directory, local job or study "
                                     f"(looked in {settings.workdir_path}); for a SageMaker job "
                                     "pass --sagemaker")
    if args.dry_run:
        return {"backend": "local", "report": str(path), "out": str(args.out or "")}
    result = debugger_report.build_report(path, args.out)
    events.event("report_written", path=result["report"])
    return result


def cmd_explain(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed import explain  # torch and Captum

    if not args.model.exists():
        raise ValueError(f"no such model {args.model}")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise ValueError(f"no such image(s): {', '.join(missing)}")
    if args.dry_run:
        return {"backend": "local", "model": str(args.model), "images": [str(p) for p in args.images],
                "out": str(args.out), "top_k": args.top_k}
    results = explain.explain_files(args.model, args.images, args.out, top_k=args.top_k)
    events.event("explained", images=len(results), out=args.out)
    return results


def _class_names(path: Path) -> list[str]:
    if path.suffix == ".json":
        return artifacts.ModelMetadata.from_mapping(json.loads(path.read_text()), str(path)).class_names
    if path.is_dir():
        return artifacts.read_metadata(artifacts.find_model_dir(path)).class_names
    with tarfile.open(path) as tar:
        member = tar.extractfile(artifacts.METADATA_FILE)
        if member is None:
            raise ValueError(f"{path} has no {artifacts.METADATA_FILE}")
        return artifacts.ModelMetadata.from_mapping(json.load(member), str(path)).class_names


def cmd_clarify(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.sagemaker import (  # lazy: each command loads its half
        batch_transform,
        clarify,
    )
    from dogbreed.launcher.sagemaker.backend import (
        SageMakerBackend,  # lazy: each command loads its half
    )
    from dogbreed.launcher.sagemaker.requests import job_name  # lazy: each command loads its half

    if backend == "local":
        raise ValueError("Clarify runs on SageMaker; locally use `dogbreed explain` (Grad-CAM)")
    labels = args.labels_from or (Path(args.model) if Path(args.model).exists() else None)
    if labels is None:
        raise ValueError("--labels-from MODEL_JSON_OR_TAR is needed when MODEL is not a local file")
    name = args.name or job_name("clarify")
    sm = SageMakerBackend(settings, dry_run=args.dry_run)
    result = clarify.run_clarify(sm, model_data=batch_transform.model_data_uri(sm, args.model, "clarify", name),
                                 class_names=_class_names(labels), data_uri=args.data_uri,
                                 name=name, instance_type=args.instance_type,
                                 num_samples=args.num_samples, wait=args.wait)
    return sm.dry_run_output() if args.dry_run else result


def cmd_batch(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed.launcher.local import batch  # lazy: each command loads its half
    from dogbreed.launcher.sagemaker import batch_transform  # lazy: each command loads its half
    from dogbreed.launcher.sagemaker.backend import (
        SageMakerBackend,  # lazy: each command loads its half
    )
    from dogbreed.launcher.sagemaker.requests import job_name  # lazy: each command loads its half

    if backend == "local":
        if args.output is None:
            raise ValueError("--local needs OUTPUT (a folder)")
        if args.dry_run:
            return {"backend": "local", "model": args.model, "input": args.input,
                    "output": args.output, "workers": args.workers}
        return batch.served_batch(Path(args.model), Path(args.input), Path(args.output),
                                  workers=args.workers, workdir=settings.workdir_path)
    name = args.name or job_name("batch")
    sm = SageMakerBackend(settings, dry_run=args.dry_run)
    result = batch_transform.sagemaker_batch(sm, model=args.model, input_uri=args.input,
                                             output_uri=args.output, name=name,
                                             instance_type=args.instance_type,
                                             max_concurrent=args.workers, wait=args.wait)
    if args.dry_run:
        return sm.dry_run_output()
    if args.logs and result:
        events.event("transform_logs", where=result["logs"])
    return result

