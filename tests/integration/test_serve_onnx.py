"""CPU serving on ONNX Runtime, end to end: ``dogbreed-train`` exports and checks the graph, the
real MMS serves it on the ``onnxruntime`` engine, and its answers match the ``torch`` engine's on
every test image of the sample. The torch side is the same model without its graph (an artifact
from before graphs), loaded on the same server: old artifacts keep working beside new ones.

Runs against the serve image too (``DOGBREED_SERVE_URL``, see conftest): it must choose ONNX
Runtime for a model with a graph.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from servelib import ServeEndpoint, TrainedModel

from dogbreed import artifacts, onnx_export

pytestmark = pytest.mark.slow


def test_training_exports_a_graph_checked_on_the_test_split(serve_models: dict[str, TrainedModel],
                                                             sample_data: Path) -> None:
    test_images = len(list((sample_data / "test").rglob("*.jpg")))
    for arch, trained in serve_models.items():
        assert (trained.model_dir / artifacts.GRAPH_FILE).is_file(), arch
        graph = artifacts.read_metadata(trained.model_dir).graph
        assert graph["checked_on"] == "test" and graph["images"] == test_images, (arch, graph)
        assert graph["top1_agreement"] == 1.0, (arch, graph)
        assert graph["max_prob_diff"] <= onnx_export.MAX_PROB_DIFF, (arch, graph)
        assert graph["runtime"] == "onnxruntime" and graph["runtime_version"], (arch, graph)
        with tarfile.open(trained.archive) as tar:
            assert artifacts.GRAPH_FILE in tar.getnames(), arch


def without_graph(model_dir: Path, target: Path) -> Path:
    """The same model as an artifact from before graphs: model.pt + model.json only."""
    target.mkdir(parents=True)
    (target / artifacts.WEIGHTS_FILE).write_bytes((model_dir / artifacts.WEIGHTS_FILE).read_bytes())
    metadata = json.loads((model_dir / artifacts.METADATA_FILE).read_text())
    metadata.pop("graph", None)
    (target / artifacts.METADATA_FILE).write_text(json.dumps(metadata))
    return target


def test_onnxruntime_engine_answers_as_the_torch_engine(serve_models: dict[str, TrainedModel],
                                                        serve_endpoint: ServeEndpoint,
                                                        sample_data: Path, tmp_path: Path) -> None:
    images = sorted((sample_data / "test").rglob("*.jpg"))
    for arch, trained in serve_models.items():
        engines = {"onnxruntime": (serve_endpoint.unique(f"onnx-{arch}"), trained.model_dir),
                   "torch": (serve_endpoint.unique(f"torch-{arch}"),
                             without_graph(trained.model_dir, tmp_path / arch / "model"))}
        for name, source in engines.values():
            reply = serve_endpoint.load(name, source)
            assert reply.status == 200, reply.body
        try:
            top_k = f"top_k={len(trained.class_names)}"
            for image in images:
                answers = {}
                for engine, (name, _) in engines.items():
                    reply = serve_endpoint.invoke(name, image.read_bytes(), "image/jpeg", query=top_k)
                    assert reply.status == 200, (engine, image.name, reply.body)
                    answers[engine] = reply.json()
                    assert answers[engine]["engine"] == engine, (image.name, answers[engine])
                onnx_answer, torch_answer = answers["onnxruntime"]["predictions"], answers["torch"]["predictions"]
                assert onnx_answer[0]["index"] == torch_answer[0]["index"], (arch, image.name)
                torch_probability = {p["index"]: p["probability"] for p in torch_answer}
                for prediction in onnx_answer:
                    # Both rounded to 6 digits in the answer.
                    assert abs(prediction["probability"] - torch_probability[prediction["index"]]) <= \
                        onnx_export.MAX_PROB_DIFF + 1e-6, (arch, image.name, prediction)
        finally:
            for name, _ in engines.values():
                serve_endpoint.unload_model(name)
