"""From request bytes to a JSON answer, independent of MMS: the SageMaker-style functions
(:func:`model_fn`, :func:`input_fn`, :func:`predict_fn`, :func:`output_fn`) and the toolkit
classes :mod:`dogbreed.serve.handler` runs them with.

- :func:`input_fn` takes ``application/x-image``, ``image/jpeg``, ``image/png``, or JSON
  ``{"image": <base64>}`` (``{"url": "https://..."}`` when ``DOGBREED_ALLOW_URL_HOSTS`` allows
  the host) with an optional ``"top_k"``. Only the image header is read here (JPEG/PNG, size
  limits); nothing is decoded.
- :func:`predict_fn` decodes and transforms with :mod:`dogbreed.data`, the code training
  evaluates with; ``CustomAttributes: explain=gradcam`` adds a Grad-CAM (:mod:`dogbreed.explain`,
  imported by the first such request).
- The forward runs on ONNX Runtime when the model has a checked ``model.onnx``, the worker is
  on the CPU and ``onnxruntime`` is installed; else on PyTorch (GPU serving, artifacts without
  a graph). ``DOGBREED_SERVE_ENGINE`` forces one; each answer names its ``engine``. Grad-CAM
  always runs on PyTorch (loaded from ``model.pt`` by the first explain request).
- Anything wrong with a request is a :class:`RequestError`: a 4xx whose body is MMS's own error
  shape ``{"code", "type", "message"}``; a bad request never takes a worker down.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import http.client
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from sagemaker_inference import content_types, utils
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
from sagemaker_inference.errors import BaseInferenceToolkitError
from sagemaker_inference.transformer import Transformer
from torch import nn

from dogbreed import artifacts, contract, data, onnx_export
from dogbreed.serve import (
    ALLOW_URL_HOSTS_ENV,
    ENGINE_ENV,
    MAX_IMAGE_PIXELS_ENV,
    TOP_K_PROPERTY,
    TORCH_THREADS_ENV,
    URL_MAX_BYTES_ENV,
    URL_TIMEOUT_ENV,
    error_body,
)

log = logging.getLogger("dogbreed.serve")

JSON = content_types.JSON
IMAGE_CONTENT_TYPES = frozenset({"application/x-image", "image/jpeg", "image/jpg", "image/png"})
ACCEPTED_CONTENT_TYPES = ", ".join(sorted(IMAGE_CONTENT_TYPES | {JSON}))
TOP_K_FIELD = "top_k"
DEFAULT_TOP_K = 5
# The header limits (pixels, each side, aspect ratio) are data's, shared with `dogbreed explain`.
IMAGE_FORMATS = data.IMAGE_FORMATS
DEFAULT_MAX_IMAGE_PIXELS = data.DEFAULT_MAX_IMAGE_PIXELS
MAX_IMAGE_SIDE = data.MAX_IMAGE_SIDE
MAX_ASPECT_RATIO = data.MAX_ASPECT_RATIO
DEFAULT_URL_MAX_BYTES = 10 * 1024**2
DEFAULT_URL_TIMEOUT = 5.0
EXPLAIN_ATTRIBUTE = "explain"  # CustomAttributes: explain=gradcam
EXPLAIN_METHODS = ("gradcam",)
ENGINE_TORCH = "torch"
ENGINE_ONNXRUNTIME = "onnxruntime"
ENGINE_AUTO = "auto"
ENGINES = (ENGINE_AUTO, ENGINE_ONNXRUNTIME, ENGINE_TORCH)


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class RequestError(BaseInferenceToolkitError):
    """A request the server refuses: an HTTP 4xx whose body is ``{"code","type","message"}``."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(status, message, phrase(status))
        self.error_type = error_type or phrase(status).replace(" ", "")

    def to_json(self) -> bytes:
        return error_body(self.status_code, self.error_type, self.message)


