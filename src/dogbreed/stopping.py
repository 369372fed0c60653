"""How training stops on a signal: SIGTERM (``StopTrainingJob``, a spot interruption, ``docker
stop``) or SIGINT (Ctrl-C). Both end the job with a failure file naming the signal and exit code
128 + its number (143, 130), as a shell reports a process killed by it.

Standard library only (and the stdlib-only :mod:`dogbreed.contract`): every entry point installs
the handler before importing torch, which takes seconds, so a signal at any moment after the
interpreter starts is caught. Until the training loop is reached there is nothing to save: a
signal writes the failure file and ends the process at once. From :meth:`StopFlag.started` on, a
signal sets a flag the loop checks between batches, so the last completed epoch stays checkpointed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from dogbreed import contract

log = logging.getLogger("dogbreed.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


def startup_failure(signal_name: str) -> str:
    return f"stopped by {signal_name} during start-up, before training began: this run trained nothing"


class StopFlag:
    """Set by SIGTERM or SIGINT; checked between batches so a stop never leaves a half-written
    file. Before :meth:`started`, a signal writes the failure file and exits instead."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._during_startup: Callable[[str], None] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        """The signal that stopped this process (SIGTERM when the stop came from another rank)."""
        return signal.Signals(self.signum).name if self.signum else "SIGTERM"

    def install(self, during_startup: Callable[[str], None] | None = None) -> StopFlag:
        """Handle SIGTERM and SIGINT from now on; ``during_startup(signal_name)`` (writes the
        failure file) runs for a signal that arrives before :meth:`started`, then the process
        exits."""
        self._during_startup = during_startup
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced (a caller in the same process gets its
        own Ctrl-C back)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def started(self) -> None:
        """The training loop polls the flag from here on: a signal stops it after the batch."""
        self._during_startup = None

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        self.signum = self.signum or signum
        self.requested = True
        during_startup = self._during_startup
        if during_startup is None:
            log.warning("event=signal signal=%s action=stop_after_batch", name)
            return
        log.warning("event=signal signal=%s action=exit during=startup", name)
        try:
            during_startup(name)
        finally:
            # Nothing is half-written during start-up; exiting here (not raising) also ends an
            # import of torch that the signal interrupted.
            logging.shutdown()
            os._exit(exit_code(signum))


def write_startup_failure(signal_name: str, first_wins: bool = False) -> None:
    """The failure file for a signal during start-up (``first_wins``: ranks share the file)."""
    try:
        contract.write_failure(startup_failure(signal_name), first_wins=first_wins)
    except Exception as exc:  # noqa: BLE001 - a malformed environment must not keep it running
        log.error("event=failure_not_written reason=%s", exc)


def configure_logging() -> None:
    """The trainer's log format on stderr (``DOGBREED_LOG_LEVEL``, default INFO)."""
    logging.basicConfig(level=os.environ.get("DOGBREED_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def install_early() -> StopFlag:
    """The entry points' first step, before torch is imported (see the module docstring)."""
    configure_logging()
    flag = StopFlag().install(during_startup=write_startup_failure)
    log.info("event=starting pid=%d handles=%s", os.getpid(), ",".join(s.name for s in STOP_SIGNALS))
    return flag


def main() -> int:
    """``dogbreed-train`` and the train image's program: catch signals, then load the trainer."""
    if contract.print_help_if_asked(sys.argv[1:]):  # before torch: help in a fraction of a second
        return 0
    install_early()
    from dogbreed import train  # torch: after the handlers, so a signal meanwhile is not lost

    return train.main()


if __name__ == "__main__":  # how torchrun starts each rank (dogbreed.distributed.RANK_MODULE)
    sys.exit(main())
