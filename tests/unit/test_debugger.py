import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dogbreed import contract, debugger


@pytest.fixture
def paths(tmp_path: Path) -> contract.Paths:
    return contract.prepare_local_job(tmp_path, {}, {})


def test_no_config_means_no_hook_and_no_smdebug_import(paths, monkeypatch):
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    monkeypatch.delenv(contract.TRAINING_JOB_NAME_ENV, raising=False)  # a local run
    assert debugger.hook_config_path(paths) is None
    assert debugger.create_hook(paths, nn.Linear(2, 2), nn.CrossEntropyLoss()) is None


def test_config_file_in_input_config_dir_or_env(paths, tmp_path, monkeypatch):
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    paths.debug_hook_config_file.write_text(json.dumps({"LocalPath": str(tmp_path / "t")}))
    assert debugger.hook_config_path(paths) == paths.debug_hook_config_file
    elsewhere = tmp_path / "hook.json"
    elsewhere.write_text("{}")
    monkeypatch.setenv(contract.SMDEBUG_CONFIG_FILE_ENV, str(elsewhere))
    assert debugger.hook_config_path(paths) == elsewhere


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_use_smdebug_0_turns_the_hook_off(paths, tmp_path, monkeypatch, value):
    paths.debug_hook_config_file.write_text(json.dumps({"LocalPath": str(tmp_path / "t")}))
    monkeypatch.setenv(contract.USE_SMDEBUG_ENV, value)
    assert debugger.hook_config_path(paths) is None


def test_a_rerun_sets_the_finished_runs_tensors_aside_and_records_again(paths, tmp_path, monkeypatch):
    """A local rerun that resumes with more epochs: smdebug refuses a dir whose run has ended
    (it surfaced as AttributeError 'prepared_collections'); the old tensors are moved, not lost."""
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    out_dir = tmp_path / "tensors"
    paths.debug_hook_config_file.write_text(json.dumps({
        "LocalPath": str(out_dir), "HookParameters": {"save_interval": "1"},
        "CollectionConfigurations": [{"CollectionName": "losses"}]}))

    def one_run() -> None:
        model, loss_fn = nn.Linear(2, 2), nn.CrossEntropyLoss()
        hook = debugger.create_hook(paths, model, loss_fn)
        debugger.set_mode(hook, train=True)
        loss_fn(model(torch.ones(4, 2)), torch.zeros(4, dtype=torch.long)).backward()
        debugger.close(hook)

    one_run()
    first = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())
    assert first and (out_dir / "training_job_end.ts").is_file()
    one_run()
    one_run()
    assert sorted(p.relative_to(tmp_path / "tensors-1") for p in (tmp_path / "tensors-1").rglob("*")
                  if p.is_file()) == first
    assert (tmp_path / "tensors-2" / "training_job_end.ts").is_file()
    assert (out_dir / "training_job_end.ts").is_file() and any(out_dir.rglob("*.tfevents"))


def test_a_hook_config_that_is_not_json_is_named(paths, monkeypatch):
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    paths.debug_hook_config_file.write_text("{not json")
    with pytest.raises(contract.ContractError, match="debughookconfig.json: not a JSON object"):
        debugger.create_hook(paths, nn.Linear(2, 2), nn.CrossEntropyLoss())


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def test_a_sagemaker_job_without_debug_hook_config_saves_tensors_with_its_output(paths, monkeypatch):
    """No DebugHookConfig (Debugger is closed to new customers): the job's own hook still saves
    the rules' collections, under output/data (uploaded as output.tar.gz), at the intervals the
    launcher's rules module sets: losses every 10 training steps and every evaluation step,
    gradients every 100 training steps, activations (relu_input) at the first training step only."""
    from smdebug import modes
    from smdebug.trials import create_trial

    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    monkeypatch.delenv(contract.USE_SMDEBUG_ENV, raising=False)
    monkeypatch.setenv(contract.TRAINING_JOB_NAME_ENV, "dogbreed-train-1")
    assert not paths.debug_hook_config_file.exists()
    model, loss_fn = _ReluNet(), nn.CrossEntropyLoss()
    hook = debugger.create_hook(paths, model, loss_fn)
    assert hook is not None
    tensors = paths.output_data_dir / contract.SMDEBUG_TENSORS_DIR
    assert Path(hook.out_dir) == tensors
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    debugger.set_mode(hook, train=True)
    for _ in range(101):
        model.zero_grad()
        loss_fn(model(x), y).backward()
    debugger.set_mode(hook, train=False)
    with torch.no_grad():
        for _ in range(3):
            loss_fn(model(x), y)
    debugger.close(hook)

    trial = create_trial(str(tensors))
    loss = trial.tensor(trial.tensor_names(collection="losses")[0])
    assert loss.steps(mode=modes.TRAIN) == list(range(0, 101, 10))
    assert loss.steps(mode=modes.EVAL) == [0, 1, 2]
    gradients = trial.tensor_names(collection="gradients")
    assert gradients and trial.tensor(gradients[0]).steps(mode=modes.TRAIN) == [0, 100]
    relu = [n for n in trial.tensor_names() if "relu_input" in n]
    assert relu and trial.tensor(relu[0]).steps(mode=modes.TRAIN) == [0]
    assert trial.tensor(relu[0]).steps(mode=modes.EVAL) == []
    assert not trial.tensor_names(collection="weights")
    # The rules' own step counts: what `dogbreed report JOB` evaluates offline.
    from dogbreed.debugger_report import builtin_rules as report_rules

    verdicts = {v.rule: v.status for v in report_rules.evaluate_debugger_rules(str(tensors))}
    assert set(verdicts) >= {"VanishingGradient", "LossNotDecreasing", "PoorWeightInitialization"}


def test_use_smdebug_0_turns_the_in_job_hook_off_too(paths, monkeypatch):
    monkeypatch.delenv(contract.SMDEBUG_CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv(contract.TRAINING_JOB_NAME_ENV, "dogbreed-train-1")
    monkeypatch.setenv(contract.USE_SMDEBUG_ENV, "0")
    assert debugger.create_hook(paths, nn.Linear(2, 2), nn.CrossEntropyLoss()) is None
