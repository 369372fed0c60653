"""smdebug wiring: a hook only when a debugger hook config is present, otherwise nothing at all.

SageMaker writes ``debughookconfig.json`` into the input config dir when a training job has a
``DebugHookConfig``; ``SMDEBUG_CONFIG_FILE_PATH`` points elsewhere, and ``USE_SMDEBUG=0`` turns
the hook off. smdebug is imported lazily so runs without a config pay nothing for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from dogbreed.contract import SMDEBUG_CONFIG_FILE_ENV, USE_SMDEBUG_ENV, ContractError, Paths

log = logging.getLogger(__name__)


def hook_config_path(paths: Paths) -> Path | None:
    if os.environ.get(USE_SMDEBUG_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get(SMDEBUG_CONFIG_FILE_ENV)
    candidate = Path(explicit) if explicit else paths.debug_hook_config_file
    return candidate if candidate.is_file() else None


def create_hook(paths: Paths, model: nn.Module, loss_fn: nn.Module) -> Any:
    """An smdebug hook registered on ``model`` and ``loss_fn``, or ``None`` without a config."""
    config = hook_config_path(paths)
    if config is None:
        return None
    set_aside_finished_run(config)
    import smdebug.pytorch as smd  # lazy: pulls in pandas, boto3 and the profiler

    hook = smd.Hook.create_from_json_file(json_file_path=str(config))
    hook.register_module(model)
    hook.register_loss(loss_fn)
    log.info("event=smdebug_hook config=%s out_dir=%s", config, hook.out_dir)
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
    import smdebug.pytorch as smd

    hook.set_mode(smd.modes.TRAIN if train else smd.modes.EVAL)


def close(hook: Any) -> None:
    if hook is not None:
        hook.close()
