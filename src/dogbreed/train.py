"""Training entry point: one code path for a local run, a SageMaker training job and an HPO trial.

    dogbreed-train [--model resnet18 --epochs 5 ...]      # or: python -m dogbreed.train

Reads the SageMaker layout (``/opt/ml`` or ``$SAGEMAKER_BASE_DIR``), trains, and writes
``model/model.pt`` + ``model/model.json``, ``output/data/`` reports and per-epoch checkpoints.
Any failure writes a one-line reason to ``output/failure`` and exits non-zero. SIGTERM (a
stopped or interrupted spot job) stops at the next batch, keeps the last epoch checkpoint and
exits; a rerun with the same checkpoint dir resumes there.
"""

from __future__ import annotations

import contextlib
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

import torch
from torch import nn

from dogbreed import artifacts, contract, data, debugger, models, profiling, recipe, reports
from dogbreed.contract import ContractError, Hyperparameters, Paths

# The metric lines and their SageMaker MetricDefinitions live in the torch-free dogbreed.metrics
# (the launcher reads them without importing torch); re-exported here, where DESIGN names them.
from dogbreed.metrics import METRIC_DEFINITIONS, METRIC_NAMES, OBJECTIVE_METRIC  # noqa: F401, E402

log = logging.getLogger("dogbreed.train")

CHECKPOINT_FILE = "checkpoint.pt"
# Set by SageMaker in every training container; a spot-restarted job keeps its name.
TRAINING_JOB_NAME_ENV = "TRAINING_JOB_NAME"
CHECKPOINT_VERSION = 2  # 2: recipe (EMA) state
EXIT_FAILURE = 1
EXIT_SIGTERM = 143  # 128 + SIGTERM, as a shell reports a process killed by it


class NonFiniteLoss(RuntimeError):
    """A training batch's loss was NaN or infinite: the weights are ruined, nothing is saved."""


# Errors whose message is the whole story: no traceback in the failure file.
EXPECTED_ERRORS = (ContractError, data.DataError, models.WeightsError, artifacts.ArtifactError,
                   NonFiniteLoss)


class Interrupted(Exception):
    """SIGTERM arrived; the last completed epoch is checkpointed."""


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


class StopFlag:
    """Set by SIGTERM; checked between batches so a stop never leaves a half-written file."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.warning("event=signal signal=%s action=stop_after_batch", signal.Signals(signum).name)
            self.requested = True

        signal.signal(signal.SIGTERM, handler)


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
                   channels_last=hp.channels_last and device.type == "cuda")


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
def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    # BatchNorm cannot train on a single sample: fold a lone last sample into the previous batch.
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
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
    *,
    epoch: int = 0,
    steps: profiling.StepRecorder = profiling.NO_STEPS,
    batch_recipe: recipe.Recipe | None = None,
) -> tuple[float, float, float]:
    """One pass over ``split``; returns (mean loss, accuracy, images/s of the training steps).

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
    batches = _batches(len(split), hp.batch_size, generator)
    for number, index in enumerate(batches, 1):
        if stop.requested:
            raise Interrupted()
        steps.start()
        index = index.to(split.device)
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
    _sync(device)
    elapsed = max(time.perf_counter() - started, 1e-9)
    if bad := int(first_bad_batch.item()):
        raise NonFiniteLoss(
            f"training loss is not finite at epoch {epoch}, batch {bad} of "
            f"{len(batches)} (lr={hp.lr}, optimizer={hp.optimizer}, amp={hp.amp}): the weights "
            "diverged, so no model was saved; lower lr or check the data")
    return total_loss.item() / seen, correct.item() / seen, seen / elapsed


@torch.no_grad()
def evaluate(model: nn.Module, split: data.DecodedSplit, hp: Hyperparameters, runtime: Runtime,
             loss_fn: nn.Module) -> EvalResult:
    model.eval()
    losses, predictions = [], []
    for start in range(0, len(split), hp.eval_batch_size):
        images = split.images[start:start + hp.eval_batch_size].to(runtime.device, non_blocking=True)
        labels = split.labels[start:start + hp.eval_batch_size].to(runtime.device, non_blocking=True)
        inputs = data.eval_transform(images, data.eval_geometry(hp.image_size, hp.eval_image_size)[0])
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(inputs).float()
        # Through the same loss module as training, so smdebug records EVAL losses too.
        losses.append(loss_fn(logits, labels) * labels.numel())
        predictions.append(logits.argmax(1))
    preds = torch.cat(predictions).cpu()
    labels_cpu = split.labels.cpu()
    return EvalResult(
        loss=torch.stack(losses).sum().item() / len(split),
        accuracy=(preds == labels_cpu).float().mean().item(),
        predictions=preds,
        labels=labels_cpu,
    )


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
    # Atomic: a SIGKILL mid-write never corrupts the previous checkpoint.
    artifacts.atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means "start fresh"
        log.warning("event=checkpoint_unreadable path=%s error=%s action=start_fresh", path, exc)
        return None
    if state.get("version") != CHECKPOINT_VERSION or json.loads(state.get("key", "{}")) != key:
        log.warning("event=checkpoint_mismatch path=%s action=start_fresh", path)
        return None
    return state


