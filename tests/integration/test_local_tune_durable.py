"""Studies that survive and scale: `dogbreed tune --local` processes killed, resumed, and sharing
one study through a real PostgreSQL server.

The tune processes are the real CLI; their trials run the fake entry point
(``tests/fakes.py``: the real metric lines and files in milliseconds per epoch), so
the storage, signals and scheduling are what is tested, in seconds.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from fakes import FAKE_EPOCH_SECONDS_ENV, FAKE_TRAIN_COMMAND

from dogbreed.launcher.local import tuning as local_tuning

pytestmark = pytest.mark.slow

# The real CLI with the fake entry point as the trials' command.
TUNE = [sys.executable, "-c",
        "import sys; from dogbreed.launcher import cli; from dogbreed.launcher.local import runs as local_runs; "
        f"local_runs.TRAIN_COMMAND = {FAKE_TRAIN_COMMAND!r}; "
        "sys.exit(cli.main(['tune', '--local', *sys.argv[1:]]))"]


def _tune(args: list[str], epoch_seconds: float) -> subprocess.Popen[str]:
    env = {**os.environ, FAKE_EPOCH_SECONDS_ENV: str(epoch_seconds)}
    return subprocess.Popen([*TUNE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _states(storage: str, name: str) -> list[str]:
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return []
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return []
    except sqlalchemy.exc.SQLAlchemyError:  # the tuner is creating the schema this very moment
        return []
    return [t.state.name for t in study.trials]


def test_a_killed_study_keeps_its_finished_trials_and_resumes(sample_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    storage = local_tuning.default_storage(work / "tuning" / "s")
    common = ["--data", str(sample_data), "--workdir", str(work), "--space", "seeds",
              "--pruner", "none", "--epochs-max", "2"]
    first = _tune([*common, "--name", "s", "--trials", "100"], epoch_seconds=0.3)
    waited: AssertionError | None = None
    try:
        _wait_for(lambda: _states(storage, "s").count("COMPLETE") >= 2, 60, "two finished trials")
    except AssertionError as exc:
        waited = exc
    finally:
        first.send_signal(signal.SIGKILL)  # no goodbye: nothing runs after this
        _, first_log = first.communicate(timeout=30)
    if waited:  # say what the tuner was doing (it takes ~5 s here, even loaded)
        raise AssertionError(f"{waited}: states {_states(storage, 's')}; the tuner's log:\n{first_log[-4000:]}")
    killed = optuna.load_study(study_name="s", storage=storage).trials
    finished = [t.number for t in killed if t.state.name == "COMPLETE"]
    assert len(finished) >= 2
    assert all(t.user_attrs["curve"] for t in killed if t.state.name == "COMPLETE")

    # --resume continues the same study: the finished trials count, numbering goes on.
    resumed = _tune([*common, "--resume", "s", "--trials", "2"], epoch_seconds=0.02)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    answer = json.loads(out)  # the answer; the whole study is in its result file
    result = {**json.loads(Path(answer["result_file"]).read_text()), **answer}
    numbers = [t["number"] for t in result["trials"]]
    assert numbers == list(range(len(killed) + 2))
    assert result["this_process"]["trials"] == [len(killed), len(killed) + 1]
    assert {t["number"] for t in result["trials"] if t["state"] == "COMPLETE"} >= set(finished)
    assert Path(result["best_model_data"]).is_file()
    assert json.loads((work / "tuning" / "s.json").read_text())["trials"] == result["trials"]

    # SIGTERM (and Ctrl-C) stop gracefully: the running trial fails, the best so far is written.
    third = _tune([*common, "--resume", "s", "--trials", "100"], epoch_seconds=0.3)
    try:
        _wait_for(lambda: _states(storage, "s").count("RUNNING") >= 1 + killed_running(killed),
                  60, "a running trial")
    finally:
        third.send_signal(signal.SIGTERM)
        out, err = third.communicate(timeout=60)
    assert third.returncode == 143, err[-3000:]
    stopped = json.loads(out)
    stopped = {**json.loads(Path(stopped["result_file"]).read_text()), **stopped}
    assert stopped["interrupted"] == "SIGTERM" and stopped["best_trial"] is not None
    # The running trial failed — or, when the signal came after its last epoch, completed.
    assert stopped["this_process"]["counts"]["RUNNING"] == 0
    assert stopped["this_process"]["counts"]["FAIL"] <= 1
    mine = [t for t in stopped["trials"] if t["number"] in stopped["this_process"]["trials"]]
    assert all(t["failure"].startswith("interrupted by SIGTERM") for t in mine if t["state"] == "FAIL")
    assert json.loads((work / "tuning" / "s.json").read_text())["interrupted"] == "SIGTERM"


def killed_running(trials: list[optuna.trial.FrozenTrial]) -> int:
    """The trial a SIGKILL left RUNNING (the storage's heartbeat fails it after the grace period)."""
    return sum(t.state.name == "RUNNING" for t in trials)


# --- PostgreSQL -----------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl as a non-root user)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: "
                    "apt-get install postgresql (.ci/run does)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (pip install 'dogbreed[launcher]')")
    # Its own folder under /tmp: pytest's tmp_path sits in a root-only (0700) folder.
    root = Path(tempfile.mkdtemp(prefix="dogbreed-pg-"))
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)

    def as_server_user() -> None:
        if user is not None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    env = {**os.environ, "LC_ALL": "C"}
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
    started = False
    try:
        for command in ([initdb, "-D", str(data), "-U", "tuner", "--auth=trust", "-E", "UTF8"],
                        [pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                         "-w", "-t", "60", "start"]):
            done = subprocess.run(command, capture_output=True, text=True, preexec_fn=as_server_user,
                                  env=env, timeout=120)
            assert done.returncode == 0, f"{command[0]}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        started = True
        yield f"postgresql+psycopg2://tuner@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, preexec_fn=as_server_user, env=env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_two_processes_share_one_postgres_study(sample_data: Path, tmp_path: Path,
                                                postgres_url: str) -> None:
    common = ["--data", str(sample_data), "--space", "seeds", "--pruner", "hyperband",
              "--epochs-max", "3", "--storage", postgres_url, "--name", "shared", "--trials", "4"]
    workers = [_tune([*common, "--workdir", str(tmp_path / f"worker-{i}"), "--seed", str(i)],
                     epoch_seconds=0.1) for i in range(2)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.trials
    # Eight trials, each run once by exactly one of the two processes.
    assert sorted(t.number for t in trials) == list(range(8))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    mine = [set(o["this_process"]["trials"]) for o in outputs]
    assert len(mine[0]) == len(mine[1]) == 4 and not mine[0] & mine[1]
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}
    for trial in trials:  # each trial's run dir holds one run's log
        log = Path(trial.user_attrs["dir"]) / "train.log"
        assert log.read_text().count("epoch=1 ") == 1
    # The process that finished last saw every trial finished (the other may have counted one
    # still RUNNING), and its best is the study's best.
    last = max(outputs, key=lambda o: o["counts"]["COMPLETE"] + o["counts"]["PRUNED"])
    assert last["counts"]["COMPLETE"] + last["counts"]["PRUNED"] == 8, [o["counts"] for o in outputs]
    assert last["best_trial"] == max((t for t in trials if t.state.name == "COMPLETE"),
                                     key=lambda t: t.value).number
    assert all(o["storage"] == postgres_url for o in outputs)  # no password to hide here
