"""The local backend: the same training entry point, Optuna tuning and a local MME, on this machine.

* Training runs ``python -m dogbreed.train`` (or ``docker run <train image> train``) against a
  fresh ``/opt/ml`` layout under the work dir, exactly as a SageMaker job or HPO trial would, and
  packs ``model/`` into ``output/model.tar.gz`` as SageMaker does.
* Tuning samples :data:`search_space.SEARCH_SPACE` with Optuna (TPE) and prunes trials with a
  median rule fed by the per-epoch metric lines the trial prints — parsed with the very
  ``MetricDefinitions`` regexes SageMaker uses.
* The endpoint is a :class:`~dogbreed.launcher.router.Router` in front of a multi-model
  ``dogbreed-serve`` (MMS), over a model store folder of ``<name>/model.tar.gz``.

Work dir layout (``--workdir``, default ``.dogbreed``)::

    jobs/<job>/            one /opt/ml per training job (model/, output/, train.log)
    tuning/<study>/        one /opt/ml per trial;  tuning/<study>.json  the result
    models/<name>/model.tar.gz                     the local endpoint's model store
    endpoint/              state.json, router + MMS run dirs, endpoint.log
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import contract
from dogbreed.artifacts import ARCHIVE_NAME, validate_model_archive
from dogbreed.launcher import events, search_space
from dogbreed.launcher.router import ModelStore, Router
from dogbreed.launcher.settings import Settings, SettingsError

EPOCH_LINE = re.compile(r"^epoch=(\d+)\s")
@functools.cache
def objective_metric() -> str:
    """dogbreed.train.OBJECTIVE_METRIC, read lazily: train imports torch, and `dogbreed status`
    or `invoke` should start fast."""
    from dogbreed.train import OBJECTIVE_METRIC

    return OBJECTIVE_METRIC


@functools.cache
def _metric_patterns() -> list[tuple[str, re.Pattern[str]]]:
    from dogbreed.train import METRIC_DEFINITIONS

    return [(d["Name"], re.compile(d["Regex"])) for d in METRIC_DEFINITIONS]
STATE_FILE = "state.json"
TRAIN_LOG = "train.log"
PRUNE_GRACE_SECONDS = 30.0
# The entry point, run as SageMaker runs it (the train image's `train` runs the same module).
TRAIN_COMMAND = (sys.executable, "-m", "dogbreed.train")


class LocalError(RuntimeError):
    """A local job or endpoint failed; the message says why (and where the log is)."""


# Validation sets are small (20 images in the sample): accuracy comes in coarse steps and trials
# tie. Optuna ranks trials by valid_accuracy with ties broken by lower valid_loss — the rule
# dogbreed.train uses to pick its best epoch — folded into one number below the accuracy step.
TIE_BREAK = 1e-4
LOSS_METRIC = "valid_loss"


def tuning_score(metrics: Mapping[str, float]) -> float | None:
    """valid_accuracy, minus less than ``TIE_BREAK`` for a higher valid_loss (None: no value)."""
    accuracy = metrics.get(objective_metric())
    if accuracy is None:
        return None
    loss = metrics.get(LOSS_METRIC)
    if loss is None or loss != loss or loss < 0:  # missing or NaN
        return accuracy - TIE_BREAK
    return accuracy - TIE_BREAK * (loss / (1.0 + loss))


def parse_metrics(line: str) -> dict[str, float]:
    """The metrics in one log line, found with the SageMaker ``MetricDefinitions`` regexes."""
    found = {}
    for name, pattern in _metric_patterns():
        match = pattern.search(line)
        if match:
            found[name] = float(match.group(1))
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def imagenet_weights_cached(arch: str) -> bool:
    """Whether torchvision's ImageNet weights for ``arch`` are already on disk (no download)."""
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def default_weights(hyperparameters: Mapping[str, str], explicit: bool) -> dict[str, str]:
    """Offline, ``weights=imagenet`` would fail every run: fall back to ``none`` unless asked."""
    hps = dict(hyperparameters)
    if explicit or hps.get("weights", contract.Hyperparameters.weights) != "imagenet":
        return hps
    arch = hps.get("model", contract.Hyperparameters.model)
    if not imagenet_weights_cached(arch):
        hps["weights"] = "none"
        events.warning("weights_default", weights="none", arch=arch,
                       reason="imagenet weights not cached and not asked for; pass --weights imagenet to insist")
    return hps


