"""Launcher logging: one line per event as ``key=value`` on stderr; progress only on a TTY.

Results a user asked for (request JSON, predictions, best hyperparameters) go to stdout; what
happened along the way goes to stderr through :func:`event`, so stdout stays parseable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("dogbreed.launcher")


def configure(level: str | None = None) -> None:
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=level or os.environ.get("DOGBREED_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


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


class Progress:
    """A single self-overwriting status line on a terminal; silent when stderr is not a TTY."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.monotonic() - self.started:6.0f}s] {text}"
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
