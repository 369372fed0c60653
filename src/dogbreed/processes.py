"""Starting child processes that a Ctrl-C cannot orphan.

SIGINT's handler raises KeyboardInterrupt (and the launcher's SIGTERM handler does too). If one
lands while ``subprocess.Popen`` returns, the child is already running but the caller never gets
its Popen object, so nothing stops it: a ``batch --local`` interrupted at that moment left MMS
running. :func:`signals_held` keeps those signals back for the few lines that start a child and
record it, then delivers them, so the caller's cleanup sees the child.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
