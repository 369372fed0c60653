#!/usr/bin/env python3
"""Accuracy for a budget: the default recipe vs the best of a budgeted study vs the seeds'
hyperparameters, on the same data and split, in one run. Prints one JSON document.

Three arms, each trained through ``dogbreed.train.run`` (the code every job runs):

* ``default``: the trainer's defaults for the starting point (``contract.recipe_defaults``),
  at ``--epochs``;
* ``seeds``: the seeds' hyperparameters (``search_space.SEEDS_HYPERPARAMETERS``: Adam 1e-3,
  batch 32, constant lr, crop + flip; frozen backbone when fine-tuning), at ``--epochs``;
* ``recipe`` (only with ``--arms``): ``contract.RECIPE_CANDIDATE`` (TrivialAugment, label
  smoothing 0.1, EMA 0.99, 1 warmup epoch) over the defaults, at ``--epochs``: the evidence
  for or against making it a default;
* ``study``: ``dogbreed tune --local --in-process --time-budget <--budget>`` as a function
  (``local_backend.tune_in_process``: the CLI's own budgeted tuner — Hyperband on epochs over
  ``--space``, trials sharing one decode, the study in SQLite under the work dir); its best
  hyperparameters are then retrained with every ``--seeds``
  value, so the three arms are compared over the same seeds (the sample's 20-image test split
  moves 5 points per image: one seed says little).

    python scripts/bench_recipe.py --weights none --budget 300 --seeds 0 1 2        # the sample
    python scripts/bench_recipe.py --bench-classes 20 --budget 600                  # make_bench_data set
    python scripts/bench_recipe.py --quick                                          # smoke run (CI)

Accuracy and wall times are only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_bench_data  # noqa: E402

from dogbreed import contract, data, train  # noqa: E402
from dogbreed.launcher import search_space  # noqa: E402
from dogbreed.launcher.local.backend import tune_in_process  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "dogs-sample"


def train_once(name: str, hyperparameters: dict[str, str], data_dir: Path, work: Path,
               device: torch.device, cache: data.DecodeCache) -> dict[str, Any]:
    hp = contract.parse_hyperparameters(hyperparameters)
    paths = contract.prepare_local_job(work / name, hp.to_sagemaker(), {"training": data_dir})
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # epoch lines to stderr: stdout is the JSON
        result = train.run(hp, paths, device=device, cache=cache)
    return {"seed": hp.seed, "test_accuracy": round(result.metrics.get("test_accuracy", float("nan")), 4),
            "valid_accuracy": round(result.metrics["valid_accuracy"], 4),
            "best_epoch": result.best_epoch, "epochs_completed": len(result.history),
            "wall_seconds": round(time.perf_counter() - started, 2)}


def summarise(runs: list[dict[str, Any]], hyperparameters: dict[str, str]) -> dict[str, Any]:
    tests = [r["test_accuracy"] for r in runs]
    return {"test_accuracy_mean": round(statistics.mean(tests), 4),
            "test_accuracy_stdev": round(statistics.stdev(tests), 4) if len(tests) > 1 else 0.0,
            "valid_accuracy_mean": round(statistics.mean(r["valid_accuracy"] for r in runs), 4),
            "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in runs), 2),
            "hyperparameters": hyperparameters, "runs": runs}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def valid_vs_test(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the study's completed trials: Spearman's rank correlation of the objective (valid
    accuracy) with test accuracy, and whether the best on valid is also the best on test."""
    done = [t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None
            and t.get("test_accuracy") is not None]
    if len(done) < 2:
        return {"completed_trials": len(done), "spearman": None, "best_valid_is_best_test": None}
    valid, test = ranks([t["value"] for t in done]), ranks([t["test_accuracy"] for t in done])
    mean = (len(done) + 1) / 2
    covariance = sum((v - mean) * (t - mean) for v, t in zip(valid, test))
    spread = (sum((v - mean) ** 2 for v in valid) * sum((t - mean) ** 2 for t in test)) ** 0.5
    best_valid = max(done, key=lambda t: t["value"])
    return {"completed_trials": len(done),
            "spearman": round(covariance / spread, 3) if spread else None,
            "best_valid_is_best_test": best_valid["test_accuracy"] >= max(t["test_accuracy"] for t in done)}


