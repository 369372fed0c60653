"""Data-parallel training across GPUs and hosts: the plan, the launch, and the collectives.

One entry point serves every shape of job. :func:`plan_world` reads the SageMaker contract
(``SM_HOSTS``/``SM_CURRENT_HOST`` or ``resourceconfig.json``, ``SM_NUM_GPUS``) and decides how
many processes run on this host:

* ``SM_NUM_GPUS > 1``: one process per GPU (NCCL);
* ``DOGBREED_NPROC_PER_HOST=N`` (``dogbreed train --local --nproc N``): N CPU processes (gloo);
* more than one host: one node per host, ranked by the host's position in ``SM_HOSTS``, with
  the first host as the rendezvous (``MASTER_ADDR``).

When the world has more than one process, the entry process hands this host's ranks to
``torch.distributed.run`` (torchrun, started as SageMaker's own PyTorch containers start it:
``--nnodes --nproc-per-node --master-addr --master-port --node-rank``), which forwards SIGTERM
and SIGINT to them and reports the first failing rank. Each rank reads torchrun's variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so running the
entry point under a torchrun of one's own works the same.

Training semantics (see README "Distributed training"): ``batch-size`` is the *global* batch.
Every rank draws the same epoch permutation, splits each global batch into ``world_size``
contiguous slices and trains on its slice; DDP averages the gradients, so an optimizer step
sees the same global batch and the same learning rate as a one-process run. Augmentation is
random per rank; BatchNorm statistics are per rank (as torchvision's reference DDP recipe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dogbreed import contract, gpu, stopping
from dogbreed.contract import ContractError, Paths

log = logging.getLogger(__name__)

# torchrun's variable names: a rank started by torchrun and one started by us look the same.
RANK_ENV, WORLD_SIZE_ENV, LOCAL_RANK_ENV = "RANK", "WORLD_SIZE", "LOCAL_RANK"
MASTER_ADDR_ENV, MASTER_PORT_ENV = "MASTER_ADDR", "MASTER_PORT"
# A fixed port on the first host for multi-host jobs (torchrun's default); one host picks a free one.
DEFAULT_MASTER_PORT = 29500
# Collectives wait this long for a peer before failing the job instead of hanging it forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# What torchrun starts in each rank: the signal handler first, then torch (dogbreed-train).
RANK_MODULE = "dogbreed.stopping"
# Ranks agree on "stop?" every this many steps (one tiny all-reduce); a SIGTERM stops every
# rank at the same step within this many steps.
STOP_CHECK_EVERY_STEPS = 4


class GpuUnusableError(ContractError):
    """The job asked for a GPU but this torch build cannot use it."""


# --- the plan -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldPlan:
    """How many processes this job runs, and where this host sits in it."""

    hosts: tuple[str, ...]
    current_host: str
    procs_per_host: int
    use_gpu: bool
    master_addr: str
    master_port: int
    socket_ifname: str | None

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.procs_per_host

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def launch_env(self, cpu_count: int | None = None) -> dict[str, str]:
        """What this host's ranks inherit besides torchrun's own variables."""
        env = {}
        if self.socket_ifname:
            # gloo and NCCL otherwise pick the interface the host name resolves to.
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = self.socket_ifname
        if not self.use_gpu:
            # N CPU ranks share this host's cores (torchrun would give each rank one thread).
            cores = cpu_count or os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // self.procs_per_host))
        return env

    def torchrun_args(self, argv: Sequence[str]) -> list[str]:
        """torchrun's command line for this host: static rendezvous on the first host, no restarts
        (a SageMaker job that fails is failed; the checkpoint is what carries it on). Only options
        every torch 2 torchrun takes: the images may pin an older torch than the dev venv. After a
        forwarded signal or a failed rank, torchrun gives the ranks 30 s before it kills them."""
        return ["--nnodes", str(len(self.hosts)), "--nproc-per-node", str(self.procs_per_host),
                "--node-rank", str(self.node_rank), "--master-addr", self.master_addr,
                "--master-port", str(self.master_port), "--max-restarts", "0",
                "--module", RANK_MODULE, *argv]


def plan_world(paths: Paths, env: Mapping[str, str] | None = None) -> WorldPlan:
    """The job's shape from the SageMaker contract (see the module docstring)."""
    env = os.environ if env is None else env
    hosts, current = contract.cluster_hosts(paths, env)
    gpus = contract.num_gpus(env)
    use_gpu = gpus > 0 and torch.cuda.is_available()
    requested = contract.procs_per_host(env)
    if use_gpu:
        procs = requested or min(gpus, torch.cuda.device_count())
    else:
        procs = requested or 1
    if len(hosts) > 1:
        addr = hosts[0]
        port = int(env.get(contract.MASTER_PORT_ENV) or DEFAULT_MASTER_PORT)
        ifname = env.get("GLOO_SOCKET_IFNAME") or contract.network_interface_name(paths, env)
    else:
        addr = "127.0.0.1"
        port = int(env.get(contract.MASTER_PORT_ENV) or 0) or contract.free_port()
        ifname = env.get("GLOO_SOCKET_IFNAME") or "lo"  # one host: never leave the loopback
    return WorldPlan(hosts=tuple(hosts), current_host=current, procs_per_host=procs,
                     use_gpu=use_gpu, master_addr=addr, master_port=port, socket_ifname=ifname)


