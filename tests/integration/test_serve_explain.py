"""``CustomAttributes: explain=gradcam`` through the live server (front + MMS + a real worker):
the prediction plus a base64 PNG Grad-CAM of the top class, at the model's input size; a plain
request on the same worker has no heat map; an unknown method is a 400."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from servelib import ServeEndpoint, TrainedModel

from dogbreed import artifacts, contract

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_explain_gradcam_through_the_server(serve_endpoint: ServeEndpoint, serve_models: dict[str, TrainedModel],
                                            sample_jpeg: bytes, arch: str) -> None:
    model = serve_models[arch]
    name = serve_endpoint.unique(f"explain-{arch}")
    assert serve_endpoint.load(name, model.model_dir).status == 200
    try:
        plain = serve_endpoint.invoke(name, sample_jpeg, "image/jpeg")
        assert plain.status == 200 and "explanations" not in plain.json()
        reply = serve_endpoint.invoke(name, sample_jpeg, "image/jpeg",
                                      {contract.CUSTOM_ATTRIBUTES_HEADER: "top_k=2; explain=gradcam"})
        assert reply.status == 200, reply.body[:300]
        answer = reply.json()
        assert answer["predictions"] == plain.json()["predictions"][:2]
        (heat,) = answer["explanations"]
        top = answer["predictions"][0]
        assert (heat["method"], heat["class_name"], heat["index"]) == ("gradcam", top["class_name"], top["index"])
        size = artifacts.read_metadata(model.model_dir).image_size
        with Image.open(io.BytesIO(base64.b64decode(heat["png_base64"], validate=True))) as image:
            assert (image.format, image.size, image.mode) == ("PNG", (size, size), "RGB")
        # The worker still answers plain requests plainly after an explanation.
        again = serve_endpoint.invoke(name, sample_jpeg, "image/jpeg")
        assert again.json() == plain.json()
        bad = serve_endpoint.invoke(name, sample_jpeg, "image/jpeg", {contract.CUSTOM_ATTRIBUTES_HEADER: "explain=shap"})
        assert bad.status == 400 and "explain=gradcam" in bad.json()["message"]
    finally:
        serve_endpoint.unload_model(name)


def test_execution_parameters_come_from_the_server_settings(serve_endpoint: ServeEndpoint,
                                                           serve_models: dict[str, TrainedModel]) -> None:
    """What SageMaker batch transform asks first; the front answers it from the server's
    workers per model (as many as MMS runs for a model) and the contract's one payload limit."""
    reply = serve_endpoint.request("GET", "/execution-parameters")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    name = serve_endpoint.unique("execution-parameters")
    assert serve_endpoint.load(name, serve_models["mobilenet_v2"].model_dir).status == 200
    try:
        workers = len(serve_endpoint.describe_model(name).json()["workers"])
    finally:
        serve_endpoint.unload_model(name)
    assert reply.json() == {"MaxConcurrentTransforms": workers, "BatchStrategy": "SINGLE_RECORD",
                            "MaxPayloadInMB": contract.MAX_PAYLOAD_BYTES // 1024**2}
    assert serve_endpoint.request("POST", "/execution-parameters").status != 200  # GET only
