"""The artifact's ONNX graph (dogbreed.onnx_export): exported from model.pt, checked against it
with ONNX Runtime, recorded in model.json; a graph that disagrees with its weights is refused
when the dir is packed, and the server picks its engine from what the artifact and process have."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from dogbreed import artifacts, data, models, onnx_export
from dogbreed.serve import ENGINE_ENV, inference

ARCH = "resnet18"  # fewer layers than MobileNetV2: the quickest export
SIZE = 32


def model_dir(root: Path, seed: int = 0, classes: int = 3) -> Path:
    torch.manual_seed(seed)
    model = models.build_model(ARCH, classes, models.WEIGHTS_NONE).eval()
    metadata = artifacts.ModelMetadata(
        arch=ARCH, class_names=[f"{i + 1:03d}.Breed_{i + 1}" for i in range(classes)],
        image_size=SIZE, resize_size=data.resize_size_for(SIZE),
        mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD))
    directory = root / "model"
    artifacts.save_model_dir(directory, model, metadata)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = model_dir(tmp_path_factory.mktemp("onnx"))
    onnx_export.export_and_verify(directory)
    return directory


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), (180, 120, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_export_writes_the_graph_and_what_it_was_checked_against(exported: Path) -> None:
    assert (exported / artifacts.GRAPH_FILE).is_file()
    graph = json.loads((exported / artifacts.METADATA_FILE).read_text())["graph"]
    assert graph["file"] == artifacts.GRAPH_FILE
    assert graph["checked_on"] == "fixed" and graph["images"] == onnx_export.FIXED_INPUT_COUNT
    assert graph["top1_agreement"] == 1.0
    assert 0 <= graph["max_prob_diff"] <= onnx_export.MAX_PROB_DIFF
    assert graph["runtime"] == "onnxruntime"
    assert graph["runtime_version"] == onnx_export.runtime_version()
    assert graph["sha256"] == artifacts.checked_files_digest(exported)


def test_export_checks_on_the_test_images_when_given(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    images = torch.randint(0, 256, (5, 3, data.resize_size_for(SIZE), data.resize_size_for(SIZE)),
                           dtype=torch.uint8)
    check = onnx_export.export_and_verify(directory, images)
    assert (check.inputs, check.images, check.disagreements) == ("test", 5, 0)
    assert artifacts.read_metadata(directory).graph["checked_on"] == "test"


def test_pack_carries_the_checked_graph(exported: Path, tmp_path: Path) -> None:
    archive = artifacts.pack(exported, tmp_path / artifacts.ARCHIVE_NAME)
    with tarfile.open(archive) as tar:
        assert artifacts.GRAPH_FILE in tar.getnames()


def test_pack_trusts_the_recorded_check_of_the_same_files_and_gzip_reads_the_archive(
        exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check_again(model_dir: Path) -> None:
        raise AssertionError("the graph was checked again although its files are the checked ones")

    monkeypatch.setattr(onnx_export, "check_model_dir", check_again)
    archive = artifacts.pack(exported, tmp_path / artifacts.ARCHIVE_NAME)
    # The system's gzip and tar (what a SageMaker host or a user unpacks with) read it whole.
    subprocess.run(["gzip", "--test", str(archive)], check=True)
    listed = subprocess.run(["tar", "-tzf", str(archive)], check=True, capture_output=True, text=True)
    assert sorted(listed.stdout.split()) == sorted(p.name for p in exported.iterdir())
    unpacked = artifacts.safe_extract(archive, tmp_path / "unpacked")
    for name in (artifacts.WEIGHTS_FILE, artifacts.GRAPH_FILE, artifacts.METADATA_FILE):
        assert (unpacked / name).read_bytes() == (exported / name).read_bytes()


def test_pack_refuses_a_graph_that_disagrees_with_its_weights(exported: Path, tmp_path: Path) -> None:
    # Another run's weights under the same model.json and graph: what a copy mix-up leaves.
    other = model_dir(tmp_path / "other", seed=1)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for name in (artifacts.METADATA_FILE, artifacts.GRAPH_FILE):
        (swapped / name).write_bytes((exported / name).read_bytes())
    (swapped / artifacts.WEIGHTS_FILE).write_bytes((other / artifacts.WEIGHTS_FILE).read_bytes())
    with pytest.raises(onnx_export.GraphMismatch, match=r"does not match model\.pt: ONNX Runtime .* "
                       r"disagrees with PyTorch .* largest probability difference"):
        artifacts.pack(swapped, tmp_path / artifacts.ARCHIVE_NAME)
    assert not (tmp_path / artifacts.ARCHIVE_NAME).exists()


def test_add_model_validation_refuses_an_archive_whose_graph_disagrees(exported: Path, tmp_path: Path) -> None:
    # An archive made elsewhere (pack() would have refused it): what add-model is handed.
    other = model_dir(tmp_path / "other", seed=1)
    archive = tmp_path / artifacts.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(other / artifacts.WEIGHTS_FILE, arcname=artifacts.WEIGHTS_FILE)
        for name in (artifacts.METADATA_FILE, artifacts.GRAPH_FILE):
            tar.add(exported / name, arcname=name)
    with pytest.raises(onnx_export.GraphMismatch, match="not a loadable model archive: .* does not match model.pt"):
        artifacts.validate_model_archive(archive)


def test_pack_refuses_a_graph_that_was_never_checked(exported: Path, tmp_path: Path) -> None:
    unchecked = tmp_path / "unchecked"
    unchecked.mkdir()
    for name in (artifacts.WEIGHTS_FILE, artifacts.GRAPH_FILE):
        (unchecked / name).write_bytes((exported / name).read_bytes())
    metadata = json.loads((exported / artifacts.METADATA_FILE).read_text())
    metadata.pop("graph")
    (unchecked / artifacts.METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(artifacts.ArtifactError, match="never checked"):
        artifacts.pack(unchecked, tmp_path / artifacts.ARCHIVE_NAME)


def test_a_failed_check_keeps_no_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_dir(tmp_path)
    real_export = onnx_export.export

    def export_other_weights(model: torch.nn.Module, image_size: int, path: Path) -> None:
        torch.manual_seed(1)
        real_export(models.build_model(ARCH, 3, models.WEIGHTS_NONE), image_size, path)

    monkeypatch.setattr(onnx_export, "export", export_other_weights)
    with pytest.raises(onnx_export.GraphMismatch, match="was not kept"):
        onnx_export.export_and_verify(directory)
    assert not (directory / artifacts.GRAPH_FILE).exists()
    assert artifacts.read_metadata(directory).graph == {}


def test_model_fn_serves_a_graph_on_onnxruntime_and_answers_as_torch(
        exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    request = inference.input_fn(jpeg(), "image/jpeg")
    answers = {}
    for engine in ("auto", "torch"):
        monkeypatch.setenv(ENGINE_ENV, engine)
        served = inference.model_fn(exported)
        answers[engine] = json.loads(inference.output_fn(inference.predict_fn(request, served))[0])
    assert answers["auto"]["engine"] == "onnxruntime"
    assert answers["torch"]["engine"] == "torch"
    onnx_top, torch_top = answers["auto"]["predictions"], answers["torch"]["predictions"]
    assert [p["index"] for p in onnx_top] == [p["index"] for p in torch_top]
    for a, b in zip(onnx_top, torch_top):
        assert abs(a["probability"] - b["probability"]) <= onnx_export.MAX_PROB_DIFF


def test_grad_cam_on_the_onnx_engine_loads_the_torch_weights(exported: Path) -> None:
    served = inference.model_fn(exported)
    assert served.engine == "onnxruntime" and served.model is None
    request = inference.InferenceRequest(jpeg(), explain="gradcam")
    body = json.loads(inference.output_fn(inference.predict_fn(request, served))[0])
    assert body["engine"] == "onnxruntime" and body["explanations"][0]["method"] == "gradcam"


def test_an_artifact_without_a_graph_is_served_by_torch(tmp_path: Path) -> None:
    served = inference.model_fn(model_dir(tmp_path))
    assert served.engine == "torch" and served.session is None


def test_forcing_onnxruntime_without_a_graph_is_a_load_error(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_ENV, "onnxruntime")
    with pytest.raises(artifacts.ArtifactError, match="has no model.onnx"):
        inference.model_fn(model_dir(tmp_path))
    monkeypatch.setenv(ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="use one of auto, onnxruntime, torch"):
        inference.model_fn(model_dir(tmp_path / "b"))


def test_model_json_naming_a_missing_graph_is_refused(exported: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (artifacts.WEIGHTS_FILE, artifacts.METADATA_FILE):
        (broken / name).write_bytes((exported / name).read_bytes())
    with pytest.raises(artifacts.ArtifactError, match="names a graph"):
        inference.model_fn(broken)


def test_the_session_uses_the_workers_thread_setting(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(inference.TORCH_THREADS_ENV, "2")
    session = inference.model_fn(exported).session
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_warm_up_runtime_builds_and_runs_a_graph() -> None:
    assert onnx_export.warm_up_runtime(size=32) is True


def test_a_broken_model_pt_is_refused_on_the_onnx_engine_too(exported: Path, tmp_path: Path) -> None:
    # The graph would answer, but the artifact is broken (explain and GPU servers need model.pt).
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (artifacts.METADATA_FILE, artifacts.GRAPH_FILE):
        (broken / name).write_bytes((exported / name).read_bytes())
    (broken / artifacts.WEIGHTS_FILE).write_bytes(b"not a zip")
    with pytest.raises(artifacts.ArtifactError, match="cannot load state_dict"):
        inference.model_fn(broken)
