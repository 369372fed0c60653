"""ModelServer and dogbreed-serve without Java: settings from the environment, the MMS config it
writes, and the refusals that happen before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_artifacts import tiny_model_dir

from dogbreed import contract
from dogbreed.processes import DirLock
from dogbreed.serve import RUN_DIR_ENV, server
from dogbreed.serve.server import ModelServer, ServerError

# Another process holding a lock until it is killed (prints "locked" once it holds it).
HOLD_LOCK = ("import sys, time; from dogbreed.processes import DirLock\n"
             "assert DirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


@pytest.fixture
def run_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="dbu-"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_settings_come_from_the_sagemaker_environment(tmp_path: Path) -> None:
    env = {contract.SAGEMAKER_BIND_TO_PORT: "9090", contract.SAGEMAKER_MULTI_MODEL: "TRUE",
           contract.SAGEMAKER_MODEL_SERVER_WORKERS: "2", contract.SAGEMAKER_MODEL_SERVER_TIMEOUT: "30",
           contract.BASE_DIR_ENV: str(tmp_path), RUN_DIR_ENV: str(tmp_path / "run")}
    s = ModelServer(env=env)
    assert (s.port, s.host, s.multi_model, s.workers, s.timeout) == (9090, "0.0.0.0", True, 2, 30)
    assert s.model_dir == tmp_path / "model" and s.run_dir == tmp_path / "run"
    assert s.url == "http://127.0.0.1:9090"
    s = ModelServer(env={contract.BIND_HOST_ENV: "127.0.0.1"})
    assert (s.port, s.host, s.multi_model, s.workers, s.timeout) == (contract.DEFAULT_BIND_PORT, "127.0.0.1",
                                                                     False, server.DEFAULT_WORKERS_PER_MODEL, None)
    assert s.model_dir == Path(contract.DEFAULT_BASE_DIR) / "model"
    assert ModelServer(port=1, host="::1", env={}).url == "http://[::1]:1"
    assert ModelServer(env={"DOGBREED_SERVE_ZYGOTE": "0"}).use_zygote is False


@pytest.mark.parametrize("name,value", [(contract.SAGEMAKER_BIND_TO_PORT, "http"),
                                        (contract.SAGEMAKER_MODEL_SERVER_WORKERS, "0"),
                                        (contract.SAGEMAKER_MODEL_SERVER_TIMEOUT, "-5"),
                                        ("DOGBREED_SERVE_WORKER_MEMORY_MB", "0"),
                                        ("DOGBREED_SERVE_WORKER_MEMORY_MB", "lots")])
def test_bad_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ServerError, match=name):
        ModelServer(env={name: value})


def test_mms_config_is_the_packaged_base_plus_this_start(run_dir: Path) -> None:
    s = ModelServer(port=0, run_dir=run_dir, multi_model=True, workers=3, timeout=45,
                    env={"DOGBREED_MMS_JVM_OPTS": "-Xmx256m -Dx=1"})
    s._make_run_dir()
    config, vmargs = s._write_config()
    props = dict(line.split("=", 1) for line in config.read_text().splitlines()  # last one wins, as in Java
                 if "=" in line and not line.startswith("#"))
    assert config.parent == run_dir
    assert props["inference_address"] == props["management_address"] == f"unix:{run_dir}/mms.sock"
    assert props["default_service_handler"] == "dogbreed.serve.handler"
    assert props["default_workers_per_model"] == "3"
    assert props["default_response_timeout_seconds"] == "45"
    assert props["decode_input_request"] == "false" and props["enable_envvars_config"] == "false"
    assert props["max_request_size"] == props["max_response_size"] == str(contract.MAX_PAYLOAD_BYTES)
    assert vmargs == ["-Xmx256m", "-Dx=1"]
    assert (run_dir / "log4j2.properties").read_text().startswith("#")
    assert DirLock(run_dir / server.LOCK_FILE).holder() == os.getpid()  # held while the server lives
    s2 = ModelServer(port=0, run_dir=run_dir, multi_model=True, env={})
    _, vmargs = s2._write_config()
    assert "-Xmx1g" in vmargs  # the base file's
    s.stop()


def test_a_run_dir_in_use_is_refused_and_free_again_once_its_owner_ends(run_dir: Path) -> None:
    """The run dir's lock, held by another live process: refused, naming it. Once that process
    is SIGKILLed the kernel has dropped the lock: taken over, no stale pid to weigh."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / server.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(ServerError, match=f"in use by process {holder.pid}"):
            ModelServer(port=0, run_dir=run_dir, multi_model=True, env={}).start()
    finally:
        holder.kill()
        holder.wait()
    ModelServer(port=0, run_dir=run_dir, multi_model=True, env={})._make_run_dir()


def test_a_run_dir_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="too long"):
        ModelServer(port=0, run_dir=tmp_path / ("x" * 100), multi_model=True, env={}).start()


def test_single_model_mode_checks_the_model_before_starting(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(ServerError, match="does not exist"):
        ModelServer(port=0, run_dir=run_dir, multi_model=False, model_dir=tmp_path / "none", env={}).start()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServerError, match="neither model.json nor model.tar.gz"):
        ModelServer(port=0, run_dir=run_dir, multi_model=False, model_dir=tmp_path / "empty", env={}).start()
    assert DirLock(run_dir / server.LOCK_FILE).holder() is None  # a failed start lets go of the run dir


