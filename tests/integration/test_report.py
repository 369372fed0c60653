"""`dogbreed report` on real local runs with smdebug on: rule verdicts, profiler, the HTML page
as headless Chromium renders it.

Two tiny runs share the module: a healthy one (lr 0.001 over the sample's 80 training images)
and one made to overfit on purpose (one image per breed, 8 epochs: it memorises five photos
while the validation loss climbs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, colour_fraction, ink_fraction, render

from dogbreed import contract, debugger_config, debugger_report, profiling, train
from dogbreed.debugger_report import builtin_rules as rules
from dogbreed.launcher import cli

pytestmark = pytest.mark.slow

ALL_RULES = {"VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization",
             "LossNotDecreasing", "LowGPUUtilization"}


def _train(base: Path, data: Path, **hyperparameters: str) -> Path:
    hps = {"model": "resnet18", "image-size": "32", "weights": "none", **hyperparameters}
    paths = contract.prepare_local_job(base, hps, {contract.TRAINING_CHANNEL: data})
    debugger_config.write_local_hook_config(paths)
    train.run(contract.load_hyperparameters([], paths), paths)
    return base


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    healthy = _train(root / "healthy", sample_data, epochs="3", **{"batch-size": "8", "lr": "0.001"})
    tiny = root / "one-per-breed"
    for breed in sorted((sample_data / "train").iterdir()):
        (tiny / "train" / breed.name).mkdir(parents=True)
        first = sorted(breed.iterdir())[0]
        shutil.copy(first, tiny / "train" / breed.name / first.name)
    (tiny / "valid").symlink_to(sample_data / "valid")
    overfit = _train(root / "overfit", tiny, epochs="8", **{"batch-size": "5", "lr": "0.01"})
    return {"healthy": healthy, "overfit": overfit}


def test_every_rule_gets_a_verdict_and_the_healthy_run_keeps_decreasing(runs):
    result = debugger_report.build_run_report(runs["healthy"])
    assert set(result["verdicts"]) == ALL_RULES
    assert all(v in (rules.ISSUES, rules.NO_ISSUES, rules.NOT_APPLICABLE)
               for v in result["verdicts"].values()), result["verdicts"]
    assert result["verdicts"]["LossNotDecreasing"] == rules.NO_ISSUES
    assert result["verdicts"]["VanishingGradient"] == rules.NO_ISSUES
    # CPU run: no GPU samples, said so rather than guessed.
    assert result["verdicts"]["LowGPUUtilization"] == rules.NOT_APPLICABLE
    saved = json.loads((runs["healthy"] / "output/data" / debugger_report.VERDICTS_FILE).read_text())
    loss_rule = next(v for v in saved if v["rule"] == "LossNotDecreasing")
    assert loss_rule["parameters"]["mode"] == "TRAIN"  # the project's rule parameter
    assert loss_rule["parameters"]["num_steps"] == 10  # AWS's default
    assert loss_rule["message"].startswith("checked ")  # it really compared windows


def test_an_ended_runs_trial_skips_smdebugs_end_of_training_wait_unless_asked(runs, monkeypatch):
    """smdebug waits SMDEBUG_TRAINING_END_DELAY_REFRESH seconds (default 1) per trial for late
    files after the end marker; on an ended run the report asks for 0, and leaves the setting as
    it found it. A user's own value still wins."""
    tensors = str(debugger_report.tensors_dir(runs["healthy"]))
    monkeypatch.delenv(rules.TRAINING_END_DELAY_ENV, raising=False)
    with debugger_report.smdebug_logs_to_stderr():
        assert rules.open_trial(tensors, "unset")._training_end_delay_refresh == 0
        assert rules.TRAINING_END_DELAY_ENV not in os.environ
        monkeypatch.setenv(rules.TRAINING_END_DELAY_ENV, "3")
        assert rules.open_trial(tensors, "set")._training_end_delay_refresh == 3
        assert os.environ[rules.TRAINING_END_DELAY_ENV] == "3"


def test_a_run_made_to_overfit_trips_overfit_or_overtraining(runs):
    verdicts = debugger_report.build_run_report(runs["overfit"])["verdicts"]
    assert set(verdicts) == ALL_RULES
    assert rules.ISSUES in (verdicts["Overfit"], verdicts["Overtraining"]), verdicts
    history = json.loads((runs["overfit"] / "output/data/metrics.json").read_text())["history"]
    assert history[-1]["valid_loss"] > 1.1 * history[-1]["train_loss"]  # it did overfit


def test_a_run_shorter_than_a_rules_window_is_not_enough_data_not_an_error(runs):
    """The overfit run trains 8 steps (5 images, batch 5, 8 epochs); LossNotDecreasing compares
    means of 10 steps. It used to say Error: "the tensors this rule reads were not saved"."""
    result = debugger_report.build_run_report(runs["overfit"])
    assert result["verdicts"]["LossNotDecreasing"] == rules.NOT_ENOUGH_DATA
    saved = json.loads((runs["overfit"] / "output/data" / debugger_report.VERDICTS_FILE).read_text())
    loss_rule = next(v for v in saved if v["rule"] == "LossNotDecreasing")
    assert loss_rule["message"] == "not enough data (8 steps, rule needs 10)"
    assert rules.ERROR not in result["verdicts"].values(), result["verdicts"]


