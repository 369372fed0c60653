"""What multi-model-server 1.1.11 (pinned) cannot do about a model's life, done beside it.

1. **A refused model's reason.** MMS answers a failed worker start with a fixed "Failed to start
   workers" and drops the worker's message. The handler keeps a load failure instead of dying;
   after MMS registers a model, :meth:`ModelLifecycle.load` asks it once
   (``X-Dogbreed-Load-Status``) and, if refused, unregisters it and answers the reason.
2. **A model.tar.gz url**, which MMS would read as a .mar (zip): unpacked once
   (:func:`dogbreed.artifacts.resolve_model_dir`), removed again on ``DELETE``.
3. **An unload never strands a request.** ``DELETE`` stops new invokes (503 + ``Retry-After``),
   waits up to :data:`DRAIN_SECONDS` for those in flight, then unloads; any still waiting in MMS
   are answered 503 at once (MMS left them hanging 65-90 s, then 504).
4. **A dead worker is noticed.** The zygote reports each worker that dies while its model is
   loaded; MMS would retry the dead worker's socket forever while ``/ping`` says healthy. The
   model is re-registered (503 meanwhile; ``GET /models/{name}`` says ``RECOVERING``); a request
   the dying worker held gets that 503 too, not MMS's 500 "Worker died.". A load that a worker
   death or MMS's 500 failed is cleaned up in MMS (which keeps the model with no worker) and
   tried once more.
5. **Out of memory is a 507 and an unload** (multi-model; SageMaker's container contract, page
   "mms-container-apis": 507 when a model cannot be loaded for memory, and SageMaker unloads
   models). A worker the kernel killed for memory (the zygote's ``"oom"``) or that answered 507
   (its allocation failed, e.g. under ``DOGBREED_SERVE_WORKER_MEMORY_MB``) has its model unloaded
   rather than reloaded into the same death; the caller gets 507; other models keep serving.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from dogbreed import artifacts, contract
from dogbreed.serve import LOAD_STATUS_HEADER
from dogbreed.serve.client import Response, ServeClient, UnixHTTPConnection

log = logging.getLogger("dogbreed.serve")

# What POST /models takes (SageMaker sends model_name and url). MMS's initial_workers,
# batch_size, max_batch_delay... are a 400: a caller-chosen max_batch_delay=5000 made every
# invoke wait 5 s.
REGISTER_PARAMETERS = frozenset({"model_name", "url", "synchronous"})
JSON_HEADERS = {"content-type": "application/json"}
DRAIN_SECONDS = 5.0
RETRY_AFTER_SECONDS = "2"
MAX_IDLE_CONNECTIONS = 16
MMS_WORKER_DIED = "Worker died."  # MMS 1.1's 500 to the requests a dying worker held
DEATH_REPORT_SECONDS = 2.0  # how long an invoke MMS answered "Worker died." waits for the zygote's report
OUT_OF_MEMORY = "OUT_OF_MEMORY"


def answer(call: Callable[[], Response], what: str) -> Response:
    """``call()``, a request through to MMS, as the answer a caller gets whatever happens
    (``what``: the request, for the log): MMS not running is a 503, too slow a 504, hanging up a
    502, anything else a 500; never an exception, never a dropped caller."""
    try:
        return call()
    except (ConnectionRefusedError, FileNotFoundError):
        return Response.error(503, "ServiceUnavailable", "the model server (MMS) is not running")
    except TimeoutError:
        return Response.error(504, "GatewayTimeout", "the model server did not answer in time")
    except (OSError, http.client.HTTPException) as exc:
        log.warning("event=mms_disconnected path=%s error=%s", what, type(exc).__name__)
        return Response.error(502, "BadGateway", f"the model server closed the connection ({type(exc).__name__})")
    except Exception as exc:  # the server outlives anything a request does
        log.exception("event=front_error path=%s", what)
        return Response.error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")


class ModelLifecycle:
    def __init__(self, mms: ServeClient, resolve: Callable[[str, str], tuple[Path, Path | None]],
                 response_timeout: float, load_timeout: float, multi_model: bool = True) -> None:
        self.mms, self.resolve, self.multi_model = mms, resolve, multi_model
        self.response_timeout, self.load_timeout = response_timeout, load_timeout
        self.unpacked: dict[str, Path] = {}  # name -> the archive unpacked for it
        self.registered: dict[str, str] = {}  # name -> the model dir MMS loaded it from
        self.registered_at: dict[str, float] = {}  # name -> when its last registration began
        self.state = threading.Condition()
        self.in_flight: dict[str, set[http.client.HTTPConnection]] = {}  # name -> its calls into MMS
        self.paused: dict[str, str] = {}  # name -> "UNLOADING" / "RECOVERING"
        self.idle: list[http.client.HTTPConnection] = []  # connections to MMS, kept for the next invoke
        self.loading: dict[str, http.client.HTTPConnection] = {}  # name -> its registration call into MMS
        self.deaths: dict[str, tuple[float, bool]] = {}  # name -> (when its last worker death was reported, for memory?)
        self.recoveries = 0

    def load(self, name: str, model_dir: str) -> Response:
        """Register a checked model dir with MMS; a model the handler refused is unregistered and
        its reason answered. A load that fails on the server's side (a worker that died while it
        started: MMS's 500 "Failed to start workers", or a cut-off registration) leaves nothing
        registered and is tried once more: it says nothing about the model."""
        reply = self._load_once(name, model_dir)
        if reply.status >= 500 and reply.status not in (503, 507):  # 503: a cut-off one, being cleaned up
            log.warning("event=model_load_retried model=%s status=%d reason=%s", name, reply.status,
                        reply.message())
            reply = self._load_once(name, model_dir)
        return reply

    def _load_once(self, name: str, model_dir: str) -> Response:
        self.registered.pop(name, None)
        self.registered_at[name] = time.time()
        body = json.dumps({"model_name": name, "url": model_dir}).encode()
        reply, cut = self._register_in_mms(name, body)
        if cut:
            # MMS waits for the dead worker until its response timeout, holding its model lock
            # (an unload would wait as long): clean up behind the caller, who gets an answer now.
            self._unload_in_background(name, "its worker died while it loaded", "RECOVERING")
            return reply
        if 200 <= reply.status < 300:
            probe = self.mms.invoke(name, b"", "application/json", {LOAD_STATUS_HEADER: "1"})
            if probe.status != 200:  # refused by the handler: its reason, and no model left behind
                self.mms.unload_model(name)
                return Response(probe.status, dict(JSON_HEADERS), probe.body)
            self.registered[name] = model_dir
        elif reply.status != 409:
            # MMS keeps a model whose worker failed to start, with no worker: every later load
            # would be a 409 and every invoke wait for a worker that never comes.
            with contextlib.suppress(OSError, http.client.HTTPException):
                self.mms.unload_model(name)
        return reply

    def _register_in_mms(self, name: str, body: bytes) -> tuple[Response, bool]:
        """``POST /models`` to MMS, cut off by :meth:`watch` if the new worker dies meanwhile
        (MMS would wait out its whole registration timeout for a worker killed before it said
        hello, then answer 500): ``(reply, cut off)``."""
        conn = UnixHTTPConnection(self.mms.unix_path or "", self.load_timeout)
        conn.connect()
        with self.state:
            self.loading[name] = conn
        try:
            conn.request("POST", "/models", body=body, headers=JSON_HEADERS)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()), False
        except (OSError, http.client.HTTPException):
            cut_by = getattr(conn, "cut_by", None)
            if cut_by is None:
                raise
            if cut_by == OUT_OF_MEMORY:
                return Response.error(507, "InsufficientStorage",
                                      f"the worker of model {name} ran out of memory while it loaded"), True
            reply = Response.error(503, "ServiceUnavailable",
                                   f"the worker of model {name} died while it loaded; retry in {RETRY_AFTER_SECONDS} s")
            reply.headers["retry-after"] = RETRY_AFTER_SECONDS
            return reply, True
        finally:
            with self.state:
                if self.loading.get(name) is conn:
                    del self.loading[name]
            conn.close()

    def register(self, body: bytes, query: str) -> Response:
        params: dict[str, Any] = dict(parse_qsl(query))
        try:
            params.update(json.loads(body) if body.strip() else {})
        except (ValueError, TypeError, RecursionError):  # not JSON, or not an object
            return Response.error(400, "BadRequest", 'body must be a JSON object {"model_name", "url"}')
        unknown = sorted(set(params) - REGISTER_PARAMETERS)
        if unknown or str(params.get("synchronous", "true")).lower() != "true":
            return Response.error(400, "BadRequest", f"POST /models takes model_name and url only, not "
                                  f"{unknown or 'synchronous'}: workers, batching and timeouts are set by the platform")
        name, url = params.get("model_name"), params.get("url")
        if isinstance(name, str) and name in self.paused:  # being unloaded or recovered: not yet
            return self._unavailable(name)
        try:
            if not isinstance(url, str) or not url:
                return Response.error(400, "BadRequest", "Parameter url is required.")
            if self.mms.describe_model(contract.validate_model_name(name)).status == 200:
                return Response.error(409, "ConflictStatusException", f"Model {name} is already registered.")
            model_dir, unpacked = self.resolve(url, name)
        except FileNotFoundError:
            return Response.error(404, "ModelNotFoundException", f"Model not found: {url}")
        except contract.ContractError as exc:
            return Response.error(400, "BadRequest", f"Parameter model_name: {exc}")
        except artifacts.ArtifactError as exc:
            return Response.error(400, "ArtifactError", str(exc))
        except OSError as exc:  # e.g. "file name too long": the caller's url, not the server
            return Response.error(400, "BadRequest", f"Parameter url ({len(url)} characters): "
                                  f"{exc.strerror or type(exc).__name__}")
        reply = Response.error(500, "InternalServerError", "registration did not finish")
        try:
            reply = self.load(name, str(model_dir))
        finally:  # tidy up before answering: the caller may look at once
            if unpacked is not None and 200 <= reply.status < 300:
                self.unpacked[name] = unpacked
            elif unpacked is not None:
                shutil.rmtree(unpacked, ignore_errors=True)
        return reply

    def invoke(self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Forward one invoke of ``name`` (:meth:`_forward`); a 507 (the worker ran out of memory)
        also unloads the model, so that memory comes back and the other models keep serving."""
        reply = self._forward(name, method, path, body, headers)
        if reply.status == 507 and self.multi_model and name in self.registered:
            self._unload_in_background(name, "its worker ran out of memory")
        return reply

    def _forward(self, name: str, method: str, path: str, body: bytes, headers: dict[str, str],
                 reuse: bool = True) -> Response:
        """Forward one invoke of ``name``, tracked so an unload or a recovery can answer it.

        Connections to MMS are kept for the next invoke (a new one per invoke was 0.5 ms of the
        1.1 ms the front adds; 64 px model, this machine); one that MMS closed meanwhile is
        retried once on a new connection.
        """
        started = time.monotonic()
        with self.state:
            if name in self.paused:
                return self._unavailable(name)
            kept = self.idle.pop() if self.idle and reuse else None
            conn = kept or UnixHTTPConnection(self.mms.unix_path or "", self.response_timeout)
            if kept is None:
                conn.connect()  # connected before it is tracked: _pause can always cut it off
            self.in_flight.setdefault(name, set()).add(conn)
        keep = False
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            reply = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            keep = not resp.will_close
            if reply.status == 500 and reply.message() == MMS_WORKER_DIED:
                # The worker died under this request: the zygote's report says whether the
                # kernel killed it for memory (507, the model is unloaded) or it is reloaded.
                return self._unavailable(name, OUT_OF_MEMORY if self._died_of_memory(name, started) else "RECOVERING")
            return reply
        except (OSError, http.client.HTTPException) as exc:
            cut_by = getattr(conn, "cut_by", None)  # the pause may be over by now: say why it was cut
            if cut_by is not None:
                return self._unavailable(name, cut_by)
            if kept is None or isinstance(exc, TimeoutError):
                raise
        finally:
            with self.state:
                calls = self.in_flight.get(name, set())
                calls.discard(conn)
                if not calls:
                    self.in_flight.pop(name, None)
                    self.state.notify_all()
                if keep and len(self.idle) < MAX_IDLE_CONNECTIONS:
                    self.idle.append(conn)
                else:
                    conn.close()
        return self._forward(name, method, path, body, headers, reuse=False)  # the kept one was stale

    def _unload_in_background(self, name: str, why: str, state: str = "UNLOADING") -> None:
        """Unload ``name`` after the caller has its answer: its worker ran out of memory (SageMaker
        unloads models on a 507; a local caller gets the same effect) or died while it loaded.
        Meanwhile the model is paused (``state``): invokes and loads of it answer at once."""
        log.warning("event=model_unload model=%s reason=%s", name, why)
        with self.state:
            self.paused[name] = state  # before the thread starts: no load may slip in first

        def unload() -> None:
            try:
                if name in self.registered:  # requests may be in flight: drained, then cut off
                    self.unload(name, f"/models/{name}", why=state)
                else:  # never registered here: nothing in flight, only MMS's leftover
                    self.mms.unload_model(name)
            except Exception:  # the thread outlives a failed unload; the log says why
                log.exception("event=model_unload_failed model=%s", name)
            finally:
                with self.state:
                    self.paused.pop(name, None)
                    self.state.notify_all()

        threading.Thread(target=unload, name=f"dogbreed-unload-{name}", daemon=True).start()

    def _died_of_memory(self, name: str, since: float) -> bool:
        """Whether the zygote reports (within :data:`DEATH_REPORT_SECONDS`) that a worker of
        ``name`` died after ``since`` because the kernel killed it for memory."""
        deadline = time.monotonic() + DEATH_REPORT_SECONDS
        with self.state:
            while True:
                when, oom = self.deaths.get(name, (0.0, False))
                if when >= since or time.monotonic() >= deadline:
                    return when >= since and oom
                self.state.wait(max(0.01, deadline - time.monotonic()))

    def invoke_single(self, method: str, query: str, body: bytes, headers: dict[str, str]) -> Response:
        """Single-model ``/invocations``, by name: MMS's own finds only a model loaded at start,
        not one recovered after its worker died."""
        name = contract.SINGLE_MODEL_NAME
        target = f"/models/{name}/invoke" + (f"?{query}" if query else "")
        return self._forward(name, method, target, body, headers)  # never unloaded: it is the endpoint

    def _unavailable(self, name: str, why: str | None = None) -> Response:
        why = why or self.paused.get(name, "UNLOADING")
        if why == OUT_OF_MEMORY:  # the multi-model contract's answer: SageMaker unloads models
            return Response.error(507, "InsufficientStorage",
                                  f"model {name} ran out of memory and was unloaded")
        reply = Response.error(503, "ServiceUnavailable", f"model {name} is {why.lower()}; retry in {RETRY_AFTER_SECONDS} s")
        reply.headers["retry-after"] = RETRY_AFTER_SECONDS
        return reply

    @contextlib.contextmanager
    def _paused(self, name: str, why: str, drain: float) -> Any:
        """No new invokes of ``name``; those in flight get ``drain`` s, then are cut off (503 now,
        not MMS's timeout later)."""
        deadline = time.monotonic() + drain
        with self.state:
            self.paused[name] = why
            while self.in_flight.get(name) and time.monotonic() < deadline:
                self.state.wait(max(0.01, deadline - time.monotonic()))
            stuck = list(self.in_flight.get(name, ()))
        for conn in stuck:
            conn.cut_by = why  # type: ignore[attr-defined]
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        try:
            yield
        finally:
            with self.state:
                self.paused.pop(name, None)
                self.state.notify_all()

    def unload(self, name: str, path: str, why: str = "UNLOADING", drain: float | None = None) -> Response:
        if self.paused.get(name) == "RECOVERING":
            return self._unavailable(name)
        with self._paused(name, why, DRAIN_SECONDS if drain is None else drain):
            reply = self.mms.request("DELETE", path, b"", {}, self.load_timeout)
            if reply.status == 200:
                self.registered.pop(name, None)
                if name in self.unpacked:
                    shutil.rmtree(self.unpacked.pop(name), ignore_errors=True)
            return reply

    def describe(self, name: str, path: str, headers: dict[str, str]) -> Response:
        reply = self.mms.request("GET", path, b"", headers)
        why = self.paused.get(name)
        if why and reply.status == 200:  # what MMS cannot say: this model does not serve now
            with contextlib.suppress(ValueError, AttributeError):
                described = json.loads(reply.body)
                for model in described if isinstance(described, list) else [described]:
                    model["status"] = why
                    for worker in model.get("workers", []):
                        worker["status"] = why
                return Response(200, dict(JSON_HEADERS), json.dumps(described, indent=2).encode())
        return reply

    def watch(self, reports: Iterable[bytes | str]) -> None:
        """Follow the zygote's reports (its stdout) and recover each model that lost a worker."""
        for line in reports:
            try:
                report = json.loads(line)
                name, forked = report.get("died"), float(report.get("forked", 0))
            except (ValueError, AttributeError, TypeError):
                continue  # "ready", or anything else the zygote's imports printed
            # A worker forked before the model's last registration is one an unload stopped.
            if not isinstance(name, str) or forked < self.registered_at.get(name, 0):
                continue
            oom = report.get("oom") is True
            with self.state:
                loading = self.loading.get(name)
                self.deaths[name] = (time.monotonic(), oom)
                self.state.notify_all()
            if loading is not None:  # died while it loaded: the load answers (and retries) now
                loading.cut_by = OUT_OF_MEMORY if oom else "worker died"  # type: ignore[attr-defined]
                with contextlib.suppress(OSError, AttributeError):
                    loading.sock.shutdown(socket.SHUT_RDWR)
            elif name in self.registered and name not in self.paused and oom and self.multi_model:
                # Reloading it would be killed again: unload it, as SageMaker does on a 507.
                log.error("event=worker_out_of_memory model=%s pid=%s action=unload", name, report.get("pid"))
                try:
                    self.unload(name, f"/models/{name}", why=OUT_OF_MEMORY, drain=0.0)
                except Exception:  # the watcher outlives any one unload
                    log.exception("event=model_unload_failed model=%s", name)
            elif name in self.registered and name not in self.paused:
                try:
                    self.recover(name)
                except Exception:  # the watcher outlives any one recovery
                    log.exception("event=worker_recovery_failed model=%s", name)

    def recover(self, name: str) -> None:
        """Unload (MMS cannot restart a forked worker) and load again from the same dir."""
        started, model_dir = time.monotonic(), self.registered[name]
        log.warning("event=worker_died model=%s action=reload", name)
        with self._paused(name, "RECOVERING", 0.0):
            self.mms.unload_model(name)
            reply = self.load(name, model_dir)
            if 200 <= reply.status < 300:
                self.recoveries += 1
                log.info("event=worker_recovered model=%s seconds=%.2f", name, time.monotonic() - started)
            else:
                log.error("event=worker_recovery_failed model=%s status=%d reason=%s", name, reply.status,
                          reply.message())


class DirectClient:
    """The container API of a :class:`ModelLifecycle` in this process, called without HTTP: what
    the front would answer, one hop fewer. The local endpoint's router (SageMaker's front-end
    stand-in) drives its in-process server through it; it has :class:`ServeClient`'s calls."""

    def __init__(self, models: ModelLifecycle, timeout: float) -> None:
        self.models, self.timeout = models, timeout

    def load_model(self, name: str, url: str) -> Response:
        body = json.dumps({"model_name": name, "url": str(url)}).encode()
        return answer(lambda: self.models.register(body, ""), "/models")

    def unload_model(self, name: str) -> Response:
        path = f"/models/{quote(name, safe='')}"
        return answer(lambda: self.models.unload(name, path), path)

    def invoke(self, name: str, body: bytes, content_type: str | None = "application/x-image",
               headers: Mapping[str, str] | None = None) -> Response:
        path = f"/models/{quote(name, safe='')}/invoke"
        headers = {**(headers or {}), **({"Content-Type": content_type} if content_type else {})}
        return answer(lambda: self.models.invoke(name, "POST", path, body, headers), path)
