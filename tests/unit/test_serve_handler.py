"""The handler module as MMS sees it: one class, initialize, load failures that end the worker."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_artifacts import tiny_model_dir

from dogbreed.serve import RUN_DIR_ENV, handler, inference, load_error_file


def context(model_dir: Path, name: str = "m") -> SimpleNamespace:
    return SimpleNamespace(model_name=name, system_properties={"model_dir": str(model_dir)},
                           request_processor=None)


def test_mms_finds_exactly_one_service_class() -> None:
    from mms.model_loader import ModelLoader

    assert ModelLoader.list_model_services(handler) == [handler.HandlerService]


def test_initialize_loads_the_model(tmp_path: Path) -> None:
    service = handler.HandlerService()
    service.initialize(context(tiny_model_dir(tmp_path / "model"), "tiny"))
    served = service._service._model
    assert isinstance(served, inference.ServedModel) and served.name == "tiny"


def test_a_failed_load_leaves_its_reason_and_ends_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    service = handler.HandlerService()
    with pytest.raises(inference.ModelLoadFailed):
        service.initialize(context(tmp_path / "empty", "a/b"))
    reason = json.loads(Path(load_error_file(str(tmp_path / "run"), "a/b")).read_text())
    assert reason["code"] == 400 and reason["type"] == "ArtifactError" and "model.json" in reason["message"]
