"""Local training runs: the entry point as SageMaker runs it, against a fresh ``/opt/ml`` layout.

:class:`TrainingRun` runs ``python -m dogbreed.train`` (or ``docker run <train image> train``)
in a subprocess and reads its per-epoch metric lines with the very ``MetricDefinitions``
regexes SageMaker uses; :class:`InProcessRun` runs ``dogbreed.train.run`` in this process (HPO
trials sharing one decoded image cache). Both return a :class:`RunResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import contract
from dogbreed.debugger_config import write_local_hook_config
from dogbreed.launcher import events
from dogbreed.launcher.settings import SettingsError
from dogbreed.metrics import (
    EPOCH_LINE,
    METRIC_NAMES,
    OBJECTIVE_METRIC,
    parse_best,
    parse_metrics,
    parse_timing,
)
from dogbreed.processes import signals_held

TRAIN_LOG = "train.log"
PRUNE_GRACE_SECONDS = 30.0
# The entry point, run as SageMaker runs it (the train image's `train` runs the same module).
TRAIN_COMMAND = (sys.executable, "-m", "dogbreed.train")


class LocalError(RuntimeError):
    """A local job or endpoint failed; the message says why (and where the log is)."""


def torch_hub_dir(env: Mapping[str, str] | None = None) -> Path:
    """``torch.hub.get_dir()`` without importing torch (2-8 s): $TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub."""
    env = os.environ if env is None else env
    if env.get("TORCH_HOME"):
        return Path(env["TORCH_HOME"]).expanduser() / "hub"
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "torch" / "hub"


def imagenet_weights_cached(arch: str) -> bool:
    """Whether torchvision's ImageNet weights for ``arch`` are on disk (no download, no torch):
    torchvision names them ``<arch>-<hash>.pth`` in the hub's checkpoints folder."""
    return any((torch_hub_dir() / "checkpoints").glob(f"{arch}-*.pth"))


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


def place_checkpoint(checkpoint: Path | None, paths: contract.Paths) -> None:
    """Copy a kept checkpoint into a fresh run's checkpoint dir, where the trainer resumes from
    it (same file name: the trainer looks for its own)."""
    if checkpoint is not None:
        paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint, paths.checkpoints_dir / Path(checkpoint).name)


def clear_run_dir(base: Path, inside: Path | None) -> None:
    """Delete a previous run's ``base`` before a rerun. With ``inside``, only a folder strictly
    inside it: a job name that escapes it (``..``, ``.``, an absolute path, a link) must never
    delete anything else, even if a caller forgot to check the name."""
    if inside is not None:
        root = Path(inside).resolve()
        if root not in Path(base).resolve().parents:
            raise SettingsError(f"refusing to use {base} as a run directory: it is not inside "
                                f"{root}")
    if Path(base).exists():
        shutil.rmtree(base)


def fresh_job(base: Path, inside: Path | None, hyperparameters: Mapping[str, str], data: Path,
              resume_checkpoint: Path | None) -> contract.Paths:
    """A run's /opt/ml layout, rebuilt from nothing, with the checkpoint to resume if any."""
    clear_run_dir(base, inside)
    paths = contract.prepare_local_job(base, hyperparameters, {contract.TRAINING_CHANNEL: data})
    place_checkpoint(resume_checkpoint, paths)
    return paths


@dataclasses.dataclass
class RunResult:
    returncode: int
    base: Path
    epochs: list[dict[str, float]]
    final: dict[str, float]
    pruned: bool = False
    seconds: float = 0.0
    stopped: bool = False  # stop() ended it early (e.g. a tuning budget ran out)

    @property
    def paths(self) -> contract.Paths:
        return contract.Paths.from_env({contract.BASE_DIR_ENV: str(self.base)})

    def failure(self) -> str | None:
        file = self.paths.failure_file
        return file.read_text().strip() if file.is_file() else None

    @property
    def objective(self) -> float | None:
        return self.final.get(OBJECTIVE_METRIC)


