"""Data-parallel training through the real entry point: 2 gloo ranks on this CPU, and the
"GPU requested but unusable" fail-fast, faked with SM_NUM_GPUS and a fake nvidia-smi."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dogbreed import artifacts, contract, train
from dogbreed.contract import free_port

pytestmark = pytest.mark.slow

# 4 epochs at 32 px: the smallest run whose accuracy is above the 5-class chance level.
# channels-last off: on a CPU the layout is chosen by timing a few steps, so a busy machine
# could give the two runs different layouts (and different float rounding) at random.
DDP_HPS = {"model": "resnet18", "epochs": "4", "batch-size": "16", "lr": "0.01",
           "image-size": "32", "weights": "none", "seed": "3", "channels-last": "false"}
EPOCH_LINE = re.compile(r"^epoch=(\d+) .*valid_loss=([0-9.]+) valid_accuracy=([0-9.]+)", re.M)


def _run(paths: contract.Paths, nproc: int, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base),
                contract.NPROC_PER_HOST_ENV: str(nproc), **env}
    full_env.pop(contract.SM_HPS, None)
    return subprocess.run([sys.executable, "-m", "dogbreed.train"], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_gloo_ranks_train_one_model_like_one_process(make_job):
    one = make_job(DDP_HPS, name="one")
    two = make_job(DDP_HPS, name="two")
    single = _run(one, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(two, 2)
    assert double.returncode == 0, double.stderr[-3000:]

    # Both ranks trained (gloo), rank 0 alone wrote: one artifact, one set of metric lines.
    assert "world_size=2 rank=0" in double.stderr and "world_size=2 rank=1" in double.stderr
    assert "backend=gloo" in double.stderr and "event=launch launcher=torchrun" in double.stderr
    assert sorted(p.name for p in two.model_dir.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert double.stderr.count("event=done model_dir=") == 1
    lines = EPOCH_LINE.findall(double.stdout)
    assert [int(e) for e, _, _ in lines] == [1, 2, 3, 4]
    meta = json.loads((two.model_dir / "model.json").read_text())
    assert meta["metrics"]["world_size"] == 2

    # Metric lines are global: the best epoch's line (each rank scored half of the valid set,
    # all-reduced) equals rank 0 scoring the whole set with the saved weights afterwards.
    best = meta["metrics"]["best_epoch"]
    _, loss, accuracy = lines[best - 1]
    assert float(accuracy) == pytest.approx(meta["metrics"]["valid_accuracy"], abs=1e-4)
    assert float(loss) == pytest.approx(meta["metrics"]["valid_loss"], rel=1e-3)
    # Same global batch and seed: the same recipe, so the same quality within noise.
    single_acc = json.loads((one.model_dir / "model.json").read_text())["metrics"]["valid_accuracy"]
    assert abs(meta["metrics"]["valid_accuracy"] - single_acc) <= 0.1, (single_acc, meta["metrics"])
    model, _ = artifacts.load_model(two.model_dir)
    assert not model.training


def _sigterm_after_the_first_epoch(paths: contract.Paths, to_rank: int | None) -> tuple[int, str]:
    """Start 2 ranks, SIGTERM rank ``to_rank`` (None: the agent, as SageMaker and `docker stop`
    signal the container's main process) once epoch 1 is printed; the agent's exit code and output."""
    env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base), contract.NPROC_PER_HOST_ENV: "2"}
    agent = subprocess.Popen([sys.executable, "-m", "dogbreed.train"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pids: dict[int, int] = {}
    try:
        for line in agent.stdout:
            if match := re.search(r"event=rank_started rank=(\d+) .* pid=(\d+)", line):
                pids[int(match.group(1))] = int(match.group(2))
            if line.startswith("epoch=1 "):
                break
        assert set(pids) == {0, 1}
        signalled = time.monotonic()
        os.kill(agent.pid if to_rank is None else pids[to_rank], signal.SIGTERM)
        rest, _ = agent.communicate(timeout=60)
        assert time.monotonic() - signalled < 30
    finally:
        agent.kill()
    for pid in pids.values():  # every rank is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    return agent.returncode, rest


def test_sigterm_to_the_agent_stops_every_rank_with_a_checkpoint(make_job):
    paths = make_job({**DDP_HPS, "epochs": "40"})
    code, output = _sigterm_after_the_first_epoch(paths, to_rank=None)
    assert code == train.EXIT_SIGTERM, output[-3000:]
    failure = paths.failure_file.read_text()
    assert "SIGTERM" in failure and "received by rank" in failure, failure
    state = torch.load(paths.checkpoints_dir / "checkpoint.pt", weights_only=True)
    assert int(state["epoch"]) >= 1 and not (paths.model_dir / "model.pt").exists()


def test_sigterm_to_one_rank_stops_every_rank_and_the_rerun_resumes(make_job):
    paths = make_job({**DDP_HPS, "epochs": "40"})
    code, rest = _sigterm_after_the_first_epoch(paths, to_rank=1)
    assert code == train.EXIT_SIGTERM, rest[-3000:]
    failure = paths.failure_file.read_text()
    assert "SIGTERM" in failure and "received by rank 1 of 2" in failure
    assert not (paths.model_dir / "model.pt").exists()
    state = torch.load(paths.checkpoints_dir / "checkpoint.pt", weights_only=True)
    completed = int(state["epoch"])
    assert completed >= 1 and not any(k.startswith("module.") for k in state["model"])

    # The checkpoint resumes on another world size: one process, one more epoch.
    hps = json.loads(paths.hyperparameters_file.read_text())
    paths.hyperparameters_file.write_text(json.dumps({**hps, "epochs": str(completed + 1)}))
    resumed = _run(paths, 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"completed_epochs={completed}" in resumed.stderr
    assert [int(e) for e, _, _ in EPOCH_LINE.findall(resumed.stdout)] == [completed + 1]
    assert not paths.failure_file.exists() and (paths.model_dir / "model.pt").is_file()


def test_gpu_requested_but_unusable_fails_fast_with_the_reason(make_job, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 470.57.02\n")
    smi.chmod(0o755)
    paths = make_job(DDP_HPS)
    started = time.monotonic()
    result = _run(paths, 0, timeout=120, SM_NUM_GPUS="4", PATH=f"{fake_bin}:{os.environ['PATH']}",
                  CUDA_VISIBLE_DEVICES="")
    assert result.returncode == train.EXIT_FAILURE
    assert time.monotonic() - started < 60
    assert "event=decoded" not in result.stderr, "failed before any work"
    failure = paths.failure_file.read_text()
    assert "GPU requested (SM_NUM_GPUS=4" in failure
    real_driver = Path("/proc/driver/nvidia/version")  # a GPU host: its driver is reported
    assert "driver 470.57.02" in failure or (real_driver.exists() and "driver " in failure)
    assert f"CUDA {torch.version.cuda}" in failure and "Fix:" in failure
    assert not (paths.model_dir / "model.pt").exists()


def _sigterm_once_waiting(paths: contract.Paths, env: dict[str, str], waiting_line: str) -> None:
    """Start the entry point; SIGTERM it once it logs ``waiting_line`` (from that line on the
    signal belongs to the rendezvous watcher); it must exit 143 at once with the failure file."""
    env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base), **env}
    env.pop(contract.SM_HPS, None)
    process = subprocess.Popen([sys.executable, "-m", "dogbreed.train"], env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if waiting_line in line:
                break
        else:
            pytest.fail("".join(seen)[-3000:])
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == train.EXIT_SIGTERM
        assert time.monotonic() - signalled < 15
    finally:
        process.kill()
        process.wait()
    assert "SIGTERM while waiting for the other ranks to join" in paths.failure_file.read_text()


def test_sigterm_while_a_rank_waits_for_a_peer_that_never_comes_ends_the_job_at_once(make_job):
    """A rank whose master never answers waits in init_process_group's C++ retry loop, where a
    Python signal handler cannot run: SIGTERM used to be ignored for the whole 10-minute
    rendezvous timeout. Now it exits 143 at once with a failure file."""
    paths = make_job(DDP_HPS, name="lonely")
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # nobody listens: no master
    _sigterm_once_waiting(paths, env, "event=rendezvous rank=1 world_size=2")


def test_sigterm_while_torchrun_waits_for_the_first_host_ends_the_job_at_once(make_job):
    """The second host of a two-host job: its torchrun waits for the first host's rendezvous
    store, which never comes up; StopTrainingJob's SIGTERM still ends it at once."""
    paths = make_job(DDP_HPS, name="second-host")
    paths.input_config_dir.mkdir(parents=True, exist_ok=True)
    paths.resource_config_file.write_text(json.dumps({
        "current_host": "127.0.0.1", "hosts": ["localhost", "127.0.0.1"], "network_interface_name": "lo"}))
    env = {contract.MASTER_PORT_ENV: str(free_port())}  # nobody listens there: no first host
    _sigterm_once_waiting(paths, env, "event=launch launcher=torchrun hosts=2 node_rank=1")