# --- one training run ----------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    returncode: int
    base: Path
    epochs: list[dict[str, float]]
    final: dict[str, float]
    pruned: bool = False
    seconds: float = 0.0

    @property
    def paths(self) -> contract.Paths:
        return contract.Paths.from_env({contract.BASE_DIR_ENV: str(self.base)})

    def failure(self) -> str | None:
        file = self.paths.failure_file
        return file.read_text().strip() if file.is_file() else None

    @property
    def objective(self) -> float | None:
        return self.final.get(objective_metric())


class TrainingRun:
    """``dogbreed.train`` in a subprocess (or the train image in docker) against ``base``.

    ``on_epoch(epoch, metrics)`` is called for each per-epoch line and may return ``True`` to
    stop the run (SIGTERM: the entry point stops after the current batch and checkpoints).
    """

    def __init__(self, base: Path, hyperparameters: Mapping[str, str], data: Path, *,
                 docker_image: str | None = None, docker: str = "docker",
                 echo: Callable[[str], None] | None = None,
                 on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
                 keep_checkpoints: bool = True, train_command: Sequence[str] | None = None) -> None:
        self.base = Path(base).resolve()
        self.train_command = list(train_command or TRAIN_COMMAND)
        self.hyperparameters = dict(hyperparameters)
        self.data = Path(data).resolve()
        self.docker_image = docker_image
        self.docker = docker
        self.echo = echo
        self.on_epoch = on_epoch
        self.keep_checkpoints = keep_checkpoints
        self.process: subprocess.Popen[str] | None = None
        self._kill_timer: threading.Timer | None = None
        self.container = f"dogbreed-{self.base.name}-{os.getpid()}"

    def prepare(self) -> contract.Paths:
        if not (self.data / "train").is_dir():
            raise SettingsError(f"{self.data} has no train/ folder (expected train/ valid/ test/)")
        if self.base.exists():
            shutil.rmtree(self.base)
        paths = contract.prepare_local_job(self.base, self.hyperparameters,
                                           {contract.TRAINING_CHANNEL: self.data})
        if self.docker_image:
            # A link to a host path means nothing in the container: the data is mounted there.
            link = contract.channel_dir(contract.TRAINING_CHANNEL, paths, {})
            link.unlink()
            link.mkdir()
        return paths

    def command(self, paths: contract.Paths) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", contract.BASE_DIR_ENV: str(paths.base)}
        for name in (contract.SM_HPS, contract.SM_MODEL_DIR, contract.SM_OUTPUT_DIR,
                     contract.SM_OUTPUT_DATA_DIR, contract.SM_CHANNELS, contract.CHECKPOINT_DIR_ENV):
            env.pop(name, None)
        if not self.docker_image:
            return list(self.train_command), env
        container = contract.Paths.from_env({})
        channel = contract.channel_dir(contract.TRAINING_CHANNEL, container, {})
        command = [self.docker, "run", "--rm", "--network", "host", "--name", self.container,
                   "-v", f"{paths.base}:{container.base}",
                   "-v", f"{self.data}:{channel}:ro"]
        if hasattr(os, "getuid") and os.getuid() != 0:
            command += ["--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
        return [*command, self.docker_image, "train"], env

    def run(self) -> RunResult:
        paths = self.prepare()
        command, env = self.command(paths)
        log_path = paths.base / TRAIN_LOG
        started = time.monotonic()
        epochs: list[dict[str, float]] = []
        final: dict[str, float] = {}
        pruned = False
        with open(log_path, "w", encoding="utf-8") as log_file:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                                            start_new_session=True)
            try:
                assert self.process.stdout is not None
                for line in self.process.stdout:
                    log_file.write(line)
                    log_file.flush()
                    if self.echo:
                        self.echo(line.rstrip("\n"))
                    metrics = parse_metrics(line)
                    if not metrics:
                        continue
                    final.update(metrics)
                    match = EPOCH_LINE.match(line)
                    if match and not pruned:
                        epochs.append({"epoch": int(match.group(1)), **metrics})
                        if self.on_epoch and self.on_epoch(int(match.group(1)), metrics):
                            pruned = True
                            self.terminate()
                returncode = self.process.wait()
            except BaseException:
                self.kill()
                raise
            finally:
                if self._kill_timer is not None:
                    self._kill_timer.cancel()
        if not self.keep_checkpoints:
            shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
        return RunResult(returncode, paths.base, epochs, final, pruned, time.monotonic() - started)

    def terminate(self) -> None:
        """SIGTERM, as SageMaker stops a job; the entry point stops after the current batch."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.docker_image:
            subprocess.run([self.docker, "stop", "-t", str(int(PRUNE_GRACE_SECONDS)), self.container],
                           capture_output=True, check=False)
        else:
            self.process.send_signal(signal.SIGTERM)
        self._kill_timer = threading.Timer(PRUNE_GRACE_SECONDS, self.kill)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class _Pruned(Exception):
    """Raised from the per-epoch callback to end a pruned in-process trial."""


class InProcessRun:
    """One trial through ``dogbreed.train.run`` in this process, same interface as TrainingRun.

    Trials share ``cache`` (a :class:`dogbreed.data.DecodeCache`), so JPEG decode — and on a GPU
    the upload of the uint8 cache — is paid once for the whole study instead of once per trial.
    Epoch lines go to the trial's ``train.log``, as a subprocess trial's do.
    """

    def __init__(self, base: Path, hyperparameters: Mapping[str, str], data: Path, *,
                 cache: Any, device: Any = None,
                 on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
                 keep_checkpoints: bool = True) -> None:
        self.base = Path(base).resolve()
        self.hyperparameters = dict(hyperparameters)
        self.data = Path(data).resolve()
        self.cache = cache
        self.device = device
        self.on_epoch = on_epoch
        self.keep_checkpoints = keep_checkpoints

    def run(self) -> RunResult:
        from dogbreed import train

        if self.base.exists():
            shutil.rmtree(self.base)
        paths = contract.prepare_local_job(self.base, self.hyperparameters,
                                           {contract.TRAINING_CHANNEL: self.data})
        started = time.monotonic()
        epochs: list[dict[str, float]] = []
        final: dict[str, float] = {}
        pruned, returncode = False, 0

        def on_epoch(result: Any) -> None:
            metrics = {k: v for k, v in dataclasses.asdict(result).items() if k in train.METRIC_NAMES}
            epochs.append({"epoch": result.epoch, **metrics})
            final.update(metrics)
            if self.on_epoch and self.on_epoch(result.epoch, metrics):
                raise _Pruned()

        with open(paths.base / TRAIN_LOG, "w", encoding="utf-8") as log_file, \
                contextlib.redirect_stdout(log_file):
            try:
                hp = contract.parse_hyperparameters(self.hyperparameters)
                outcome = train.run(hp, paths, on_epoch=on_epoch, device=self.device, cache=self.cache)
                final.update({k: v for k, v in outcome.metrics.items()
                              if k in train.METRIC_NAMES and isinstance(v, float)})
            except _Pruned:
                pruned = True
            except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the study goes on
                contract.write_failure(f"{type(exc).__name__}: {exc}", paths)
                returncode = train.EXIT_FAILURE
        if not self.keep_checkpoints:
            shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
        return RunResult(returncode, paths.base, epochs, final, pruned, time.monotonic() - started)


# --- the backend -------------------------------------------------------------------------------------
class LocalBackend:
    def __init__(self, settings: Settings, *, docker_image: str | None = None,
                 progress: events.Progress | None = None,
                 train_command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.train_command = train_command
        self.workdir = settings.workdir_path.resolve()
        self.docker_image = docker_image
        self.progress = progress or events.Progress()

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.workdir / "models")

    @property
    def endpoint_dir(self) -> Path:
        return self.workdir / "endpoint"

    # -- training
    def train(self, *, name: str, hyperparameters: Mapping[str, str], data: Path,
              echo: bool = True) -> dict[str, Any]:
        contract.parse_hyperparameters(hyperparameters)
        base = self.workdir / "jobs" / name
        events.event("training_started", job=name, base=base, docker=self.docker_image or "no",
                     **{k.replace("-", "_"): v for k, v in hyperparameters.items()})
        run = TrainingRun(base, hyperparameters, data, docker_image=self.docker_image,
                          train_command=self.train_command, echo=(lambda line: print(line, file=sys.stderr, flush=True)) if echo else None)
        result = run.run()
        if result.returncode != 0:
            raise LocalError(f"training job {name} failed (exit {result.returncode}): "
                             f"{result.failure() or 'no failure file'}; log: {base / TRAIN_LOG}")
        paths = result.paths
        from dogbreed import artifacts

        archive = artifacts.pack(paths.model_dir, paths.output_dir / artifacts.ARCHIVE_NAME)
        out = {"training_job": name, "status": "Completed", "model_data": str(archive),
               "model_dir": str(paths.model_dir), "output_data": str(paths.output_data_dir),
               "final_metrics": result.final, "seconds": round(result.seconds, 1)}
        events.event("training_completed", job=name, model_data=archive,
                     valid_accuracy=result.objective, seconds=round(result.seconds, 1))
        return out

    def job_archive(self, job: str) -> Path:
        archive = self.workdir / "jobs" / job / "output" / ARCHIVE_NAME
        if not archive.is_file():
            raise SettingsError(f"no local training job {job!r} with a model "
                                f"(looked for {archive})")
        return archive

    # -- tuning
    def tune(self, *, name: str, data: Path, static_hyperparameters: Mapping[str, str],
             trials: int = 6, epochs_max: int | None = None, seed: int | None = 0,
             prune_startup_trials: int = 2, prune_warmup_epochs: int = 0,
             output: Path | None = None, in_process: bool = False,
             device: Any = None) -> dict[str, Any]:
        """Optuna study over the search space. ``in_process``: trials run back to back in this
        process sharing one decoded image cache (the fast path on a GPU); otherwise each trial
        is its own process, as a SageMaker HPO trial is."""
        import optuna

        space = search_space.with_epochs_max(search_space.SEARCH_SPACE, epochs_max)
        search_space.validate(space)
        static = dict(static_hyperparameters)
        overlap = sorted(set(static) & {p.name for p in space})
        if overlap:
            raise SettingsError(f"hyperparameter(s) {', '.join(overlap)} are tuned; do not also fix them")
        contract.parse_hyperparameters(static)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed,
                                             n_startup_trials=max(1, min(10, trials // 3)))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_startup_trials,
                                             n_warmup_steps=prune_warmup_epochs)
        study = optuna.create_study(study_name=name, direction="maximize", sampler=sampler,
                                    pruner=pruner)
        root = self.workdir / "tuning" / name
        if in_process and self.docker_image:
            raise SettingsError("--in-process and --docker exclude each other")
        cache = None
        if in_process:
            from dogbreed.data import DecodeCache

            cache = DecodeCache()
        started = time.monotonic()
        records: list[dict[str, Any]] = []
        events.event("tuning_started", study=name, trials=trials, sampler="TPE",
                     mode="in_process" if in_process else "subprocess",
                     pruner="MedianPruner", objective=objective_metric(),
                     space=json.dumps(search_space.describe(space), separators=(",", ":")))
        for index in range(trials):
            trial = study.ask()
            tuned = search_space.to_strings(search_space.suggest(trial, space))
            hps = {**static, **tuned}
            label = f"trial-{trial.number:03d} ({index + 1}/{trials})"

            def on_epoch(epoch: int, metrics: dict[str, float], trial: Any = trial,
                         label: str = label) -> bool:
                score = tuning_score(metrics)
                self.progress.update(f"{label} epoch {epoch} "
                                     f"{objective_metric()}={metrics.get(objective_metric())}")
                if score is None:
                    return False
                trial.report(score, epoch)
                return trial.should_prune()

            trial_dir = root / f"trial-{trial.number:03d}"
            run: TrainingRun | InProcessRun
            if in_process:
                run = InProcessRun(trial_dir, hps, data, cache=cache, device=device,
                                   on_epoch=on_epoch, keep_checkpoints=False)
            else:
                run = TrainingRun(trial_dir, hps, data, docker_image=self.docker_image,
                                  on_epoch=on_epoch, keep_checkpoints=False,
                                  train_command=self.train_command)
            result = run.run()
            self.progress.close()
            record = {"number": trial.number, "hyperparameters": tuned,
                      "epochs_completed": len(result.epochs),
                      "intermediate": [e.get(objective_metric()) for e in result.epochs],
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
            records.append(record)
            events.event("trial", study=name, number=trial.number, state=record["state"],
                         value=record["value"], epochs_completed=record["epochs_completed"],
                         seconds=record["seconds"],
                         **{k.replace("-", "_"): v for k, v in tuned.items()})
        complete = [r for r in records if r["state"] == "COMPLETE"]
        if not complete:
            raise LocalError(f"no trial of {name} completed: "
                             + "; ".join(f"{r['number']}: {r.get('failure', r['state'])}" for r in records))
        best = max(complete, key=lambda r: r["score"])
        best_dir = Path(best["dir"])
        # Keep the best trial's model; drop the others' weights (tens of MB each).
        for record in records:
            if record is not best:
                shutil.rmtree(Path(record["dir"]) / "model", ignore_errors=True)
        from dogbreed import artifacts

        archive = artifacts.pack(best_dir / "model", best_dir / "output" / artifacts.ARCHIVE_NAME)
        result = {
            "tuning_job": name,
            "backend": "local",
            "mode": "in_process" if in_process else "subprocess",
            "objective": {"metric": objective_metric(), "type": "Maximize",
                          "ties": f"lower {LOSS_METRIC} wins (score = accuracy - "
                                  f"{TIE_BREAK} * loss / (1 + loss))"},
            "search_space": search_space.describe(space),
            "static_hyperparameters": static,
            "trials": records,
            "counts": {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "best_trial": best["number"],
            "best_objective": best["value"],
            "best_hyperparameters": {**static, **best["hyperparameters"]},
            "best_model_data": str(archive),
            "seconds": round(time.monotonic() - started, 1),
        }
        # Always under the work dir (so `train --from-tuning-job NAME` finds it), and at --output.
        path = self.workdir / "tuning" / f"{name}.json"
        for target in (path, output):
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(result, indent=2) + "\n")
        path = output or path
        result["result_file"] = str(path)
        events.event("tuning_completed", study=name, best_trial=best["number"],
                     best_objective=best["value"], complete=result["counts"]["COMPLETE"],
                     pruned=result["counts"]["PRUNED"], failed=result["counts"]["FAIL"],
                     seconds=result["seconds"], result=path)
        return result

    def best_hyperparameters(self, tuning_job: str) -> dict[str, str]:
        path = Path(tuning_job)
        if not path.is_file():
            path = self.workdir / "tuning" / f"{tuning_job}.json"
        if not path.is_file():
            raise SettingsError(f"no local tuning result {tuning_job!r} (looked for {path})")
        return dict(json.loads(path.read_text())["best_hyperparameters"])

    # -- model store
    def add_model(self, name: str, *, training_job: str | None = None,
                  file: Path | None = None) -> dict[str, Any]:
        if (training_job is None) == (file is None):
            raise SettingsError("give exactly one of --job or --file")
        archive = self.job_archive(training_job) if training_job else Path(file)  # type: ignore[arg-type]
        if not archive.is_file():
            raise SettingsError(f"no such file {archive}")
        try:
            validate_model_archive(archive)  # nothing reaches the store that a server cannot load
            target = self.store.add(name, archive)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        target_model = target.relative_to(self.store.root).as_posix()
        events.event("model_added", name=name, path=target, target_model=target_model)
        return {"model": name, "uri": str(target), "target_model": target_model}

    # -- endpoint
    def endpoint(self, port: int | None = None, max_loaded: int | None = None) -> LocalEndpoint:
        return LocalEndpoint(self.store.root, self.endpoint_dir,
                             endpoint_name=self.settings.endpoint_name,
                             port=self.settings.port if port is None else port,
                             max_loaded=max_loaded or self.settings.max_loaded_models)

    def state(self) -> dict[str, Any] | None:
        path = self.endpoint_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if not _pid_alive(state.get("pid", -1)) or not _is_endpoint_process(state["pid"]):
            return None  # stale: the endpoint died without cleaning up (or its pid was reused)
        return state

    def serve_forever(self, port: int | None = None, max_loaded: int | None = None) -> None:
        """Run the endpoint in this process until SIGTERM/SIGINT (``dogbreed deploy --local``)."""
        stop = threading.Event()

        def handle(signum: int, _frame: Any) -> None:
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self.endpoint(port, max_loaded) as endpoint:
                state = {"pid": os.getpid(), "url": endpoint.url,
                         "endpoint_name": self.settings.endpoint_name,
                         "model_server_url": endpoint.model_server_url,
                         "store": str(self.store.root)}
                _write_json(self.endpoint_dir / STATE_FILE, state)
                events.event("endpoint_ready", **state)
                while not stop.wait(1.0):
                    pass
        finally:
            (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            events.event("endpoint_stopped", endpoint=self.settings.endpoint_name)

    def deploy_detached(self, port: int | None = None, max_loaded: int | None = None,
                        timeout: float = 180.0) -> dict[str, Any]:
        """Start ``dogbreed deploy --local --foreground`` in the background; wait until it answers."""
        existing = self.state()
        if existing:
            raise LocalError(f"a local endpoint is already running at {existing['url']} "
                             f"(pid {existing['pid']}); `dogbreed cleanup --local` stops it")
        self.endpoint_dir.mkdir(parents=True, exist_ok=True)
        (self.endpoint_dir / STATE_FILE).unlink(missing_ok=True)
        log_path = self.endpoint_dir / "endpoint.log"
        command = [sys.executable, "-m", "dogbreed.launcher.cli", "deploy", "--local", "--foreground",
                   "--workdir", str(self.workdir), "--endpoint-name", self.settings.endpoint_name,
                   "--port", str(self.settings.port if port is None else port),
                   "--max-loaded-models", str(max_loaded or self.settings.max_loaded_models)]
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and state["pid"] == process.pid:
                return {**state, "log": str(log_path)}
            if process.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise LocalError(f"local endpoint exited with {process.returncode}:\n{tail}")
            time.sleep(0.5)
        process.terminate()
        raise LocalError(f"local endpoint not ready after {timeout:.0f}s; log: {log_path}")

    def stop_endpoint(self, timeout: float = 60.0) -> dict[str, Any] | None:
        state = self.state()
        if state is None:
            return None
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
        events.event("endpoint_stopped", pid=state["pid"], url=state["url"])
        return state

    def status(self) -> dict[str, Any]:
        state = self.state()
        endpoint = None
        if state:
            endpoint = {"url": state["url"], "pid": state["pid"], "name": state["endpoint_name"]}
            try:
                import urllib.request

                with urllib.request.urlopen(state["url"] + "/models", timeout=5) as reply:
                    endpoint["loaded"] = json.loads(reply.read())["loaded"]
            except OSError as exc:
                endpoint["error"] = str(exc)
        jobs = sorted(p.name for p in (self.workdir / "jobs").glob("*") if p.is_dir())
        tunings = sorted(p.stem for p in (self.workdir / "tuning").glob("*.json"))
        return {"workdir": str(self.workdir), "endpoint": endpoint, "models": self.store.targets(),
                "training_jobs": jobs, "tuning_jobs": tunings}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_endpoint_process(pid: int) -> bool:
    """Whether ``pid`` runs ``dogbreed … deploy`` (so a reused pid is never signalled)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (not Linux): trust the state file
    return b"deploy" in argv and any(b"dogbreed" in arg for arg in argv)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    from dogbreed.artifacts import atomic_write

    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())


