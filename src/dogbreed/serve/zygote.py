"""A fork server for MMS backend workers, so loading a model does not start Python from zero.

MMS starts one Python process per model worker and each would import torch & co. again
(4-9 s here, against a 0.5 s cold-load budget). The server tells MMS that this module's *shim*
is its Python. The shim sends its argv, environment, cwd and stdin/stdout/stderr (as file
descriptors, over a unix socket) to the *zygote*, which imported everything once, and forks;
the child becomes the worker, writing straight into the pipes MMS reads. The shim stays as the
worker's stand-in for MMS: it forwards signals and exits with the worker's status; if MMS kills
the shim, the zygote kills the worker's process group. Workers die with the zygote
(``PR_SET_PDEATHSIG``), so the zygote owns their whole lifetime.

The zygote reports on its stdout, one JSON line each: ``{"ready": pid}`` once warm, then
``{"died": model, "pid", "exit", "forked", "oom"}`` for each worker that dies while it runs (MMS
1.1 never restarts a worker it did not start; the server reloads that model, or unloads it if the
kernel killed it for memory). ``DOGBREED_SERVE_WORKER_MEMORY_MB`` caps each worker's address
space (RLIMIT_AS, set in the child right after the fork). It is single-threaded
(fork and threads do not mix) and never runs a torch op after warming up.
``DOGBREED_SERVE_ZYGOTE=0`` has MMS start plain Python workers instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import random
import resource
import runpy
import selectors
import signal
import socket
import stat
import sys
import time
import traceback

from dogbreed.serve import WORKER_MEMORY_ENV

SOCKET_NAME = "zygote.sock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHIM_NAME = "python-worker"
PRELOAD = ("torch", "torchvision", "PIL.Image", "multiprocessing", "mms.model_service_worker",
           "mms.model_loader", "mms.service", "dogbreed.serve.handler", "dogbreed.models",
           "onnxruntime")
# Skipped when not installed: ONNX Runtime serves models with a graph on CPU workers (the serve
# extra has it); a process without it serves them with torch.
OPTIONAL_PRELOAD = ("onnxruntime",)
# The kernel's count of OOM kills in this process's memory cgroup (v2, then v1's "oom_kill"
# line, kernel >= 4.13): a worker that died of SIGKILL while it rose was killed for memory.
OOM_COUNTERS = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


def oom_kills(paths: tuple[str, ...] = OOM_COUNTERS) -> int | None:
    """OOM kills so far in this cgroup, or None where the kernel does not say."""
    for path in paths:
        try:
            with open(path, encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def limit_address_space(megabytes: str | None) -> None:
    """In a new worker: at most ``megabytes`` more address space than it has now (RLIMIT_AS)."""
    if not megabytes or not megabytes.strip():
        return
    extra = int(megabytes) * 2**20
    if extra <= 0:
        raise ValueError(f"worker memory limit must be a positive number of MB, got {megabytes!r}")
    with open("/proc/self/status", encoding="ascii") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


# Beside each worker's socket: the FIFOs its MMS worker made (see record_fifos).
FIFO_RECORD_SUFFIX = ".fifos"


def argv_value(argv: list[str], flag: str) -> str:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), "")


def record_fifos(record: str) -> None:
    """In a new worker: note each FIFO it makes in ``record``. MMS's worker makes two per model
    load (``<tmp>/<io_fd>-stdout``/``-stderr``, named after MMS's connection id, in the process
    it forks per connection) and removes them only when it exits cleanly; a killed worker left
    them, and its socket, in the run dir for good (94 FIFOs after 16 minutes of faults)."""
    make = os.mkfifo
    with open(record, "a", encoding="utf-8"):
        pass  # there from the start: the socket is removed with it even if no FIFO comes

    def mkfifo(path: str, *args: object, **kwargs: object) -> None:
        make(path, *args, **kwargs)  # type: ignore[arg-type]
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(os.path.abspath(os.fsdecode(path)) + "\n")

    os.mkfifo = mkfifo  # type: ignore[assignment]


def remove_worker_files(sock_name: str) -> None:
    """Remove a dead worker's socket and the FIFOs it recorded (only sockets and FIFOs)."""
    record = sock_name + FIFO_RECORD_SUFFIX
    try:
        with open(record, encoding="utf-8") as handle:
            fifos = [line.rstrip("\n") for line in handle if line.strip()]
    except OSError:
        fifos = []
    for path, kind in [*((f, stat.S_ISFIFO) for f in fifos), (sock_name, stat.S_ISSOCK)]:
        with contextlib.suppress(OSError):
            if kind(os.lstat(path).st_mode):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.unlink(record)


def remove_stale_worker_files(directory: str) -> None:
    """At start: the files of workers an earlier zygote left (they died with it)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.endswith(FIFO_RECORD_SUFFIX):
                remove_worker_files(os.path.join(directory, name[: -len(FIFO_RECORD_SUFFIX)]))


# Taken once through a model load and a 224 px forward (weights_only unpickler, meta-device
# build, oneDNN kernels), so every worker forked later finds them warm.
WARM_ARCHITECTURES = ("resnet18", "mobilenet_v2")


def write_shim(path: str, socket_path: str) -> str:
    """Write the executable MMS is told to use as its Python interpreter."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {package_root!r})\n"
                     f"from dogbreed.serve.zygote import shim_main\nshim_main({socket_path!r}, {sys.executable!r})\n")
    os.chmod(path, 0o755)
    return path