class TrainingRun:
    """``dogbreed.train`` in a subprocess (or the train image in docker) against ``base``.

    ``on_epoch(epoch, metrics)`` is called for each per-epoch line and may return ``True`` to
    stop the run (SIGTERM: the entry point stops after the current batch and checkpoints);
    ``on_timing(timing)`` for the first timed batches' line (:func:`dogbreed.metrics.parse_timing`).
    ``base`` is deleted and rebuilt; with ``inside``, only if it lies strictly inside that folder.
    ``resume_checkpoint``: a checkpoint put in the fresh run's checkpoint dir (the run resumes it).
    """

    def __init__(self, base: Path, hyperparameters: Mapping[str, str], data: Path, *,
                 docker_image: str | None = None, docker: str = "docker",
                 echo: Callable[[str], None] | None = None,
                 on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
                 keep_checkpoints: bool = True, train_command: Sequence[str] | None = None,
                 nproc: int = 1, debugger: bool = False, inside: Path | None = None,
                 on_timing: Callable[[dict[str, Any]], None] | None = None,
                 resume_checkpoint: Path | None = None) -> None:
        self.base = Path(base).resolve()
        self.on_timing = on_timing
        self.resume_checkpoint = resume_checkpoint
        self.inside = inside
        self.nproc = nproc
        self.train_command = list(train_command or TRAIN_COMMAND)
        self.hyperparameters = dict(hyperparameters)
        self.data = Path(data).resolve()
        self.docker_image = docker_image
        self.docker = docker
        self.echo = echo
        self.on_epoch = on_epoch
        self.keep_checkpoints = keep_checkpoints
        self.debugger = debugger
        self.process: subprocess.Popen[str] | None = None
        self._kill_timer: threading.Timer | None = None
        self._stopped = False
        self.container = f"dogbreed-{self.base.name}-{os.getpid()}"

    @staticmethod
    def default_command() -> tuple[str, ...]:
        return TRAIN_COMMAND

    def prepare(self) -> contract.Paths:
        if not (self.data / "train").is_dir():
            raise SettingsError(f"{self.data} has no train/ folder (expected train/ valid/ test/)")
        paths = fresh_job(self.base, self.inside, self.hyperparameters, self.data, self.resume_checkpoint)
        if self.docker_image:
            # A link to a host path means nothing in the container: the data is mounted there.
            link = contract.channel_dir(contract.TRAINING_CHANNEL, paths, {})
            link.unlink()
            link.mkdir()
        if self.debugger:  # smdebug on, as SageMaker's DebugHookConfig turns it on: `dogbreed report`
            config = write_local_hook_config(paths)
            if self.docker_image:  # the container sees the job dir at /opt/ml
                config.write_text(config.read_text().replace(str(paths.base), str(contract.Paths.from_env({}).base)))
        return paths

    def command(self, paths: contract.Paths) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", contract.BASE_DIR_ENV: str(paths.base)}
        for name in (contract.SM_HPS, contract.SM_MODEL_DIR, contract.SM_OUTPUT_DIR,
                     contract.SM_OUTPUT_DATA_DIR, contract.SM_CHANNELS, contract.CHECKPOINT_DIR_ENV):
            env.pop(name, None)
        env[contract.NPROC_PER_HOST_ENV] = str(self.nproc)  # >1: DDP ranks (gloo on a CPU)
        if not self.docker_image:
            return list(self.train_command), env
        container = contract.Paths.from_env({})
        channel = contract.channel_dir(contract.TRAINING_CHANNEL, container, {})
        command = [self.docker, "run", "--rm", "--network", "host", "--name", self.container,
                   "-v", f"{paths.base}:{container.base}",
                   "-v", f"{self.data}:{channel}:ro",
                   "-e", f"{contract.NPROC_PER_HOST_ENV}={self.nproc}"]
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
            try:
                with signals_held():  # a Ctrl-C now must find the trainer in self.process to stop it
                    self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                                    start_new_session=True)
                if self._stopped:  # stop() came while the process was starting
                    self.terminate()
                assert self.process.stdout is not None
                for line in self.process.stdout:
                    log_file.write(line)
                    log_file.flush()
                    if self.echo:
                        self.echo(line.rstrip("\n"))
                    if self.on_timing and (timing := parse_timing(line)) is not None:
                        self.on_timing(timing)
                        continue
                    metrics = parse_metrics(line) or parse_best(line)
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
            except BaseException:  # Ctrl-C, SIGTERM (cli.Terminated), a failing callback
                self.kill()
                if self.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=5)  # reaped here: no zombie left behind
                raise
            finally:
                if self._kill_timer is not None:
                    self._kill_timer.cancel()
        if not self.keep_checkpoints:
            shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
        return RunResult(returncode, paths.base, epochs, final, pruned, time.monotonic() - started,
                         stopped=self._stopped)

    def stop(self) -> None:
        """End the run early from another thread (SIGTERM: it stops after the current batch)."""
        self._stopped = True
        self.terminate()

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


