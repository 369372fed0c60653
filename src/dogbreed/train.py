"""Training entry point: one code path for a local run, a SageMaker training job and an HPO trial.

    dogbreed-train [--model resnet18 --epochs 5 ...]      # or: python -m dogbreed.train

Reads the SageMaker layout (``/opt/ml`` or ``$SAGEMAKER_BASE_DIR``), trains, and writes
``model/model.pt`` + ``model/model.json``, ``output/data/`` reports and per-epoch checkpoints.
Any failure writes a one-line reason to ``output/failure`` and exits non-zero. SIGTERM (a
stopped or interrupted spot job) stops at the next batch, keeps the last epoch checkpoint and
exits; a rerun with the same checkpoint dir resumes there.

More than one GPU, ``DOGBREED_NPROC_PER_HOST`` or more than one host: the same entry point
starts one rank per device and trains data-parallel (:mod:`dogbreed.distributed`); rank 0
alone writes the model, reports, debugger output and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # python -m dogbreed.train: catch SIGTERM/SIGINT before torch loads
    from dogbreed import stopping as _stopping

    _stopping.install_early()

import torch  # noqa: E402 - after the signal handler, on purpose
from torch import nn

from dogbreed import (
    artifacts,
    contract,
    data,
    debugger,
    distributed,
    gpu,
    models,
    onnx_export,
    output_data,
    profiling,
    recipe,
    stopping,
)
from dogbreed.contract import ContractError, Hyperparameters, Paths
from dogbreed.distributed import World

# The metric lines and their SageMaker MetricDefinitions live in the torch-free dogbreed.metrics
# (the launcher reads them without importing torch); re-exported here, where DESIGN names them.
from dogbreed.metrics import (  # noqa: F401, E402
    METRIC_DEFINITIONS,
    METRIC_NAMES,
    OBJECTIVE_METRIC,
    best_line,
    parse_timing,
    seed_objective_line,
    timing_line,
)
from dogbreed.stopping import StopFlag

log = logging.getLogger("dogbreed.train")

CHECKPOINT_FILE = "checkpoint.pt"
# Set by SageMaker in every training container; a spot-restarted job keeps its name.
TRAINING_JOB_NAME_ENV = "TRAINING_JOB_NAME"
CHECKPOINT_VERSION = 2  # 2: recipe (EMA) state
# Batches timed after the first (warm-up) batch of a run's first epoch: the line that lets a
# tuner with a time budget see what an epoch costs before the epoch ends.
TIMING_BATCHES = 2
EXIT_FAILURE = 1
EXIT_SIGTERM = stopping.exit_code(signal.SIGTERM)  # 143, as a shell reports a process killed by it
EXIT_SIGINT = stopping.exit_code(signal.SIGINT)  # 130


class NonFiniteLoss(RuntimeError):
    """A training batch's loss was NaN or infinite: the weights are ruined, nothing is saved."""


class Diverged(RuntimeError):
    """Finite but absurd: a validation loss no trained model has, or weights holding inf/NaN."""


# A validation loss over this many times a uniform guess's (ln of the class count) means diverged
# weights (lr=1 without momentum: valid_loss 1.2e7, every loss finite). Far above what an early,
# noisy epoch gives: from scratch at small sizes, BatchNorm's running statistics alone lift an
# epoch's validation loss past 100x (160-180 for 5 classes, seen at lr 0.01-0.05), and the run
# recovers. Such an epoch is never the saved model; the job fails only when no epoch was sane.
DIVERGED_LOSS_FACTOR = 10_000


def divergence_limit(num_classes: int) -> float:
    """The validation loss above which a run counts as diverged (see DIVERGED_LOSS_FACTOR)."""
    return DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))


# Errors whose message is the whole story: no traceback in the failure file.
EXPECTED_ERRORS = (ContractError, data.DataError, models.WeightsError, artifacts.ArtifactError,
                   NonFiniteLoss, Diverged)


class Interrupted(Exception):
    """SIGTERM or SIGINT (``signal_name``) arrived (at ``rank``; every rank stops at the same
    step); epochs up to ``checkpointed_epochs`` (0: none) are checkpointed."""

    def __init__(self, rank: int = 0, checkpointed_epochs: int = 0, signal_name: str = "SIGTERM") -> None:
        super().__init__(f"{signal_name} at rank {rank}")
        self.rank = rank
        self.checkpointed_epochs = checkpointed_epochs
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return stopping.exit_code(signal.Signals[self.signal_name])


def _check_stop(stop: StopFlag, world: World, device: torch.device, checkpointed_epochs: int = 0) -> None:
    """Raise :class:`Interrupted` on every rank once any rank got SIGTERM/SIGINT (a collective)."""
    stopped_by = world.stop_requested_by(stop.requested, device)
    if stopped_by is not None:
        raise Interrupted(stopped_by, checkpointed_epochs, stop.signal_name)


