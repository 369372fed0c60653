"""Training-side faults: bad hyperparameters and diverging runs.

- A non-finite loss fails the job naming the epoch and the batch, and saves no model.
- A class whose training images are all undecodable fails the job naming the class.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dogbreed import contract, data, models, train

TINY = {"model": "resnet18", "epochs": "2", "batch-size": "16", "lr": "0.01", "image-size": "32",
        "weights": "none"}


class NaNFromCall(nn.Module):
    """Wraps a model; from its ``bad_call``-th training forward on, every logit is NaN."""

    def __init__(self, inner: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                out = out * float("nan")
        return out


def run_main(paths: contract.Paths, monkeypatch: pytest.MonkeyPatch) -> int:
    """The entry point in this process (so a test can patch the model), SIGTERM restored after."""
    monkeypatch.setenv(contract.BASE_DIR_ENV, str(paths.base))
    monkeypatch.delenv(contract.SM_HPS, raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return train.main([])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_non_finite_loss_fails_the_job_with_epoch_and_batch(make_job, monkeypatch):
    # 80 training images / batch 16 = 5 batches per epoch; the epoch number itself is checked in
    # the test below (one epoch here keeps this under the suite's time budget).
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: NaNFromCall(build(*a, **k), 3))
    paths = make_job(TINY | {"epochs": "1"})
    assert run_main(paths, monkeypatch) == train.EXIT_FAILURE
    failure = paths.failure_file.read_text()
    assert failure.startswith("NonFiniteLoss: training loss is not finite at epoch 1, batch 3 of 5")
    assert "lr=0.01" in failure
    assert not (paths.model_dir / "model.pt").exists(), "a NaN model must never be saved"


class InfiniteUnusedBuffer(nn.Module):
    """Wraps a model and carries an inf buffer its forward never reads: every loss stays finite."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", torch.tensor(float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_weights_holding_inf_are_never_saved(make_job, monkeypatch):
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: InfiniteUnusedBuffer(build(*a, **k)))
    paths = make_job(TINY | {"epochs": "1"})
    assert run_main(paths, monkeypatch) == train.EXIT_FAILURE
    failure = paths.failure_file.read_text()
    assert failure.startswith("Diverged: the weights hold inf or NaN (scale"), failure
    assert not (paths.model_dir / "model.pt").exists()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_call", [99, 3])
def test_the_loss_check_adds_no_per_step_host_sync(monkeypatch, device, bad_call):
    """The check reads one device scalar per epoch, never one per batch (on CUDA too)."""
    hp = contract.parse_hyperparameters({"batch-size": "4", "image-size": "32"})
    runtime = train.Runtime(device=torch.device(device), amp_dtype=None, channels_last=False)
    split = data.DecodedSplit(
        images=torch.randint(0, 255, (16, 3, 37, 37), dtype=torch.uint8, device=device),
        labels=(torch.arange(16) % 2).to(device), class_names=["a", "b"], skipped=0)
    model = NaNFromCall(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), bad_call).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or real_item(self))
    def one_epoch():
        return train.train_one_epoch(model, split, hp, runtime, optimizer, nn.CrossEntropyLoss(),
                                     torch.Generator().manual_seed(0), None, train.StopFlag(),
                                     epoch=7)

    if bad_call > 4:
        one_epoch()
    else:
        with pytest.raises(train.NonFiniteLoss, match="at epoch 7, batch 3 of 4"):
            one_epoch()
    assert len(items) <= 3  # loss, accuracy, the non-finite check: per epoch, not per batch (4)


# --- fault 6: a class with nothing decodable ---------------------------------------------------
def break_class(root: Path, class_name: str) -> int:
    folder = root / class_name
    images = sorted(folder.iterdir())
    for image in images:
        image.write_bytes(b"\xff\xd8 this is not a JPEG")
    return len(images)


def test_class_with_no_decodable_training_image_fails_naming_it(sample_copy, make_job, run_entry_point):
    victim = sorted(p.name for p in (sample_copy / "train").iterdir())[2]
    broken = break_class(sample_copy / "train", victim)
    paths = make_job(TINY | {"epochs": "1"}, channels={"training": sample_copy})
    result = run_entry_point(paths, timeout=180)
    assert result.returncode == 1, result.stderr[-2000:]
    failure = paths.failure_file.read_text()
    assert failure.startswith("DataError:") and victim in failure, failure
    assert f"{broken}" in failure
    assert not (paths.model_dir / "model.pt").exists()


@pytest.mark.parametrize("split", ["valid", "test"])
def test_class_with_nothing_decodable_in_valid_or_test_fails_naming_it(sample_copy, split):
    """valid/test are scored per class: a class whose images all fail would be silently absent."""
    victim = sorted(p.name for p in (sample_copy / split).iterdir())[1]
    break_class(sample_copy / split, victim)
    train_index = data.index_split(sample_copy / "train")
    index = data.index_split(sample_copy / split, train_index.class_names)
    with pytest.raises(data.DataError, match=victim):
        data.decode_split(index, 37, torch.device("cpu"), num_workers=1)