def test_profiler_summary_splits_step_time_into_data_and_compute(runs):
    profile = json.loads((runs["healthy"] / "output/data" / profiling.PROFILE_FILE).read_text())
    assert len(profile["steps"]) == 30  # 80 images / batch 8 x 3 epochs
    assert {s["epoch"] for s in profile["steps"]} == {1, 2, 3}
    assert all(s["data_s"] > 0 and s["compute_s"] > 0 for s in profile["steps"])
    summary = debugger_report.profiler_summary(profile)
    assert summary["images"] == 240
    assert summary["images_per_sec"] > 0 and 0 < summary["data_fraction"] < 1
    assert summary["rss_peak_mb"] > 100  # psutil samples of a process holding torch


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")
def test_the_page_renders_in_headless_chromium_with_every_plot_drawn(runs, tmp_path, capsys):
    out = tmp_path / "page" / "report.html"
    assert cli.main(["report", str(runs["healthy"]), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(out)
    probe, screenshot = render(out, tmp_path)
    images = {box["id"]: box for box in probe["images"]}
    assert set(images) >= {"rule-verdicts", "epoch-curves", "step-losses", "confusion-matrix",
                           "step-time", "device-samples"}
    for name, box in images.items():
        assert box["complete"] and box["naturalWidth"] > 0, f"{name} did not load"
        assert box["w"] > 300 and box["h"] > 100, f"{name} is not shown: {box}"
        # Pixels in the screenshot where the browser placed the image: drawn, coloured plots.
        assert ink_fraction(screenshot, box) > 0.03, name
        assert colour_fraction(screenshot, box) > 0.002, name
    # Control: the same page with its images emptied renders nothing there.
    blank = tmp_path / "blank"
    blank.mkdir()
    stripped = blank / "report.html"
    html = out.read_text()
    import re

    stripped.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', html))
    blank_probe, blank_shot = render(stripped, blank)
    assert all(b["naturalWidth"] == 0 for b in blank_probe["images"])
    box = images["confusion-matrix"]
    assert colour_fraction(blank_shot, box) < colour_fraction(screenshot, box) / 5


def test_train_local_debugger_then_report(sample_data, tmp_path, capsys):
    """`dogbreed train --local --debugger` writes the hook config itself: `dogbreed report`
    on that job then gives every rule a verdict, with no hand-written config."""
    workdir = tmp_path / "work"
    assert cli.main(["train", "--local", "--workdir", str(workdir), "--data", str(sample_data),
                     "--name", "dbg", "--debugger", "--model", "resnet18", "--image-size", "32",
                     "--epochs", "2", "--batch-size", "16", "--weights", "none"]) == 0
    capsys.readouterr()
    job = workdir / "jobs" / "dbg"
    assert json.loads((job / "input/config/debughookconfig.json").read_text())["LocalPath"] == str(
        job / "output" / "tensors")
    assert cli.main(["report", "--local", "--workdir", str(workdir), "dbg"]) == 0
    result = json.loads(capsys.readouterr().out)  # smdebug's own log lines go to stderr
    assert set(result["verdicts"]) == ALL_RULES
    assert all(v in (rules.ISSUES, rules.NO_ISSUES, rules.NOT_APPLICABLE)
               for v in result["verdicts"].values()), result["verdicts"]
    # The five smdebug rules really ran on the job's tensors (only the GPU rule has nothing to read).
    assert [r for r, v in result["verdicts"].items() if v == rules.NOT_APPLICABLE] == ["LowGPUUtilization"]


def test_report_stdout_is_exactly_the_json(runs, tmp_path):
    """A real `dogbreed report` process on a debugger run: smdebug's logger writes to a handler
    bound to sys.stdout, and its ~22 INFO lines used to come before the JSON on stdout."""
    out = tmp_path / "report.html"
    result = subprocess.run([str(Path(sys.executable).with_name("dogbreed")), "report",
                             str(runs["healthy"]), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["report"] == str(out)
    # smdebug's INFO chatter (~23 lines of set-up) is silenced; SMDEBUG_LOG_LEVEL brings it
    # back, on stderr.
    assert "RULE_JOB_STOP_SIGNAL_FILENAME" not in result.stderr
    smdebug_info = re.compile(r"^\[.* INFO \S+\.py:\d+\]", re.M)  # smdebug's log format
    assert not smdebug_info.search(result.stderr), result.stderr[-2000:]
    verbose = subprocess.run([str(Path(sys.executable).with_name("dogbreed")), "report",
                              str(runs["healthy"]), "--out", str(out)],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "SMDEBUG_LOG_LEVEL": "info"})
    assert verbose.returncode == 0 and json.loads(verbose.stdout)["report"] == str(out)
    assert "RULE_JOB_STOP_SIGNAL_FILENAME" in verbose.stderr
    assert smdebug_info.search(verbose.stderr)