class NonFiniteOutputError(BaseInferenceToolkitError):
    """The model computed NaN or infinite probabilities (e.g. weights trained into NaN): a 500
    JSON error (the router wraps it as a 424 ModelError), never a body with NaN in it."""

    error_type = "NonFiniteOutput"

    def __init__(self, model: str) -> None:
        super().__init__(500, f"model {model} computed non-finite probabilities (NaN or inf): "
                              "its weights are likely broken; retrain it", phrase(500))


def out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failing (a RuntimeError, "can't allocate
    memory", e.g. under the worker's RLIMIT_AS): the container's 507, which has SageMaker unload
    models ("mms-container-apis")."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def load_failure(exc: BaseException) -> tuple[int, str, str]:
    """``(status, type, message)`` for a model that failed to load."""
    if isinstance(exc, artifacts.ArtifactError):
        return 400, "ArtifactError", str(exc)
    if isinstance(exc, (SyntaxError, ImportError)) or (isinstance(exc, ValueError) and "transform_fn" in str(exc)):
        return 400, "UserCodeError", f"the model's code/inference.py: {type(exc).__name__}: {exc}"
    if out_of_memory(exc):
        return 507, "InsufficientStorage", "out of memory while loading the model"
    return 500, type(exc).__name__, f"cannot load the model: {type(exc).__name__}: {exc}"


# --- settings from the environment -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    """Which URLs a JSON request may make the server fetch. No hosts = URL input disabled."""

    hosts: frozenset[str] = frozenset()
    max_bytes: int = DEFAULT_URL_MAX_BYTES
    timeout: float = DEFAULT_URL_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UrlPolicy:
        env = os.environ if env is None else env
        hosts = frozenset(h.strip().lower() for h in env.get(ALLOW_URL_HOSTS_ENV, "").split(",") if h.strip())
        return cls(hosts=hosts, max_bytes=contract.env_int(env, URL_MAX_BYTES_ENV, 1, DEFAULT_URL_MAX_BYTES),
                   timeout=float(env.get(URL_TIMEOUT_ENV) or DEFAULT_URL_TIMEOUT))

    def allows(self, host: str) -> bool:
        """Exact host names, or ``.example.com`` / ``*.example.com`` for any subdomain."""
        host = host.lower().rstrip(".")
        for allowed in self.hosts:
            suffix = allowed[1:] if allowed.startswith("*.") else allowed
            if host == allowed or (suffix.startswith(".") and host.endswith(suffix)):
                return True
        return False


@dataclasses.dataclass(frozen=True)
class Settings:
    url_policy: UrlPolicy = UrlPolicy()
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(UrlPolicy.from_env(env), contract.env_int(env, MAX_IMAGE_PIXELS_ENV, 1, DEFAULT_MAX_IMAGE_PIXELS))


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The worker's settings, read from its environment once."""
    return Settings.from_env()


# --- the model -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str
    model: nn.Module | None  # None on ONNX Runtime until an explain request needs it
    metadata: artifacts.ModelMetadata
    device: torch.device
    labels: tuple[str, ...]
    engine: str = ENGINE_TORCH
    session: Any = None  # onnxruntime.InferenceSession when engine is ENGINE_ONNXRUNTIME
    model_dir: Path | None = None
    _lazy: dict[str, nn.Module] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def torch_model(self) -> nn.Module:
        """The PyTorch model (Grad-CAM needs gradients): loaded from model.pt on first use
        when the engine is ONNX Runtime."""
        if self.model is not None:
            return self.model
        if "model" not in self._lazy:
            start = time.perf_counter()
            model, _ = artifacts.load_model(Path(self.model_dir), self.device)
            self._lazy["model"] = model.eval()
            log.info("event=torch_model_loaded model=%s reason=explain load_s=%.3f", self.name,
                     time.perf_counter() - start)
        return self._lazy["model"]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised batch, on this model's engine."""
        if self.session is not None:
            return onnx_export.run(self.session, batch)
        with torch.inference_mode():
            return self.model(batch)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads(env: Mapping[str, str] | None = None) -> int:
    """Set this process's torch threads: ``DOGBREED_TORCH_THREADS``, else 1, as MMS exports
    ``OMP_NUM_THREADS=1``: on a shared 2-vCPU box a 2-thread batch-1 ResNet18 forward at 64 px
    took 660 ms against 22 ms with 1 (every op waits for a descheduled thread). Raise
    ``SAGEMAKER_MODEL_SERVER_WORKERS`` for throughput.
    """
    threads = worker_threads(env)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set, or inter-op work already ran in this process
    return threads


def worker_threads(env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads per worker, for torch and ONNX Runtime alike: ``DOGBREED_TORCH_THREADS``."""
    return contract.env_int(os.environ if env is None else env, TORCH_THREADS_ENV, 1, 1)


def choose_engine(metadata: artifacts.ModelMetadata, device: torch.device,
                  env: Mapping[str, str] | None = None) -> str:
    """``onnxruntime`` for a model with a checked graph on a CPU worker that has the runtime;
    ``torch`` otherwise (GPU, no graph, no runtime). ``DOGBREED_SERVE_ENGINE`` forces one: a
    forced ``onnxruntime`` the model or the process cannot run is a load error, not a fallback."""
    env = os.environ if env is None else env
    wanted = (env.get(ENGINE_ENV) or ENGINE_AUTO).strip().lower()
    if wanted not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={wanted!r}: use one of {', '.join(ENGINES)}")
    if wanted == ENGINE_TORCH:
        return ENGINE_TORCH
    has_graph, has_runtime = bool(metadata.graph), onnx_export.runtime_available()
    if wanted == ENGINE_ONNXRUNTIME:
        if not has_graph:
            raise artifacts.ArtifactError(f"{ENGINE_ENV}=onnxruntime but the model has no "
                                          f"{artifacts.GRAPH_FILE} (trained before graphs were exported)")
        if not has_runtime:
            raise ValueError(f"{ENGINE_ENV}=onnxruntime but onnxruntime is not installed")
        return ENGINE_ONNXRUNTIME
    return ENGINE_ONNXRUNTIME if has_graph and has_runtime and device.type == "cpu" else ENGINE_TORCH


def model_fn(model_dir: str | Path, context: Any = None) -> ServedModel:
    """Load the artifact in ``model_dir`` once; :class:`artifacts.ArtifactError` if it is bad.

    On ONNX Runtime ``model.pt`` is loaded and checked too (a missing, corrupt, unsafe or
    non-finite one is refused with the same reason as on torch; the graph's class count is
    checked against model.json), then dropped: Grad-CAM builds the module on the first explain
    request, so a worker holds one copy of the weights, the graph's.
    (Two parameters exactly: the toolkit passes ``context`` when a function takes one more.)
    """
    start, device = time.perf_counter(), default_device()
    directory = artifacts.find_model_dir(Path(model_dir))
    metadata = artifacts.read_metadata(directory)
    engine = choose_engine(metadata, device)
    name = getattr(context, "model_name", None) or Path(model_dir).name
    labels = tuple(artifacts.breed_name(c) for c in metadata.class_names)
    if engine == ENGINE_ONNXRUNTIME:
        graph = directory / artifacts.GRAPH_FILE
        if not graph.is_file():
            raise artifacts.ArtifactError(f"{artifacts.METADATA_FILE} names a graph but {directory} "
                                          f"has no {artifacts.GRAPH_FILE}")
        artifacts.load_state(directory)  # model.pt's checks; the tensors are not kept
        session = onnx_export.session(graph, worker_threads())
        onnx_export.check_output_shape(session, metadata.num_classes)
        served = ServedModel(name, None, metadata, torch.device("cpu"), labels, engine, session, directory)
    else:
        model, metadata = artifacts.load_model(directory, device)
        served = ServedModel(name, model.eval(), metadata, device, labels, engine, None, directory)
    log.info("event=model_fn model=%s engine=%s load_s=%.3f", name, engine, time.perf_counter() - start)
    return served


def warm_up(served: ServedModel) -> None:
    """One forward at the model's input size: oneDNN builds its kernels now, not in a request.

    Worth it where the load is not on a caller's clock (single-model: at start-up). In
    multi-model mode the first request follows the load anyway, and this would add a forward.
    """
    size = served.metadata.image_size
    served.forward(torch.zeros(1, 3, size, size, device=served.device))


# --- input ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    image: bytes
    top_k: int | None = None
    explain: str | None = None  # one of EXPLAIN_METHODS


def mime_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def input_fn(input_data: bytes | bytearray | str | None, content_type: str | None,
             config: Settings | None = None) -> InferenceRequest:
    """Parse a request body into image bytes (header-checked, not yet decoded) and a top-k."""
    config = config or settings()
    mime = mime_type(content_type)
    body = input_data.encode() if isinstance(input_data, str) else bytes(input_data or b"")
    if not mime:
        raise RequestError(415, f"missing Content-Type header; send one of {ACCEPTED_CONTENT_TYPES}")
    if mime in IMAGE_CONTENT_TYPES:
        check_image(body, config.max_image_pixels)
        return InferenceRequest(body)
    if mime == JSON:
        return _json_request(body, config)
    raise RequestError(415, f"unsupported Content-Type {mime!r}; send one of {ACCEPTED_CONTENT_TYPES}")


def _json_request(body: bytes, config: Settings) -> InferenceRequest:
    if not body:
        raise RequestError(400, "empty request body")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep
        raise RequestError(400, "request body is JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(400, 'JSON body must be an object: {"image": "<base64 JPEG/PNG>"}')
    top_k = parse_top_k(payload[TOP_K_FIELD]) if TOP_K_FIELD in payload else None
    if "image" in payload:
        image = decode_base64(payload["image"])
    elif "url" in payload:
        image = fetch_image(payload["url"], config.url_policy)
    else:
        raise RequestError(400, 'JSON body has no image: send {"image": "<base64 JPEG/PNG>"}')
    check_image(image, config.max_image_pixels)
    return InferenceRequest(image, top_k)


def decode_base64(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError(400, '"image" must be a non-empty base64 string')
    if value.startswith("data:"):  # a data URI: data:image/jpeg;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f'"image" is not valid base64: {exc}') from None


def check_image(body: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                resize_size: int | None = None) -> tuple[str, tuple[int, int]]:
    """Read only the image header (:func:`dogbreed.data.check_image_header`): a refusal is a
    :class:`RequestError` with its status (400, 413, 415)."""
    try:
        return data.check_image_header(body, max_pixels, resize_size)
    except data.ImageRejected as exc:
        raise RequestError(exc.status, str(exc)) from None


def fetch_image(url: Any, policy: UrlPolicy,
                connection_factory: Callable[..., http.client.HTTPConnection] | None = None) -> bytes:
    """GET an image over https from an allowed host, within the policy's size and time limits.

    Redirects are not followed (one could lead to a host outside the allow-list).
    """
    if not policy.hosts:
        raise RequestError(
            403, f"URL input is disabled; send the image itself (or set {ALLOW_URL_HOSTS_ENV})"
        )
    if not isinstance(url, str) or not url:
        raise RequestError(400, '"url" must be a non-empty string')
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise RequestError(400, f"bad URL {url!r}: {exc}") from None
    if parts.scheme.lower() != "https":
        raise RequestError(400, "only https:// URLs can be fetched")
    if parts.username or parts.password:
        raise RequestError(400, "URLs with credentials are not fetched")
    host = (parts.hostname or "").lower()
    if not host or not policy.allows(host):
        raise RequestError(403, f"host {host!r} is not in {ALLOW_URL_HOSTS_ENV}")
    factory = connection_factory or functools.partial(
        http.client.HTTPSConnection, context=ssl.create_default_context()
    )
    deadline = time.monotonic() + policy.timeout
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = factory(host, port, timeout=policy.timeout)
    try:
        connection.request("GET", target, headers={"Accept": "image/jpeg, image/png",
                                                    "User-Agent": "dogbreed-serve"})
        response = connection.getresponse()
        if response.status != 200:
            raise RequestError(400, f"fetching {url} answered HTTP {response.status} (redirects are not followed)")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise RequestError(413, f"{url} is {length} bytes, more than the {policy.max_bytes} allowed")
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(64 * 1024):
            total += len(chunk)
            if total > policy.max_bytes:
                raise RequestError(413, f"{url} is more than the {policy.max_bytes} bytes allowed")
            if time.monotonic() > deadline:
                raise RequestError(400, f"fetching {url} took more than {policy.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)
    except RequestError:
        raise
    except TimeoutError:
        raise RequestError(400, f"fetching {url} took more than {policy.timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise RequestError(400, f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


# --- top-k -----------------------------------------------------------------------------------------
def parse_top_k(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        value = None
    try:
        k = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise RequestError(400, f"top_k must be a whole number >= 1, got {value!r}")
    return k


def custom_attributes(header: str | None) -> dict[str, str]:
    """``X-Amzn-SageMaker-Custom-Attributes: top_k=3; trace=abc`` → ``{"top_k": "3", ...}``."""
    result: dict[str, str] = {}
    for item in (header or "").replace(",", ";").split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            result[key.strip().lower()] = value.strip()
    return result


# --- predict / output ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prediction:
    model: ServedModel
    probabilities: torch.Tensor  # [num_classes], on the CPU
    top_k: int
    explanations: tuple[dict[str, Any], ...] = ()


def preprocess(image: bytes, metadata: artifacts.ModelMetadata, device: torch.device) -> torch.Tensor:
    """Exactly the evaluation pipeline: decode + resize + centre crop, then crop + normalise.

    The header is checked again here (input_fn may be the user's own): the decoded image and
    its short-side resize must both fit ``max_image_pixels`` before anything is allocated.
    """
    check_image(image, settings().max_image_pixels, metadata.resize_size)
    try:
        pixels = data.decode_image(image, metadata.resize_size)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise RequestError(400, f"cannot decode image: {reason}") from None
    if pixels.dtype != torch.uint8:  # a 16-bit PNG: the model was trained on 8-bit pixels
        raise RequestError(415, f"{pixels.dtype} images are not supported; send 8 bits per channel")
    return data.eval_transform(pixels.to(device), metadata.image_size, metadata.mean, metadata.std)


def predict_fn(request: InferenceRequest, served: ServedModel) -> Prediction:
    batch = preprocess(request.image, served.metadata, served.device)
    logits = served.forward(batch)
    with torch.inference_mode():
        probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
    prediction = Prediction(served, probabilities, request.top_k or DEFAULT_TOP_K)
    if request.explain:  # Captum + matplotlib: loaded by the first explain request
        from dogbreed import explain

        explanation = explain.served_explanation(served.torch_model(), batch, served.metadata, probabilities)
        prediction = dataclasses.replace(prediction, explanations=(explanation,))
    return prediction


def explain_option(value: str | None) -> str | None:
    """The ``explain`` custom attribute: None, or a method this server draws."""
    if value is None:
        return None
    method = value.strip().lower()
    if method not in EXPLAIN_METHODS:
        raise RequestError(400, f"explain={value!r} is not supported; use explain={EXPLAIN_METHODS[0]}")
    return method


def output_fn(prediction: Prediction, accept: str | None = None) -> tuple[bytes, str]:
    if accept and not any(t in accept for t in (JSON, "*/*", "application/*")):
        raise RequestError(406, f"cannot answer Accept: {accept}; this server answers {JSON}")
    served = prediction.model
    k = min(prediction.top_k, served.metadata.num_classes)
    if not bool(torch.isfinite(prediction.probabilities).all()):
        # A model trained into NaN weights answers NaN: say so, never an invalid JSON "NaN".
        raise NonFiniteOutputError(served.name)
    values, indices = torch.topk(prediction.probabilities, k)
    class_names = served.metadata.class_names
    predictions = [
        {"label": served.labels[i], "class_name": class_names[i], "index": i, "probability": round(p, 6)}
        for p, i in zip(values.tolist(), indices.tolist())
    ]
    body: dict[str, Any] = {"model": served.name, "arch": served.metadata.arch, "engine": served.engine,
                            "predictions": predictions}
    if prediction.explanations:
        body["explanations"] = list(prediction.explanations)
    return json.dumps(body, allow_nan=False).encode(), JSON


# --- the toolkit's handler and transformer (see dogbreed.serve.handler) ------------------------------
def header(properties: dict[str, Any], name: str) -> str | None:
    for key, value in properties.items():
        if isinstance(key, str) and key.lower() == name.lower():
            return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    return None


class DogbreedInferenceHandler(DefaultInferenceHandler):
    """Our defaults for the toolkit's Transformer (see :mod:`dogbreed.serve.inference`)."""

    def default_model_fn(self, model_dir: str, context: Any = None) -> ServedModel:
        return model_fn(model_dir, context)

    def default_model_warmup_fn(self, model_dir: str, model: Any) -> None:
        # Single-model: the load is not on a caller's clock, so build oneDNN's kernels now. In
        # multi-model mode the first request follows the load anyway; a warm-up would add one.
        if os.environ.get(contract.SAGEMAKER_MULTI_MODEL, "").lower() != "true" and isinstance(
                model, ServedModel):
            warm_up(model)

    def default_input_fn(self, input_data: Any, content_type: str | None, context: Any = None) -> InferenceRequest:
        request = input_fn(input_data, content_type)
        if request.top_k is None and context is not None:
            # The JSON body's top_k, else ?top_k= (local use), else SageMaker's CustomAttributes.
            properties = context.request_processor[0].get_request_properties()
            raw = header(properties, TOP_K_PROPERTY)
            if raw is None:
                raw = custom_attributes(header(properties, contract.CUSTOM_ATTRIBUTES_HEADER)).get("top_k")
            if raw is not None:
                request = dataclasses.replace(request, top_k=parse_top_k(raw))
        if context is not None:
            request = with_explain(request, context)
        return request

    def default_predict_fn(self, data: InferenceRequest, model: ServedModel, context: Any = None) -> Prediction:
        return predict_fn(data, model)

    def default_output_fn(self, prediction: Prediction, accept: str | None, context: Any = None) -> tuple[bytes, str]:
        return output_fn(prediction, accept)


def with_explain(request: InferenceRequest, context: Any) -> InferenceRequest:
    """The request with CustomAttributes' ``explain=`` method, if it asks for one."""
    attributes = header(context.request_processor[0].get_request_properties(), contract.CUSTOM_ATTRIBUTES_HEADER)
    if not attributes or EXPLAIN_ATTRIBUTE not in attributes.lower():
        return request  # the plain path: no parsing
    method = explain_option(custom_attributes(attributes).get(EXPLAIN_ATTRIBUTE))
    return dataclasses.replace(request, explain=method) if method else request


class DogbreedTransformer(Transformer):
    """The toolkit's Transformer, answering errors as JSON ``{"code","type","message"}``."""

    @staticmethod
    def handle_error(context: Any, inference_exception: BaseInferenceToolkitError, trace: str) -> list[bytes]:
        cause = sys.exc_info()[1]  # called inside transform's except: the original exception
        status, error_type, message = inference_exception.status_code, "InternalServerError", inference_exception.message
        if isinstance(cause, BaseInferenceToolkitError):  # ours, or raised so by user code
            error_type = getattr(cause, "error_type", phrase(status).replace(" ", ""))
        elif isinstance(cause, UnicodeDecodeError):
            status, error_type, message = 400, "BadRequest", f"request body is not UTF-8: {cause}"
        elif cause is not None and out_of_memory(cause):
            status, error_type, message = 507, "InsufficientStorage", "out of memory"
        else:
            log.error("event=predict_failed trace=%r", trace)
            message = f"prediction failed: {type(cause).__name__}: {message}"
        context.set_response_status(code=status, phrase=utils.remove_crlf(phrase(status)))
        context.set_response_content_type(0, JSON)
        return [error_body(status, error_type, utils.remove_crlf(str(message))[:1000])]