def interrupted_reason(exc: Interrupted, world: World, checkpoints_dir: Path) -> str:
    """The failure-file line for a stop by a signal: what is checkpointed, whether a rerun resumes."""
    by = (f" (received by rank {exc.rank} of {world.size}; every rank stopped at the same step)"
          if world.distributed else "")
    if not exc.checkpointed_epochs:
        return (f"stopped by {exc.signal_name}{by} before the first epoch completed: no epoch is "
                f"checkpointed in {checkpoints_dir}, so a rerun has nothing to resume from")
    return (f"stopped by {exc.signal_name}{by}; last completed epoch ({exc.checkpointed_epochs}) is checkpointed "
            f"in {checkpoints_dir}: run again with the same checkpoint dir to resume")


@dataclasses.dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    valid_loss: float
    valid_accuracy: float
    images_per_sec: float
    epoch_seconds: float
    lr: float

    def log_line(self) -> str:
        return (
            f"epoch={self.epoch} train_loss={self.train_loss:.4f} "
            f"train_accuracy={self.train_accuracy:.4f} valid_loss={self.valid_loss:.4f} "
            f"valid_accuracy={self.valid_accuracy:.4f} images_per_sec={self.images_per_sec:.1f} "
            f"epoch_seconds={self.epoch_seconds:.2f} lr={self.lr:.6g}"
        )


@dataclasses.dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor
    labels: torch.Tensor


# --- runtime set-up ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def select_runtime(hp: Hyperparameters, device: torch.device | None = None) -> Runtime:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = hp.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype is torch.float16 and device.type != "cuda":
        raise ContractError("amp=fp16 needs a GPU; use amp=bf16 or amp=off on CPU")
    return Runtime(device=device, amp_dtype=dtype,
                   # "auto" on a CPU is decided by faster_layout_on_cpu once the model exists.
                   channels_last=hp.channels_last == "true"
                   or (hp.channels_last == "auto" and device.type == "cuda"))


def faster_layout_on_cpu(model: nn.Module, hp: Hyperparameters, num_classes: int,
                         steps: int = 2, batch: int = 8) -> tuple[bool, dict[str, float]]:
    """Whether channels_last trains ``model`` faster than NCHW on this CPU, measured now.

    Which layout wins on a CPU depends on the model, the image size and the CPU's oneDNN
    kernels (ResNet18 at 128 px: ~22% faster channels_last on the 2-core dev box), so each run
    times a few steps of both on a copy of the model (the real one's BatchNorm stats stay
    untouched) and keeps the faster one. Returns (use channels_last, ms per step by layout).
    """
    probe = copy.deepcopy(model).train()
    # Its own generator, and the global RNG restored after (dropout draws from it): probing
    # must not change what the run draws, or a run pinned to the chosen layout would differ.
    probe_generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, hp.image_size, hp.image_size, generator=probe_generator)
    y = torch.randint(0, num_classes, (batch,), generator=probe_generator)
    loss_fn = nn.CrossEntropyLoss()
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            timings[name] = _time_steps(probe.to(memory_format=layout),
                                        x.contiguous(memory_format=layout), y, loss_fn, steps)
    return timings["channels_last"] < timings["nchw"], timings


def _time_steps(probe: nn.Module, inputs: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                steps: int) -> float:
    """The fastest of ``steps`` forward+backward steps, in ms, after one warm-up step."""
    best = math.inf
    for step in range(steps + 1):  # the first step warms up (oneDNN picks its kernels)
        started = time.perf_counter()
        loss_fn(probe(inputs), y).backward()
        probe.zero_grad(set_to_none=True)
        if step:
            best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(hp: Hyperparameters, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused or None)


