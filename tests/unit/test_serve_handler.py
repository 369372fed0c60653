"""The handler module as MMS drives it (real ``mms.context.Context``), without Java: one class,
the toolkit's Transformer with our defaults, a model's own ``code/inference.py``, and refused
models that answer with their reason instead of killing the worker."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mms.context import Context, RequestProcessor
from PIL import Image
from test_artifacts import tiny_model_dir

from dogbreed import artifacts
from dogbreed.serve import LOAD_STATUS_HEADER, handler


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def fresh_user_module() -> Iterator[None]:
    """Each MMS worker is its own process; here one process plays several: forget user code."""
    path, pythonpath = list(sys.path), os.environ.get("PYTHONPATH")
    yield
    sys.path[:] = path
    sys.modules.pop("inference", None)
    # The toolkit's Transformer prepends the model's code dir to $PYTHONPATH: in a real worker
    # that is its own; here it would leak into every server a later test starts.
    if pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = pythonpath


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("handler") / "model")


def load(model_dir: Path, name: str = "m") -> tuple[handler.HandlerService, Context]:
    context = Context(name, str(model_dir), None, 1, None, "1.1.11")
    service = handler.HandlerService()
    service.initialize(context)
    return service, context


def ask(service: handler.HandlerService, context: Context, body: bytes | None, headers: dict,
        params: dict | None = None) -> tuple[int, str, bytes]:
    context.request_processor = [RequestProcessor(dict(headers))]
    item = {"body": body} if body is not None else {}
    [answer] = service.handle([{**item, **(params or {})}], context)
    status = context.get_response_status(0)[0]
    return status, context.get_response_content_type(0), answer if isinstance(answer, bytes) else str(answer).encode()


def test_mms_finds_exactly_one_service_class() -> None:
    from mms.model_loader import ModelLoader

    assert ModelLoader.list_model_services(handler) == [handler.HandlerService]


def test_defaults_answer_with_top_k_from_json_query_and_header(good: Path) -> None:
    service, context = load(good, "tiny")
    status, content_type, body = ask(service, context, jpeg(), {"Content-Type": "image/jpeg"})
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    assert answer["model"] == "tiny" and len(answer["predictions"]) == 3
    attrs = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=2"}
    assert len(json.loads(ask(service, context, jpeg(), attrs)[2])["predictions"]) == 2
    # MMS hands ?top_k=1 over as a request input: it wins over the header
    assert len(json.loads(ask(service, context, jpeg(), attrs, {"top_k": b"1"})[2])["predictions"]) == 1
    assert ask(service, context, jpeg(), {"Content-Type": "image/jpeg", LOAD_STATUS_HEADER: "1"})[:2] == (200, "application/json")


@pytest.mark.parametrize("body,headers,status", [
    (b"", {"Content-Type": "image/jpeg"}, 400),
    (None, {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    (b"x", {"Content-Type": "text/plain"}, 415),
    (b"\xff\xfe{", {"Content-Type": "application/json"}, 400),
    (jpeg(), {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406),
])
def test_errors_are_json_with_their_status(good: Path, body: bytes | None, headers: dict, status: int) -> None:
    service, context = load(good)
    code, content_type, answer = ask(service, context, body, headers)
    error = json.loads(answer)
    assert (code, content_type, error["code"]) == (status, "application/json", status)
    assert error["type"] and error["message"] and "Traceback" not in error["message"]


def test_a_failing_predict_is_a_500_without_the_traceback(good: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(good, tmp_path / "model"))
    (model / "code").mkdir()
    (model / "code" / "inference.py").write_text("def predict_fn(data, model):\n    raise ValueError('boom\\nline')\n")
    service, context = load(model)
    code, _, answer = ask(service, context, jpeg(), {"Content-Type": "image/jpeg"})
    error = json.loads(answer)
    assert code == 500 and "boom" in error["message"] and "\n" not in error["message"]


def refused(model_dir: Path) -> dict:
    service, context = load(model_dir, "broken")
    assert service.load_error is not None
    status, content_type, body = ask(service, context, jpeg(), {"Content-Type": "image/jpeg"})
    error = json.loads(body)
    assert (status, content_type, error["code"]) == (error["code"], "application/json", service.load_error[0])
    # the front's question gets the same answer
    assert ask(service, context, b"", {LOAD_STATUS_HEADER: "1"})[0] == status
    return error


def test_a_missing_model_json_is_refused_with_the_reason(good: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(good, tmp_path / "model"))
    (model / artifacts.METADATA_FILE).unlink()
    error = refused(model)
    assert error["code"] == 400 and error["type"] == "ArtifactError" and "model.json" in error["message"]


def test_a_wrong_class_count_is_refused_with_the_reason(good: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(good, tmp_path / "model"))
    meta = json.loads((model / artifacts.METADATA_FILE).read_text())
    meta["class_names"] = [*meta["class_names"], "099.Extra"]
    (model / artifacts.METADATA_FILE).write_text(json.dumps(meta))
    error = refused(model)
    assert error["code"] == 400 and "4 classes" in error["message"]


class RunsCode:
    """A pickle that, loaded with plain pickle (weights_only=False), would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_code_running_pickle_is_refused_and_nothing_runs(good: Path, tmp_path: Path) -> None:
    import torch

    model = Path(shutil.copytree(good, tmp_path / "model"))
    marker = tmp_path / "pwned"
    torch.save({"weight": RunsCode(marker)}, model / artifacts.WEIGHTS_FILE)
    error = refused(model)
    assert error["code"] == 400 and "state_dict" in error["message"]
    assert not marker.exists(), "loading the model ran code from model.pt"
    torch.load(model / artifacts.WEIGHTS_FILE, weights_only=False)  # the payload is real:
    assert marker.exists()  # a plain unpickler would have run it


