"""Local tuning: an Optuna study over :data:`search_space.SEARCH_SPACE`, trials run as local jobs.

TPE samples the space; a median pruner stops a trial whose per-epoch ``valid_accuracy`` (read
from its metric lines with the SageMaker ``MetricDefinitions`` regexes) trails the others'. Each
trial is a :class:`~dogbreed.launcher.local_runs.TrainingRun` (its own process, as a SageMaker
HPO trial is) or, ``in_process``, an :class:`~dogbreed.launcher.local_runs.InProcessRun`
sharing one decoded image cache. :meth:`LocalTuning.plan` renders the study it would run (for
``--dry-run``) from the very sampler and pruner objects :meth:`LocalTuning.run` uses.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import contract
from dogbreed.launcher import events, search_space
from dogbreed.launcher.local_runs import TRAIN_LOG, InProcessRun, LocalError, TrainingRun
from dogbreed.launcher.settings import SettingsError
from dogbreed.metrics import OBJECTIVE_METRIC

# Validation sets are small (20 images in the sample): accuracy comes in coarse steps and trials
# tie. Optuna ranks trials by valid_accuracy with ties broken by lower valid_loss — the rule
# dogbreed.train uses to pick its best epoch — folded into one number below the accuracy step.
TIE_BREAK = 1e-4
LOSS_METRIC = "valid_loss"
STATES = ("COMPLETE", "PRUNED", "FAIL")


def tuning_score(metrics: Mapping[str, float]) -> float | None:
    """valid_accuracy, minus less than ``TIE_BREAK`` for a higher valid_loss (None: no value)."""
    accuracy = metrics.get(OBJECTIVE_METRIC)
    if accuracy is None:
        return None
    loss = metrics.get(LOSS_METRIC)
    if loss is None or loss != loss or loss < 0:  # missing or NaN
        return accuracy - TIE_BREAK
    return accuracy - TIE_BREAK * (loss / (1.0 + loss))


def _options(obj: Any, names: Sequence[str]) -> dict[str, Any]:
    """The constructor options an Optuna sampler/pruner keeps (as ``_<name>`` attributes)."""
    return {n: getattr(obj, "_" + n) for n in names if hasattr(obj, "_" + n)}


class LocalTuning:
    """One study: the space, the static hyperparameters, the sampler and the pruner."""

    def __init__(self, *, name: str, root: Path, static_hyperparameters: Mapping[str, str],
                 trials: int = 6, epochs_max: int | None = None, seed: int | None = 0,
                 prune_startup_trials: int = 2, prune_warmup_epochs: int = 0,
                 in_process: bool = False, docker_image: str | None = None,
                 train_command: Sequence[str] | None = None) -> None:
        import optuna

        if in_process and docker_image:
            raise SettingsError("--in-process and --docker exclude each other")
        self.space = search_space.with_epochs_max(search_space.SEARCH_SPACE, epochs_max)
        search_space.validate(self.space)
        self.static = dict(static_hyperparameters)
        overlap = sorted(set(self.static) & {p.name for p in self.space})
        if overlap:
            raise SettingsError(f"hyperparameter(s) {', '.join(overlap)} are tuned; do not also fix them")
        contract.parse_hyperparameters(self.static)
        self.name, self.root, self.trials, self.seed = name, Path(root), trials, seed
        self.in_process, self.docker_image, self.train_command = in_process, docker_image, train_command
        self.sampler = optuna.samplers.TPESampler(seed=seed,
                                                  n_startup_trials=max(1, min(10, trials // 3)))
        self.pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_startup_trials,
                                                  n_warmup_steps=prune_warmup_epochs)

    @property
    def mode(self) -> str:
        return "in_process" if self.in_process else "subprocess"

    def plan(self) -> dict[str, Any]:
        """What :meth:`run` would do, read off the objects it would use."""
        return {"tuning_job": self.name, "trials": self.trials, "mode": self.mode,
                "sampler": {"name": type(self.sampler).__name__,
                            # Optuna keeps no seed, only the generator it seeded.
                            "seed": self.seed, **_options(self.sampler, ("n_startup_trials",))},
                "pruner": {"name": type(self.pruner).__name__,
                           **_options(self.pruner, ("percentile", "n_startup_trials",
                                                    "n_warmup_steps", "interval_steps"))},
                "objective": {"metric": OBJECTIVE_METRIC, "direction": "maximize",
                              "ties": f"lower {LOSS_METRIC} wins"},
                "search_space": search_space.describe(self.space),
                "static_hyperparameters": self.static, "root": str(self.root),
                "docker": self.docker_image}

    def run(self, data: Path, *, progress: events.Progress, device: Any = None) -> dict[str, Any]:
        """Run every trial; keep the best trial's model (packed) and drop the others' weights."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.name, direction="maximize",
                                    sampler=self.sampler, pruner=self.pruner)
        cache = None
        if self.in_process:
            from dogbreed.data import DecodeCache

            cache = DecodeCache()
        started = time.monotonic()
        records: list[dict[str, Any]] = []
        events.event("tuning_started", study=self.name, trials=self.trials,
                     sampler=type(self.sampler).__name__, pruner=type(self.pruner).__name__,
                     mode=self.mode, objective=OBJECTIVE_METRIC,
                     space=json.dumps(search_space.describe(self.space), separators=(",", ":")))
        with progress.bar(f"tune {self.name}", total=self.trials, unit="trial") as trials_bar:
            for index in range(self.trials):
                records.append(self._trial(study, index, data, cache, device, progress))
                counts = {s: sum(r["state"] == s for r in records) for s in STATES}
                best = max((r["value"] for r in records if r["state"] == "COMPLETE"), default=None)
                trials_bar.status(f"done={counts['COMPLETE']} pruned={counts['PRUNED']} "
                                  f"failed={counts['FAIL']} best={best}")
                trials_bar.advance()
        return self._result(records, started)

    def _trial(self, study: Any, index: int, data: Path, cache: Any, device: Any,
               progress: events.Progress) -> dict[str, Any]:
        import optuna

        trial = study.ask()
        tuned = search_space.to_strings(search_space.suggest(trial, self.space))
        hps = {**self.static, **tuned}
        epochs = contract.parse_hyperparameters(hps).epochs
        trial_dir = self.root / f"trial-{trial.number:03d}"
        with progress.bar(f"  trial {trial.number} ({index + 1}/{self.trials})", total=epochs,
                          unit="epoch", leave=False) as epoch_bar:

            def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
                epoch_bar.set(epoch)
                epoch_bar.status(f"{OBJECTIVE_METRIC}={metrics.get(OBJECTIVE_METRIC)}")
                score = tuning_score(metrics)
                if score is None:
                    return False
                trial.report(score, epoch)
                return trial.should_prune()

            run: TrainingRun | InProcessRun
            if self.in_process:
                run = InProcessRun(trial_dir, hps, data, cache=cache, device=device,
                                   on_epoch=on_epoch, keep_checkpoints=False)
            else:
                run = TrainingRun(trial_dir, hps, data, docker_image=self.docker_image,
                                  on_epoch=on_epoch, keep_checkpoints=False,
                                  train_command=self.train_command)
            result = run.run()
        record = {"number": trial.number, "hyperparameters": tuned,
                  "epochs_completed": len(result.epochs),
                  "intermediate": [e.get(OBJECTIVE_METRIC) for e in result.epochs],
                  "seconds": round(result.seconds, 1), "dir": str(result.base)}
        if result.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            record.update(state="PRUNED", value=None)
        elif result.returncode == 0 and result.objective is not None:
            score = tuning_score(result.final)
            study.tell(trial, score)
            record.update(state="COMPLETE", value=result.objective, score=score)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            record.update(state="FAIL", value=None, failure=result.failure()
                          or f"exit {result.returncode}; log {result.base / TRAIN_LOG}")
        events.event("trial", study=self.name, number=trial.number, state=record["state"],
                     value=record["value"], epochs_completed=record["epochs_completed"],
                     seconds=record["seconds"], **{k.replace("-", "_"): v for k, v in tuned.items()})
        return record

    def _result(self, records: list[dict[str, Any]], started: float) -> dict[str, Any]:
        complete = [r for r in records if r["state"] == "COMPLETE"]
        if not complete:
            raise LocalError(f"no trial of {self.name} completed: "
                             + "; ".join(f"{r['number']}: {r.get('failure', r['state'])}" for r in records))
        best = max(complete, key=lambda r: r["score"])
        best_dir = Path(best["dir"])
        # Keep the best trial's model; drop the others' weights (tens of MB each).
        for record in records:
            if record is not best:
                shutil.rmtree(Path(record["dir"]) / "model", ignore_errors=True)
        from dogbreed import artifacts

        archive = artifacts.pack(best_dir / "model", best_dir / "output" / artifacts.ARCHIVE_NAME)
        return {
            "tuning_job": self.name,
            "backend": "local",
            "mode": self.mode,
            "objective": {"metric": OBJECTIVE_METRIC, "type": "Maximize",
                          "ties": f"lower {LOSS_METRIC} wins (score = accuracy - "
                                  f"{TIE_BREAK} * loss / (1 + loss))"},
            "search_space": search_space.describe(self.space),
            "static_hyperparameters": self.static,
            "trials": records,
            "counts": {s: sum(r["state"] == s for r in records) for s in STATES},
            "best_trial": best["number"],
            "best_objective": best["value"],
            "best_hyperparameters": {**self.static, **best["hyperparameters"]},
            "best_model_data": str(archive),
            "seconds": round(time.monotonic() - started, 1),
        }