def run_study(data_dir: Path, work: Path, device: torch.device, static: dict[str, str],
              budget: float, epochs_max: int, space: str, trials: int | None = None) -> dict[str, Any]:
    """A study within ``budget`` seconds of wall clock: the CLI's budgeted tuner, in process."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = tune_in_process(data_dir, work, trials=trials, device=device,
                                 base_hyperparameters=static, epochs_max=epochs_max,
                                 time_budget=budget, space=space)
    best = next(t for t in result["trials"] if t["number"] == result["best_trial"])
    return {"valid_vs_test": valid_vs_test(result["trials"]),
            "budget_seconds": budget, "seconds": round(time.perf_counter() - started, 1),
            "space": result["space"], "pruner": result["pruner"], "trials_cap": trials,
            "storage": result["storage"], "counts": result["counts"],
            "best_trial": result["best_trial"],
            "best_valid_accuracy": result["best_objective"],
            "best_trial_test_accuracy": best.get("test_accuracy"),
            "best_hyperparameters": result["best_hyperparameters"],
            "trials": [{k: t.get(k) for k in ("number", "state", "value", "test_accuracy", "epochs_completed",
                                              "seconds", "stopped", "origin", "hyperparameters")}
                       for t in result["trials"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE, help="dogImages-layout folder")
    parser.add_argument("--bench-classes", type=int, default=0,
                        help="instead of --data: a make_bench_data set with this many classes")
    parser.add_argument("--bench-images", type=int, nargs=3, default=(400, 100, 100),
                        metavar=("TRAIN", "VALID", "TEST"), help="make_bench_data split sizes")
    parser.add_argument("--weights", default="none", help="none, imagenet or a .pth path")
    parser.add_argument("--model", default="resnet18", choices=contract.ARCHITECTURES)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the default and seeds arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=300.0, help="study wall-clock seconds")
    parser.add_argument("--epochs-max", type=int, default=10,
                        help="epochs each study trial is set up for (Hyperband's max resource)")
    parser.add_argument("--trials", type=int, help="also cap the study's trial count (default: "
                                                   "as many as the budget fits)")
    parser.add_argument("--space", choices=sorted(search_space.SPACES), default="full")
    parser.add_argument("--arms", nargs="+", default=["default", "seeds", "study"],
                        choices=["default", "seeds", "study", "recipe"])
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE",
                        help="fixed for every arm (e.g. num-workers=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, help="keep runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 px, 1 epoch, 1 seed, 2 study trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.epochs, args.seeds, args.epochs_max = 32, 1, args.seeds[:1], 1
        # Two 1-epoch trials; the budget only bounds them (a budget too short to finish one
        # trial leaves the study without a best).
        args.trials, args.budget = 2, min(args.budget, 300.0)
    device = torch.device(args.device)
    fixed = dict(item.split("=", 1) for item in args.hp)

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-recipe-")))
        work.mkdir(parents=True, exist_ok=True)
        data_dir = args.data
        if args.bench_classes:
            data_dir = work / "bench-data"
            train_n, valid_n, test_n = args.bench_images
            make_bench_data.make(data_dir, args.bench_classes,
                                 {"train": train_n, "valid": valid_n, "test": test_n}, (500, 375), 0,
                                 make_bench_data.DEFAULT_SOURCE, None)
        common = {"model": args.model, "weights": args.weights, "image-size": str(args.image_size),
                  **fixed}
        cache = data.DecodeCache()
        arms: dict[str, Any] = {}
        default_hps = {**common, "epochs": str(args.epochs)}
        seeds_hps = {**common, **search_space.SEEDS_HYPERPARAMETERS, "epochs": str(args.epochs),
                     "freeze-backbone": "false" if args.weights == "none" else "true"}
        recipe_hps = {**{k.replace("_", "-"): str(v) for k, v in contract.RECIPE_CANDIDATE.items()},
                      **common, "epochs": str(args.epochs)}
        for arm, hps in (("default", default_hps), ("seeds", seeds_hps), ("recipe", recipe_hps)):
            if arm not in args.arms:
                continue
            runs = [train_once(f"{arm}-seed{seed}", {**hps, "seed": str(seed)}, data_dir, work,
                               device, cache) for seed in args.seeds]
            # The defaults actually used (scratch or fine-tuning recipe), as the trainer saw them.
            resolved = contract.parse_hyperparameters(hps).to_sagemaker() if arm == "default" else hps
            arms[arm] = summarise(runs, resolved)
            print(f"event=arm_done arm={arm} test_accuracy_mean={arms[arm]['test_accuracy_mean']}",
                  file=sys.stderr, flush=True)

        if "study" in args.arms:
            study = run_study(data_dir, work / "study", device, {**common, "seed": str(args.seeds[0])},
                              args.budget, args.epochs_max, args.space, args.trials)
            best = {k: v for k, v in study["best_hyperparameters"].items() if k != "seed"}
            runs = [train_once(f"study-best-seed{seed}", {**best, "seed": str(seed)}, data_dir, work,
                               device, cache) for seed in args.seeds]
            arms["study"] = {**summarise(runs, best), "study": study}

        report = {
            "device": str(device), "data": str(data_dir),
            "data_images": {split: len(data.index_split(data_dir / split)) for split in ("train", "valid", "test")},
            "weights": args.weights, "model": args.model, "image_size": args.image_size,
            "epochs": args.epochs, "seeds": args.seeds, "budget_seconds": args.budget, "quick": args.quick,
            "arms": arms,
            "ranking": sorted(arms, key=lambda a: arms[a]["test_accuracy_mean"], reverse=True),
        }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