def make_scheduler(hp: Hyperparameters, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return recipe.make_scheduler(hp, optimizer, log=log.info)


# --- epochs -----------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, generator: torch.Generator, world_size: int = 1) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    # BatchNorm cannot train on a single sample: fold a last batch that would leave a rank one
    # sample (or none) into the previous batch.
    if len(batches) > 1 and batches[-1].numel() < 2 * world_size:
        # (Pop first: ``batches[-2] = cat([batches[-2], batches.pop()])`` would overwrite the
        # batch before it once the pop has shortened the list.)
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return batches


def train_one_epoch(
    model: nn.Module,
    split: data.DecodedSplit,
    hp: Hyperparameters,
    runtime: Runtime,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None,
    stop: StopFlag,
    world: World = distributed.ONE_PROCESS,
    order_generator: torch.Generator | None = None,
    *,
    epoch: int = 0,
    steps: profiling.StepRecorder = profiling.NO_STEPS,
    batch_recipe: recipe.Recipe | None = None,
    on_timing: Callable[[int, int, float, bool], None] | None = None,
) -> tuple[float, float, float]:
    """One pass over ``split``; returns (mean loss, accuracy, images/s of the training steps).

    ``on_timing(batches, images, seconds, warmup_included)`` is called once, after the first
    ``TIMING_BATCHES`` batches that follow the first one (which pays the kernels' warm-up), or at
    the epoch's end if it is shorter (with a single batch, that batch, warm-up included).

    With several ranks every rank draws the same global batches from ``order_generator`` and
    trains on its slice of each; the returned numbers are global (all-reduced).
    Raises :class:`NonFiniteLoss` naming the epoch and the first batch whose loss was not finite.
    """
    model.train()
    # Callers other than run() (tests) get the augmentation, without an EMA across epochs.
    batch_recipe = batch_recipe or recipe.Recipe(hp, model, len(split.class_names))
    device = runtime.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    # First batch (1-based) with a non-finite loss, tracked on the device: checking each loss
    # with .item() would add a GPU sync per step; this is read at the epoch's existing sync.
    first_bad_batch = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    _sync(device)
    started = time.perf_counter()
    batches = _batches(len(split), hp.batch_size, order_generator or generator, world.size)
    timed_from: float | None = None  # the warm-up batch's end
    timed_images = 0
    for number, index in enumerate(batches, 1):
        if not world.distributed or (number - 1) % distributed.STOP_CHECK_EVERY_STEPS == 0:
            # run() checkpoints every completed epoch (or resumed after it) before the next starts.
            _check_stop(stop, world, device, checkpointed_epochs=max(epoch - 1, 0))
        steps.start()
        index = world.shard_batch(index).to(split.device)
        images = split.images[index].to(device, non_blocking=True)
        labels = split.labels[index].to(device, non_blocking=True)
        inputs, targets = batch_recipe.inputs(images, labels, generator)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        steps.data_ready()
        with runtime.autocast():
            logits = model(inputs)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        batch_recipe.after_step(model)
        total_loss += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        first_bad_batch = torch.where((first_bad_batch == 0) & ~torch.isfinite(loss.detach()),
                                      number, first_bad_batch)
        seen += labels.numel()
        steps.end(labels.numel())
        if on_timing is not None:
            _sync(device)  # only while timing: a handful of batches of one epoch
            now = time.perf_counter()
            if number == 1 and len(batches) > 1:
                timed_from = now
            else:
                timed_images += labels.numel() * world.size
                timed = number - 1 if timed_from is not None else number
                if timed == TIMING_BATCHES or number == len(batches):
                    on_timing(timed, timed_images, now - (timed_from if timed_from is not None else started),
                              timed_from is None)
                    on_timing = None
    _sync(device)
    local_elapsed = max(time.perf_counter() - started, 1e-9)
    if world.distributed:
        # per_sec, not images_per_sec: SageMaker applies MetricDefinitions to stderr too, and the
        # images_per_sec regex would take this rank's rate for the job's.
        log.info("event=rank_epoch rank=%d images=%d per_sec=%.1f", world.rank, seen,
                 seen / local_elapsed)
    elapsed = world.all_max(local_elapsed, device)
    # All ranks agree on the first bad batch (one rank raising alone would leave the others
    # waiting in a collective); the all-reduced gradients spread a NaN to every rank anyway.
    first_bad = int(first_bad_batch.item())
    agreed = int(world.all_max(len(batches) + 1 - first_bad if first_bad else 0, device))
    if bad := (len(batches) + 1 - agreed if agreed else 0):
        raise NonFiniteLoss(
            f"training loss is not finite at epoch {epoch}, batch {bad} of "
            f"{len(batches)} (lr={hp.lr}, optimizer={hp.optimizer}, amp={hp.amp}): the weights "
            "diverged, so no model was saved; lower lr or check the data")
    loss_sum, correct_sum, seen_sum = world.all_sum([total_loss.item(), correct.item(), seen], device)
    return loss_sum / seen_sum, correct_sum / seen_sum, seen_sum / elapsed


@torch.no_grad()
def evaluate(model: nn.Module, split: data.DecodedSplit, hp: Hyperparameters, runtime: Runtime,
             loss_fn: nn.Module, world: World = distributed.ONE_PROCESS) -> EvalResult:
    """Loss and accuracy on ``split``; with several ranks each evaluates its share and the
    loss/accuracy are all-reduced (``predictions``/``labels`` are then this rank's share)."""
    model.eval()
    world.sync_buffers(model)
    losses, predictions = [], []
    rows = world.shard_range(len(split))
    eval_size = data.eval_geometry(hp.image_size, hp.eval_image_size)[0]
    for start in range(rows.start, rows.stop, hp.eval_batch_size):
        end = min(start + hp.eval_batch_size, rows.stop)
        images = split.images[start:end].to(runtime.device, non_blocking=True)
        labels = split.labels[start:end].to(runtime.device, non_blocking=True)
        inputs = data.eval_transform(images, eval_size)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(inputs).float()
        # Through the same loss module as training, so smdebug records EVAL losses too.
        losses.append(loss_fn(logits, labels) * labels.numel())
        predictions.append(logits.argmax(1))
    preds = torch.cat(predictions).cpu() if predictions else torch.zeros(0, dtype=torch.int64)
    labels_cpu = split.labels[rows.start:rows.stop].cpu()
    loss_sum = torch.stack(losses).sum().item() if losses else 0.0
    loss_sum, correct, count = world.all_sum(
        [loss_sum, (preds == labels_cpu).sum().item(), len(rows)], runtime.device)
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, predictions=preds,
                      labels=labels_cpu)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- checkpoints --------------------------------------------------------------------------------
