"""The local backend: the same training entry point, Optuna tuning and a local MME, on this machine.

One object per concern, composed here:

* runs (:mod:`~dogbreed.launcher.local.runs`): ``python -m dogbreed.train`` (or the train image
  in docker) against a fresh ``/opt/ml`` layout, as a SageMaker job or HPO trial would;
  ``model/`` is packed into ``output/model.tar.gz`` as SageMaker does.
* tuning (:mod:`~dogbreed.launcher.local.tuning`): an Optuna study (TPE + Hyperband pruning on
  the per-epoch metric lines) in RDB storage, within a trial count or a wall-clock budget.
* endpoint (:mod:`~dogbreed.launcher.local.endpoint`): the router in front of a multi-model
  ``dogbreed-serve`` (MMS) over a model store folder of ``<name>/model.tar.gz``.

Each ``plan_*`` method renders what the command would do (``--dry-run``) from the objects it
would use. Work dir layout (``--workdir``, default ``.dogbreed``)::

    jobs/<job>/            one /opt/ml per training job (model/, output/, train.log)
    tuning/<study>/        one /opt/ml per trial;  tuning/<study>.json  the result
    tuning/optuna.db       the studies (Optuna RDB storage, unless --storage URL)
    models/<name>/model.tar.gz                     the local endpoint's model store
    endpoint/              state.json, router + MMS run dirs, endpoint.log
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import artifacts, contract
from dogbreed.artifacts import ARCHIVE_NAME, validate_model_archive
from dogbreed.launcher import events
from dogbreed.launcher.local.endpoint import EndpointDaemon, LocalEndpoint
from dogbreed.launcher.local.router import ModelStore
from dogbreed.launcher.local.runs import (  # noqa: F401 - re-exported
    TRAIN_LOG,
    LocalError,
    TrainingRun,
    default_weights,
)
from dogbreed.launcher.local.tuning import LocalTuning
from dogbreed.launcher.sagemaker.requests import JOB_NAME_MAX, TUNING_JOB_NAME_MAX, check_name
from dogbreed.launcher.settings import Settings, SettingsError, check_model_name
from dogbreed.metrics import OBJECTIVE_METRIC


def check_job_name(name: str, flag: str = "--name") -> str:
    """A local training job name: a folder under ``<workdir>/jobs`` that is deleted and rebuilt,
    so it follows SageMaker's rule (no ``/``, ``.`` or ``..`` can reach another folder)."""
    return check_name(name, JOB_NAME_MAX, f"training job name ({flag})")


