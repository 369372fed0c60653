"""A fork server for MMS backend workers, so loading a model does not start Python from zero.

MMS starts one Python process per model worker (``<python> mms/model_service_worker.py ...``),
and each would import torch, torchvision and the toolkit again: seconds on a small machine,
far over a 1 s cold-load budget. Instead the server gives MMS this module's *shim* as its
"python" executable. The shim hands its argv, environment, working dir and stdin/stdout/stderr
(as file descriptors, over a unix socket) to the *zygote*, a process that imported all of that
once; the zygote forks, and the child becomes the worker, writing straight into the pipes MMS
reads. The shim stays as the worker's stand-in for MMS: it forwards signals to the worker and
exits with its exit status; if MMS kills the shim, the zygote kills the worker's process group.

The zygote is single-threaded (fork and threads do not mix) and never runs a torch op itself.
Set ``DOGBREED_SERVE_ZYGOTE=0`` to have MMS start plain Python workers instead.
"""

from __future__ import annotations

import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import time

SOCKET_NAME = "zygote.sock"
SHIM_NAME = "python-worker"
READY_FILE = "zygote.ready"  # beside the socket, once everything is imported
# Beside the socket: one JSON line {"model", "pid", "exit", "forked"} per worker that died while
# the zygote runs. MMS 1.1 cannot restart a worker it did not start (it retries the dead
# worker's socket forever, the model stays READY); the front reads this and reloads the model.
DEATHS_FILE = "worker-deaths"
# Imported once in the zygote; every worker inherits them.
PRELOAD = (
    "torch",
    "torchvision",
    "PIL.Image",
    "multiprocessing",
    "mms.model_service_worker",
    "mms.model_loader",
    "mms.service",
    "dogbreed.serve.handler",
    "dogbreed.models",
)
# Architectures whose load path (weights_only unpickling, meta-device build, oneDNN kernels for
# a 224 px forward) the zygote runs once, so every worker forked later finds it warm.
WARM_ARCHITECTURES = ("resnet18", "mobilenet_v2")
WARM_IMAGE_SIZE = 224
_HEADER = struct.Struct("!I")


def _send_message(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(message).encode()
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int, buffer: bytearray) -> bytes:
    while len(buffer) < size:
        chunk = sock.recv(max(65536, size - len(buffer)))
        if not chunk:
            raise EOFError("peer closed the connection")
        buffer.extend(chunk)
    out = bytes(buffer[:size])
    del buffer[:size]
    return out


def _recv_message(sock: socket.socket, buffer: bytearray, with_fds: bool = False) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if with_fds and not buffer:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 3)
        if not data:
            raise EOFError("peer closed the connection")
        buffer.extend(data)
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, buffer))
    return json.loads(_recv_exact(sock, size, buffer)), fds


