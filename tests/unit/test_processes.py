"""What the kernel keeps for us: children that die with their parent, and folder locks that
end with their holder (dogbreed.processes). Real processes, real SIGKILLs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dogbreed.processes import DirLock, dying_with_this_process

# A parent that starts a sleeping child through dying_with_this_process, prints its pid, sleeps.
PARENT = ("import subprocess, sys, time\n"
          "from dogbreed.processes import dying_with_this_process\n"
          "child = subprocess.Popen(dying_with_this_process([sys.executable, '-c', 'import time; time.sleep(120)']),"
          " start_new_session=True)\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(120)\n")
HOLDER = ("import sys, time; from dogbreed.processes import DirLock\n"
          "assert DirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def _ended(pid: int, timeout: float = 20.0) -> bool:
    try:
        process = psutil.Process(pid)
        process.wait(timeout)  # not our child: psutil polls until it is gone
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return process.status() == psutil.STATUS_ZOMBIE
    return True


def test_a_child_started_through_it_dies_when_its_parent_is_sigkilled() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert psutil.Process(child).cmdline()[-1] == "import time; time.sleep(120)"  # exec'd: the prelude is gone
        assert psutil.Process(child).ppid() == parent.pid
    finally:
        parent.kill()  # a SIGKILL: nothing of the parent's own runs
        parent.wait()
    assert _ended(child), "the child outlived its SIGKILLed parent"


def test_the_command_is_run_as_given() -> None:
    result = subprocess.run(dying_with_this_process([sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "c"]),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "['a b', 'c']\n"


def test_a_lock_names_its_live_holder_and_is_free_once_the_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "x.lock"
    assert DirLock(path).holder() is None  # no file yet
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert DirLock(path).holder() == holder.pid
        assert DirLock(path).acquire() is False
    finally:
        holder.kill()
        holder.wait()
    assert path.read_text().strip() == str(holder.pid)  # the dead holder's pid is still written...
    assert DirLock(path).holder() is None  # ...but the lock says it is gone
    lock = DirLock(path)
    assert lock.acquire() and lock.acquire()  # taken over; taking it again is a no-op
    assert DirLock(path).holder() == lock.holder() == psutil.Process().pid
    lock.release()
    assert DirLock(path).holder() is None


@pytest.mark.parametrize("content", ["", "garbage", "1"])
def test_a_free_lock_whatever_its_file_holds_has_no_holder(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.lock"
    path.write_text(content)
    assert DirLock(path).holder() is None