def check_study_name(name: str, flag: str = "--name/--resume") -> str:
    """A local study name (``<workdir>/tuning/<name>``): SageMaker's tuning job name rule."""
    return check_name(name, TUNING_JOB_NAME_MAX, f"study name ({flag})")


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
    def plan_train(self, *, name: str, hyperparameters: Mapping[str, str],
                   data: Path | None, nproc: int = 1) -> dict[str, Any]:
        check_job_name(name)
        contract.parse_hyperparameters(hyperparameters)
        return {"backend": "local", "training_job": name, "hyperparameters": dict(hyperparameters),
                "data": str(data), "base_dir": str(self.workdir / "jobs" / name), "nproc": nproc,
                "command": [self.docker_image, "train"] if self.docker_image
                else list(self.train_command or TrainingRun.default_command())}

    def train(self, *, name: str, hyperparameters: Mapping[str, str], data: Path,
              echo: bool = True, nproc: int = 1, debugger: bool = False) -> dict[str, Any]:
        check_job_name(name)  # before anything touches the disk
        epochs = contract.parse_hyperparameters(hyperparameters).epochs
        base = self.workdir / "jobs" / name
        events.event("training_started", job=name, base=base, docker=self.docker_image or "no",
                     **{k.replace("-", "_"): v for k, v in hyperparameters.items()})
        with self.progress.bar(f"train {name}", total=epochs, unit="epoch") as bar:

            def on_line(line: str) -> None:
                if self.progress.enabled:
                    bar.write(line)
                else:
                    print(line, file=sys.stderr, flush=True)

            def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
                bar.set(epoch)
                bar.status(f"{OBJECTIVE_METRIC}={metrics.get(OBJECTIVE_METRIC)}")
                return False

            run = TrainingRun(base, hyperparameters, data, docker_image=self.docker_image,
                              train_command=self.train_command, echo=on_line if echo else None,
                              on_epoch=on_epoch, nproc=nproc, debugger=debugger,
                              inside=self.workdir / "jobs")
            result = run.run()
        if result.returncode != 0:
            raise LocalError(f"training job {name} failed (exit {result.returncode}): "
                             f"{result.failure() or 'no failure file'}; log: {base / TRAIN_LOG}")
        paths = result.paths

        archive = artifacts.pack(paths.model_dir, paths.output_dir / artifacts.ARCHIVE_NAME)
        out = {"training_job": name, "status": "Completed", "model_data": str(archive),
               "model_dir": str(paths.model_dir), "output_data": str(paths.output_data_dir),
               "final_metrics": final_metrics(result.epochs, result.final),
               "seconds": round(result.seconds, 1)}
        events.event("training_completed", job=name, model_data=archive,
                     valid_accuracy=result.objective, seconds=round(result.seconds, 1))
        return out

    def job_archive(self, job: str) -> Path:
        check_job_name(job, "--job")
        archive = self.workdir / "jobs" / job / "output" / ARCHIVE_NAME
        if not archive.is_file():
            raise SettingsError(f"no local training job {job!r} with a model "
                                f"(looked for {archive})")
        return archive

    # -- tuning
    def tuning(self, *, name: str, static_hyperparameters: Mapping[str, str],
               in_process: bool = False, **options: Any) -> LocalTuning:
        """The study ``tune`` runs (and ``--dry-run`` renders)."""
        check_study_name(name)  # before anything touches the disk
        return LocalTuning(name=name, root=self.workdir / "tuning" / name,
                           static_hyperparameters=static_hyperparameters, in_process=in_process,
                           docker_image=self.docker_image, train_command=self.train_command,
                           **options)

    def plan_tune(self, *, data: Path | None, **kwargs: Any) -> dict[str, Any]:
        return {"backend": "local", **self.tuning(**kwargs).plan(), "data": str(data)}

    def tune(self, *, name: str, data: Path, static_hyperparameters: Mapping[str, str],
             output: Path | None = None, device: Any = None, **options: Any) -> dict[str, Any]:
        """Optuna study over the search space (see :class:`LocalTuning`); the result JSON goes
        to ``<workdir>/tuning/<name>.json`` (where ``train --from-tuning-job`` finds it) and to
        ``output`` — also when interrupted (``result["interrupted"]``: the best so far)."""
        tuning = self.tuning(name=name, static_hyperparameters=static_hyperparameters, **options)
        result = tuning.run(data, progress=self.progress, device=device)
        if result.get("best_model_data"):
            result.update(self.next_steps(name, Path(result["best_model_data"]), Path(data)))
        path = self.workdir / "tuning" / f"{name}.json"
        for target in (path, output):
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(result, indent=2) + "\n")
        path = output or path
        result["result_file"] = str(path)
        events.event("tuning_interrupted" if result.get("interrupted") else "tuning_completed",
                     study=name, best_trial=result.get("best_trial"),
                     best_objective=result.get("best_objective"),
                     complete=result["counts"]["COMPLETE"], pruned=result["counts"]["PRUNED"],
                     failed=result["counts"]["FAIL"], seconds=result["seconds"], result=path,
                     best_model_data=result.get("best_model_data"))
        if result.get("best_trial") is None and not result.get("interrupted"):
            raise LocalError(result["error"] + f" (result: {path})")
        return result

    def next_steps(self, study: str, model_data: Path, data: Path) -> dict[str, str]:
        """The commands that follow a study, exact (this workdir, no placeholder), and which
        model to take."""
        workdir = shlex.quote(str(self.workdir))
        return {
            "which_model": (
                "best_model_data is the best trial's own model, the one that scored "
                "best_objective: serve it (next). `retrain` trains the same hyperparameters and "
                "seed again and reproduces the trial epoch for epoch on this machine; run it for "
                "a job of its own (add --debugger for `dogbreed report`'s tensors)."),
            "next": f"dogbreed add-model {study} --local --workdir {workdir} "
                    f"--file {shlex.quote(str(model_data))}",
            "retrain": f"dogbreed train --local --workdir {workdir} "
                       f"--data {shlex.quote(str(Path(data).resolve()))} "
                       f"--from-tuning-job {study} --name {study}-best",
        }

    def best_hyperparameters(self, tuning_job: str) -> dict[str, str]:
        path = Path(tuning_job)
        if not path.is_file():
            try:  # a study name, never a path out of <workdir>/tuning
                check_study_name(tuning_job, "--from-tuning-job")
            except SettingsError as exc:
                raise SettingsError(f"no tuning result file {tuning_job!r}, and {exc}") from None
            path = self.workdir / "tuning" / f"{tuning_job}.json"
        if not path.is_file():
            raise SettingsError(f"no local tuning result {tuning_job!r} (looked for {path})")
        best = json.loads(path.read_text()).get("best_hyperparameters")
        if best is None:
            raise SettingsError(f"tuning result {path} has no completed trial yet")
        return dict(best)

    # -- model store
    def plan_add_model(self, name: str, *, training_job: str | None = None,
                       file: Path | None = None) -> dict[str, Any]:
        check_model_name(name)
        source = str(self.job_archive(training_job)) if training_job else str(file)
        return {"backend": "local", "copy": source, "to": str(self.store.root / name / ARCHIVE_NAME)}

    def add_model(self, name: str, *, training_job: str | None = None,
                  file: Path | None = None) -> dict[str, Any]:
        if (training_job is None) == (file is None):
            raise SettingsError("give exactly one of --job or --file")
        check_model_name(name)
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
        if target_model in self.loaded_models():
            # As on SageMaker MME: a loaded model is not reloaded when its archive is replaced.
            events.warning("model_still_loaded", target_model=target_model,
                           note="the running endpoint keeps serving the copy it loaded; add the "
                                "new archive under a new name, or redeploy")
        return {"model": name, "uri": str(target), "target_model": target_model}

    def loaded_models(self) -> list[str]:
        """TargetModels the running local endpoint holds loaded (none when it is not running)."""
        state = self.state()
        try:
            return _loaded_models(state["url"]) if state else []
        except (OSError, ValueError, KeyError):
            return []

    # -- endpoint
    def daemon(self, port: int | None = None, max_loaded: int | None = None) -> EndpointDaemon:
        return EndpointDaemon(self.store, self.endpoint_dir, workdir=self.workdir,
                              endpoint_name=self.settings.endpoint_name,
                              port=self.settings.port if port is None else port,
                              max_loaded=max_loaded or self.settings.max_loaded_models,
                              docker_image=self.docker_image)

    def endpoint(self, port: int | None = None, max_loaded: int | None = None) -> LocalEndpoint:
        return self.daemon(port, max_loaded).endpoint()

    def plan_deploy(self, port: int | None = None, max_loaded: int | None = None) -> dict[str, Any]:
        daemon = self.daemon(port, max_loaded)
        return {"backend": "local", "endpoint_name": daemon.endpoint_name,
                "store": str(daemon.store.root), "port": daemon.port,
                "max_loaded_models": daemon.max_loaded, "running": daemon.state(),
                "model_server": f"docker run -d {daemon.docker_image} serve" if daemon.docker_image
                else "dogbreed-serve (in the endpoint process)"}

    def state(self) -> dict[str, Any] | None:
        return self.daemon().state()

    def serve_forever(self, port: int | None = None, max_loaded: int | None = None) -> None:
        self.daemon(port, max_loaded).serve_forever()

    def deploy_detached(self, port: int | None = None, max_loaded: int | None = None,
                        timeout: float = 180.0) -> dict[str, Any]:
        return self.daemon(port, max_loaded).deploy_detached(timeout=timeout)

    def stop_endpoint(self, timeout: float = 60.0) -> dict[str, Any] | None:
        return self.daemon().stop_endpoint(timeout)

    def plan_cleanup(self, delete_models: bool = False) -> dict[str, Any]:
        return {"backend": "local", "stop": self.state(),
                "delete_models": str(self.store.root) if delete_models else False}

    def cleanup(self, delete_models: bool = False) -> dict[str, Any]:
        stopped = self.stop_endpoint()
        if delete_models:
            shutil.rmtree(self.store.root, ignore_errors=True)
        return {"stopped": stopped, "deleted_models": bool(delete_models)}

    def status(self) -> dict[str, Any]:
        state = self.state()
        endpoint = None
        if state:
            endpoint = {"url": state["url"], "pid": state["pid"], "name": state["endpoint_name"]}
            try:
                endpoint["loaded"] = _loaded_models(state["url"])
            except OSError as exc:
                endpoint["error"] = str(exc)
        jobs = sorted(p.name for p in (self.workdir / "jobs").glob("*") if p.is_dir())
        tunings = sorted(p.stem for p in (self.workdir / "tuning").glob("*.json"))
        return {"workdir": str(self.workdir), "endpoint": endpoint, "models": self.store.targets(),
                "training_jobs": jobs, "tuning_jobs": tunings}


