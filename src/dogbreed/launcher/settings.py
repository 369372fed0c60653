"""Launcher settings: command-line flags > environment (``DOGBREED_*``) > config file > defaults.

The config file is TOML (Python 3.11+) or JSON with the field names below, found at
``--config PATH``, ``$DOGBREED_CONFIG`` or ``./dogbreed.toml`` / ``./dogbreed.json``. The region
also falls back to boto3's own ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dogbreed.contract import ContractError, validate_model_name

ENV_PREFIX = "DOGBREED_"
CONFIG_ENV = "DOGBREED_CONFIG"
DEFAULT_CONFIG_FILES = ("dogbreed.toml", "dogbreed.json")
TRAIN_REPOSITORY = "dogbreed-train"
SERVE_REPOSITORY = "dogbreed-serve"


class SettingsError(ValueError):
    pass


def check_model_name(name: str) -> str:
    """``name`` if valid under the one model-name rule (:func:`dogbreed.contract.validate_model_name`)."""
    try:
        return validate_model_name(name)
    except ContractError as exc:
        raise SettingsError(str(exc)) from None


def _number(convert: Callable[[str], Any], expected: str,
            valid: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type`` for a numeric flag: a value out of range is refused at parse time
    (exit 2, argparse names the flag) instead of being replaced by a default or failing later."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a number > 0", lambda v: 0 < v < math.inf)
port_number = _number(int, "a port number, 0 to 65535", lambda v: 0 <= v <= 65535)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a launcher command may need; fields left ``None`` are resolved or refused later."""

    region: str | None = None
    role_arn: str | None = None
    bucket: str | None = None
    prefix: str = "dogbreed"
    train_image: str | None = None
    serve_image: str | None = None
    # What `make push` recorded (default <workdir>/pushed-images.json): the default images.
    pushed_images: str | None = None
    # L4, NVIDIA driver 535 as AWS documents it: runs the default image's CUDA 12.x without the
    # compat libraries (ml.g4dn's documented 470 does not; launcher/sagemaker/instances.py).
    train_instance_type: str = "ml.g6.xlarge"
    train_instance_count: int = 1
    train_volume_gb: int = 30
    max_run_seconds: int = 4 * 3600
    serve_instance_type: str = "ml.m5.xlarge"
    serve_instance_count: int = 1
    endpoint_name: str = "dogbreed-mme"
    # Local backend.
    workdir: str = ".dogbreed"
    max_loaded_models: int = 4
    port: int = 8090
    poll_seconds: float = 30.0

    @property
    def has_aws(self) -> bool:
        """Whether enough is configured to talk to SageMaker (a role and a bucket)."""
        return bool(self.role_arn and self.bucket)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser()

    def s3_uri(self, *parts: str) -> str:
        bucket = self.bucket or "<bucket>"
        key = "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))
        return f"s3://{bucket}/{key}"

    @property
    def data_uri(self) -> str:
        return self.s3_uri("data")

    @property
    def models_uri(self) -> str:
        """The MME model prefix: each model is ``<models_uri>/<name>/model.tar.gz``."""
        return self.s3_uri("models") + "/"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    kind = FIELDS[name].type
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name}={value!r}: expected a number") from None
    return str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    if path.suffix == ".toml":
        try:
            import tomllib  # only for a .toml config
        except ModuleNotFoundError:  # Python 3.10
            raise SettingsError(f"{path}: TOML config files need Python 3.11; use JSON") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a table/object of settings")
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(FIELDS)}")
    return raw


def find_config_file(explicit: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    for name in DEFAULT_CONFIG_FILES:
        if (cwd / name).is_file():
            return cwd / name
    return None


def load(flags: Mapping[str, Any] | None = None, config_file: str | None = None,
         env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
    """Merge defaults < config file < environment < flags (a flag left ``None`` is not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = find_config_file(config_file, env, cwd or Path.cwd())
    if path is not None:
        values.update(read_config_file(path))
    if "region" not in values:
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            values["region"] = region
    for name in FIELDS:
        if env.get(env_name(name)):
            values[name] = env[env_name(name)]
    for name, value in (flags or {}).items():
        if name in FIELDS and value is not None:
            values[name] = value
    return Settings(**{k: _coerce(k, v) for k, v in values.items()})
