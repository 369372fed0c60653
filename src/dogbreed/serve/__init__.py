"""Serving: Multi Model Server (MMS) + a sagemaker-inference handler, driven like SageMaker.

    dogbreed-serve                              # single-model: loads /opt/ml/model
    SAGEMAKER_MULTI_MODEL=true dogbreed-serve   # multi-model: POST /models {"model_name","url"}

The request path: :mod:`~dogbreed.serve.front` (the public port) → MMS → :mod:`~dogbreed.serve.handler`
(the toolkit's handler service) → :mod:`~dogbreed.serve.inference` (``model_fn`` … ``output_fn``).
Beside it: :mod:`~dogbreed.serve.lifecycle` (what MMS 1.1 lacks about a model's life),
:mod:`~dogbreed.serve.zygote` (pre-imported workers), :mod:`~dogbreed.serve.server`
(``dogbreed-serve``, :class:`~dogbreed.serve.server.ModelServer`), :mod:`~dogbreed.serve.client`.
The SageMaker environment names live in :mod:`dogbreed.contract`; these are serving's own. Nothing
heavy is imported here: the worker shim imports this package.
"""

# Where the server keeps its MMS config, sockets, lock, logs and unpacked models.
RUN_DIR_ENV = "DOGBREED_RUN_DIR"
# Comma-separated hosts an ``{"url": ...}`` request may fetch from; unset = URL input disabled.
ALLOW_URL_HOSTS_ENV = "DOGBREED_ALLOW_URL_HOSTS"
URL_MAX_BYTES_ENV = "DOGBREED_URL_MAX_BYTES"
URL_TIMEOUT_ENV = "DOGBREED_URL_TIMEOUT"
# Largest image (width x height) a request may decode to.
MAX_IMAGE_PIXELS_ENV = "DOGBREED_MAX_IMAGE_PIXELS"
# Intra-op threads per backend worker, torch's and ONNX Runtime's (default 1, as MMS sets
# OMP_NUM_THREADS=1). Workers x threads should not exceed the instance's vCPUs.
TORCH_THREADS_ENV = "DOGBREED_TORCH_THREADS"
# The forward's engine: "auto" (ONNX Runtime for a model with a graph on a CPU worker, else
# torch), "onnxruntime" or "torch".
ENGINE_ENV = "DOGBREED_SERVE_ENGINE"
# "0" starts backend workers as fresh Python processes instead of forking them from the zygote.
ZYGOTE_ENV = "DOGBREED_SERVE_ZYGOTE"
# JVM options for MMS, replacing the base file's ``vmargs``.
JVM_OPTS_ENV = "DOGBREED_MMS_JVM_OPTS"
# Megabytes of address space a backend worker may add to what it had when forked (the kernel
# enforces it: RLIMIT_AS); unset = no limit. A model that needs more answers 507 and is
# unloaded, as SageMaker's multi-model contract wants, instead of taking the instance's memory.
WORKER_MEMORY_ENV = "DOGBREED_SERVE_WORKER_MEMORY_MB"


# Asked once of a freshly registered model: did it load? (handler.HandlerService.handle)
LOAD_STATUS_HEADER = "X-Dogbreed-Load-Status"
# Where the handler finds a ``?top_k=`` query parameter among the request properties.
TOP_K_PROPERTY = "top_k"


def error_body(status: int, error_type: str, message: str) -> bytes:
    """The JSON error every layer of the server answers with (MMS's own shape)."""
    import json  # not at the top: the worker shim imports this package on every cold load

    return json.dumps({"code": status, "type": error_type, "message": message}).encode()