# --- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    history: list[EpochResult]
    best_epoch: int
    metrics: dict[str, Any]
    model_dir: Path


def run(hp: Hyperparameters, paths: Paths, stop: StopFlag | None = None,
        on_epoch: Callable[[EpochResult], None] | None = None,
        device: torch.device | None = None, cache: data.DecodeCache | None = None) -> TrainResult:
    """Train with ``hp`` on the channels under ``paths``; write the artifact and reports.

    ``on_epoch`` sees every epoch's result (a tuner may raise there to prune the trial);
    ``cache`` lets runs in one process share decoded images.
    """
    stop = stop or StopFlag()
    cache = cache or data.DecodeCache()
    run_started = time.perf_counter()
    runtime = select_runtime(hp, device)
    seed_everything(hp.seed)
    paths.create_output_dirs()
    if contract.num_hosts(paths) > 1:
        log.warning("event=multi_host hosts=%d note=each host trains independently", contract.num_hosts(paths))

    splits = contract.resolve_splits(paths)
    train_index = data.index_split(splits["train"])
    valid_index = data.index_split(splits["valid"], train_index.class_names)
    test_index = data.index_split(splits["test"], train_index.class_names) if "test" in splits else None
    class_names = train_index.class_names
    cache_size = data.resize_size_for(hp.image_size)
    # Evaluation (valid/test, and serving through model.json) may use a larger size (FixRes).
    eval_size, eval_cache_size = data.eval_geometry(hp.image_size, hp.eval_image_size)
    total_images = len(train_index) + len(valid_index) + (len(test_index) if test_index else 0)
    on_device = data.fits_on_device(total_images, max(cache_size, eval_cache_size), runtime.device)
    log.info("event=start model=%s device=%s amp=%s classes=%d train_images=%d valid_images=%d "
             "test_images=%d cache_size=%d cache_on_device=%s", hp.model, runtime.device,
             runtime.amp_dtype or "off", len(class_names), len(train_index), len(valid_index),
             len(test_index) if test_index else 0, cache_size, on_device)

    decode_started = time.perf_counter()

    def decode(index: data.SplitIndex, size: int) -> data.DecodedSplit:
        return cache.get(index, size, runtime.device, hp.num_workers, on_device)

    train_split, valid_split = decode(train_index, cache_size), decode(valid_index, eval_cache_size)
    test_split = decode(test_index, eval_cache_size) if test_index else None
    skipped = train_split.skipped + valid_split.skipped + (test_split.skipped if test_split else 0)
    decode_seconds = time.perf_counter() - decode_started
    log.info("event=decoded seconds=%.2f images_per_sec=%.1f skipped_images=%d",
             decode_seconds, total_images / max(decode_seconds, 1e-9), skipped)

    model = models.build_model(hp.model, len(class_names), hp.weights, hp.freeze_backbone)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(hp, trainable, runtime.device)
    scheduler = make_scheduler(hp, optimizer)
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype is torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    generator = torch.Generator().manual_seed(hp.seed)
    batch_recipe = recipe.Recipe(hp, model, len(class_names))

    checkpoint_path = checkpoint_file(paths)
    key = _resume_key(hp, class_names)
    history: list[EpochResult] = []
    best = {"epoch": 0, "valid_accuracy": -1.0, "valid_loss": math.inf}
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 1
    resumed = load_checkpoint(checkpoint_path, key)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["generator"])
        batch_recipe.load_state_dict(resumed["recipe"])
        history = [EpochResult(**h) for h in resumed["history"]]
        best = resumed["best"]
        best_state = resumed["best_model"]
        start_epoch = int(resumed["epoch"]) + 1
        log.info("event=resume checkpoint=%s completed_epochs=%d", checkpoint_path, start_epoch - 1)

    hook = debugger.create_hook(paths, model, loss_fn)
    steps = profiling.StepRecorder(runtime.device)  # -> output/data/profile.json
    step_model: nn.Module = model
    if hp.compile:
        compile_started = time.perf_counter()
        step_model = torch.compile(model)
        log.info("event=compile mode=lazy setup_seconds=%.2f", time.perf_counter() - compile_started)

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "key": json.dumps(key), "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "recipe": batch_recipe.state_dict(),
                "history": [dataclasses.asdict(h) for h in history], "best": best,
                "best_model": best_state or {}}

    epochs_without_improvement = len(history) - best["epoch"] if history else 0
    for epoch in range(start_epoch, hp.epochs + 1):
        epoch_started = time.perf_counter()
        debugger.set_mode(hook, train=True)
        train_loss, train_acc, images_per_sec = train_one_epoch(
            step_model, train_split, hp, runtime, optimizer, loss_fn, generator, scaler, stop,
            epoch=epoch, steps=steps.epoch(epoch), batch_recipe=batch_recipe)
        debugger.set_mode(hook, train=False)
        valid = evaluate(batch_recipe.eval_model(step_model), valid_split, hp, runtime, loss_fn)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        result = EpochResult(epoch, train_loss, train_acc, valid.loss, valid.accuracy,
                             images_per_sec, time.perf_counter() - epoch_started, lr)
        history.append(result)
        print(result.log_line(), flush=True)
        improved = (valid.accuracy, -valid.loss) > (best["valid_accuracy"], -best["valid_loss"])
        if improved:
            best = {"epoch": epoch, "valid_accuracy": valid.accuracy, "valid_loss": valid.loss}
            best_state = {k: v.detach().cpu().clone()
                          for k, v in batch_recipe.eval_model(model).state_dict().items()}
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
        save_checkpoint(checkpoint_path, checkpoint_state(epoch))
        if on_epoch:
            on_epoch(result)
        if stop.requested:
            raise Interrupted()
        if hp.early_stopping_patience and epochs_without_improvement >= hp.early_stopping_patience:
            log.info("event=early_stop epoch=%d best_epoch=%d patience=%d", epoch, best["epoch"],
                     hp.early_stopping_patience)
            break
    debugger.close(hook)
    steps.write(paths.output_data_dir)

    # The artifact is the best epoch's weights, not the last one's.
    if best_state:
        model.load_state_dict(best_state)
    final_valid = evaluate(model, valid_split, hp, runtime, loss_fn)
    # Printed last so a tuner reading the final objective value sees the saved model's score.
    print(f"best_epoch={best['epoch']} valid_loss={final_valid.loss:.4f} "
          f"valid_accuracy={final_valid.accuracy:.4f}", flush=True)
    metrics: dict[str, Any] = {
        "best_epoch": best["epoch"], "valid_loss": final_valid.loss,
        "valid_accuracy": final_valid.accuracy, "epochs_completed": len(history),
        "skipped_images": skipped, "decode_seconds": round(decode_seconds, 3),
        "device": str(runtime.device),
    }
    test_report: dict[str, Any] | None = None
    if test_split is not None:
        test = evaluate(model, test_split, hp, runtime, loss_fn)
        print(f"test_loss={test.loss:.4f} test_accuracy={test.accuracy:.4f}", flush=True)
        metrics.update(test_loss=test.loss, test_accuracy=test.accuracy)
        test_report = reports.classification_report(test.labels, test.predictions, class_names)
    metrics["wall_seconds"] = round(time.perf_counter() - run_started, 3)

    metadata = artifacts.ModelMetadata(
        # The evaluation geometry: serving decodes at resize_size and centre-crops image_size.
        arch=hp.model, class_names=class_names, image_size=eval_size, resize_size=eval_cache_size,
        mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD), metrics=metrics,
        hyperparameters=hp.to_dict(), versions=artifacts.library_versions())
    artifacts.save_model_dir(paths.model_dir, model, metadata)
    reports.write_reports(paths.output_data_dir, [dataclasses.asdict(h) for h in history], metrics,
                          test_report, class_names)
    log.info("event=done model_dir=%s output_data_dir=%s wall_seconds=%.1f", paths.model_dir,
             paths.output_data_dir, metrics["wall_seconds"])
    return TrainResult(history=history, best_epoch=best["epoch"], metrics=metrics,
                       model_dir=paths.model_dir)


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("DOGBREED_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point. Returns the process exit code (also used by ``sys.exit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        contract.build_arg_parser_help().print_help()
        return 0
    configure_logging()
    paths = Paths.from_env()
    # A failure file left by an earlier (e.g. interrupted) run in this dir is not this run's.
    paths.failure_file.unlink(missing_ok=True)
    stop = StopFlag()
    stop.install()
    try:
        hp = contract.load_hyperparameters(argv, paths)
        log.info("event=hyperparameters %s", " ".join(f"{k}={v}" for k, v in hp.to_sagemaker().items()))
        run(hp, paths, stop)
    except Interrupted:
        reason = (f"stopped by SIGTERM; last completed epoch is checkpointed in {paths.checkpoints_dir}: "
                  "run again with the same checkpoint dir to resume")
        contract.write_failure(reason, paths)
        log.warning("event=interrupted %s", reason)
        return EXIT_SIGTERM
    except EXPECTED_ERRORS as exc:
        contract.write_failure(f"{type(exc).__name__}: {exc}", paths)
        log.error("event=failed reason=%s", exc)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - every failure must reach the failure file
        contract.write_failure(f"{type(exc).__name__}: {exc}", paths)
        log.exception("event=failed reason=unexpected error")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
