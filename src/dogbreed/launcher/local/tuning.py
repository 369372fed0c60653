"""Local tuning: an Optuna study over a :mod:`search_space`, trials run as local jobs.

* **Space**: ``full`` (the seeds' lr / batch-size / epochs plus the training-recipe knobs) or
  ``seeds`` — the very ranges the SageMaker tuning request carries.
* **Multi-fidelity**: with the default ``hyperband`` pruner, epochs is the resource (as in
  SageMaker's Hyperband strategy): every trial is set up for ``epochs-max`` epochs and Optuna's
  :class:`~optuna.pruners.HyperbandPruner` stops the weaker ones at its rungs (epochs 1, 3, 9 for
  η=3), so a budget buys several times more configurations than full runs would. ``median``
  keeps epochs in the space and prunes on the median, ``none`` never prunes.
* **Durable**: the study lives in Optuna's RDB storage — SQLite in ``<workdir>/tuning/optuna.db``
  by default, any SQLAlchemy URL (PostgreSQL: several processes or machines share one study)
  with ``storage`` — and every trial is written as it finishes, with its per-epoch curve
  (intermediate values, and the ``curve`` user attribute). Ctrl-C or SIGTERM fails the running
  trial and writes the result so far; a kill loses only the running trial (the storage's
  heartbeat fails it later); ``resume`` continues a study.
* **Budget**: ``time_budget`` seconds of wall clock: no trial starts after it, and a running one
  is stopped at it (after the current batch) and recorded as pruned, its curve kept. Each trial's
  cost is measured from its first timed batches, then from each epoch (:mod:`budget`): a trial
  that cannot reach what it needs before the budget ends (the first trial: all its epochs, since
  a lone trial is never pruned; later ones: the pruner's next rung) is stopped at once, with an
  ``event=time_budget_short`` line naming the ``--epochs-max``/``--image-size``/``--time-budget``
  that would fit (when no trial has an epoch yet and one fits in the time left, that first epoch
  finishes first, so the study has a model to name). A study the budget ended names its best
  trial so far, pruned or not (the best objective at its last reported epoch), with a model: a
  pruned trial's checkpoint is kept while it is the best so far, and its model is finished from
  it (the trainer resumes the checkpoint with no epoch left to train: its best epoch's weights,
  evaluated and exported as any run's).

Each trial is a :class:`~dogbreed.launcher.local.runs.TrainingRun` (its own process, as a
SageMaker HPO trial is) or, ``in_process``, an :class:`~dogbreed.launcher.local.runs.InProcessRun`
sharing one decoded image cache. :meth:`LocalTuning.plan` renders the study (``--dry-run``) from
the very sampler and pruner objects :meth:`LocalTuning.run` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import artifacts, contract
from dogbreed.artifacts import METADATA_FILE
from dogbreed.launcher import budget, events, search_space
from dogbreed.launcher.local.runs import TRAIN_LOG, InProcessRun, LocalError, TrainingRun
from dogbreed.launcher.settings import SettingsError
from dogbreed.metrics import OBJECTIVE_METRIC

# Validation sets are small (20 images in the sample): accuracy comes in coarse steps and trials
# tie. Optuna ranks trials by valid_accuracy with ties broken by lower valid_loss — the rule
# dogbreed.train uses to pick its best epoch — folded into one number below the accuracy step.
TIE_BREAK = 1e-4
LOSS_METRIC = "valid_loss"
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
PRUNERS = ("hyperband", "median", "none")
DEFAULT_SPACE = "full"
STORAGE_FILE = "optuna.db"
# Hyperband's halving rate: rungs at 1, 3, 9 epochs; a third of a rung's trials go on.
REDUCTION_FACTOR = 3
# A process that dies without a word (SIGKILL, power loss) leaves its trial RUNNING; with a
# heartbeat every HEARTBEAT_SECONDS the next process to start a trial fails it after GRACE_SECONDS.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
SCHEMA_ATTEMPTS = 5
TRIAL_ATTRS = ("origin", "curve", "dir", "host", "valid_accuracy", "test_accuracy", "stopped", "failure",
               "model_data", "seconds", "channels_last", "checkpoint")
CHANNELS_LAST = "channels-last"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``"300"``/``"300s"``, ``"5m"``, ``"1.5h"`` → seconds."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"time budget {text!r}: expected a positive number of seconds, or with "
                         "a unit: 90s, 5m, 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2).lower()]


def default_storage(root: Path) -> str:
    """SQLite beside the studies' trial folders: ``<workdir>/tuning/optuna.db``."""
    return f"sqlite:///{Path(root).resolve().parent / STORAGE_FILE}"


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


class TrialFailed(Exception):
    """A trial's training failed (recorded as FAIL; the study goes on)."""