def _resume_key(hp: Hyperparameters, class_names: list[str]) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (epochs may grow; workers may change)."""
    keep = hp.to_dict()
    for volatile in ("epochs", "num_workers", "compile", "eval_batch_size"):
        keep.pop(volatile)
    return {"hyperparameters": keep, "class_names": class_names}


def checkpoint_file(paths: Paths, env: Mapping[str, str] | None = None) -> Path:
    """``checkpoint.pt``, or ``checkpoint-<job>.pt`` on SageMaker: the trials of a tuning job
    share one ``CheckpointConfig.S3Uri``, and a file per training job keeps concurrent trials
    from overwriting each other while a spot-restarted trial finds its own."""
    job = (os.environ if env is None else env).get(TRAINING_JOB_NAME_ENV)
    return paths.checkpoints_dir / (f"checkpoint-{job}.pt" if job else CHECKPOINT_FILE)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # Atomic: a SIGKILL mid-write never corrupts the previous checkpoint; it leaves the temp file
    # (".<name>.<random>", see artifacts.atomic_write), which the next start removes.
    artifacts.atomic_write(path, buffer.getvalue())


def remove_partial_checkpoints(own: Path, every_job: bool = True) -> list[Path]:
    """Delete checkpoint temp files a killed write left in ``own``'s dir; returns them.

    SageMaker uploads everything in the checkpoint dir to the CheckpointConfig S3 URI while the
    job runs, copies it back into the next job, and deletes from S3 what is deleted here (AWS,
    "Checkpoints in Amazon SageMaker AI", model-checkpoints): removing them here removes the
    uploaded copies too. A tuning trial (``every_job=False``) shares the dir with trials
    running now, whose writes may be in flight: it removes only its own file's."""
    pattern = ".checkpoint*.pt.*" if every_job else f".{own.name}.*"
    removed = []
    for stale in sorted(own.parent.glob(pattern)):
        with contextlib.suppress(FileNotFoundError):
            size = stale.stat().st_size
            stale.unlink()
            removed.append(stale)
            log.info("event=partial_checkpoint_removed path=%s bytes=%d", stale, size)
    return removed


def _key_mismatch(state: dict[str, Any], key: dict[str, Any]) -> str | None:
    """Why ``state`` cannot resume a run with ``key`` (``version=…`` or ``differs=<names>``), or None."""
    if state.get("version") != CHECKPOINT_VERSION:
        return f"version={state.get('version')}"
    saved = json.loads(state.get("key", "{}"))
    if saved == key:
        return None
    saved_hps, hps = saved.get("hyperparameters", {}), key["hyperparameters"]
    differs = sorted(name for name in saved_hps.keys() | hps.keys() if saved_hps.get(name) != hps.get(name))
    if saved.get("class_names") != key["class_names"]:
        differs.append("class_names")
    return "differs=" + ",".join(differs)


def load_checkpoint(path: Path, key: dict[str, Any], action: str = "start_fresh",
                    mmap: bool = False) -> dict[str, Any] | None:
    """The state in ``path`` if it resumes a run with ``key``; else None, logged with ``action``.
    ``mmap``: read tensors only when used (checking another job's key costs no model read)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means "start fresh"
        log.warning("event=checkpoint_unreadable path=%s error=%s action=%s", path, exc, action)
        return None
    if mismatch := _key_mismatch(state, key):
        log.warning("event=checkpoint_mismatch path=%s %s action=%s", path, mismatch, action)
        return None
    return state


def find_checkpoint(own: Path, key: dict[str, Any],
                    adopt_others: bool = True) -> tuple[dict[str, Any] | None, Path | None]:
    """The state to resume and its file: ``own`` (this job's file) when it exists, else (with
    ``adopt_others``) the newest other checkpoint in its dir saved with the same ``key``. AWS
    resumes a stopped job as a new job (a new name, so a new file) on the same checkpoint
    prefix; a differing key never resumes. A tuning trial never adopts another trial's file:
    two trials that differ only in epochs would otherwise not be independent samples."""
    if own.is_file() or not adopt_others:
        state = load_checkpoint(own, key)
        return state, (own if state is not None else None)

    def modified(path: Path) -> float:
        with contextlib.suppress(OSError):  # a concurrent trial's file may go meanwhile
            return path.stat().st_mtime
        return -math.inf

    for other in sorted(own.parent.glob("checkpoint*.pt"), key=modified, reverse=True):
        state = load_checkpoint(other, key, action="skip", mmap=True)
        if state is not None:
            return state, other
    return None, None


# --- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    history: list[EpochResult]
    best_epoch: int
    metrics: dict[str, Any]
    model_dir: Path


@dataclasses.dataclass
class Splits:
    """The decoded channels: train at the training cache size, valid/test at the evaluation's."""
    class_names: list[str]
    train: data.DecodedSplit
    valid: data.DecodedSplit
    test: data.DecodedSplit | None
    eval_size: int  # the evaluation (and serving) crop
    eval_cache_size: int
    indexed: tuple[int, int, int]  # images listed per split (train, valid, test), skipped ones too
    skipped: int
    decode_seconds: float


