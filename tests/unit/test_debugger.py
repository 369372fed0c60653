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