class LocalTuning:
    """One study: the space, the static hyperparameters, the sampler, the pruner and the storage."""

    def __init__(self, *, name: str, root: Path, static_hyperparameters: Mapping[str, str],
                 trials: int | None = 6, time_budget: float | None = None,
                 space: str = DEFAULT_SPACE, pruner: str = "hyperband",
                 epochs_max: int | None = None, seed: int | None = 0,
                 prune_startup_trials: int = 2, prune_warmup_epochs: int = 0,
                 storage: str | None = None, resume: bool = False, default_trial: bool = True,
                 in_process: bool = False, docker_image: str | None = None,
                 train_command: Sequence[str] | None = None) -> None:
        import optuna  # optuna: ~0.5 s, only for a study

        if in_process and docker_image:
            raise SettingsError("--in-process and --docker exclude each other")
        if pruner not in PRUNERS:
            raise SettingsError(f"pruner {pruner!r}: choose one of {', '.join(PRUNERS)}")
        if trials is not None and trials < 1:
            raise SettingsError("--trials must be at least 1")
        if time_budget is not None and time_budget <= 0:
            raise SettingsError("--time-budget must be positive")
        full = search_space.with_epochs_max(search_space.named(space), epochs_max)
        search_space.validate(full)
        self.static = dict(static_hyperparameters)
        overlap = sorted(set(self.static) & {p.name for p in full})
        if overlap:
            raise SettingsError(f"hyperparameter(s) {', '.join(overlap)} are tuned; do not also fix them")
        self.space_name, self.pruner_name = space, pruner
        if pruner == "hyperband":
            # Epochs is the resource, not a searched value: each trial is set up for the most
            # epochs (the cosine schedule spans them) and the pruner decides how many it gets.
            epochs = search_space.get(full, search_space.EPOCHS)
            self.max_epochs = epochs.high if isinstance(epochs, search_space.Integer) else \
                contract.Hyperparameters().epochs
            self.space = search_space.without(full, search_space.EPOCHS)
            self.static[search_space.EPOCHS] = str(self.max_epochs)
            self.pruner: Any = optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=self.max_epochs, reduction_factor=REDUCTION_FACTOR)
        else:
            self.space = full
            epochs = search_space.get(full, search_space.EPOCHS)
            self.max_epochs = epochs.high if isinstance(epochs, search_space.Integer) else None
            self.pruner = (optuna.pruners.MedianPruner(n_startup_trials=prune_startup_trials,
                                                       n_warmup_steps=prune_warmup_epochs)
                           if pruner == "median" else optuna.pruners.NopPruner())
        contract.parse_hyperparameters(self.static)
        self.prune_startup_trials, self.prune_warmup_epochs = prune_startup_trials, prune_warmup_epochs
        self.name, self.root, self.seed = name, Path(root), seed
        # Neither a count nor a budget: the old default of 6 trials.
        self.trials = trials if trials is not None or time_budget is not None else 6
        self.time_budget, self.resume = time_budget, resume
        # A new study's first trials are the known-good points (where the space holds them): the
        # trainer's own recipe for this starting point, then the seeds' tuned hyperparameters.
        # The search starts from them, not only from TPE's random start-up trials, and its best
        # is never worse, on its own objective, than what the seeds shipped.
        self.default_trial = self.defaults_in_space() if default_trial else {}
        seeds_point = self.defaults_in_space(search_space.SEEDS_HYPERPARAMETERS) if default_trial else {}
        self.seeds_trial = seeds_point if seeds_point != self.default_trial else {}
        self.storage_url = storage or default_storage(self.root)
        self.in_process, self.docker_image, self.train_command = in_process, docker_image, train_command
        startup = self.trials if self.trials is not None else 30
        self.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, startup // 3)))
        self._deadline: float | None = None
        self._interrupted: str | None = None  # the signal that asked the study to stop
        self._budget_short: dict[str, Any] | None = None  # why the budget check ended the study
        self._current_run: TrainingRun | InProcessRun | None = None

    @property
    def mode(self) -> str:
        return "in_process" if self.in_process else "subprocess"

    def defaults_in_space(self, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The trainer's defaults (for these static hyperparameters: ``weights=none`` gets the
        scratch recipe), with ``overrides`` on top, for every searched name whose value lies in
        its range (a name whose value does not is left to the sampler)."""
        searched = {p.name for p in self.space}
        fixed = {**self.static, **{k: v for k, v in (overrides or {}).items() if k in searched}}
        if "lr" in searched and "optimizer" not in searched and "optimizer" not in fixed:
            # Every trial gives an lr, and an lr given alone keeps SGD from scratch: a study of
            # this space trains that optimizer, so its defaults point is that optimizer's.
            fixed["optimizer"] = contract.parse_hyperparameters({**fixed, "lr": "1"}).optimizer
        defaults = contract.parse_hyperparameters(fixed).to_dict()
        point: dict[str, Any] = {}
        for param in self.space:
            value = defaults.get(param.name.replace("-", "_"))
            if isinstance(param, search_space.Categorical):
                if value in param.values:
                    point[param.name] = value
            elif isinstance(value, int | float) and param.low <= value <= param.high:
                point[param.name] = value
        return point

    def definition(self) -> dict[str, Any]:
        """What makes two processes' trials comparable: stored with the study, checked on joins."""
        return {"space": search_space.describe(self.space), "static_hyperparameters": self.static,
                "pruner": self.pruner_name}

    def plan(self) -> dict[str, Any]:
        """What :meth:`run` would do, read off the objects it would use."""
        return {"tuning_job": self.name, "trials": self.trials, "time_budget_seconds": self.time_budget,
                "mode": self.mode, "space": self.space_name, "storage": _redact(self.storage_url),
                "resume": self.resume, "default_trial": search_space.to_strings(self.default_trial),
                "seeds_trial": search_space.to_strings(self.seeds_trial),
                "sampler": {"name": type(self.sampler).__name__,
                            # Optuna keeps no seed, only the generator it seeded.
                            "seed": self.seed, **_options(self.sampler, ("n_startup_trials",))},
                "pruner": {"name": type(self.pruner).__name__,
                           **_options(self.pruner, ("percentile", "n_startup_trials",
                                                    "n_warmup_steps", "interval_steps",
                                                    "min_resource", "max_resource",
                                                    "reduction_factor"))},
                "objective": {"metric": OBJECTIVE_METRIC, "direction": "maximize",
                              "ties": f"lower {LOSS_METRIC} wins"},
                "search_space": search_space.describe(self.space),
                "static_hyperparameters": self.static, "root": str(self.root),
                "docker": self.docker_image}

    # -- the study -------------------------------------------------------------------------------
    def storage(self) -> Any:
        import optuna  # optuna: ~0.5 s, only for a study

        url = self.storage_url
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # SQLite: wait for a writer up to 60 s instead of failing at once (several local workers).
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        from sqlalchemy.exc import (  # with optuna's storage
            IntegrityError,
            OperationalError,
            ProgrammingError,
        )

        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                      heartbeat_interval=HEARTBEAT_SECONDS,
                                                      grace_period=GRACE_SECONDS)
            except (IntegrityError, ProgrammingError, OperationalError) as exc:
                # Processes opening an empty database together race to create Optuna's tables
                # (PostgreSQL: "duplicate key ... studydirection"; SQLite: "table ... already
                # exists"); the loser finds them made on the next try.
                if isinstance(exc, OperationalError) and "already exists" not in str(exc):
                    raise
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def open_study(self) -> Any:
        """Create the study, or join it (``resume``, or the same name in a shared storage) after
        checking it searches the same space with the same static hyperparameters."""
        import optuna  # optuna: ~0.5 s, only for a study

        storage = self.storage()
        exists = self.name in {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
        if self.resume and not exists:
            raise SettingsError(f"no study {self.name!r} to resume in {_redact(self.storage_url)}")
        study = optuna.create_study(study_name=self.name, storage=storage, direction="maximize",
                                    sampler=self.sampler, pruner=self.pruner, load_if_exists=True)
        stored = study.user_attrs.get("definition")
        mine = json.loads(json.dumps(self.definition()))
        if stored is None:
            study.set_user_attr("definition", mine)
            for origin, point in (("defaults", self.default_trial), ("seeds", self.seeds_trial)):
                if point:
                    study.enqueue_trial(point, user_attrs={"origin": origin}, skip_if_exists=True)
        elif stored != mine:
            differences = "; ".join(definition_differences(stored, mine)) or \
                f"stored {_compact(stored)}"  # same fields, another order
            raise SettingsError(
                f"study {self.name!r} was created with a different definition ({differences}); "
                "resume it with the same --space/--pruner/--epochs-max and hyperparameters")
        return study

    def run(self, data: Path, *, progress: events.Progress, device: Any = None) -> dict[str, Any]:
        """Run trials until the count or the budget is spent; return the study's result (best so
        far). Interrupted (Ctrl-C, SIGTERM), the result so far is returned with ``interrupted``."""
        import optuna  # optuna: ~0.5 s, only for a study

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        started, wall_started = time.monotonic(), time.time()
        study = self.open_study()
        self.root.mkdir(parents=True, exist_ok=True)
        cache = None
        if self.in_process:
            from dogbreed.data import DecodeCache  # dogbreed.data imports torch

            cache = DecodeCache()
        self._deadline = started + self.time_budget if self.time_budget else None
        self._interrupted = None
        self._budget_short = None
        before = sum(t.state.name != "WAITING" for t in study.get_trials(deepcopy=False))
        events.event("tuning_started", study=self.name, trials=self.trials or "budget",
                     time_budget=self.time_budget or "none", resumed_trials=before,
                     sampler=type(self.sampler).__name__, pruner=type(self.pruner).__name__,
                     mode=self.mode, objective=OBJECTIVE_METRIC, space=self.space_name,
                     storage=_redact(self.storage_url))
        with progress.bar(f"tune {self.name}", total=self.trials, unit="trial") as trials_bar, \
                _stopping_on_signals(self._on_signal):

            def after_trial(study: Any, trial: Any) -> None:
                counts = _counts(study.get_trials(deepcopy=False))
                best = _best(study)
                trials_bar.status(f"done={counts['COMPLETE']} pruned={counts['PRUNED']} "
                                  f"failed={counts['FAIL']} best={best.value if best else None}")
                trials_bar.advance()
                if self._expired() or self._interrupted or self._budget_short:
                    study.stop()

            def objective(trial: Any) -> float:
                return self._trial(study, trial, data, cache, device, progress)

            try:
                if not self._expired():
                    study.optimize(objective, n_trials=self.trials, callbacks=[after_trial],
                                   catch=(TrialFailed,),
                                   timeout=self._deadline - time.monotonic() if self._deadline else None)
            except KeyboardInterrupt as exc:  # a second signal: Optuna failed the running trial
                self._interrupted = str(exc) or "SIGINT"
        interrupted = self._interrupted
        if interrupted:
            events.warning("tuning_interrupted", study=self.name, signal=interrupted,
                           note="finished trials are in the storage; --resume continues")
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pid") == os.getpid()
                and t.datetime_start is not None and t.datetime_start.timestamp() >= wall_started]
        finished = None
        if self._ended_by_budget() and not interrupted:
            try:
                finished = self._finish_best_so_far(study, data, cache, device)
            except (OSError, ValueError, LocalError) as exc:  # the study's result is written anyway
                events.warning("trial_model_unfinished", study=self.name, failure=exc)
        return self._result(study, started, mine, interrupted, finished)

    def _on_signal(self, name: str) -> None:
        """Ctrl-C or SIGTERM: no new trial; the running one stops after its current batch and
        is recorded as failed; then the result so far is written. A second signal stops at once."""
        if self._interrupted:
            raise KeyboardInterrupt(name)
        self._interrupted = name
        events.warning("tuning_stopping", study=self.name, signal=name,
                       note="the running trial stops after its current batch; again to stop now")
        if self._current_run is not None:
            self._current_run.stop()

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _ended_by_budget(self) -> bool:
        return self._budget_short is not None or self._expired()

    def _epochs_needed(self, study: Any, epochs: int, done: int) -> int:
        """The epoch a trial must reach to be worth its time: all of them while the study has no
        complete trial (a lone trial is never pruned: Hyperband promotes the best of one, the
        median pruner waits for its start-up trials) or without a pruner; else the pruner's next
        rung after ``done`` (Hyperband: 1, 3, 9, ... for η=3; median: every epoch after warm-up)."""
        complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
        if self.pruner_name == "hyperband" and complete:
            rungs = [REDUCTION_FACTOR ** k for k in range(epochs) if REDUCTION_FACTOR ** k < epochs]
            return min([r for r in rungs if r > done] or [epochs])
        if self.pruner_name == "median" and complete >= self.prune_startup_trials:
            return min(max(done + 1, self.prune_warmup_epochs + 1), epochs)
        return epochs

    def _short_of_budget(self, study: Any, number: int, epochs: int, done: int,
                         epoch_seconds: float | None, cost: Mapping[str, float],
                         decided: dict[str, Any]) -> bool:
        """Whether trial ``number``, ``done`` epochs in, cannot reach the epoch it needs before
        the budget ends (then: an event line, the trial marked stopped by the budget, and the
        study ended when no later trial could do better). One verdict per trial."""
        if self._deadline is None or not epoch_seconds or epoch_seconds <= 0 or decided.get("budget"):
            return False
        needed = self._epochs_needed(study, epochs, done)
        finish = cost.get("finish", 0.0) if needed == epochs else 0.0
        left = self._deadline - time.monotonic()
        image_size = int(cost["image_size"])
        verdict = budget.fit(epoch_seconds=epoch_seconds, epochs=needed - done, seconds_left=left,
                             image_size=image_size, finish_seconds=finish)
        if verdict.fits:
            return False
        decided["budget"] = True
        has_answer = any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
        # A trial that cannot reach its first rung, or a full trial that cannot finish: no later
        # trial could either (they cost the same), so the study ends. A trial short of a later
        # rung stops; a new one may still reach its first.
        ends_study = done == 0 or needed == epochs
        if not has_answer and self.time_budget:
            # What would fit a new study of this budget: every trial pays its start-up again.
            whole = budget.fit(epoch_seconds=epoch_seconds, epochs=epochs,
                               seconds_left=self.time_budget, image_size=image_size,
                               finish_seconds=finish + cost.get("startup", 0.0))
            measured = "first timed batches" if done == 0 else f"epoch {done}"
            message = (f"time budget too small for one full trial: {whole.message()} (measured "
                       f"on trial {number}'s {measured}; --resume {self.name} with a larger "
                       "--time-budget continues this study)")
            suggestions = whole.suggestions()
        else:
            message = (f"{left:.0f} s of the time budget left cannot take trial {number} from epoch "
                       f"{done} to epoch {needed} (an epoch takes about {epoch_seconds:.1f} s): "
                       f"it stops now{', and the study ends' if ends_study else ''}")
            suggestions = []
        events.warning("time_budget_short", study=self.name, trial=number, epochs_done=done,
                       epochs_needed=needed, epoch_seconds=round(epoch_seconds, 1),
                       seconds_left=round(left, 1), needed_seconds=round(verdict.needed_seconds, 1),
                       action="study_ends" if ends_study else "trial_stops",
                       suggestions="; ".join(suggestions) or None, message=message)
        if ends_study:
            self._budget_short = {"trial": number, "epochs_done": done, "epochs_needed": needed,
                                  "epoch_seconds": round(epoch_seconds, 2),
                                  "seconds_left": round(left, 1), "message": message,
                                  "suggestions": suggestions}
        return True

    def _first_epoch_fits(self, study: Any, number: int, epoch_seconds: float) -> bool:
        """Whether trial ``number``, which the budget check has just ended the study on, should
        finish its first epoch before it stops: no trial has an epoch (so no model to name) and
        one epoch fits in the time left (the budget's timer still stops it at the deadline)."""
        if self._deadline is None or epoch_seconds > self._deadline - time.monotonic():
            return False
        return not any(t.user_attrs.get("curve") for t in study.get_trials(deepcopy=False) if t.number != number)

    def _keep_if_best_so_far(self, study: Any, trial: Any, checkpoints: Path,
                             curve: Sequence[Mapping[str, float]]) -> None:
        """A pruned trial's checkpoint stays while its last score is the study's best so far (a
        budget that ends the study may name it; its model is then finished from the checkpoint);
        the checkpoint it displaces, and any other, is deleted."""
        score = tuning_score(curve[-1]) if curve else None
        files = sorted(checkpoints.glob("checkpoint*.pt")) if checkpoints.is_dir() else []
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        rivals = [t.value for t in others if t.state.name in ("COMPLETE", "PRUNED") and t.value is not None]
        if score is None or not files or (rivals and score <= max(rivals)):
            shutil.rmtree(checkpoints, ignore_errors=True)
            return
        host = socket.gethostname()
        for other in others:
            if other.user_attrs.get("checkpoint") and other.user_attrs.get("host") == host:
                Path(other.user_attrs["checkpoint"]).unlink(missing_ok=True)
        trial.set_user_attr("checkpoint", str(files[0].resolve()))

    def _finish_best_so_far(self, study: Any, data: Path, cache: Any, device: Any) -> tuple[Any, dict[str, Any]] | None:
        """For a study the budget ended: the best trial so far by its last reported score, if
        it is a pruned trial whose checkpoint this host kept, with the model finished from it
        (None: the best complete trial is the answer, as for any study)."""
        host = socket.gethostname()
        candidates = [t for t in study.get_trials(deepcopy=False) if t.value is not None and (
            t.state.name == "COMPLETE" or (t.state.name == "PRUNED" and t.user_attrs.get("host") == host
                                           and Path(t.user_attrs.get("checkpoint") or "-").is_file()))]
        if not candidates:
            return None
        best = max(candidates, key=lambda t: t.value)
        if best.state.name == "COMPLETE":
            return None
        checkpoint = Path(best.user_attrs["checkpoint"])
        trial_dir = Path(best.user_attrs["dir"])
        done = len(best.user_attrs.get("curve") or [])
        # The trainer resumes the checkpoint with no epoch left to train and does what every run
        # does at its end: the best epoch's weights, evaluated, saved, exported and checked.
        hps = {**self.static, **search_space.to_strings(best.params), search_space.EPOCHS: str(done)}
        base = trial_dir / "final"
        run: TrainingRun | InProcessRun
        if self.in_process:
            run = InProcessRun(base, hps, data, cache=cache, device=device, keep_checkpoints=False,
                               inside=self.root, resume_checkpoint=checkpoint)
        else:
            run = TrainingRun(base, hps, data, docker_image=self.docker_image, keep_checkpoints=False,
                              train_command=self.train_command, inside=self.root,
                              resume_checkpoint=checkpoint)
        result = run.run()
        model_dir = base / "model"
        if result.returncode != 0 or result.objective is None or not model_dir.is_dir():
            events.warning("trial_model_unfinished", study=self.name, number=best.number,
                           failure=result.failure() or f"exit {result.returncode}",
                           log=result.base / TRAIN_LOG)
            return None

        archive = artifacts.pack(model_dir, trial_dir / "output" / artifacts.ARCHIVE_NAME)
        # The layout the trial trained in (the finishing run measures its own, and trains nothing).
        attrs = {"model_data": str(archive.resolve()), "valid_accuracy": result.objective,
                 "test_accuracy": result.final.get("test_accuracy"),
                 "channels_last": logged_layout(trial_dir / TRAIN_LOG), "model_dir": str(model_dir)}
        events.event("trial_model_finished", study=self.name, number=best.number, state="PRUNED",
                     epochs_completed=done, valid_accuracy=result.objective, model_data=archive,
                     seconds=round(result.seconds, 1))
        return best, attrs

    def _trial(self, study: Any, trial: Any, data: Path, cache: Any, device: Any,
               progress: events.Progress) -> float:
        import optuna  # optuna: ~0.5 s, only for a study

        trial_dir = self.root / f"trial-{trial.number:03d}"
        trial.set_user_attr("dir", str(trial_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if self._interrupted:  # the signal came between two trials
            failure = f"interrupted by {self._interrupted} before it started"
            trial.set_user_attr("failure", failure)
            raise TrialFailed(failure)
        tuned = search_space.to_strings(search_space.suggest(trial, self.space))
        hps = {**self.static, **tuned}
        epochs = contract.parse_hyperparameters(hps).epochs
        curve: list[dict[str, float]] = []
        decided: dict[str, Any] = {}
        # The trial's measured costs: start-up (process, decode, model) and the finishing
        # evaluations, from its first timed batches.
        cost: dict[str, float] = {"image_size": contract.parse_hyperparameters(hps).image_size}
        run_started = time.monotonic()

        with progress.bar(f"  trial {trial.number}", total=epochs, unit="epoch", leave=False) as epoch_bar:

            def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
                epoch_bar.set(epoch)
                epoch_bar.status(f"{OBJECTIVE_METRIC}={metrics.get(OBJECTIVE_METRIC)}")
                curve.append({"epoch": epoch, **metrics})
                trial.set_user_attr("curve", curve)  # in the storage epoch by epoch
                score = tuning_score(metrics)
                if score is None:
                    return False
                trial.report(score, epoch)
                if decided.get("stop_after_epoch"):
                    return epoch < epochs
                # The last epoch's work is done: the trial is complete, whatever a pruner would
                # say (asking there recorded full 10-epoch runs as pruned).
                if epoch < epochs and trial.should_prune():
                    decided["pruned_at"] = epoch
                    return True
                # The measured epoch (training + validation) corrects the first batches' estimate.
                return epoch < epochs and self._short_of_budget(
                    study, trial.number, epochs, epoch, metrics.get("epoch_seconds"), cost, decided)

            def on_timing(timing: dict[str, Any]) -> None:
                per_image = float(timing["seconds_per_image"])
                cost["startup"] = max(time.monotonic() - run_started - float(timing["seconds"]), 0.0)
                # The final validation, the test split and the ONNX check over it.
                cost["finish"] = per_image * budget.EVAL_COST_RATIO * (
                    timing["valid_images"] + 2 * timing["test_images"])
                estimate = budget.epoch_seconds(per_image, int(timing["train_images"]),
                                                int(timing["valid_images"]))
                if self._short_of_budget(study, trial.number, epochs, 0, estimate, cost, decided):
                    if self._first_epoch_fits(study, trial.number, estimate):
                        decided["stop_after_epoch"] = True  # the study's one chance of a model
                    else:
                        run.stop()

            run: TrainingRun | InProcessRun
            if self.in_process:
                run = InProcessRun(trial_dir, hps, data, cache=cache, device=device,
                                   on_epoch=on_epoch, on_timing=on_timing, keep_checkpoints=True,
                                   inside=self.root)
            else:
                run = TrainingRun(trial_dir, hps, data, docker_image=self.docker_image,
                                  on_epoch=on_epoch, on_timing=on_timing, keep_checkpoints=True,
                                  train_command=self.train_command, inside=self.root)
            timer = None
            if self._deadline is not None:
                # The budget's end stops a running trial after its current batch.
                def budget_spent(run: TrainingRun | InProcessRun = run) -> None:
                    decided["budget"] = True
                    run.stop()

                timer = threading.Timer(max(0.0, self._deadline - time.monotonic()), budget_spent)
                timer.daemon = True
                timer.start()
            self._current_run = run
            run_started = time.monotonic()
            try:
                result = run.run()
            finally:
                self._current_run = None
                if timer is not None:
                    timer.cancel()
        seconds = round(result.seconds, 1)
        trial.set_user_attr("seconds", seconds)
        fields = {k.replace("-", "_"): v for k, v in tuned.items()}
        # A stop that came after the last epoch changes nothing: the run completed.
        completed = not result.pruned and result.returncode == 0 and result.objective is not None
        checkpoints = result.paths.checkpoints_dir
        if result.stopped and self._interrupted and not completed:
            shutil.rmtree(checkpoints, ignore_errors=True)
            failure = f"interrupted by {self._interrupted} after epoch {len(curve)}"
            trial.set_user_attr("failure", failure)
            events.event("trial", study=self.name, number=trial.number, state="FAIL",
                         epochs_completed=len(curve), seconds=seconds, failure=failure, **fields)
            raise TrialFailed(failure)
        if result.pruned or (result.stopped and decided.get("budget") and not completed):
            by_budget = bool(decided.get("budget")) and "pruned_at" not in decided
            if by_budget:
                trial.set_user_attr("stopped", "time_budget")
            events.event("trial", study=self.name, number=trial.number, state="PRUNED",
                         epochs_completed=len(curve), seconds=seconds,
                         reason="time_budget" if by_budget else "pruner", **fields)
            shutil.rmtree(trial_dir / "model", ignore_errors=True)
            self._keep_if_best_so_far(study, trial, checkpoints, curve)
            raise optuna.TrialPruned(f"after epoch {len(curve)}")
        shutil.rmtree(checkpoints, ignore_errors=True)
        if not completed:
            failure = result.failure() or f"exit {result.returncode}; log {result.base / TRAIN_LOG}"
            trial.set_user_attr("failure", failure)
            events.event("trial", study=self.name, number=trial.number, state="FAIL",
                         epochs_completed=len(curve), seconds=seconds, failure=failure, **fields)
            raise TrialFailed(failure)
        score = tuning_score(result.final)
        assert score is not None
        trial.set_user_attr("valid_accuracy", result.objective)
        layout = trained_layout(trial_dir / "model")
        if layout is not None:
            trial.set_user_attr("channels_last", layout)
        if "test_accuracy" in result.final:
            trial.set_user_attr("test_accuracy", result.final["test_accuracy"])
        best = _best(study)
        if best is None or score > best.value:
            # A new best: its model is packed now, so a study stopped any time later has one.

            archive = artifacts.pack(trial_dir / "model", trial_dir / "output" / artifacts.ARCHIVE_NAME)
            trial.set_user_attr("model_data", str(archive.resolve()))
        else:
            shutil.rmtree(trial_dir / "model", ignore_errors=True)  # tens of MB each
        events.event("trial", study=self.name, number=trial.number, state="COMPLETE",
                     value=result.objective, epochs_completed=len(curve), seconds=seconds, **fields)
        return score

    def _result(self, study: Any, started: float, mine: Sequence[Any],
                interrupted: str | None,
                finished: tuple[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        records = [_record(t) for t in trials]
        best = _best(study)
        attrs: dict[str, Any] = dict(best.user_attrs) if best is not None else {}
        if finished is not None:  # the budget ended the study on a pruned trial's better score
            best, extra = finished
            attrs = {**best.user_attrs, **extra}
        # The answer first (what a reader or `jq .best_trial` wants), the study's details after.
        result: dict[str, Any] = {"tuning_job": self.name, "best_trial": None}
        if best is not None:
            best_dir = Path(attrs["dir"])
            self._drop_other_models(trials, best)
            result.update({
                "best_trial": best.number,
                "best_objective": attrs.get("valid_accuracy"),
                "best_test_accuracy": attrs.get("test_accuracy"),
                "best_model_data": attrs.get("model_data"),
                # Retraining a pruned trial trains it for all its epochs (the study's setting).
                "best_hyperparameters": reproducing_hyperparameters(
                    {**self.static, **search_space.to_strings(best.params)}, attrs),
                "best_model_dir": attrs.get("model_dir") or str(best_dir / "model"),
                "best_host": attrs.get("host"),
            })
            if best.state.name == "PRUNED":
                epochs_done = len(attrs.get("curve") or [])
                planned = result["best_hyperparameters"].get(search_space.EPOCHS, epochs_done)
                result["best_state"] = (
                    f"PRUNED after epoch {epochs_done} of {planned} "
                    f"({'time budget' if attrs.get('stopped') else 'pruner'}): the best score when "
                    "the time budget ended the study; its model is its best epoch's")
        result.update({
            "counts": _counts(trials),
            "seconds": round(time.monotonic() - started, 1),
            "backend": "local",
            "mode": self.mode,
            "storage": _redact(self.storage_url),
            "space": self.space_name,
            "pruner": {"name": type(self.pruner).__name__, "max_epochs": self.max_epochs},
            "objective": {"metric": OBJECTIVE_METRIC, "type": "Maximize",
                          "ties": f"lower {LOSS_METRIC} wins (score = accuracy - "
                                  f"{TIE_BREAK} * loss / (1 + loss))"},
            "static_hyperparameters": self.static,
            "time_budget_seconds": self.time_budget,
            "this_process": {"trials": [t.number for t in mine], "counts": _counts(mine)},
            "search_space": search_space.describe(self.space),
            "trials": records,
        })
        if interrupted:
            result["interrupted"] = interrupted
        if self._budget_short is not None:
            result["budget_short"] = self._budget_short
        if best is None and self._budget_short is not None:
            result["error"] = (f"no trial of {self.name} completed: {self._budget_short['message']} "
                               f"(the study is kept in {_redact(self.storage_url)})")
        elif best is None:
            failures = "; ".join(f"{r['number']}: {r.get('failure') or r.get('stopped') or r['state']}"
                                 for r in records)
            result.update(error=(
                f"no trial of {self.name} completed (the study is kept in "
                f"{_redact(self.storage_url)}; --resume {self.name} continues): {failures}"))
        return result

    def _drop_other_models(self, trials: Sequence[Any], best: Any) -> None:
        """Packed models of trials that were the best once, on this host, under this study."""
        host = socket.gethostname()
        for trial in trials:
            if trial.number == best.number or trial.user_attrs.get("host") != host:
                continue
            trial_dir = Path(trial.user_attrs.get("dir", ""))
            if trial.user_attrs.get("model_data") and trial_dir.parent == self.root.resolve() \
                    and trial.state.name != "RUNNING":
                shutil.rmtree(trial_dir / "model", ignore_errors=True)
                Path(trial.user_attrs["model_data"]).unlink(missing_ok=True)


def trained_layout(model_dir: Path) -> str | None:
    """The memory layout a finished run trained in (``"true"``: channels_last), from its
    model.json; None when it does not say."""
    try:
        metrics = json.loads((Path(model_dir) / METADATA_FILE).read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    value = metrics.get("channels_last") if isinstance(metrics, dict) else None
    return None if value is None else ("true" if value else "false")


_LAYOUT_LINE = re.compile(r"\bevent=cpu_layout channels_last=(True|False)\b")


def logged_layout(train_log: Path) -> str | None:
    """The CPU memory layout a run's trainer chose, from its log (``"true"``: channels_last);
    None when the log does not say (an in-process trial logs to the launcher's stderr)."""
    try:
        match = _LAYOUT_LINE.search(Path(train_log).read_text(errors="replace"))
    except OSError:
        return None
    return None if match is None else match.group(1).lower()


def reproducing_hyperparameters(hyperparameters: Mapping[str, str],
                                trial_attrs: Mapping[str, Any]) -> dict[str, str]:
    """A trial's hyperparameters, made to reproduce it: ``channels-last=auto`` (the default)
    picks the CPU layout by timing, and the layouts round differently (a retrain matched the
    trial at epoch 1 and drifted from epoch 2), so the layout the trial measured is pinned."""
    out = dict(hyperparameters)
    layout = trial_attrs.get("channels_last")
    if layout and contract.parse_hyperparameters(out).channels_last == "auto":
        out[CHANNELS_LAST] = layout
    return out


def definition_differences(stored: Any, given: Any, field: str = "") -> list[str]:
    """Each field where two study definitions differ, as ``field: stored X, given Y`` (the
    space compared parameter by parameter, e.g. ``space.lr.high``)."""
    def by_name(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(p, dict) and "name" in p for p in value):
            return {p["name"]: p for p in value}
        return value

    stored, given = by_name(stored), by_name(given)
    if not (isinstance(stored, dict) and isinstance(given, dict)):
        return [] if stored == given else [
            f"{field}: stored {_compact(stored)}, given {_compact(given)}"]
    out: list[str] = []
    for key in [*stored, *(k for k in given if k not in stored)]:
        inner = f"{field}.{key}" if field else str(key)
        if key not in given:
            out.append(f"{inner}: stored {_compact(stored[key])}, given (unset)")
        elif key not in stored:
            out.append(f"{inner}: stored (unset), given {_compact(given[key])}")
        else:
            out += definition_differences(stored[key], given[key], inner)
    return out


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _best(study: Any) -> Any:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: t.value) if complete else None


def _counts(trials: Sequence[Any]) -> dict[str, int]:
    return {s: sum(t.state.name == s for t in trials) for s in STATES}


def _record(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    curve = attrs.get("curve") or []
    record = {"number": trial.number, "state": trial.state.name,
              "hyperparameters": search_space.to_strings(trial.params),
              "value": attrs.get("valid_accuracy") if trial.state.name == "COMPLETE" else None,
              "score": trial.value,
              "epochs_completed": len(curve),
              "intermediate": [point.get(OBJECTIVE_METRIC) for point in curve],
              "curve": curve}
    record.update({k: attrs[k] for k in TRIAL_ATTRS if k in attrs and k not in ("curve", "valid_accuracy")})
    return record


def _redact(url: str) -> str:
    """A storage URL without its password (it goes to logs and result files)."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


@contextlib.contextmanager
def _stopping_on_signals(on_signal: Any) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM call ``on_signal(name)`` instead of raising mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        on_signal(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
