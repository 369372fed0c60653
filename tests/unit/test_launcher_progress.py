"""What a person sees: progress bars on a terminal, ``event=… key=value`` lines in a pipe; and a
launcher that starts fast because it never imports torch."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from fakes import FAKE_TRAIN_COMMAND

REPO_SRC = Path(__file__).resolve().parents[2] / "src"
# The launcher's CLI with the fake entry point (same contract, milliseconds per epoch).
RUN_CLI = ("import sys; from dogbreed.launcher import cli; from dogbreed.launcher.local import runs as local_runs; "
           f"local_runs.TRAIN_COMMAND = {FAKE_TRAIN_COMMAND!r}; "
           "sys.exit(cli.main(sys.argv[1:]))")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO_SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "COLUMNS": "120", "TERM": "xterm", "DOGBREED_FAKE_EPOCH_SECONDS": "0.05"}


def _on_a_terminal(argv: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run the CLI with stderr (and stdin/stdout) on a pseudo-terminal; returns (exit, output)."""
    leader, follower = pty.openpty()
    # A terminal of 40 rows x 120 columns (a fresh pty has 0 x 0: tqdm would draw nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-c", RUN_CLI, *argv], stdin=follower,
                               stdout=follower, stderr=follower, env=_env(), close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def local_args(tmp_path: Path, sample_data: Path) -> list[str]:
    return ["--local", "--data", str(sample_data), "--workdir", str(tmp_path / "work")]


def test_a_terminal_gets_progress_bars_and_a_pipe_gets_key_value_lines(local_args: list[str]) -> None:
    train = ["train", *local_args, "--name", "bar-job", "--epochs", "3", "--weights", "none"]
    code, screen = _on_a_terminal(train)
    assert code == 0, screen
    # tqdm's bar: description, fraction of epochs, the unit and the elapsed time, redrawn with \r.
    assert "train bar-job" in screen and "3/3" in screen and "epoch" in screen and "\r" in screen
    assert "valid_accuracy=" in screen

    piped = subprocess.run([sys.executable, "-c", RUN_CLI, *train], capture_output=True,
                           text=True, env=_env(), timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "3/3" not in piped.stderr
    assert "event=training_started job=bar-job" in piped.stderr
    assert "event=training_completed job=bar-job" in piped.stderr
    assert json.loads(piped.stdout)["status"] == "Completed"


def test_a_terminal_shows_trials_done_pruned_and_best(local_args: list[str]) -> None:
    code, screen = _on_a_terminal(["tune", *local_args, "--name", "bar-study", "--trials", "2",
                                   "--epochs-max", "2", "--weights", "none"])
    assert code == 0, screen
    assert "tune bar-study" in screen and "2/2" in screen
    # The last bar: both trials counted (the seeds' point, trial 2, may be pruned at epoch 1).
    done, pruned = map(int, re.findall(r"done=(\d+) pruned=(\d+) failed=0 best=0\.\d+", screen)[-1])
    assert done + pruned == 2 and done >= 1


def test_the_launcher_never_imports_torch(tmp_path: Path, sample_data: Path) -> None:
    """`import dogbreed.launcher.cli`, tune dry runs (local and SageMaker) and `status` load no
    torch: the metric definitions come from the torch-free dogbreed.metrics."""
    script = f"""
import contextlib, io, json, sys
from dogbreed.launcher import cli
loaded = {{"import": sorted(m for m in ("torch", "torchvision") if m in sys.modules)}}
runs = {{
    "tune_local": ["tune", "--dry-run", "--local", "--data", {str(sample_data)!r},
                   "--workdir", {str(tmp_path)!r}],
    "tune_sagemaker": ["tune", "--dry-run", "--sagemaker", "--region", "eu-west-1",
                       "--workdir", {str(tmp_path)!r}],
    "train_sagemaker": ["train", "--dry-run", "--sagemaker", "--region", "eu-west-1",
                        "--workdir", {str(tmp_path)!r}],
    "status": ["status", "--local", "--workdir", {str(tmp_path)!r}],
}}
for name, argv in runs.items():
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    loaded[name] = [code] + sorted(m for m in ("torch", "torchvision") if m in sys.modules)
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "import": [], "tune_local": [0], "tune_sagemaker": [0], "train_sagemaker": [0],
        "status": [0]}


def test_job_status_bar_shows_status_and_elapsed_time_and_upload_bytes() -> None:
    import io

    from dogbreed.launcher import events

    screen = io.StringIO()
    progress = events.Progress(stream=screen, enabled=True)
    with progress.bar("training job dogbreed-train-1") as bar:  # no total: status + elapsed
        bar.status("InProgress / Training")
    with progress.bar("upload s3://b/dogbreed/data", total=3 * 1024 * 1024, bytes_=True) as bar:
        bar.advance(3 * 1024 * 1024)
    text = screen.getvalue()
    assert "training job dogbreed-train-1 [00:00, InProgress / Training]" in text
    assert "3.00M/3.00M" in text
    quiet = events.Progress(stream=io.StringIO())  # not a terminal: no bars at all
    assert not quiet.enabled and quiet.bar("x", total=1)._bar is None
