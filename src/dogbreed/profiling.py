"""Per-step training timings and device samples for the profiler report (``profile.json``).

The trainer marks three points per step: start, inputs ready (index, copy and on-device
augmentation done) and step done (forward, backward, optimizer). On a GPU the marks are CUDA
events, resolved only when the file is written, so recording never synchronises the device; on
CPU they are ``perf_counter`` readings. A daemon thread samples GPU utilisation and memory
through NVML (``nvidia-ml-py``) when training on CUDA, and the process's CPU use and RSS
(psutil) everywhere, every :data:`SAMPLE_SECONDS` — the interval the seeds' SageMaker profiler
config uses (500 ms).

``dogbreed report`` reads the file (see :mod:`dogbreed.debugger_report`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
SAMPLE_SECONDS = 0.5


class _Sampler(threading.Thread):
    """GPU (NVML) and process (psutil) samples every ``interval`` seconds until stopped."""

    def __init__(self, device: torch.device, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(name="dogbreed-profiler", daemon=True)
        self.interval = interval
        self.started_at = time.monotonic()
        self.samples: list[dict[str, float]] = []
        self.gpu_name: str | None = None
        self._stop_event = threading.Event()
        self._nvml: Any = None
        self._handle: Any = None
        if device.type == "cuda":
            try:
                import pynvml  # optional (nvidia-ml-py, train extra)

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(self._handle)
                self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
                self._nvml = pynvml
            except Exception as exc:  # noqa: BLE001 - no NVML: the report says so, training goes on
                log.warning("event=nvml_unavailable error=%s", exc)
        try:
            import psutil  # optional: the report imports this module without it

            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call only primes the counter
        except Exception:  # noqa: BLE001 - psutil is a train dependency; be safe anyway
            self._process = None

    def sample(self) -> dict[str, float]:
        row: dict[str, float] = {"t": round(time.monotonic() - self.started_at, 3)}
        if self._process is not None:
            row["cpu_percent"] = self._process.cpu_percent(None)
            row["rss_mb"] = round(self._process.memory_info().rss / 2**20, 1)
        if self._nvml is not None:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            row["gpu_percent"] = float(util.gpu)
            row["gpu_memory_mb"] = round(memory.used / 2**20, 1)
        return row

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 - a failed sample must never stop training
                log.warning("event=profiler_sample_failed error=%s", exc)
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2 * self.interval)
        if self._nvml is not None and not self.is_alive():
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()  # NVML counts inits; give back this one
            self._nvml = None


class StepRecorder:
    """Marks per training step; cheap enough to stay on for every run (no device sync)."""

    def __init__(self, device: torch.device, sample: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.current_epoch = 0
        # Per step: [epoch, images, start, ready, done] (events on CUDA, seconds on CPU).
        self._steps: list[list[Any]] = []
        self._open: list[Any] | None = None
        self._sampler = _Sampler(device) if sample else None
        if self._sampler is not None:
            self._sampler.start()
            # A run that ends in an exception (a pruned trial, SIGTERM) never calls write():
            # the sampler stops when the recorder is collected instead of sampling forever.
            weakref.finalize(self, self._sampler.stop)

    def epoch(self, epoch: int) -> StepRecorder:
        self.current_epoch = epoch
        return self

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._open = [self.current_epoch, 0, self._mark(), None, None]

    def data_ready(self) -> None:
        if self._open is not None:
            self._open[3] = self._mark()

    def end(self, images: int) -> None:
        if self._open is None or self._open[3] is None:
            return
        self._open[1] = images
        self._open[4] = self._mark()
        self._steps.append(self._open)
        self._open = None

    def steps(self) -> list[dict[str, float]]:
        if self.cuda and self._steps:
            torch.cuda.synchronize(self.device)
        rows = []
        for epoch, images, start, ready, done in self._steps:
            if self.cuda:
                data_s, compute_s = start.elapsed_time(ready) / 1000, ready.elapsed_time(done) / 1000
            else:
                data_s, compute_s = ready - start, done - ready
            rows.append({"epoch": epoch, "images": images, "data_s": round(data_s, 6),
                         "compute_s": round(compute_s, 6)})
        return rows

    def summary(self) -> dict[str, Any]:
        profile: dict[str, Any] = {"device": str(self.device), "steps": self.steps(),
                                   "sample_seconds": SAMPLE_SECONDS, "samples": []}
        if self._sampler is not None:
            self._sampler.stop()
            profile["samples"] = self._sampler.samples
            profile["gpu_name"] = self._sampler.gpu_name
            profile["nvml"] = any("gpu_percent" in row for row in self._sampler.samples)
        if self.cuda:
            profile["cuda_max_memory_allocated_mb"] = round(
                torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return profile

    def write(self, output_data_dir: Path) -> Path:
        """Stop sampling and write ``profile.json``; returns its path."""
        path = Path(output_data_dir) / PROFILE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary()) + "\n")
        return path


class _NoSteps(StepRecorder):
    """The default for callers that do not profile (benchmarks, tests): records nothing."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), sample=False)

    def start(self) -> None:
        pass


NO_STEPS = _NoSteps()