def load_splits(hp: Hyperparameters, paths: Paths, runtime: Runtime, world: World,
                cache: data.DecodeCache) -> Splits:
    """Index the channels, log the job's start and decode every split once (on the device when
    the whole set fits there)."""
    splits = contract.resolve_splits(paths)
    train_index = data.index_split(splits["train"])
    valid_index = data.index_split(splits["valid"], train_index.class_names)
    test_index = data.index_split(splits["test"], train_index.class_names) if "test" in splits else None
    cache_size = data.resize_size_for(hp.image_size)
    # Evaluation (valid/test, and serving through model.json) may use a larger size (FixRes).
    eval_size, eval_cache_size = data.eval_geometry(hp.image_size, hp.eval_image_size)
    test_images = len(test_index) if test_index else 0
    total_images = len(train_index) + len(valid_index) + test_images
    on_device = data.fits_on_device(total_images, max(cache_size, eval_cache_size), runtime.device)
    cuda = runtime.device.type == "cuda"
    # Which driver, CUDA runtime and compat libraries this job runs on (the entry script switched
    # the compat libraries on or off before torch loaded libcuda).
    log.info(gpu.event_line(cuda, torch.version.cuda, gpu.host_driver_version() if cuda else None))
    log.info("event=start model=%s device=%s gpus=%d world_size=%d rank=%d amp=%s classes=%d "
             "train_images=%d valid_images=%d test_images=%d cache_size=%d cache_on_device=%s",
             hp.model, runtime.device, torch.cuda.device_count() if cuda else 0, world.size,
             world.rank, runtime.amp_dtype or "off", len(train_index.class_names), len(train_index),
             len(valid_index), test_images, cache_size, on_device)
    started = time.perf_counter()

    def decode(index: data.SplitIndex, size: int) -> data.DecodedSplit:
        return cache.get(index, size, runtime.device, hp.num_workers, on_device)

    train, valid = decode(train_index, cache_size), decode(valid_index, eval_cache_size)
    test = decode(test_index, eval_cache_size) if test_index else None
    skipped = train.skipped + valid.skipped + (test.skipped if test else 0)
    seconds = time.perf_counter() - started
    log.info("event=decoded seconds=%.2f per_sec=%.1f skipped_images=%d",  # not a metric name
             seconds, total_images / max(seconds, 1e-9), skipped)
    return Splits(train_index.class_names, train, valid, test, eval_size, eval_cache_size,
                  (len(train_index), len(valid_index), test_images), skipped, seconds)


def place_model(hp: Hyperparameters, num_classes: int, runtime: Runtime,
                world: World) -> tuple[nn.Module, Runtime]:
    """The model on the device, in the memory layout this run uses (``channels-last=auto`` on a
    CPU: rank 0 measures both and every rank uses its answer, as DDP needs one layout)."""
    model = models.build_model(hp.model, num_classes, hp.weights, hp.freeze_backbone).to(runtime.device)
    if hp.channels_last == "auto" and runtime.device.type == "cpu":
        faster, timings = faster_layout_on_cpu(model, hp, num_classes) if world.is_main else (False, {})
        runtime = dataclasses.replace(runtime, channels_last=world.broadcast_object(faster))
        log.info("event=cpu_layout channels_last=%s ms_per_step=%s", runtime.channels_last, timings or "rank0")
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, runtime


@dataclasses.dataclass
class Progress:
    """What the epochs so far decided: kept in every checkpoint, restored on resume."""
    history: list[EpochResult] = dataclasses.field(default_factory=list)
    best: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"epoch": 0, "valid_accuracy": -1.0, "valid_loss": math.inf})
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's (eval) weights, on the CPU

    @property
    def epochs_without_improvement(self) -> int:
        return len(self.history) - self.best["epoch"] if self.history else 0

    def record(self, result: EpochResult, sane: bool, eval_model: nn.Module) -> None:
        """Add an epoch; keep its weights when it is the best so far (a diverged one never is)."""
        self.history.append(result)
        if sane and (result.valid_accuracy, -result.valid_loss) > (
                self.best["valid_accuracy"], -self.best["valid_loss"]):
            self.best = {"epoch": result.epoch, "valid_accuracy": result.valid_accuracy,
                         "valid_loss": result.valid_loss}
            self.best_state = {k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()}