def final_metrics(epochs: Sequence[Mapping[str, float]], final: Mapping[str, float]) -> dict[str, Any]:
    """A finished run's figures by the epoch they belong to: the best epoch (the saved model:
    its validation figures, and the test split scored with its weights) and the last epoch
    (which the last training loss and accuracy are from), never mixed under one heading."""
    if not epochs:
        return dict(final)
    # The trainer's rule: the first epoch with the highest valid_accuracy, lower valid_loss on ties.
    best = max(epochs, key=lambda e: (e.get("valid_accuracy", -1.0), -e.get("valid_loss", float("inf"))))
    last = epochs[-1]
    saved = {"epoch": int(best["epoch"]),
             **{k: best[k] for k in ("valid_loss", "valid_accuracy") if k in best},
             **{k: final[k] for k in ("test_loss", "test_accuracy") if k in final}}
    return {"best_epoch": saved,
            "last_epoch": {"epoch": int(last["epoch"]),
                           **{k: last[k] for k in ("train_loss", "train_accuracy", "valid_loss",
                                                   "valid_accuracy") if k in last}}}


# What `dogbreed tune --local` prints: the answer; the whole study is in result_file.
ANSWER_KEYS = ("tuning_job", "best_trial", "best_objective", "best_test_accuracy", "best_state",
               "best_model_data", "next", "retrain", "which_model", "best_hyperparameters",
               "counts", "this_process", "seconds", "result_file", "storage", "interrupted",
               "budget_short", "error")


