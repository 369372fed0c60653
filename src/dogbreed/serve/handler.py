"""The handler MMS loads in every backend worker (``default_service_handler``), on the toolkit's
public API: :class:`HandlerService` is sagemaker-inference's ``DefaultHandlerService`` around its
``Transformer`` (:class:`~dogbreed.serve.inference.DogbreedTransformer`, errors as JSON), with
:class:`~dogbreed.serve.inference.DogbreedInferenceHandler` (a ``DefaultInferenceHandler``)
supplying ``default_model_fn`` / ``default_input_fn`` / ``default_predict_fn`` /
``default_output_fn``. (MMS wants exactly one class in this module.)

User inference code: a model dir may hold ``code/inference.py``; the Transformer uses any of
``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn`` (or ``transform_fn``) it defines in place
of ours. MMS runs each model in its own worker processes, so that code serves that model only.
``code/requirements.txt`` is not installed (endpoints may have no network).

A model that cannot be loaded (bad ``model.json``, class count not matching the weights, a
``model.pt`` that is not a plain state_dict, unknown arch, broken user code) does not kill the
worker: :meth:`HandlerService.initialize` keeps the reason and every request to that model is
answered with it, as JSON. MMS 1.1 answers a failed worker start with a fixed "Failed to start
workers" and drops the worker's message, so this is how the reason reaches a caller (asked
once after ``POST /models``, see :mod:`dogbreed.serve.lifecycle`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sagemaker_inference.default_handler_service import DefaultHandlerService

from dogbreed.serve import LOAD_STATUS_HEADER, TOP_K_PROPERTY, error_body
from dogbreed.serve import inference as inf

log = logging.getLogger("dogbreed.serve")


class HandlerService(DefaultHandlerService):
    def __init__(self) -> None:
        super().__init__(transformer=inf.DogbreedTransformer(inf.DogbreedInferenceHandler()))
        self.load_error: tuple[int, str, str] | None = None

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        code_dir = Path(model_dir, "code")
        if code_dir.is_dir():  # this worker serves this model only: its code goes first
            sys.path.insert(0, str(code_dir))
        start = time.perf_counter()
        try:  # a bad DOGBREED_TORCH_THREADS too is a reason the caller gets, not a dead worker
            threads = inf.configure_threads()
            super().initialize(context)
        except Exception as exc:  # noqa: BLE001 - kept and answered, see the module docstring
            self.load_error = inf.load_failure(exc)
            log.error("event=model_load_failed model=%s dir=%s status=%d reason=%s",
                      context.model_name, model_dir, self.load_error[0], self.load_error[2])
            return
        # The engine model_fn chose (torch or onnxruntime; "user" for a user model_fn's object).
        engine = getattr(getattr(self._service, "_model", None), "engine", "user")
        log.info("event=model_loaded model=%s dir=%s pid=%d engine=%s threads=%d user_code=%s seconds=%.3f",
                 context.model_name, model_dir, os.getpid(), engine, threads, code_dir.is_dir(),
                 time.perf_counter() - start)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        if self.load_error is not None:
            status, error_type, message = self.load_error
            context.set_all_response_status(code=status, phrase=inf.phrase(status))
            for idx in range(len(data)):
                context.set_response_content_type(idx, inf.JSON)
            return [error_body(status, error_type, message)] * len(data)
        properties = context.request_processor[0].get_request_properties()
        if inf.header(properties, LOAD_STATUS_HEADER) is not None:
            context.set_response_content_type(0, inf.JSON)
            return [b'{"status": "loaded"}']
        if data and TOP_K_PROPERTY in data[0]:
            # MMS hands query parameters over as request inputs; input_fn reads headers.
            properties[TOP_K_PROPERTY] = data[0][TOP_K_PROPERTY]
        return super().handle(data, context)