def check_valid_loss(valid_loss: float, epoch: int, hp: Hyperparameters, num_classes: int) -> bool:
    """Whether an epoch's weights may be kept (checkpointed, saved): ``NonFiniteLoss`` when the
    loss is not finite; False, with a warning, when it is absurd (over ``divergence_limit``)."""
    if not math.isfinite(valid_loss):
        # The last steps can ruin the weights after the last finite training loss (lr=10:
        # train_loss 16042, then valid_loss nan); nothing diverged may be checkpointed or saved.
        raise NonFiniteLoss(
            f"validation loss is not finite after epoch {epoch} (lr={hp.lr}, optimizer="
            f"{hp.optimizer}, amp={hp.amp}): the weights diverged, so no model was saved; lower lr")
    if valid_loss <= divergence_limit(num_classes):
        return True
    log.warning("event=diverged_epoch epoch=%d loss=%.4g limit=%.4g note=neither checkpointed nor "
                "a candidate for the saved model", epoch, valid_loss, divergence_limit(num_classes))
    return False


def diverged(progress: Progress, hp: Hyperparameters, num_classes: int) -> Diverged:
    """The failure of a run none of whose epochs could be kept."""
    lowest = min(progress.history, key=lambda r: r.valid_loss)
    count = len(progress.history)
    return Diverged(
        f"validation loss {lowest.valid_loss:.4g} after epoch {lowest.epoch}"
        f"{f' (the lowest of {count} epochs)' if count > 1 else ''} is over "
        f"{DIVERGED_LOSS_FACTOR}x a uniform guess's ({math.log(max(num_classes, 2)):.3g} for "
        f"{num_classes} classes; lr={hp.lr}, optimizer={hp.optimizer}, amp={hp.amp}): the "
        "weights diverged, so no model was saved; lower lr")


def write_outputs(hp: Hyperparameters, paths: Paths, model: nn.Module, progress: Progress,
                  splits: Splits, runtime: Runtime, loss_fn: nn.Module, world: World,
                  run_started: float) -> TrainResult:
    """Rank 0's end of a run: the best epoch's weights scored on valid and test, then model.pt +
    model.json + model.onnx (checked) and the reports under output/data."""
    if progress.best_state:  # the artifact is the best epoch's weights, not the last one's
        model.load_state_dict(progress.best_state)
    if broken := [name for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]:
        raise Diverged(f"the weights hold inf or NaN ({', '.join(broken[:3])}"
                       f"{', ...' if len(broken) > 3 else ''}; lr={hp.lr}, optimizer={hp.optimizer}, "
                       f"amp={hp.amp}): no model was saved; lower lr")
    best_epoch = progress.best["epoch"]
    final_valid = evaluate(model, splits.valid, hp, runtime, loss_fn)
    # The saved model's score, under names no MetricDefinitions regex reads: a tuner's objective
    # gets exactly one value per epoch (Hyperband counts them as epochs).
    print(best_line(best_epoch, final_valid.loss, final_valid.accuracy), flush=True)
    metrics: dict[str, Any] = {
        "best_epoch": best_epoch, "valid_loss": final_valid.loss,
        "valid_accuracy": final_valid.accuracy, "epochs_completed": len(progress.history),
        "skipped_images": splits.skipped, "decode_seconds": round(splits.decode_seconds, 3),
        "device": str(runtime.device), "world_size": world.size,
        "channels_last": runtime.channels_last,
    }
    test_report: dict[str, Any] | None = None
    if splits.test is not None:
        test = evaluate(model, splits.test, hp, runtime, loss_fn)
        print(f"test_loss={test.loss:.4f} test_accuracy={test.accuracy:.4f}", flush=True)
        metrics.update(test_loss=test.loss, test_accuracy=test.accuracy)
        test_report = output_data.classification_report(test.labels, test.predictions, splits.class_names)
    metrics["wall_seconds"] = round(time.perf_counter() - run_started, 3)

    metadata = artifacts.ModelMetadata(
        # The evaluation geometry: serving decodes at resize_size and centre-crops image_size.
        arch=hp.model, class_names=splits.class_names, image_size=splits.eval_size,
        resize_size=splits.eval_cache_size, mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD),
        metrics=metrics, hyperparameters=hp.to_dict(), versions=artifacts.library_versions())
    artifacts.save_model_dir(paths.model_dir, model, metadata)
    # model.onnx for CPU serving, checked against model.pt on the test split (a mismatch fails
    # the job with the reason).
    onnx_export.export_and_verify(paths.model_dir, splits.test.images if splits.test is not None else None)
    output_data.write_reports(paths.output_data_dir, [dataclasses.asdict(h) for h in progress.history],
                              metrics, test_report, splits.class_names)
    log.info("event=done model_dir=%s output_data_dir=%s wall_seconds=%.1f", paths.model_dir,
             paths.output_data_dir, metrics["wall_seconds"])
    return TrainResult(history=progress.history, best_epoch=best_epoch, metrics=metrics,
                       model_dir=paths.model_dir)


