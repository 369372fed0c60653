import json
from pathlib import Path

import pytest
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
