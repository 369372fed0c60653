"""Launcher logging: one line per event as ``key=value`` on stderr; progress bars only on a TTY.

Results a user asked for (request JSON, predictions, best hyperparameters) go to stdout; what
happened along the way goes to stderr through :func:`event`, so stdout stays parseable. On a
terminal :class:`Progress` draws tqdm bars (upload bytes, epochs, trials, job status with the
elapsed time); off a terminal it draws nothing and the ``event=…`` lines are the whole record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

log = logging.getLogger("dogbreed.launcher")


def configure(level: str | None = None) -> None:
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=level or os.environ.get("DOGBREED_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


@contextlib.contextmanager
def lines_above_bars(stream: TextIO | None = None) -> Iterator[None]:
    """On a terminal, log lines are written through tqdm (above the bars, which are redrawn
    below them) instead of into the middle of a bar; off a terminal nothing changes."""
    if not _isatty(stream or sys.stderr):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm  # tqdm only with a terminal

    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield


def _value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() for c in text) or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(name: str, /, **fields: Any) -> str:
    return " ".join([f"event={name}", *(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)])


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    log.log(level, format_event(name, **fields))


def warning(name: str, /, **fields: Any) -> None:
    event(name, logging.WARNING, **fields)


class Bar:
    """One progress bar (tqdm on a TTY); every method is a no-op on the null bar."""

    def __init__(self, tqdm_bar: Any = None) -> None:
        self._bar = tqdm_bar
        self.is_null = tqdm_bar is None  # drawing nothing: callers log event lines instead

    def advance(self, n: float = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set(self, n: float, total: float | None = None) -> None:
        """Move to ``n`` (of ``total``, when it changes)."""
        if self._bar is None:
            return
        if total is not None and total != self._bar.total:
            self._bar.total = total
        self._bar.n = n
        self._bar.refresh()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(text)

    def status(self, text: str) -> None:
        """The text after the bar (e.g. ``pruned=1 best=0.55``)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        """A log line above the bar (the bar is redrawn below it)."""
        if self._bar is not None:
            self._bar.write(line, file=self._bar.fp)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Makes progress bars on ``stream`` (default stderr) when it is a terminal."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled

    def bar(self, description: str, *, total: float | None = None, unit: str = "it",
            bytes_: bool = False, leave: bool = True) -> Bar:
        """A bar counting ``unit`` (bytes scaled to kB/MB with ``bytes_``) towards ``total``;
        without a total it shows the count and the elapsed time (a job's status)."""
        if not self.enabled:
            return Bar()
        from tqdm import tqdm  # tqdm only with a terminal

        bar_format = None if total is not None else "{desc} [{elapsed}{postfix}]"
        return Bar(tqdm(total=total, desc=description, unit="B" if bytes_ else unit,
                        unit_scale=bytes_, unit_divisor=1024 if bytes_ else 1000,
                        file=self.stream, dynamic_ncols=True, leave=leave, bar_format=bar_format))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