def run(hp: Hyperparameters, paths: Paths, stop: StopFlag | None = None,
        on_epoch: Callable[[EpochResult], None] | None = None,
        device: torch.device | None = None, cache: data.DecodeCache | None = None,
        world: World | None = None,
        on_timing: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train with ``hp`` on the channels under ``paths``; write the artifact and reports.

    ``on_epoch`` sees every epoch's result (a tuner may raise there to prune the trial);
    ``on_timing`` the first timed batches' line, parsed (:func:`dogbreed.metrics.parse_timing`);
    ``cache`` lets runs in one process share decoded images; ``world`` is this rank's place in
    a data-parallel job (default: one process). Only rank 0 writes files.
    """
    world = world or World()
    stop = stop or StopFlag()
    run_started = time.perf_counter()
    runtime = select_runtime(hp, device)
    seed_everything(hp.seed)
    if world.is_main:
        paths.create_output_dirs()
    splits = load_splits(hp, paths, runtime, world, cache or data.DecodeCache())
    num_classes = len(splits.class_names)

    model, runtime = place_model(hp, num_classes, runtime, world)
    optimizer = make_optimizer(hp, [p for p in model.parameters() if p.requires_grad], runtime.device)
    scheduler = make_scheduler(hp, optimizer)
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype is torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    generator = torch.Generator().manual_seed(hp.seed)
    # Ranks share the epoch order (same seed) but not the augmentation draws.
    order_generator = torch.Generator().manual_seed(hp.seed) if world.distributed else generator
    batch_recipe = recipe.Recipe(hp, model, num_classes)

    checkpoint_path = checkpoint_file(paths)
    if world.is_main:
        remove_partial_checkpoints(checkpoint_path, every_job=not contract.is_tuning_trial(paths))
    key = _resume_key(hp, splits.class_names)
    progress = Progress()
    # Rank 0 reads it and hands it to the others: resumable on any world size, any host.
    resumed, resumed_from = world.broadcast_object(
        find_checkpoint(checkpoint_path, key, adopt_others=not contract.is_tuning_trial(paths))
        if world.is_main else (None, None))
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if resumed.get("epochs") == hp.epochs:
            scheduler.load_state_dict(resumed["scheduler"])  # exact: as if never interrupted
        else:
            # Planned for another epoch count (epochs may grow): follow this count's schedule.
            scheduler = recipe.scheduler_after(hp, optimizer, int(resumed["epoch"]))
            log.info("event=schedule_rebuilt saved_epochs=%s epochs=%d completed_epochs=%d lr=%.6g",
                     resumed.get("epochs"), hp.epochs, int(resumed["epoch"]), optimizer.param_groups[0]["lr"])
        generator.set_state(resumed["generator"])
        order_generator.set_state(resumed.get("order_generator", resumed["generator"]))
        batch_recipe.load_state_dict(resumed["recipe"])
        progress = Progress([EpochResult(**h) for h in resumed["history"]], resumed["best"],
                            resumed["best_model"])
        log.info("event=resume checkpoint=%s completed_epochs=%d from=%s", checkpoint_path,
                 int(resumed["epoch"]), resumed_from)
    start_epoch = int(resumed["epoch"]) + 1 if resumed is not None else 1
    if world.distributed:
        generator.manual_seed(hp.seed + 7919 * (world.rank + 1) + start_epoch)

    hook = debugger.create_hook(paths, model, loss_fn) if world.is_main else None
    steps = profiling.StepRecorder(runtime.device)  # -> output/data/profile.json (rank 0)
    step_model: nn.Module = model
    if hp.compile:
        compile_started = time.perf_counter()
        step_model = torch.compile(model)
        log.info("event=compile mode=lazy setup_seconds=%.2f", time.perf_counter() - compile_started)
    train_model = world.wrap(step_model, runtime.device)  # DDP with several ranks

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "key": json.dumps(key), "epoch": epoch, "epochs": hp.epochs,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "order_generator": order_generator.get_state(), "recipe": batch_recipe.state_dict(),
                "history": [dataclasses.asdict(h) for h in progress.history], "best": progress.best,
                "best_model": progress.best_state or {}}

    def report_timing(batches: int, images: int, seconds: float, warmup_included: bool) -> None:
        line = timing_line(batches, images, seconds, warmup_included, *splits.indexed, hp.image_size)
        log.info(line)
        if on_timing:
            on_timing(parse_timing(line) or {})

    for epoch in range(start_epoch, hp.epochs + 1):
        epoch_started = time.perf_counter()
        debugger.set_mode(hook, train=True)
        train_loss, train_acc, images_per_sec = train_one_epoch(
            train_model, splits.train, hp, runtime, optimizer, loss_fn, generator, scaler, stop,
            world, order_generator, epoch=epoch, steps=steps.epoch(epoch), batch_recipe=batch_recipe,
            on_timing=report_timing if epoch == start_epoch and world.is_main else None)
        debugger.set_mode(hook, train=False)
        valid = evaluate(batch_recipe.eval_model(step_model), splits.valid, hp, runtime, loss_fn, world)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        result = EpochResult(epoch, train_loss, train_acc, valid.loss, valid.accuracy,
                             images_per_sec, time.perf_counter() - epoch_started, lr)
        if world.is_main:
            print(result.log_line(), flush=True)
            print(seed_objective_line(valid.loss, valid.accuracy), flush=True)
        sane = check_valid_loss(valid.loss, epoch, hp, num_classes)
        progress.record(result, sane, batch_recipe.eval_model(model))
        if world.is_main and sane:
            save_checkpoint(checkpoint_path, checkpoint_state(epoch))
        if on_epoch:
            on_epoch(result)
        _check_stop(stop, world, runtime.device, checkpointed_epochs=epoch)
        if hp.early_stopping_patience and progress.epochs_without_improvement >= hp.early_stopping_patience:
            log.info("event=early_stop epoch=%d best_epoch=%d patience=%d", epoch, progress.best["epoch"],
                     hp.early_stopping_patience)
            break
    debugger.close(hook)
    if progress.history and not progress.best_state:
        raise diverged(progress, hp, num_classes)
    if not world.is_main:
        # Every rank holds the same weights; rank 0 alone evaluates them and writes the files.
        log.info("event=done rank=%d note=rank 0 writes the model", world.rank)
        return TrainResult(history=progress.history, best_epoch=progress.best["epoch"], metrics={},
                           model_dir=paths.model_dir)
    steps.write(paths.output_data_dir)
    result = write_outputs(hp, paths, model, progress, splits, runtime, loss_fn, world, run_started)
    if contract.is_tuning_trial(paths):
        # The trials of a tuning job share one checkpoint prefix, and SageMaker copies all of it
        # into every trial at start (model-checkpoints). Nothing resumes a finished trial, and a
        # file deleted here is deleted from the prefix too, so later trials do not download it.
        with contextlib.suppress(FileNotFoundError):
            checkpoint_path.unlink()
            log.info("event=checkpoint_removed path=%s reason=tuning_trial_finished", checkpoint_path)
    return result


configure_logging = stopping.configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point. Returns the process exit code (also used by ``sys.exit``).

    With a world of more than one process this process becomes the host's agent: torchrun
    starts the ranks, each of which runs this function again (see :mod:`dogbreed.distributed`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if contract.print_help_if_asked(argv):
        return 0
    is_rank = distributed.is_rank_process()
    # First of all: from here until the loop starts, SIGTERM/SIGINT writes the failure and exits.
    stop = StopFlag().install(
        during_startup=lambda name: stopping.write_startup_failure(name, first_wins=is_rank))
    configure_logging()
    paths = Paths.from_env()
    if not is_rank:
        # A failure file left by an earlier (e.g. interrupted) run in this dir is not this run's.
        paths.failure_file.unlink(missing_ok=True)
    world = World()

    def fail(reason: str) -> None:
        # Ranks of one host share the failure file: the first to fail names the cause.
        where = f"{world.describe()}: " if world.distributed else ""
        contract.write_failure(where + reason, paths, first_wins=world.distributed)

    def waited_for_peers() -> None:
        contract.write_failure("SIGTERM while waiting for the other ranks to join: nothing was trained",
                               paths, first_wins=True)

    try:
        device = None
        if not is_rank:
            distributed.check_gpu()
            plan = distributed.plan_world(paths)
            if plan.world_size > 1:  # this process is the host's agent: torchrun starts the ranks
                code = distributed.launch(plan, argv, on_sigterm=waited_for_peers, exit_code=EXIT_SIGTERM)
                if code and not paths.failure_file.exists():
                    contract.write_failure(f"a training rank on {plan.current_host} exited with code {code}", paths)
                return code
        if is_rank:
            world, device = distributed.init_rank(on_sigterm=waited_for_peers, exit_code=EXIT_SIGTERM)
        hp = contract.load_hyperparameters(argv, paths)
        if hp.batch_size < 2 * world.size:  # each rank trains on 1/N of a batch
            raise ContractError(f"hyperparameter batch-size={hp.batch_size} gives a rank fewer than 2 "
                                f"images per batch with {world.size} ranks: BatchNorm needs 2; use at "
                                f"least {2 * world.size}")
        if world.is_main:
            log.info("event=hyperparameters %s", " ".join(f"{k}={v}" for k, v in hp.to_sagemaker().items()))
        stop.started()  # the loop stops after a batch from here, keeping the last epoch checkpointed
        run(hp, paths, stop, device=device, world=world)
    except Interrupted as exc:
        reason = interrupted_reason(exc, world, paths.checkpoints_dir)
        fail(reason)
        log.warning("event=interrupted %s", reason)
        return exc.exit_code
    except EXPECTED_ERRORS as exc:
        fail(f"{type(exc).__name__}: {exc}")
        log.error("event=failed reason=%s", exc)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - every failure must reach the failure file
        fail(f"{type(exc).__name__}: {exc}")
        log.exception("event=failed reason=unexpected error")
        return EXIT_FAILURE
    finally:
        distributed.shutdown()
        stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
