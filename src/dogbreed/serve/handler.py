"""The handler service MMS loads in every backend worker (``default_service_handler``).

MMS imports this module and instantiates its only class (a handler module must define exactly
one), calls ``initialize(context)`` once with the model dir, then ``handle(data, context)`` per
request. The work is done by :class:`dogbreed.serve.inference.DogbreedTransformer`, the
sagemaker-inference Transformer wired to :mod:`dogbreed.serve.inference`'s functions.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from sagemaker_inference.default_handler_service import DefaultHandlerService

from dogbreed.contract import SAGEMAKER_MULTI_MODEL
from dogbreed.serve import RUN_DIR_ENV, error_body, load_error_file
from dogbreed.serve.inference import (
    DogbreedTransformer,
    ModelLoadFailed,
    configure_threads,
    load_failure,
    warm_up,
)

log = logging.getLogger("dogbreed.serve")


class HandlerService(DefaultHandlerService):
    def __init__(self) -> None:
        super().__init__(transformer=DogbreedTransformer())

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        threads = configure_threads()
        start = time.perf_counter()
        try:
            self._service.validate_and_initialize(model_dir=model_dir, context=context)
            if os.environ.get(SAGEMAKER_MULTI_MODEL, "").lower() != "true":
                warm_up(self._service._model)
        except Exception as exc:
            status, error_type, message = load_failure(exc)
            log.error("event=model_load_failed model=%s dir=%s status=%d reason=%s",
                      context.model_name, model_dir, status, message)
            run_dir = os.environ.get(RUN_DIR_ENV)
            if run_dir:
                path = Path(load_error_file(run_dir, context.model_name))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(error_body(status, error_type, message))
            raise ModelLoadFailed(message) from exc
        log.info("event=model_loaded model=%s dir=%s pid=%d torch_threads=%d seconds=%.3f",
                 context.model_name, model_dir, os.getpid(), threads, time.perf_counter() - start)
