"""What a killed local endpoint leaves behind, found from its run dir's pid files and stopped
without ever signalling a pid that now belongs to another program (the real thing, with MMS:
tests/integration/test_local_endpoint.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dogbreed.launcher.local import endpoint as local_endpoint

SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"


def _alive(pid: int) -> bool:
    return local_endpoint._pid_alive(pid)


def test_leftovers_of_the_run_dir_are_stopped_with_their_group_and_nothing_else(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dogbreed.launcher")
    run_dir = tmp_path / "endpoint" / "mms"
    run_dir.mkdir(parents=True)
    # A zygote stand-in: a session leader naming a file of the run dir, with a child in its group.
    ours = subprocess.Popen([sys.executable, "-c", SLEEPER, f"{run_dir}/zygote.sock"],
                            start_new_session=True)
    # What a recycled pid looks like: a live process that has nothing to do with the run dir
    # (another run dir whose name merely starts the same is no match either).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              f"{run_dir}2/zygote.sock"], start_new_session=True)
    try:
        (run_dir / "zygote.pid").write_text(f"{ours.pid}\n")
        (run_dir / "mms.pid").write_text(f"{other.pid}\n")
        deadline = time.monotonic() + 10
        while len(_group(ours.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = _group(ours.pid)
        assert len(members) == 2
        assert local_endpoint.leftover_processes(run_dir) == {"zygote": ours.pid}
        stopped = local_endpoint.stop_leftovers(run_dir, grace=5)
        assert stopped == [{"process": "zygote", "pid": ours.pid}]
        assert ours.wait(5) is not None
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in members)  # the child in its group too
        assert other.poll() is None  # never signalled
        assert f"event=endpoint_leftover_stopped process=zygote pid={ours.pid}" in caplog.text
        assert local_endpoint.stop_leftovers(run_dir) == []  # nothing left: nothing to do
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait()


def test_no_pid_files_no_leftovers(tmp_path: Path) -> None:
    assert local_endpoint.leftover_processes(tmp_path / "missing") == {}
    (tmp_path / "mms.pid").write_text("not a pid")
    (tmp_path / "zygote.pid").write_text(f"{2**22 + 12345}\n")  # no such process
    assert local_endpoint.stop_leftovers(tmp_path) == []
    assert local_endpoint.running_front(tmp_path) is None


def _group(pgid: int) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(proc.name))
    return members
