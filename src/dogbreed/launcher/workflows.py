"""The after-training workflows' subcommands: ``report``, ``explain``, ``clarify``, ``batch``.

Registered by :func:`dogbreed.launcher.cli.build_parser` through :func:`register`; each command
has the CLI's ``(args, settings, backend) -> result`` shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dogbreed.launcher import events
from dogbreed.launcher import settings as settings_mod


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report", parents=[parent], help="debugger + profiler report of a run, or a study's",
        description="Evaluate the seeds' debugger rules (VanishingGradient, Overfit, "
                    "Overtraining, PoorWeightInitialization, LossNotDecreasing) on the run's "
                    "smdebug tensors, LowGPUUtilization and a profiler summary on its step "
                    "timings, and write one HTML page with plots. RUN is a run directory (the "
                    "/opt/ml layout), a local job or tuning study name, a tuning result JSON, "
                    "or (SageMaker) a training job name whose outputs are downloaded first.")
    p.add_argument("run", help="run dir, local job/study name, tuning JSON or SageMaker job")
    p.add_argument("--out", type=Path, help="HTML file (default <run>/output/data/report.html)")

    p = sub.add_parser(
        "explain", parents=[parent], help="Grad-CAM overlay PNGs for images (Captum)",
        description="Predict each image with MODEL (a model dir or model.tar.gz) through the "
                    "serving transform and write <image>.gradcam.png: the photo and one Grad-CAM "
                    "overlay per top-k class, titled with label and probability.")
    p.add_argument("model", type=Path, help="model dir (model.json + model.pt) or model.tar.gz")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG files")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("explanations"),
                   help="folder for the PNGs (default ./explanations)")


def _local_candidates(name: str, workdir: Path) -> list[Path]:
    return [workdir / "jobs" / name, workdir / "tuning" / f"{name}.json"]


def cmd_report(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed import report

    path = Path(args.run)
    if not path.exists():
        local = [c for c in _local_candidates(args.run, settings.workdir_path) if c.exists()]
        if local:
            path = local[0]
        elif backend == "sagemaker":
            from dogbreed.launcher.sagemaker_backend import SageMakerBackend

            dest = settings.workdir_path / "reports" / args.run
            if args.dry_run:
                return {"backend": "sagemaker", "training_job": args.run, "download_to": str(dest),
                        "requests": ["sagemaker DescribeTrainingJob", "s3 GetObject output.tar.gz",
                                     "s3 ListObjectsV2 + GetObject <DebugHookConfig>/<job>/debug-output/"]}
            sm = SageMakerBackend(settings)
            path = report.download_training_job(sm.client("sagemaker"), sm.client("s3"), args.run, dest)
            events.event("report_downloaded", training_job=args.run, to=path)
        else:
            raise report.ReportError(f"{args.run}: no such run directory, local job or study "
                                     f"(looked in {settings.workdir_path}); for a SageMaker job "
                                     "pass --sagemaker")
    if args.dry_run:
        return {"backend": "local", "report": str(path), "out": str(args.out or "")}
    result = report.build_report(path, args.out)
    events.event("report_written", path=result["report"])
    return result


def cmd_explain(args: argparse.Namespace, settings: settings_mod.Settings, backend: str) -> Any:
    from dogbreed import explain

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


COMMANDS = {"report": cmd_report, "explain": cmd_explain}
