"""The worker zygote and its shim: argv/env/cwd/stdio hand-over, exit codes, signals, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dogbreed.serve import zygote

WORKER_SCRIPT = """
import os, sys, time
print("argv", sys.argv[1:], flush=True)
print("cwd", os.getcwd(), flush=True)
print("env", os.environ.get("ZYGOTE_TEST"), flush=True)
print("path", os.environ.get("PYTHONPATH", "").split(":")[0] in sys.path, flush=True)
print("pid", os.getpid(), flush=True)
sys.stderr.write("to stderr\\n")
mode = sys.argv[1]
if mode == "sleep":
    time.sleep(60)
sys.exit(int(mode))
"""


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def zyg(tmp_path: Path) -> Iterator[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix="dbz-"))
    sock = str(run_dir / zygote.SOCKET_NAME)
    proc = subprocess.Popen([sys.executable, "-c",
                             f"from dogbreed.serve.zygote import Zygote; Zygote({sock!r}, preload=(), warm=()).serve()"],
                            start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"ready": proc.pid}  # its report channel: stdout
    shim = zygote.write_shim(str(run_dir / zygote.SHIM_NAME), sock)
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    try:
        yield {"proc": proc, "shim": shim, "script": str(script), "sock": sock, "run_dir": run_dir, "tmp": tmp_path}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def run_shim(zyg: dict, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "ZYGOTE_TEST": "from-the-shim", "PYTHONPATH": str(zyg["tmp"] / "extra")}
    return subprocess.Popen([zyg["shim"], zyg["script"], *args], cwd=zyg["tmp"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_worker_runs_with_the_shims_argv_env_cwd_and_pipes(zyg: dict) -> None:
    proc = run_shim(zyg, "3", "--flag")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["argv"] == "['3', '--flag']"
    assert lines["cwd"] == str(zyg["tmp"])
    assert lines["env"] == "from-the-shim"
    assert lines["path"] == "True"
    assert int(lines["pid"]) != proc.pid  # forked by the zygote, not the shim itself
    assert "to stderr" in err


def test_sigterm_to_the_shim_reaches_the_worker(zyg: dict) -> None:
    proc = run_shim(zyg, "sleep")
    pid = int(next(line for line in iter(proc.stdout.readline, "") if line.startswith("pid")).split()[1])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    wait_for(lambda: not alive(pid))


def test_killing_the_shim_kills_the_worker_and_what_it_forked(zyg: dict, tmp_path: Path) -> None:
    script = tmp_path / "forker.py"
    script.write_text("import os, sys, time\n"
                      "child = os.fork()\n"
                      "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                      "print('pids', os.getpid(), child, flush=True)\n"
                      "time.sleep(60)\n")
    proc = subprocess.Popen([zyg["shim"], str(script)], stdout=subprocess.PIPE, text=True)
    _, worker, child = proc.stdout.readline().split()
    proc.kill()  # what MMS does to a worker it gives up on (destroyForcibly)
    proc.wait(10)
    wait_for(lambda: not alive(int(worker)) and not alive(int(child)))


def test_without_a_zygote_the_shim_is_a_plain_interpreter(zyg: dict) -> None:
    zyg["proc"].terminate()
    assert zyg["proc"].wait(10) == 0
    assert not os.path.exists(zyg["sock"])  # the zygote removes its socket
    proc = run_shim(zyg, "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "env from-the-shim" in out
    assert f"pid {proc.pid}" in out  # exec'd in place


def test_stopping_the_zygote_stops_its_workers(zyg: dict) -> None:
    proc = run_shim(zyg, "sleep")
    pid = int(next(line for line in iter(proc.stdout.readline, "") if line.startswith("pid")).split()[1])
    zyg["proc"].terminate()
    zyg["proc"].wait(10)
    wait_for(lambda: not alive(pid))
    assert proc.wait(10) != 0


def test_a_worker_dies_with_a_killed_zygote(zyg: dict) -> None:
    """SIGKILL leaves the zygote no chance to clean up: its workers still go (PR_SET_PDEATHSIG),
    so nothing outlives the process that owns them and MMS sees its worker die."""
    proc = run_shim(zyg, "sleep")
    pid = int(next(line for line in iter(proc.stdout.readline, "") if line.startswith("pid")).split()[1])
    assert alive(pid)
    zyg["proc"].kill()
    zyg["proc"].wait(10)
    wait_for(lambda: not alive(pid))
    assert proc.wait(10) != 0  # the shim, MMS's stand-in for the worker, reports it gone


def test_a_dead_worker_is_reported_with_its_model(zyg: dict) -> None:
    """MMS 1.1 never restarts a forked worker: the server reads this report and reloads the model."""
    proc = run_shim(zyg, "sleep", "--model-name", "dogs")
    pid = int(next(line for line in iter(proc.stdout.readline, "") if line.startswith("pid")).split()[1])
    os.kill(pid, signal.SIGKILL)
    proc.wait(10)
    record = json.loads(zyg["proc"].stdout.readline())
    assert (record["died"], record["pid"], record["exit"]) == ("dogs", pid, -signal.SIGKILL)
    assert 0 < time.time() - record["forked"] < 60


@pytest.mark.parametrize("text,expected", [
    ("low 0\nhigh 0\nmax 3\noom 4\noom_kill 2\n", 2),  # cgroup v2 memory.events
    ("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", 7),  # cgroup v1 memory.oom_control
    ("oom_kill_disable 0\nunder_oom 0\n", None),  # a kernel before 4.13: no count
])
def test_oom_kills_reads_the_cgroup_count(tmp_path: Path, text: str, expected: int | None) -> None:
    counter = tmp_path / "memory.events"
    counter.write_text(text)
    assert zygote.oom_kills((str(tmp_path / "missing"), str(counter))) == expected


def test_the_worker_memory_limit_is_the_kernels(tmp_path: Path) -> None:
    """RLIMIT_AS over what the process has: a larger allocation fails in that process only."""
    script = (f"import sys; sys.path.insert(0, {str(Path(zygote.__file__).parents[2])!r})\n"
              "from dogbreed.serve import zygote\n"
              "zygote.limit_address_space('64')\n"
              "small = bytearray(16 * 2**20)\n"
              "try:\n    big = bytearray(256 * 2**20)\nexcept MemoryError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "refused", out.stderr
