"""smdebug wiring: the hook a job's config asks for, or, in a SageMaker job without one, the
project's own; locally nothing unless asked.

SageMaker writes ``debughookconfig.json`` into the input config dir when a training job has a
``DebugHookConfig`` (``--debugger-rules``; Debugger is closed to new customers), and
``SMDEBUG_CONFIG_FILE_PATH`` points elsewhere. A SageMaker job without one (``TRAINING_JOB_NAME``
set) still saves the same collections (:func:`dogbreed.debugger_config.hook_config`) into
``/opt/ml/output/data/tensors``, which SageMaker uploads with the job's output.tar.gz (page
``your-algorithms-training-algo-output``), so ``dogbreed report JOB`` can evaluate the rules.
``USE_SMDEBUG=0`` turns the hook off. smdebug is imported lazily so runs without a hook pay
nothing for it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dogbreed.contract import (
    SMDEBUG_CONFIG_FILE_ENV,
    SMDEBUG_TENSORS_DIR,
    TRAINING_JOB_NAME_ENV,
    USE_SMDEBUG_ENV,
    ContractError,
    Paths,
)
from dogbreed.debugger_config import hook_config

log = logging.getLogger(__name__)


def _hook_off(env: Mapping[str, str]) -> bool:
    return env.get(USE_SMDEBUG_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def hook_config_path(paths: Paths, env: Mapping[str, str] | None = None) -> Path | None:
    """The hook config SageMaker (or ``SMDEBUG_CONFIG_FILE_PATH``) gave this run, if any."""
    env = os.environ if env is None else env
    if _hook_off(env):
        return None
    explicit = env.get(SMDEBUG_CONFIG_FILE_ENV)
    candidate = Path(explicit) if explicit else paths.debug_hook_config_file
    return candidate if candidate.is_file() else None


def in_job_tensors_dir(paths: Paths) -> Path:
    return paths.output_data_dir / SMDEBUG_TENSORS_DIR


def in_job_config_path(paths: Paths, env: Mapping[str, str] | None = None) -> Path | None:
    """In a SageMaker job with no hook config: the project's own, written to a temporary file
    (the input config dir is SageMaker's), with tensors under ``output/data``. Else None."""
    env = os.environ if env is None else env
    if _hook_off(env) or not env.get(TRAINING_JOB_NAME_ENV):
        return None
    config = hook_config(str(in_job_tensors_dir(paths)))
    handle, name = tempfile.mkstemp(prefix="dogbreed-debughookconfig-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(config, file)
    return Path(name)


def create_hook(paths: Paths, model: nn.Module, loss_fn: nn.Module) -> Any:
    """An smdebug hook registered on ``model`` and ``loss_fn``: the config's, else in a
    SageMaker job the project's own; ``None`` locally without a config."""
    config = hook_config_path(paths)
    source = "config"
    if config is None:
        config, source = in_job_config_path(paths), "in_job"
    if config is None:
        return None
    set_aside_finished_run(config)
    import smdebug.pytorch as smd  # lazy: pulls in pandas, boto3 and the profiler

    hook = smd.Hook.create_from_json_file(json_file_path=str(config))
    if source == "in_job":
        config.unlink(missing_ok=True)  # read once, at creation
    hook.register_module(model)
    hook.register_loss(loss_fn)
    log.info("event=smdebug_hook source=%s config=%s out_dir=%s", source, config, hook.out_dir)
    return hook


def set_aside_finished_run(config: Path) -> Path | None:
    """Move a finished run's tensors (a rerun that resumes with more epochs, same dir) to
    ``<out_dir>-<n>``: smdebug refuses to write into them, and deleting them would lose data.

    smdebug's own refusal surfaced as ``AttributeError: 'Hook' object has no attribute
    'prepared_collections'``. On SageMaker every job (and a spot restart) starts with an empty
    local out_dir, so this happens only in local reruns."""
    try:
        local_path = json.loads(config.read_text()).get("LocalPath")
    except (OSError, ValueError, AttributeError) as exc:
        raise ContractError(f"debugger hook config {config}: not a JSON object ({exc})") from None
    if not isinstance(local_path, str) or "://" in local_path:
        return None  # smdebug's default, or S3: nothing here to set aside
    # smdebug marks a run's end when its hook closes, and then refuses that dir to any later
    # hook (smdebug.core.hook_utils.verify_and_get_out_dir); an interrupted run it writes on.
    from smdebug.core.access_layer.utils import has_training_ended

    out_dir = Path(local_path).expanduser()
    if not has_training_ended(str(out_dir)):
        return None
    n = 1
    while (aside := out_dir.with_name(f"{out_dir.name}-{n}")).exists():
        n += 1
    out_dir.rename(aside)
    log.info("event=smdebug_previous_run moved=%s to=%s", out_dir, aside)
    return aside


def set_mode(hook: Any, train: bool) -> None:
    if hook is None:
        return
    import smdebug.pytorch as smd  # seconds to import: only a run with a hook loads it

    hook.set_mode(smd.modes.TRAIN if train else smd.modes.EVAL)


def close(hook: Any) -> None:
    if hook is not None:
        hook.close()