def test_java_is_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    with pytest.raises(ServerError, match="java not found"):
        ModelServer(port=0, multi_model=True, env={}).start()


def test_the_cli_exits_1_with_the_reason(tmp_path: Path, run_dir: Path, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    monkeypatch.setenv(contract.BASE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(contract.SAGEMAKER_MULTI_MODEL, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    assert server.main(["--port", "0", "--run-dir", str(run_dir)]) == 1
    assert "model dir" in caplog.text and "does not exist" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_cli_documents_the_environment(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        server.main(["--help"])
    out = capsys.readouterr().out
    assert contract.SAGEMAKER_BIND_TO_PORT in out and contract.BIND_HOST_ENV in out


def test_single_model_archives_are_unpacked_into_the_run_dir(tmp_path: Path, run_dir: Path) -> None:
    from dogbreed import artifacts

    model = tiny_model_dir(tmp_path / "m")
    base = tmp_path / "opt-ml" / "model"
    artifacts.pack(model, base / artifacts.ARCHIVE_NAME)
    s = ModelServer(port=0, run_dir=run_dir, multi_model=False, model_dir=base, env={})
    s._make_run_dir()
    model_dir = s._single_model_dir()
    assert model_dir.parent == run_dir / "models" and (model_dir / artifacts.METADATA_FILE).is_file()


def test_a_taken_port_fails_the_start_before_mms(run_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s = ModelServer(port=taken.getsockname()[1], host="127.0.0.1", run_dir=run_dir, multi_model=True, env={})
        with pytest.raises(ServerError, match="cannot listen"):
            s.start()
    assert s.java is None and s.zygote is None


@pytest.mark.parametrize("name,ok", [("resnet18", True), ("a.b_c-1", True), ("x" * 128, True),
                                     ("x" * 129, False), ("-lead", False), ("a/b", False),
                                     ("a..b", False), ("", False), (None, False), ("é", False)])
def test_the_one_model_name_rule(name: object, ok: bool) -> None:
    if ok:
        assert contract.validate_model_name(name) == name
    else:
        with pytest.raises(contract.ContractError):
            contract.validate_model_name(name)


def test_a_ctrl_c_before_the_front_serves_stops_the_server(run_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing after the front was bound but before its serving loop was started
    (here: while MMS's process is being started) left stop() waiting forever in the front's
    shutdown(), which waits for a loop that never ran: `dogbreed batch --local` hung after Ctrl-C."""
    import subprocess
    import threading

    real_popen = subprocess.Popen

    def interrupted_at_java(cmd, *args, **kwargs):
        if "com.amazonaws.ml.mms.ModelServer" in cmd:
            raise KeyboardInterrupt
        return real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(server.subprocess, "Popen", interrupted_at_java)
    s = ModelServer(port=0, host="127.0.0.1", run_dir=run_dir, multi_model=True,
                    env={"DOGBREED_SERVE_ZYGOTE": "0"})
    raised: list[BaseException] = []

    def start() -> None:
        try:
            s.start()
        except BaseException as exc:  # the KeyboardInterrupt, after stop()
            raised.append(exc)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(60)  # a deadlock detector, not a timing: stop() takes milliseconds here
    assert not starting.is_alive(), "stop() hung in the front's shutdown()"
    assert [type(e) for e in raised] == [KeyboardInterrupt]
    assert s.front is not None and s.front.socket.fileno() == -1  # the port is released


def test_a_ctrl_c_while_mms_is_being_started_still_stops_it(run_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as Popen returns (MMS already running, its Popen object not yet in
    hand) left java running after `dogbreed batch --local` exited 130. The signal now waits
    until the process is recorded, so stop() ends it."""
    import signal
    import subprocess

    java = tmp_path / "jdk" / "bin" / "java"  # a java that waits to be stopped
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c 'import signal; signal.pause()' \"$@\"\n")
    java.chmod(0o755)
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def ctrl_c_as_java_starts(cmd, *args, **kwargs):
        process = real_popen(cmd, *args, **kwargs)
        if "com.amazonaws.ml.mms.ModelServer" in cmd:
            started.append(process)
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came now
        return process

    monkeypatch.setattr(server.subprocess, "Popen", ctrl_c_as_java_starts)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    s = ModelServer(port=0, host="127.0.0.1", run_dir=run_dir, multi_model=True,
                    env={**os.environ, "DOGBREED_SERVE_ZYGOTE": "0"})
    with pytest.raises(KeyboardInterrupt):
        s.start()
    assert [p.pid for p in started] == [s.java.pid]
    assert s.java.poll() is not None, "java left running"


def test_signals_held_deliver_once_after_the_block() -> None:
    import signal

    from dogbreed.processes import signals_held

    seen: list[str] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append("handler"))
    try:
        with signals_held((signal.SIGUSR1,)):
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            seen.append("block ends")
        assert seen == ["block ends", "handler"]  # after the block, once
    finally:
        signal.signal(signal.SIGUSR1, previous)