# --- the shim (what MMS runs as "python") -----------------------------------------------------------
def write_shim(path: str, socket_path: str) -> str:
    """Write the executable MMS is told to use as its Python interpreter."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = (
        f"#!{sys.executable} -S\n"
        "# Written by dogbreed-serve: hands this worker to the zygote (dogbreed.serve.zygote).\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        "from dogbreed.serve.zygote import shim_main\n"
        f"shim_main({socket_path!r}, {sys.executable!r})\n"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(script)
    os.chmod(path, 0o755)
    return path


def shim_main(socket_path: str, python: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError:
        # No zygote (stopped, or never started): be a plain interpreter.
        os.execv(python, [python, *sys.argv[1:]])
    request = {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
    _send_message(sock, request, fds=[0, 1, 2])
    buffer = bytearray()
    try:
        reply, _ = _recv_message(sock, buffer)
        pid = int(reply["pid"])

        def forward(signum: int, _frame: object) -> None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        reply, _ = _recv_message(sock, buffer)
        code = int(reply.get("exit", 1))
    except (EOFError, OSError, ValueError, KeyError):
        code = 1
    os._exit(code)


# --- the zygote ----------------------------------------------------------------------------------
def warm_up(architectures: tuple[str, ...] = WARM_ARCHITECTURES, size: int = WARM_IMAGE_SIZE) -> None:
    """Take each architecture through what a model load and a first request do, in this process.

    First calls are expensive in a fresh process: the weights_only unpickler, the meta-device
    machinery, oneDNN generating its kernels. Done here once, forked workers inherit the result.
    One torch thread only: no OpenMP pool may exist when the zygote forks.
    """
    import io

    import torch

    from dogbreed import models

    torch.set_num_threads(1)
    for arch in architectures:
        buffer = io.BytesIO()
        torch.save(models.build_model(arch, 2, models.WEIGHTS_NONE).state_dict(), buffer)
        buffer.seek(0)
        model = models.build_for_inference(arch, 2, torch.load(buffer, weights_only=True))
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))


class Zygote:
    def __init__(self, socket_path: str, preload: tuple[str, ...] = PRELOAD,
                 warm: tuple[str, ...] = WARM_ARCHITECTURES) -> None:
        self.socket_path = socket_path
        self.preload = preload
        self.warm = warm
        self.children: dict[int, socket.socket] = {}  # worker pid -> its shim's connection
        self.workers: dict[int, tuple[str, float]] = {}  # worker pid -> (model name, fork time)
        self.deaths_path = os.path.join(os.path.dirname(socket_path), DEATHS_FILE)
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stopping = False

    def serve(self) -> None:
        # Listen first: a shim that connects while the imports run waits in the backlog.
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.listener.bind(self.socket_path)
        self.listener.listen(64)
        for name in self.preload:
            __import__(name)
        if self.warm:
            warm_up(self.warm)
        ready = os.path.join(os.path.dirname(self.socket_path), READY_FILE)
        with open(ready, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        print(f"zygote ready pid={os.getpid()} socket={self.socket_path}", file=sys.stderr, flush=True)
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    try:
                        self.wakeup_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    self._shim_gone(key.data)
            self._reap()
        self._kill_all()

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        fds: list[int] = []
        try:
            request, fds = _recv_message(conn, bytearray(), with_fds=True)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except (OSError, EOFError, ValueError) as exc:
            print(f"zygote: bad request from shim: {exc}", file=sys.stderr, flush=True)
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
        self.children[pid] = conn
        argv = request.get("argv", [])
        model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model-name"), "")
        self.workers[pid] = (model, time.time())
        try:
            _send_message(conn, {"pid": pid})
        except OSError:
            pass
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _shim_gone(self, pid: int) -> None:
        """The shim's connection closed (MMS killed it): take its worker down too."""
        conn = self.children.get(pid)
        if conn is None:
            return
        try:
            if conn.recv(1):
                return  # the shim does not talk after its request; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        self._kill_group(pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._record_death(pid, code)
            try:
                self.selector.unregister(conn)
                conn.setblocking(True)
                _send_message(conn, {"exit": code if code >= 0 else 128 - code})
            except (OSError, KeyError, ValueError):
                pass
            conn.close()
            self._kill_group(pid)  # whatever the worker forked and left behind

    def _record_death(self, pid: int, code: int) -> None:
        model, forked = self.workers.pop(pid, ("", 0.0))
        if self.stopping or not model:
            return
        line = json.dumps({"model": model, "pid": pid, "exit": code, "forked": forked}) + "\n"
        try:
            with open(self.deaths_path, "a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError as exc:
            print(f"zygote: cannot record a worker's death: {exc}", file=sys.stderr, flush=True)

    @staticmethod
    def _kill_group(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_all(self) -> None:
        for pid in list(self.children):
            self._kill_group(pid)
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def _become_worker(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # its own group, so it can be killed with whatever it forks
            import ctypes  # and it dies with the zygote, which owns its lifetime (PR_SET_PDEATHSIG)

            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            self.selector.close()
            for sock in (self.listener, self.wakeup_r, self.wakeup_w, conn, *self.children.values()):
                sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            sys.stdout.reconfigure(line_buffering=True)
            sys.stderr.reconfigure(line_buffering=True)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            argv = request["argv"][1:]  # [worker script, args...]
            script = argv[0]
            extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:0] = [os.path.dirname(os.path.abspath(script)), *extra]
            sys.argv = argv
            import random

            random.seed()
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: B036 - the child must never return into the zygote's loop
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m dogbreed.serve.zygote SOCKET_PATH")
    Zygote(argv[0]).serve()


if __name__ == "__main__":
    main()