class LocalEndpoint:
    """A multi-model ``dogbreed-serve`` (MMS) on a free port + the router in front of it.

    ``model_server_url`` skips starting MMS and routes to a server that is already running
    (tests use a fake one). Usable as a context manager; ``stop`` stops what ``start`` started.
    """

    def __init__(self, store_dir: Path, run_dir: Path, *, endpoint_name: str | None = None,
                 port: int = 0, max_loaded: int = 4, model_server_url: str | None = None,
                 ready_timeout: float = 120.0) -> None:
        self.store_dir = Path(store_dir)
        self.run_dir = Path(run_dir)
        self.endpoint_name = endpoint_name
        self.port = port
        self.max_loaded = max_loaded
        self.model_server_url = model_server_url
        self.ready_timeout = ready_timeout
        self.server: Any = None
        self.router: Router | None = None

    @property
    def url(self) -> str:
        assert self.router is not None, "endpoint is not started"
        return self.router.url

    def start(self) -> LocalEndpoint:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.model_server_url is None:
                from dogbreed.serve.server import ModelServer

                mms_dir = self.run_dir / "mms"
                if mms_dir.exists():
                    shutil.rmtree(mms_dir)
                options: dict[str, Any] = {}
                if "log_file" in inspect.signature(ModelServer).parameters:
                    options["log_file"] = self.run_dir / "model-server.log"
                self.server = ModelServer(port=free_port(), host="127.0.0.1", run_dir=mms_dir,
                                          multi_model=True, **options)
                started = time.monotonic()
                self.server.start()
                self.server.wait_ready(self.ready_timeout)
                self.model_server_url = self.server.url
                events.event("model_server_ready", url=self.model_server_url,
                             seconds=round(time.monotonic() - started, 1))
            work = self.run_dir / "router-models"
            if work.exists():
                shutil.rmtree(work)
            self.router = Router(self.store_dir, self.model_server_url, work,
                                 endpoint_name=self.endpoint_name, max_loaded=self.max_loaded,
                                 port=self.port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        if self.server is not None:
            self.server.stop()
            self.server = None
            events.event("model_server_stopped")

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tune_in_process(data: Path, workdir: Path, *, trials: int, device: Any = None,
                    base_hyperparameters: Mapping[str, str] | None = None,
                    epochs_max: int | None = None) -> dict[str, Any]:
    """A local study with every trial in this process sharing one decode (for benchmarks)."""
    backend = LocalBackend(Settings(workdir=str(workdir)))
    return backend.tune(name="bench-tune", data=data, trials=trials, epochs_max=epochs_max,
                        static_hyperparameters=dict(base_hyperparameters or {}),
                        in_process=True, device=device)