def is_rank_process(env: Mapping[str, str] | None = None) -> bool:
    """True inside a rank started by torchrun (:func:`launch` or one's own)."""
    env = os.environ if env is None else env
    return WORLD_SIZE_ENV in env and RANK_ENV in env


# --- GPU truth ----------------------------------------------------------------------------------
# Kept under these names for check_gpu's callers; the parsing lives in dogbreed.gpu.
nvidia_driver_version = gpu.host_driver_version
parse_driver_version = gpu.parse_driver_version


def nvidia_device_files(dev: Path = Path("/dev")) -> list[str]:
    try:
        return sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    except OSError:
        return []


def gpu_request(env: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> str | None:
    """Why this job expects a GPU, or None.

    ``SM_NUM_GPUS > 0`` (the toolkit counts GPUs with nvidia-smi) or NVIDIA device files in the
    container. ``NVIDIA_VISIBLE_DEVICES`` alone is no request: the images set it to ``all`` so
    the NVIDIA runtime exposes GPUs where there are some, and a CPU host leaves it dangling;
    it counts when it names devices and their files are there.
    """
    env = os.environ if env is None else env
    reasons = []
    gpus = contract.num_gpus(env)
    if gpus > 0:
        reasons.append(f"{contract.SM_NUM_GPUS}={gpus}")
    devices = nvidia_device_files(dev)
    if devices:
        reasons.append("/dev/" + ",".join(devices))
        visible = env.get("NVIDIA_VISIBLE_DEVICES", "")
        if visible and visible not in ("all", "none", "void"):
            reasons.append(f"NVIDIA_VISIBLE_DEVICES={visible}")
    return "; ".join(reasons) or None


def _cuda_init_error() -> str:
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the message is what we report
        return str(exc).strip().splitlines()[0][:300]
    return "torch.cuda.is_available() is False"


def check_gpu(env: Mapping[str, str] | None = None, dev: Path = Path("/dev"),
              cuda_available: Callable[[], bool] = torch.cuda.is_available,
              driver_version: Callable[[], str | None] = nvidia_driver_version) -> None:
    """Fail fast when the job asks for a GPU that this torch build cannot use.

    Otherwise a driver older than the wheel's CUDA would quietly train on the CPU for hours.
    """
    request = gpu_request(env, dev)
    if request is None or cuda_available():
        return
    driver = driver_version() or "unknown (no /proc/driver/nvidia/version, no nvidia-smi)"
    wheel_cuda = torch.version.cuda or "none (a CPU-only torch build)"
    raise GpuUnusableError(
        f"GPU requested ({request}) but torch cannot use it ({_cuda_init_error()}): NVIDIA "
        f"driver {driver}, torch {torch.__version__} built for CUDA {wheel_cuda}. Fix: run on "
        f"an instance whose driver supports CUDA {wheel_cuda} (see README 'GPU drivers'), or "
        f"rebuild the train image FROM an nvidia/cuda:{wheel_cuda}-base image (NVIDIA's CUDA "
        f"forward-compatibility libraries, switched on at start for older drivers: make build "
        f"BASE_IMAGE=...), or run on a CPU instance"
    )


# --- the agent: one per host ----------------------------------------------------------------------
def launch(plan: WorldPlan, argv: Sequence[str], on_sigterm: Callable[[], None], exit_code: int = 143) -> int:
    """Run this host's ranks of the entry point with ``argv`` under torchrun; return the job's
    exit code: 0, the first failing rank's code (128 + N for a rank killed by signal N), or
    128 + N when this process got signal N (torchrun forwards it and waits for the ranks).

    ``on_sigterm``: called if SIGTERM arrives while torchrun waits for the other hosts (before
    any rank starts), before the process exits with ``exit_code``."""
    # torchrun's modules load only for a job with more than one rank.
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for key, value in plan.launch_env().items():
        os.environ.setdefault(key, value)
    try:
        # torchrun installs its own handlers just before it starts the ranks; until then a
        # SIGTERM during the rendezvous with the other hosts ends this process at once.
        with sigterm_ends_the_wait(on_sigterm, exit_code):
            log.info("event=launch launcher=torchrun hosts=%d node_rank=%d procs_per_host=%d "
                     "world_size=%d backend=%s master=%s:%d", len(plan.hosts), plan.node_rank,
                     plan.procs_per_host, plan.world_size, plan.backend, plan.master_addr,
                     plan.master_port)
            torchrun.run(torchrun.parse_args(plan.torchrun_args(argv)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else stopping.exit_code(-failure.exitcode)
        log.error("event=rank_failed rank=%d exit_code=%d", rank, code)
        return code
    except SignalException as exc:
        log.warning("event=signal signal=%s action=ranks_stopped", signal.Signals(exc.sigval).name)
        return stopping.exit_code(exc.sigval)
    return 0


# --- inside a rank --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is a plain one-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    host: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}" + (f" on {self.host}" if self.host else "")

    # Sharding -----------------------------------------------------------------------------------
    def shard_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        return batch if self.size == 1 else batch.tensor_split(self.size)[self.rank]

    def shard_range(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (for evaluation)."""
        bounds = torch.linspace(0, n, self.size + 1).round().long().tolist()
        return range(bounds[self.rank], bounds[self.rank + 1])

    # Collectives --------------------------------------------------------------------------------
    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_max(self, value: float, device: torch.device) -> float:
        if self.size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def stop_requested_by(self, local_stop: bool, device: torch.device) -> int | None:
        """The lowest rank that was asked to stop, agreed by all ranks; None when none was."""
        if self.size == 1:
            return 0 if local_stop else None
        mine = float(self.size - self.rank) if local_stop else 0.0
        agreed = self.all_max(mine, device)
        return None if agreed == 0 else self.size - int(agreed)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running stats) everywhere. DDP broadcasts them before each
        training forward, so after the last step each rank still holds its own: evaluating
        without this would score a slightly different model on each shard."""
        if self.size == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around ``model`` when there is more than one rank, else ``model`` itself."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel  # one rank never needs it

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


ONE_PROCESS = World()


def _deferred(_signum: int, _frame: Any) -> None:
    """The Python-level SIGTERM handler while :func:`sigterm_ends_the_wait` owns the signal: the
    watcher thread acts on it (the handler must exist so the C-level one sees the signal)."""


@contextlib.contextmanager
def sigterm_ends_the_wait(on_sigterm: Callable[[], None], exit_code: int) -> Iterator[None]:
    """While the main thread waits inside C++, a SIGTERM still ends the process promptly.

    A rendezvous (``init_process_group``, torchrun's with the other hosts) retries through
    EINTR, and a Python signal handler runs only once the call returns: a host whose peer never
    came kept waiting 10 minutes after a SIGTERM (SageMaker's StopTrainingJob then SIGKILLs it,
    without a failure file). Inside this block SIGTERM belongs to a watcher thread: the C-level
    handler writes the signal number to ``set_wakeup_fd`` at once, and the thread calls
    ``on_sigterm`` (the failure file) and exits. Code that installs its own SIGTERM handler
    inside the block (torchrun, once its ranks start) takes the signal back from the watcher.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_handler = signal.signal(signal.SIGTERM, _deferred)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if select.select([reader], [], [], 0.5)[0] and signal.SIGTERM in reader.recv(64):
                if not done.is_set() and signal.getsignal(signal.SIGTERM) is _deferred:
                    log.warning("event=signal signal=SIGTERM action=exit during=rendezvous")
                    on_sigterm()
                    os._exit(exit_code)

    watcher = threading.Thread(target=watch, name="dogbreed-rendezvous-sigterm", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous_handler)
        watcher.join(2.0)
        reader.close()
        writer.close()


def init_rank(env: Mapping[str, str] | None = None,
              on_sigterm: Callable[[], None] | None = None,
              exit_code: int = 143) -> tuple[World, torch.device | None]:
    """Join the process group as the rank the environment names; returns the world and device.

    ``on_sigterm``: called if SIGTERM arrives while waiting for the other ranks, before the
    process exits with ``exit_code`` (see :func:`sigterm_ends_the_wait`)."""
    env = os.environ if env is None else env
    rank, size = int(env[RANK_ENV]), int(env[WORLD_SIZE_ENV])
    local_rank = int(env.get(LOCAL_RANK_ENV, "0"))
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device is not None else "gloo"
    with sigterm_ends_the_wait(on_sigterm, exit_code) if on_sigterm else contextlib.nullcontext():
        log.info("event=rendezvous rank=%d world_size=%d master=%s:%s timeout_s=%d", rank, size,
                 env.get(MASTER_ADDR_ENV), env.get(MASTER_PORT_ENV), COLLECTIVE_TIMEOUT.total_seconds())
        dist.init_process_group(backend=backend, rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=device)
    host = env.get(contract.SM_CURRENT_HOST) or socket.gethostname()
    log.info("event=rank_started rank=%d world_size=%d local_rank=%d host=%s pid=%d backend=%s",
             rank, size, local_rank, host, os.getpid(), backend)
    return World(rank=rank, size=size, local_rank=local_rank, host=host), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