def test_some_undecodable_images_in_a_class_are_skipped_not_fatal(sample_copy):
    folder = sorted((sample_copy / "train").iterdir())[0]
    next(iter(sorted(folder.iterdir()))).write_bytes(b"not an image")
    split = data.decode_split(data.index_split(sample_copy / "train"), 37, torch.device("cpu"),
                              num_workers=1)
    assert split.skipped == 1 and len(split) == 79


def test_16bit_png_and_animated_gif_in_train_are_skipped_not_fatal(sample_copy, make_job, run_entry_point):
    """Each used to end the whole job at torch.stack with a message naming no file; README:
    unreadable images are "skipped with a warning and counted"."""
    import numpy as np
    from PIL import Image

    folder = sample_copy / "train" / "001.Beagle"
    Image.fromarray((np.arange(37 * 50, dtype=np.uint16) * 31).reshape(37, 50)).save(folder / "deep.png")
    frames = [Image.new("RGB", (50, 37), color) for color in ((200, 30, 60), (30, 200, 60))]
    frames[0].save(folder / "moving.jpg", format="GIF", save_all=True, append_images=frames[1:])
    paths = make_job(TINY | {"epochs": "1"}, channels={"training": sample_copy})
    result = run_entry_point(paths, timeout=300)
    assert result.returncode == 0, (paths.failure_file.read_text() if paths.failure_file.exists()
                                    else result.stderr[-2000:])
    logs = result.stdout + result.stderr
    assert "deep.png" in logs and "16-bit images are not supported" in logs
    assert "moving.jpg" in logs and "animated/multi-frame image" in logs
    assert "skipped_images=2" in logs
    assert (paths.model_dir / "model.pt").exists()


# --- SIGTERM / SIGINT: a failure file naming the signal, whenever it lands --------------------
REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {
    "python -m dogbreed.train": [sys.executable, "-m", "dogbreed.train"],
    "dogbreed-train": [str(Path(sys.executable).with_name("dogbreed-train"))],
    "image program": [sys.executable, str(REPO / "docker" / "dogbreed_train.py")],
}


def start_training(paths: contract.Paths, command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base)}
    env.pop(contract.SM_HPS, None)
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def signal_on_line(process: subprocess.Popen[str], stream: str, marker: str,
                   signum: int) -> tuple[str, str]:
    """Send ``signum`` as soon as ``marker`` appears on ``stream``; (stdout, stderr) after."""
    seen = []
    try:
        for line in getattr(process, stream):
            seen.append(line)
            if marker in line:
                process.send_signal(signum)
                break
        else:
            pytest.fail(f"{marker!r} never appeared: {''.join(seen)[-2000:]}")
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    before = "".join(seen)
    return (before + stdout, stderr) if stream == "stdout" else (stdout, before + stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_signal_during_start_up_writes_the_failure_naming_it(make_job, entry, signum):
    """The handler is installed before torch is imported (seconds): the process signals it as
    its first log line, and the test sends the signal right then, while torch loads."""
    paths = make_job(TINY | {"epochs": "1"})
    process = start_training(paths, ENTRY_POINTS[entry])
    _, stderr = signal_on_line(process, "stderr", "event=starting ", signum)
    assert process.returncode == 128 + signum, stderr[-2000:]
    failure = paths.failure_file.read_text()
    assert failure.startswith(f"stopped by {signum.name} during start-up"), failure
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not (paths.model_dir / "model.pt").exists()


def test_sigint_mid_run_stops_like_sigterm_with_exit_130(make_job):
    """Ctrl-C: the epoch in progress stops after its batch, the last completed one stays
    checkpointed, the failure names SIGINT (a KeyboardInterrupt traceback and no failure file
    before)."""
    paths = make_job(TINY | {"epochs": "3"})
    process = start_training(paths, ENTRY_POINTS["python -m dogbreed.train"])
    stdout, stderr = signal_on_line(process, "stdout", "epoch=1 ", signal.SIGINT)
    assert process.returncode == train.EXIT_SIGINT == 130, stderr[-2000:]
    failure = paths.failure_file.read_text()
    completed = len([line for line in stdout.splitlines() if line.startswith("epoch=")])
    assert failure.startswith(f"stopped by SIGINT; last completed epoch ({completed}) is checkpointed"), failure
    assert "event=signal signal=SIGINT action=stop_after_batch" in stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    assert (paths.checkpoints_dir / train.CHECKPOINT_FILE).exists()
    assert not (paths.model_dir / "model.pt").exists()