class _StopRequest:
    """What ``dogbreed.train.run`` polls between batches (a ``train.StopFlag`` without signals)."""

    requested = False


class InProcessRun:
    """One trial through ``dogbreed.train.run`` in this process, same interface as TrainingRun.

    Trials share ``cache`` (a :class:`dogbreed.data.DecodeCache`), so JPEG decode — and on a GPU
    the upload of the uint8 cache — is paid once for the whole study instead of once per trial.
    Epoch lines go to the trial's ``train.log``, as a subprocess trial's do.
    """

    def __init__(self, base: Path, hyperparameters: Mapping[str, str], data: Path, *,
                 cache: Any, device: Any = None,
                 on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
                 keep_checkpoints: bool = True, inside: Path | None = None,
                 on_timing: Callable[[dict[str, Any]], None] | None = None,
                 resume_checkpoint: Path | None = None) -> None:
        self.base = Path(base).resolve()
        self.on_timing = on_timing
        self.resume_checkpoint = resume_checkpoint
        self.inside = inside
        self.hyperparameters = dict(hyperparameters)
        self.data = Path(data).resolve()
        self.cache = cache
        self.device = device
        self.on_epoch = on_epoch
        self.keep_checkpoints = keep_checkpoints
        self._stop = _StopRequest()

    def stop(self) -> None:
        """End the run after the current batch (callable from another thread)."""
        self._stop.requested = True

    def run(self) -> RunResult:
        from dogbreed import train  # in-process trials train here: torch is needed anyway

        paths = fresh_job(self.base, self.inside, self.hyperparameters, self.data, self.resume_checkpoint)
        started = time.monotonic()
        epochs: list[dict[str, float]] = []
        final: dict[str, float] = {}
        pruned, returncode = False, 0

        def on_epoch(result: Any) -> None:
            metrics = {k: v for k, v in dataclasses.asdict(result).items() if k in METRIC_NAMES}
            epochs.append({"epoch": result.epoch, **metrics})
            final.update(metrics)
            if self.on_epoch and self.on_epoch(result.epoch, metrics):
                raise _Pruned()

        with open(paths.base / TRAIN_LOG, "w", encoding="utf-8") as log_file, \
                contextlib.redirect_stdout(log_file):
            try:
                hp = contract.parse_hyperparameters(self.hyperparameters)
                outcome = train.run(hp, paths, self._stop, on_epoch=on_epoch,  # type: ignore[arg-type]
                                    device=self.device, cache=self.cache, on_timing=self.on_timing)
                final.update({k: v for k, v in outcome.metrics.items()
                              if k in METRIC_NAMES and isinstance(v, float)})
            except _Pruned:
                pruned = True
            except train.Interrupted:
                contract.write_failure("stopped before the end (stop requested)", paths)
                returncode = train.EXIT_SIGTERM
            except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the study goes on
                contract.write_failure(f"{type(exc).__name__}: {exc}", paths)
                returncode = train.EXIT_FAILURE
        if not self.keep_checkpoints:
            shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
        return RunResult(returncode, paths.base, epochs, final, pruned, time.monotonic() - started,
                         stopped=self._stop.requested)
