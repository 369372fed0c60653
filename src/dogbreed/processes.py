"""Child processes that nothing can orphan, and folders only one process may own.

The kernel does the book-keeping, so nothing has to be found again after a crash: a child
started through :func:`dying_with_this_process` is killed when its parent ends however it
ends (SIGKILL included), and a :class:`DirLock` is released when its holder ends, so a stale
owner is never taken for a live one (a pid file's trouble: a dead pid, or one reused since).

SIGINT's handler raises KeyboardInterrupt (and the launcher's SIGTERM handler does too). If one
lands while ``subprocess.Popen`` returns, the child is already running but the caller never gets
its Popen object, so nothing stops it: a ``batch --local`` interrupted at that moment left MMS
running. :func:`signals_held` keeps those signals back for the few lines that start a child and
record it, then delivers them, so the caller's cleanup sees the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Run as ``python -c`` with the parent's pid and the command: the kernel is to SIGKILL this process
# when its parent ends (kept across exec); a parent gone before the prctl is checked by pid.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0)\n"
                    "if os.getppid() != int(sys.argv[1]): sys.exit(137)\n"
                    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def dying_with_this_process(command: Sequence[str]) -> list[str]:
    """``command`` run so that the kernel SIGKILLs it when this process ends, whatever ends it
    (``PR_SET_PDEATHSIG``, set by a short Python prelude that then execs the command). The
    kernel ties it to the starting *thread*: start it from one that lives as long (the main one)."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


class DirLock:
    """An exclusive ``flock`` on ``path``, which holds the holder's pid (for messages only): the
    lock, not the pid, says whether the owner lives, and the kernel drops it when the owner ends."""

    def __init__(self, path: Path) -> None:
        self.path, self._fd = Path(path), -1

    def acquire(self) -> bool:
        """Take the lock if free (never waits); True if this process holds it now."""
        if self._fd >= 0:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def holder(self) -> int | None:
        """The pid of the live process holding the lock (this one included), else None."""
        if self._fd >= 0:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: the pid inside is the holder's, once written
                for _ in range(100):  # the holder writes it right after taking the lock
                    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    if text.isdigit() and int(text) > 1:
                        return int(text)
                    time.sleep(0.01)
                return None
            return None  # free: whoever wrote the pid has ended
        finally:
            os.close(fd)  # drops the shared lock, if taken


@contextlib.contextmanager
def signals_held(signums: tuple[signal.Signals, ...] = HELD_SIGNALS) -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM are only recorded; on leaving it the previous
    handlers are back and each signal received meanwhile is raised once, in order. Assign the
    started process inside the block. Only the main thread handles signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        received.append(signum)

    # A handler not set from Python (getsignal answers None) cannot be put back: leave it be.
    previous = {s: signal.signal(s, hold) for s in signums if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # runs the restored handler now (KeyboardInterrupt, …)