def tune_answer(result: Mapping[str, Any]) -> dict[str, Any]:
    """The short answer of a tuning result (the full one stays in its ``result_file``)."""
    return {key: result[key] for key in ANSWER_KEYS if key in result}


def _loaded_models(url: str) -> list[str]:
    """``GET <router>/models``'s ``loaded`` list: TargetModels the local endpoint holds loaded."""
    with urllib.request.urlopen(url + "/models", timeout=5) as reply:
        return list(json.loads(reply.read())["loaded"])


def tune_in_process(data: Path, workdir: Path, *, trials: int | None = None, device: Any = None,
                    base_hyperparameters: Mapping[str, str] | None = None,
                    epochs_max: int | None = None, name: str = "bench-tune",
                    **options: Any) -> dict[str, Any]:
    """``dogbreed tune --local --in-process`` as a function (benchmarks): every trial in this
    process sharing one decode; ``options`` are :class:`LocalTuning`'s (``time_budget``,
    ``space``, ``pruner``, ``seed``, ``storage``, ``resume``)."""
    backend = LocalBackend(Settings(workdir=str(workdir)))
    return backend.tune(name=name, data=data, trials=trials, epochs_max=epochs_max,
                        static_hyperparameters=dict(base_hyperparameters or {}),
                        in_process=True, device=device, **options)