def test_user_code_replaces_our_functions_for_that_model_only(good: Path, tmp_path: Path) -> None:
    custom = Path(shutil.copytree(good, tmp_path / "custom"))
    (custom / "code").mkdir()
    (custom / "code" / "inference.py").write_text(
        "import json\n"
        "def input_fn(body, content_type):\n"
        "    assert content_type == 'text/plain', content_type\n"
        "    return bytes(body).decode()\n"
        "def predict_fn(data, model):\n"
        "    return {'echo': data, 'classes': model.metadata.num_classes}\n"
        "def output_fn(prediction, accept):\n"
        "    return json.dumps({'custom': prediction}), 'application/x-custom'\n")
    (custom / "code" / "requirements.txt").write_text("not-installed-at-run-time==1.0\n")
    service, context = load(custom, "custom")
    status, content_type, body = ask(service, context, b"hello", {"Content-Type": "text/plain"})
    assert (status, content_type) == (200, "application/x-custom")
    assert json.loads(body) == {"custom": {"echo": "hello", "classes": 3}}

    sys.modules.pop("inference", None)  # a second model, another worker: our defaults
    sys.path.remove(str(custom / "code"))
    plain, plain_context = load(good, "plain")
    status, content_type, body = ask(plain, plain_context, jpeg(), {"Content-Type": "image/jpeg"})
    assert (status, content_type) == (200, "application/json") and json.loads(body)["model"] == "plain"


def test_broken_user_code_refuses_the_model(good: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(good, tmp_path / "model"))
    (model / "code").mkdir()
    (model / "code" / "inference.py").write_text("def model_fn(model_dir:\n")
    error = refused(model)
    assert error["code"] == 400 and "inference.py" in error["message"]


def test_a_bad_torch_threads_setting_is_a_load_reason_not_a_dead_worker(
        good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGBREED_TORCH_THREADS", "0")
    service, context = load(good)  # initialize keeps the reason instead of raising
    status, _, body = ask(service, context, jpeg(), {"Content-Type": "image/jpeg"})
    assert status == 500 and "DOGBREED_TORCH_THREADS='0' must be at least 1" in json.loads(body)["message"]