def shim_main(socket_path: str, python: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError:  # no zygote (stopped, or never started): be a plain interpreter
        os.execv(python, [python, *sys.argv[1:]])
    # One JSON line (json.dumps writes no raw newline); the socket stays open both ways: the
    # zygote takes its closing for MMS having killed the shim.
    request = json.dumps({"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode() + b"\n"
    sent = socket.send_fds(sock, [request], [0, 1, 2])
    sock.sendall(request[sent:])
    replies = sock.makefile("r")
    try:
        pid = int(replies.readline())

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        code = int(replies.readline())
    except (OSError, ValueError):
        code = 1
    os._exit(code)


def warm_up(architectures: tuple[str, ...] = WARM_ARCHITECTURES, size: int = 224) -> None:
    """One thread only: no OpenMP pool may exist when the zygote forks."""
    # Here, in the zygote process: the server and the shim import this module without torch.
    import torch

    from dogbreed import models, onnx_export

    torch.set_num_threads(1)
    for arch in architectures:
        buffer = io.BytesIO()
        torch.save(models.build_model(arch, 2, models.WEIGHTS_NONE).state_dict(), buffer)
        buffer.seek(0)
        model = models.build_for_inference(arch, 2, torch.load(buffer, weights_only=True))
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    onnx_export.warm_up_runtime(size)  # ONNX Runtime's one-time set-up, once for all workers


class Zygote:
    def __init__(self, socket_path: str, preload: tuple[str, ...] = PRELOAD,
                 warm: tuple[str, ...] = WARM_ARCHITECTURES) -> None:
        self.socket_path, self.preload, self.warm = socket_path, preload, warm
        self.workers: dict[int, tuple[socket.socket, str, float]] = {}  # pid -> (shim, model, fork time)
        self.oom_kills_at_fork: dict[int, int | None] = {}  # pid -> the cgroup's OOM kills then
        self.worker_sockets: dict[int, str] = {}  # pid -> the socket MMS gave it (--sock-name)
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stopping = False

    def report(self, **event: object) -> None:
        print(json.dumps(event), flush=True)

    def serve(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.listener.bind(self.socket_path)  # first: a shim that comes early waits in the backlog
        remove_stale_worker_files(os.path.dirname(os.path.abspath(self.socket_path)))
        self.listener.listen(64)
        for name in self.preload:
            try:
                __import__(name)
            except ImportError:
                if name not in OPTIONAL_PRELOAD:
                    raise
        if self.warm:
            warm_up(self.warm)
        for sock in (self.wakeup_r, self.wakeup_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        self.report(ready=os.getpid())
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        self.wakeup_r.recv(4096)
                else:
                    self._check_shim(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()
        for pid in list(self.workers):
            self._kill_group(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            if sock_name := self.worker_sockets.pop(pid, ""):
                remove_worker_files(sock_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _check_shim(self, conn: socket.socket, pid: int) -> None:
        """The shim never talks after its request: readable means it hung up (MMS killed it)."""
        try:
            if conn.recv(1):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._kill_group(pid)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            while data and not data.endswith(b"\n"):
                data += conn.recv(1 << 16) or b"\n"  # a shim gone mid-request: fails as JSON
            request = json.loads(data)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except (OSError, ValueError) as exc:
            print(f"zygote: bad request from a shim: {exc}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_worker(request, fds, conn)  # never returns
        for fd in fds:
            os.close(fd)
        argv = request["argv"]
        model = argv_value(argv, "--model-name")
        self.workers[pid] = (conn, model, time.time())
        self.worker_sockets[pid] = argv_value(argv, "--sock-name")
        self.oom_kills_at_fork[pid] = oom_kills()
        try:
            conn.sendall(f"{pid}\n".encode())
        except OSError:
            pass
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.workers:
                continue
            conn, model, forked = self.workers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            before, now = self.oom_kills_at_fork.pop(pid, None), None
            if code == -signal.SIGKILL and before is not None:
                now = oom_kills()
            if model and not self.stopping:
                # "oom": the kernel's OOM killer took it (the cgroup's count rose since its fork).
                self.report(died=model, pid=pid, exit=code, forked=forked,
                            oom=now is not None and before is not None and now > before)
            self.selector.unregister(conn)
            try:
                conn.setblocking(True)
                conn.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
            except OSError:
                pass
            conn.close()
            self._kill_group(pid)  # whatever the worker forked and left behind
            if sock_name := self.worker_sockets.pop(pid, ""):
                remove_worker_files(sock_name)

    @staticmethod
    def _kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _become_worker(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # its own group, so it can be killed with whatever it forks
            limit_address_space(request["env"].get(WORKER_MEMORY_ENV))
            if sock_name := argv_value(request["argv"], "--sock-name"):
                record_fifos(sock_name + FIFO_RECORD_SUFFIX)
            libc = ctypes.CDLL(None)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the zygote
            # ...and so does whatever it forks (MMS's worker forks one process per connection,
            # which would otherwise outlive a dead zygote, orphaned, still answering MMS).
            os.register_at_fork(after_in_child=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            self.selector.close()
            for sock in (self.listener, self.wakeup_r, self.wakeup_w, conn, *(w[0] for w in self.workers.values())):
                sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            sys.stdout.reconfigure(line_buffering=True)
            sys.stderr.reconfigure(line_buffering=True)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = request["argv"][1:]  # [worker script, args...]
            extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:0] = [os.path.dirname(os.path.abspath(sys.argv[0])), *extra]
            random.seed()
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: B036 - the child must never return into the zygote's loop
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m dogbreed.serve.zygote SOCKET_PATH")
    Zygote(sys.argv[1]).serve()
