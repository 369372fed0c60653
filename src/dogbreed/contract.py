"""The SageMaker container contract: the only module that knows /opt/ml, SM_* and HP parsing.

Training, serving and the launcher import their paths, environment names and hyperparameter
rules from here. The layout follows sagemaker-training's ``environment.py``: everything hangs
off one base directory (``/opt/ml``), overridable with ``SAGEMAKER_BASE_DIR`` so tests and local
runs can use a temp dir, and ``SM_*`` variables (set by the toolkit) win over derived paths.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# --- environment names ----------------------------------------------------------------------
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"

SM_MODEL_DIR = "SM_MODEL_DIR"
SM_OUTPUT_DIR = "SM_OUTPUT_DIR"
SM_OUTPUT_DATA_DIR = "SM_OUTPUT_DATA_DIR"
SM_INPUT_CONFIG_DIR = "SM_INPUT_CONFIG_DIR"
SM_CHANNELS = "SM_CHANNELS"
SM_CHANNEL_PREFIX = "SM_CHANNEL_"
SM_HPS = "SM_HPS"
SM_CURRENT_HOST = "SM_CURRENT_HOST"
SM_HOSTS = "SM_HOSTS"
SM_NUM_GPUS = "SM_NUM_GPUS"
SM_NETWORK_INTERFACE_NAME = "SM_NETWORK_INTERFACE_NAME"
# Not toolkit variables: processes per host for a CPU run (`dogbreed train --local --nproc N`;
# GPU hosts run one per GPU), and the rendezvous port on the first host of a multi-host job.
NPROC_PER_HOST_ENV = "DOGBREED_NPROC_PER_HOST"
MASTER_PORT_ENV = "DOGBREED_MASTER_PORT"
# Not a toolkit variable: lets a local run or a test put checkpoints elsewhere.
CHECKPOINT_DIR_ENV = "DOGBREED_CHECKPOINT_DIR"
# smdebug's own override for the hook config file, and our switch to turn the hook off.
SMDEBUG_CONFIG_FILE_ENV = "SMDEBUG_CONFIG_FILE_PATH"
USE_SMDEBUG_ENV = "USE_SMDEBUG"
# Set by SageMaker in every training job's container (sagemaker-training reads it the same way).
TRAINING_JOB_NAME_ENV = "TRAINING_JOB_NAME"
# Where a SageMaker job's own smdebug hook writes when the job has no DebugHookConfig: under
# output/data, which SageMaker uploads as output.tar.gz (page your-algorithms-training-algo-output).
SMDEBUG_TENSORS_DIR = "tensors"

# Serving (sagemaker-inference / MME contract).
SAGEMAKER_BIND_TO_PORT = "SAGEMAKER_BIND_TO_PORT"
SAGEMAKER_MULTI_MODEL = "SAGEMAKER_MULTI_MODEL"
SAGEMAKER_MODEL_SERVER_WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"
SAGEMAKER_MODEL_SERVER_TIMEOUT = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
BIND_HOST_ENV = "DOGBREED_BIND_HOST"
DEFAULT_BIND_HOST = "0.0.0.0"
DEFAULT_BIND_PORT = 8080
# SageMaker real-time limits and headers: one constant each, for the server, router and clients.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # "6 MB" request/response payload of InvokeEndpoint
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
# What a batch transform sends with every record, on SageMaker and locally: the server sniffs JPEG/PNG.
BATCH_RECORD_CONTENT_TYPE = "application/x-image"
TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
SINGLE_MODEL_NAME = "model"  # what sagemaker-inference calls the model of a single-model endpoint
# The container API of a SageMaker (multi-model) endpoint: (method, path shape) pairs, "*" one
# path segment (a model name).
CONTAINER_ROUTES = frozenset({
    ("GET", ("ping",)), ("POST", ("invocations",)), ("GET", ("execution-parameters",)), ("GET", ("models",)),
    ("POST", ("models",)), ("GET", ("models", "*")), ("DELETE", ("models", "*")), ("POST", ("models", "*", "invoke"))})


def execution_parameters(workers: int) -> dict[str, Any]:
    """The ``GET /execution-parameters`` answer batch transform asks a container for: one record
    per request (images are not split), as many in flight as model workers, the payload limit."""
    return {"MaxConcurrentTransforms": max(1, int(workers)), "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": MAX_PAYLOAD_BYTES // 1024**2}

# File names inside the contract.
HYPERPARAMETERS_FILE = "hyperparameters.json"
INPUT_DATA_CONFIG_FILE = "inputdataconfig.json"
RESOURCE_CONFIG_FILE = "resourceconfig.json"
DEBUG_HOOK_CONFIG_FILE = "debughookconfig.json"
FAILURE_FILE = "failure"

# Channel names: one ``training`` channel holding train/valid/test, or one channel per split.
TRAINING_CHANNEL = "training"
SPLIT_CHANNELS = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}

# SageMaker adds these to the hyperparameters of tuning and SDK jobs; they are not ours. Only
# the known ones: a bare "_" prefix also swallowed typos such as "_epochs". "sagemaker_*" is the
# SDK's and sagemaker-training's prefix (params.SAGEMAKER_PREFIX: sagemaker_program,
# sagemaker_region...); "_tuning_objective_metric" is the one underscore key, added by the tuning
# service to every training job of a tuning job (sagemaker_training params.TUNING_METRIC_PARAM;
# the SDK's tuner.py deletes it as "reserved by SageMaker for tuning jobs"). Kept as prefixes so
# callers can go on filtering with ``key.startswith(IGNORED_HYPERPARAMETER_PREFIXES)``.
TUNING_OBJECTIVE_METRIC_KEY = "_tuning_objective_metric"
IGNORED_HYPERPARAMETER_PREFIXES = ("sagemaker_", TUNING_OBJECTIVE_METRIC_KEY)


class ContractError(ValueError):
    """The job's configuration breaks the contract (bad hyperparameter, missing channel...)."""


# --- paths ------------------------------------------------------------------------------------
def base_dir() -> Path:
    return Path(os.environ.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR)


@dataclasses.dataclass(frozen=True)
class Paths:
    """Every path of the /opt/ml layout, resolved once from the base dir and SM_* overrides."""

    base: Path
    input_config_dir: Path
    data_dir: Path
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    checkpoints_dir: Path
    code_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Paths:
        env = os.environ if env is None else env
        base = Path(env.get(BASE_DIR_ENV) or DEFAULT_BASE_DIR)
        output_dir = Path(env.get(SM_OUTPUT_DIR) or base / "output")
        return cls(
            base=base,
            input_config_dir=Path(env.get(SM_INPUT_CONFIG_DIR) or base / "input" / "config"),
            data_dir=base / "input" / "data",
            model_dir=Path(env.get(SM_MODEL_DIR) or base / "model"),
            output_dir=output_dir,
            output_data_dir=Path(env.get(SM_OUTPUT_DATA_DIR) or output_dir / "data"),
            checkpoints_dir=Path(env.get(CHECKPOINT_DIR_ENV) or base / "checkpoints"),
            code_dir=base / "code",
        )

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config_dir / HYPERPARAMETERS_FILE

    @property
    def input_data_config_file(self) -> Path:
        return self.input_config_dir / INPUT_DATA_CONFIG_FILE

    @property
    def resource_config_file(self) -> Path:
        return self.input_config_dir / RESOURCE_CONFIG_FILE

    @property
    def debug_hook_config_file(self) -> Path:
        return self.input_config_dir / DEBUG_HOOK_CONFIG_FILE

    @property
    def failure_file(self) -> Path:
        return self.output_dir / FAILURE_FILE

    def create_output_dirs(self) -> None:
        for path in (self.model_dir, self.output_data_dir, self.checkpoints_dir):
            path.mkdir(parents=True, exist_ok=True)


def write_failure(message: str, paths: Paths | None = None, first_wins: bool = False) -> Path:
    """Write the reason a job failed where SageMaker reads it (``FailureReason``).

    ``first_wins``: keep a reason already there (the ranks of one host share the file, and the
    first rank to fail names the cause; the others only see its effect).
    """
    paths = paths or Paths.from_env()
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    # SageMaker truncates FailureReason at 1024 characters; keep the first line readable.
    text = message.strip()[:1024] + "\n"
    try:
        with open(paths.failure_file, "x" if first_wins else "w", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        pass
    return paths.failure_file


# --- channels -----------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path} is not valid JSON: {exc}") from exc


# Each config input is checked for its shape where it is read: a list where an object belongs
# used to fail later as "'str' object has no attribute 'get'", naming neither file nor variable.
def input_data_config(paths: Paths) -> dict[str, dict[str, Any]]:
    config = _read_json(paths.input_data_config_file) or {}
    if not isinstance(config, dict):
        raise ContractError(f"{paths.input_data_config_file} must hold a JSON object of channel name -> "
                            f"channel settings, not a {_json_type(config)}")
    for name, channel in config.items():
        if not isinstance(channel, dict):
            raise ContractError(f"{paths.input_data_config_file}: channel {name!r} must be a JSON object "
                                f'(e.g. {{"TrainingInputMode": "File"}}), not a {_json_type(channel)}')
    return config


def resource_config(paths: Paths) -> dict[str, Any]:
    config = _read_json(paths.resource_config_file) or {}
    if not isinstance(config, dict):
        raise ContractError(f"{paths.resource_config_file} must hold a JSON object, not a {_json_type(config)}")
    if "hosts" in config:
        _check_hosts(config["hosts"], f"{paths.resource_config_file}: \"hosts\"")
    if not isinstance(config.get("current_host", ""), str):
        raise ContractError(f'{paths.resource_config_file}: "current_host" must be a string (e.g. "algo-1"), '
                            f"not a {_json_type(config['current_host'])}")
    return config


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_hosts(hosts: Any, where: str) -> list[str]:
    # A string would be read as a list of one-letter hosts ("algo-1" -> a, l, g, o...).
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ContractError(f'{where} must be a JSON list of host names (e.g. ["algo-1", "algo-2"]), '
                            f"got {hosts!r}")
    return hosts


def channel_names(paths: Paths, env: Mapping[str, str] | None = None) -> list[str]:
    """Channels from SM_CHANNELS, else inputdataconfig.json, else the folders under input/data."""
    env = os.environ if env is None else env
    if env.get(SM_CHANNELS):
        expected = f'{SM_CHANNELS} must be a JSON list of channel names (e.g. ["training"])'
        try:
            names = json.loads(env[SM_CHANNELS])
        except json.JSONDecodeError as exc:
            raise ContractError(f"{expected}; {SM_CHANNELS}={env[SM_CHANNELS]!r} is not valid JSON: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ContractError(f"{expected}, got {env[SM_CHANNELS]!r}")
        return sorted(names)
    config = input_data_config(paths)
    if config:
        return sorted(config)
    if paths.data_dir.is_dir():
        return sorted(p.name for p in paths.data_dir.iterdir() if p.is_dir())
    return []


def channel_dir(name: str, paths: Paths, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(SM_CHANNEL_PREFIX + name.upper()) or paths.data_dir / name)


def resolve_splits(paths: Paths, env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Map ``train``/``valid``/``test`` to folders of class subfolders.

    Either one ``training`` channel holding ``train/ valid/ test/`` (how the seeds upload
    dogImages), or one channel per split. ``train`` and ``valid`` are required; ``test`` is used
    when present.
    """
    env = os.environ if env is None else env
    config = input_data_config(paths)
    for name, channel in config.items():
        if channel.get("TrainingInputMode", "File") == "Pipe":
            raise ContractError(
                f"channel {name!r} uses Pipe mode; this container reads files: use File or FastFile"
            )
    names = channel_names(paths, env)
    splits: dict[str, Path] = {}
    for split, aliases in SPLIT_CHANNELS.items():
        for alias in aliases:
            if alias in names:
                splits[split] = channel_dir(alias, paths, env)
                break
    if TRAINING_CHANNEL in names:
        root = channel_dir(TRAINING_CHANNEL, paths, env)
        for split, aliases in SPLIT_CHANNELS.items():
            if split in splits:
                continue
            for alias in aliases:
                if (root / alias).is_dir():
                    splits[split] = root / alias
                    break
    missing = [s for s in ("train", "valid") if s not in splits]
    if missing:
        raise ContractError(
            f"missing data split(s) {', '.join(missing)}: give a '{TRAINING_CHANNEL}' channel with "
            f"train/ valid/ test/ folders, or channels named train and valid "
            f"(channels found: {', '.join(names) or 'none'})"
        )
    return splits


def cluster_hosts(paths: Paths, env: Mapping[str, str] | None = None) -> tuple[list[str], str]:
    """(every host of the job, this host): ``SM_HOSTS``/``SM_CURRENT_HOST`` (set by the toolkit),
    else ``resourceconfig.json``, else one host. Hosts keep SageMaker's order (algo-1, algo-2...):
    a host's position is its node rank and the first host is the rendezvous."""
    env = os.environ if env is None else env
    config = resource_config(paths)
    try:
        hosts = json.loads(env[SM_HOSTS]) if env.get(SM_HOSTS) else config.get("hosts")
    except json.JSONDecodeError as exc:
        raise ContractError(f"{SM_HOSTS} is not valid JSON: {exc}") from exc
    if env.get(SM_HOSTS):
        _check_hosts(hosts, SM_HOSTS)
    current = env.get(SM_CURRENT_HOST) or config.get("current_host")
    if not hosts:
        return [current or "localhost"], current or "localhost"
    hosts = [str(h) for h in hosts]
    if current is None and len(hosts) == 1:
        current = hosts[0]
    if current not in hosts:
        raise ContractError(f"current host {current!r} is not among the job's hosts {hosts}")
    return hosts, current


def network_interface_name(paths: Paths, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get(SM_NETWORK_INTERFACE_NAME) or resource_config(paths).get("network_interface_name")


def env_int(env: Mapping[str, str], name: str, minimum: int = 0, default: int | None = 0) -> int | None:
    """A whole-number setting: ``default`` when unset or blank, :class:`ContractError` when it is
    not a whole number or under ``minimum``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not _INT_TEXT.fullmatch(raw):  # int() alone takes "1_0" and non-ASCII digits
        raise ContractError(f"{name}={raw!r} is not a whole number")
    value = int(raw)
    if value < minimum:
        raise ContractError(f"{name}={raw!r} must be at least {minimum}")
    return value


def num_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs the toolkit counted on this host (``SM_NUM_GPUS``; 0 when unset)."""
    return env_int(os.environ if env is None else env, SM_NUM_GPUS) or 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now: the rendezvous's on one host without
    ``DOGBREED_MASTER_PORT``, or a local model server's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def procs_per_host(env: Mapping[str, str] | None = None) -> int:
    """Training processes per host asked for explicitly (0 = the default: one per GPU, else one)."""
    return env_int(os.environ if env is None else env, NPROC_PER_HOST_ENV) or 0


# --- hyperparameters ------------------------------------------------------------------------
ARCHITECTURES = ("resnet18", "mobilenet_v2", "resnet50")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LR_SCHEDULES = ("cosine", "none")
AUGMENTS = ("none", "flip", "trivialaugment")
# channels-last: "auto" is on for a GPU and, on a CPU, whichever layout a few timed probe steps
# find faster. The layouts round differently, so a run that must reproduce another (a retrain of
# a tuning trial) pins the layout that run used: "true" or "false".
CHANNELS_LAST_MODES = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Everything a training run can be told. Names use underscores; dashes are accepted."""

    model: str = "resnet18"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    lr_schedule: str = "cosine"
    image_size: int = 224
    weights: str = "imagenet"
    freeze_backbone: bool = False
    seed: int = 0
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    early_stopping_patience: int = 0
    num_workers: int = 0
    eval_batch_size: int = 256
    # Recipe primitives (dogbreed.recipe). These defaults are the fine-tuning recipe;
    # weights=none starts from SCRATCH_DEFAULTS instead (README, "Training recipe").
    augment: str = "flip"
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0
    warmup_epochs: int = 0
    eval_image_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_sagemaker(self) -> dict[str, str]:
        """Render as SageMaker wants them: dashed keys, string values."""
        return {k.replace("_", "-"): _to_string(v) for k, v in self.to_dict().items()}


# What each hyperparameter means: `dogbreed-train --help` shows it beside the default (a test
# checks every field has one). The README's table says the same at more length.
HYPERPARAMETER_HELP: dict[str, str] = {
    "model": "torchvision architecture; a new head is made for the classes",
    "epochs": "epochs to train (a resumed run finishes the planned count)",
    "batch_size": "training batch size, global over all ranks (at least 2 per rank: BatchNorm)",
    "lr": "learning rate (cosine-annealed over the epochs unless lr-schedule=none)",
    "optimizer": "sgd (with momentum) or adamw; from scratch, an lr given alone keeps sgd",
    "momentum": "SGD momentum",
    "weight_decay": "L2 (sgd) or decoupled (adamw) weight decay",
    "label_smoothing": "cross-entropy label smoothing",
    "lr_schedule": "cosine annealing over the epochs, or a constant lr",
    "image_size": "training crop in pixels; images are cached at ceil(size x 256/224)",
    "weights": "starting weights: imagenet (torchvision), none (from scratch) or a .pth state_dict path",
    "freeze_backbone": "train only the new head (transfer learning)",
    "seed": "seeds weight init, shuffling and augmentation (0 to 2**31-1)",
    "amp": "mixed precision: auto (bf16 on a GPU that has it, else off), bf16, fp16 (GPU only), off",
    "channels_last": "memory layout: auto (GPU: channels_last; CPU: whichever a few timed steps "
                     "find faster, so it may differ run to run), true or false to pin it",
    "compile": "torch.compile the model",
    "early_stopping_patience": "stop after this many epochs without a better valid_accuracy (0 = off)",
    "num_workers": "CPU threads decoding images (0 = all cores)",
    "eval_batch_size": "evaluation batch size",
    "augment": "none (centre crop), flip (random resized crop + flip), trivialaugment (flip + TrivialAugmentWide)",
    "random_erasing": "probability of erasing one random box per sample",
    "mixup_alpha": "MixUp Beta(alpha, alpha) (0 = off)",
    "cutmix_alpha": "CutMix Beta(alpha, alpha) (0 = off)",
    "ema_decay": "EMA of weights and BatchNorm buffers, evaluated and saved (0 = off)",
    "warmup_epochs": "linear warmup from 1% of lr over this many epochs, then the schedule",
    "eval_image_size": "evaluation and serving crop (FixRes; 0 = image-size), recorded in model.json",
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "model": ARCHITECTURES,
    "optimizer": OPTIMIZERS,
    "amp": AMP_MODES,
    "lr_schedule": LR_SCHEDULES,
    "augment": AUGMENTS,
    "channels_last": CHANNELS_LAST_MODES,
}
# (minimum, maximum), inclusive. Every float hyperparameter needs an entry (a test checks):
# with no bound, lr=1e308 would "train" into NaN weights just as lr=nan did.
_RANGES: dict[str, tuple[float, float | None]] = {
    "epochs": (1, 10_000),
    "batch_size": (2, 65_536),  # see _RANGE_REASONS
    "eval_batch_size": (1, 65_536),
    # Exclusive at 0 (see _EXCLUSIVE_MINIMUM); 10 is far above any rate SGD or AdamW trains with.
    "lr": (0.0, 10.0),
    "momentum": (0.0, 1.0),
    # Decoupled (AdamW) or L2 (SGD) coefficient: above 1 it outweighs the loss itself.
    "weight_decay": (0.0, 1.0),
    "label_smoothing": (0.0, 0.99),
    "image_size": (32, 1024),
    "early_stopping_patience": (0, None),
    "num_workers": (0, 256),
    "random_erasing": (0.0, 1.0),
    "mixup_alpha": (0.0, 10.0),
    "cutmix_alpha": (0.0, 10.0),
    "ema_decay": (0.0, 0.99999),
    "warmup_epochs": (0, 100),
    "eval_image_size": (0, 1024),
    "seed": (0, 2**31 - 1),  # see _RANGE_REASONS
}
_EXCLUSIVE_MINIMUM = frozenset({"lr"})
# Why a bound is where it is, when the number alone does not say (added to the message).
_RANGE_REASONS = {
    # batch-size=1 passed and then crashed in BatchNorm ("Expected more than 1 value per channel
    # when training") on the 1x1 feature map of a small image, with a traceback.
    "batch_size": "BatchNorm needs at least 2 images per training batch",
    # 2**63 and up used to end the job in torch.manual_seed ("Overflow when unpacking long long").
    # 31 bits leave room for the per-rank offset train.py adds (seed + 7919 * (rank + 1) + epoch)
    # under torch's 64-bit limit, and fit any 32-bit seed API (numpy, CUDA) a later change uses.
    "seed": "the seed must fit the random generators it seeds (31 bits)",
}
# The learning rate an optimizer gets when none is given: torch.optim's AdamW default, and the SGD
# rate fine-tuning has always used (Keras pairs them the same way). AdamW at SGD's 0.01 diverges
# from scratch within an epoch or two.
DEFAULT_LR: dict[str, float] = {"sgd": 0.01, "adamw": 0.001}
# Defaults for a run from scratch (weights=none) where they differ from the fine-tuning ones;
# keys given explicitly win, and an lr given without an optimizer keeps SGD (such an lr was chosen
# for it: the documented default, the seeds' tuning space). Measured on dogs-medium (ResNet18, 64
# px, 10 epochs, 3 seeds; README, "Training recipe"): AdamW at 1e-3 with cosine decay gets a
# random init going in the few hundred steps such a set gives, where SGD at 0.01 barely starts;
# batch 16 doubles those steps. The torchvision-style regularisers (RECIPE_CANDIDATE) scored
# below, so they stay off.
SCRATCH_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "batch_size": 16}
# The candidate from torchvision's recipe work, kept as a named point for benchmarks and HPO.
RECIPE_CANDIDATE: dict[str, Any] = {
    "augment": "trivialaugment",
    "label_smoothing": 0.1,
    "ema_decay": 0.99,
    "warmup_epochs": 1,
}
WEIGHTS_NONE = "none"
# Choice fields that also take a boolean's spellings (channels-last was a boolean).
_BOOLEAN_SPELLINGS = {"true": "true", "1": "true", "yes": "true", "on": "true",
                      "false": "false", "0": "false", "no": "false", "off": "false"}
_SWITCHES: dict[str, dict[str, str]] = {"channels_last": _BOOLEAN_SPELLINGS}
_FIELDS = {f.name: f for f in dataclasses.fields(Hyperparameters)}
# The seeds' (Udacity dog-breed projects') hyperparameter names, accepted so their tuner and
# estimator definitions run unchanged: their notebooks passed learning_rate, their scripts'
# argparse took --test-batch-size for the evaluation loader. Warned once per process each.
HYPERPARAMETER_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "test_batch_size": "eval_batch_size",
}
_warned_aliases: set[str] = set()


def canonical_name(key: str) -> str | None:
    """The field a hyperparameter key names (dashes or underscores, a seeds' alias warned once),
    or None when it names none."""
    name = key.strip().lstrip("-").replace("-", "_")
    if name in _FIELDS:
        return name
    target = HYPERPARAMETER_ALIASES.get(name)
    if target is not None and name not in _warned_aliases:
        _warned_aliases.add(name)
        logging.getLogger(__name__).warning(
            "event=hyperparameter_alias name=%s use=%s note=the seeds' name, accepted as %s",
            key, _dashed(target), _dashed(target))
    return target


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unwrap(value: Any) -> Any:
    """Undo the JSON encoding the SageMaker SDK applies to hyperparameter values ("\"x\"")."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, ValueError):
            return value.strip()
        if isinstance(decoded, (str, int, float, bool)):
            return decoded
    return value


# Numbers as text: ASCII digits only (sign, decimal point, exponent; nan/inf so that the range
# check can say "not a finite number"). int() and float() alone also take "1_0" (10) and other
# scripts' digits ("٣" is 3): a typo must fail, not train. Every str() and JSON form the SDK
# sends ("3", "0.001", "1e-05", "\"0.001\"") matches.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|nan|inf|infinity)",
                         re.IGNORECASE | re.ASCII)


def _number(value: Any, whole: bool) -> int | float:
    """``value`` (after :func:`_unwrap`) as an int (``whole``) or a float, else ``ValueError``."""
    expected = "expected a whole number" if whole else "expected a number"
    # "true" unwraps to True, and int(True) is 1: epochs=true used to train one epoch.
    if isinstance(value, bool):
        raise ValueError(f"{expected}, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if not (_INT_TEXT if whole else _FLOAT_TEXT).fullmatch(text):
            raise ValueError(f"{expected} in ASCII digits (e.g. {'10' if whole else '0.001 or 1e-3'})")
        return int(text) if whole else float(text)
    if not isinstance(value, (int, float)):
        raise ValueError(f"{expected}, not {type(value).__name__}")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(expected)
        return int(value)
    return float(value)


def _convert(name: str, raw: Any) -> Any:
    field_type = _FIELDS[name].type
    value = _unwrap(raw)
    try:
        if field_type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if field_type in ("int", "float"):
            return _number(value, whole=field_type == "int")
        if name in _SWITCHES:  # true/false spelled any way a boolean is, or another choice
            text = str(value).strip().lower()
            return _SWITCHES[name].get(text, text)
        return str(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ContractError(f"hyperparameter {_dashed(name)}={raw!r}: {exc}") from None


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _range_text(name: str) -> str:
    low, high = _RANGES[name]
    opening = "(" if name in _EXCLUSIVE_MINIMUM else "["
    return f"{opening}{low}, {high if high is not None else 'inf'}]"


def _check_range(name: str, value: Any) -> None:
    """Numbers must be finite and inside ``_RANGES``: generic, so every new knob gets it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    valid = f"valid range {_range_text(name)}" if name in _RANGES else "valid: any finite number"
    if not math.isfinite(value):
        raise ContractError(f"hyperparameter {_dashed(name)}={value!r} is not a finite number; {valid}")
    if name not in _RANGES:
        return
    low, high = _RANGES[name]
    if value < low or (high is not None and value > high):
        reason = f": {_RANGE_REASONS[name]}" if name in _RANGE_REASONS else ""
        raise ContractError(f"hyperparameter {_dashed(name)}={value!r} is outside {_range_text(name)}{reason}")
    if name in _EXCLUSIVE_MINIMUM and value == low:
        raise ContractError(f"hyperparameter {_dashed(name)}={value!r} is outside "
                            f"{_range_text(name)}: it must be greater than {low}")


def valid_hyperparameter_names() -> list[str]:
    return sorted(_dashed(n) for n in _FIELDS)


def parse_hyperparameters(*sources: Mapping[str, Any]) -> Hyperparameters:
    """Merge hyperparameter mappings (later wins) into a validated :class:`Hyperparameters`.

    Values may be strings (SageMaker passes nothing else), JSON-encoded strings (the SageMaker
    SDK's ``"\\"resnet18\\""``) or native values. Keys SageMaker adds itself
    (``_tuning_objective_metric``, ``sagemaker_*``) are ignored; any other unknown key fails.
    """
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for source in sources:
        given: dict[str, str] = {}  # field -> the key that set it, in this source
        for key, raw in source.items():
            if key.startswith(IGNORED_HYPERPARAMETER_PREFIXES):
                continue
            name = canonical_name(key)
            if name is None:
                unknown.append(key)
                continue
            value = _convert(name, raw)
            if name in given and values[name] != value:
                raise ContractError(f"hyperparameters {given[name]} and {key} name the same setting "
                                    f"({_dashed(name)}) with different values: give one")
            given[name] = key
            values[name] = value
    if unknown:
        raise ContractError(
            f"unknown hyperparameter(s) {', '.join(sorted(set(unknown)))}; "
            f"valid: {', '.join(valid_hyperparameter_names())}"
        )
    for name, value in values.items():
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ContractError(
                f"hyperparameter {_dashed(name)}={value!r}: choose one of {', '.join(_CHOICES[name])}"
            )
        _check_range(name, value)
    if 0 < values.get("eval_image_size", 0) < _RANGES["image_size"][0]:
        raise ContractError(f"hyperparameter eval-image-size={values['eval_image_size']!r}: 0 "
                            f"(= image-size) or in [{_RANGES['image_size'][0]}, {_RANGES['image_size'][1]}]")
    if values.get("weights", Hyperparameters.weights) == WEIGHTS_NONE:
        values = {**{k: v for k, v in SCRATCH_DEFAULTS.items() if not (k == "optimizer" and "lr" in values)},
                  **values}
    values.setdefault("lr", DEFAULT_LR[values.get("optimizer", Hyperparameters.optimizer)])
    return Hyperparameters(**values)


def recipe_defaults(weights: str) -> dict[str, Any]:
    """The default of every hyperparameter for a run starting from ``weights``."""
    return parse_hyperparameters({"weights": weights}).to_dict()


def parse_cli_args(argv: Sequence[str]) -> dict[str, str]:
    """Parse ``--key value`` / ``--key=value`` pairs (dashes or underscores), as the toolkit passes them."""
    result: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ContractError(f"unexpected argument {arg!r}: pass hyperparameters as --name value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ContractError(f"argument --{key} needs a value")
            value = args[i + 1]
            i += 1
        result[key] = value
        i += 1
    return result


def is_tuning_trial(paths: Paths | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether this training job is a trial of a SageMaker tuning job: the tuning service adds
    ``_tuning_objective_metric`` to every trial's hyperparameters."""
    paths = paths or Paths.from_env(env)
    env = os.environ if env is None else env
    with contextlib.suppress(ContractError, ValueError, TypeError):
        if TUNING_OBJECTIVE_METRIC_KEY in (_read_json(paths.hyperparameters_file) or {}):
            return True
        return TUNING_OBJECTIVE_METRIC_KEY in json.loads(env.get(SM_HPS) or "{}")
    return False


def load_hyperparameters(
    argv: Sequence[str] = (), paths: Paths | None = None, env: Mapping[str, str] | None = None
) -> Hyperparameters:
    """Defaults < hyperparameters.json < SM_HPS < command-line arguments."""
    paths = paths or Paths.from_env(env)
    env = os.environ if env is None else env
    sources: list[Mapping[str, Any]] = []
    file_values = _read_json(paths.hyperparameters_file)
    if file_values is not None:
        if not isinstance(file_values, dict):
            raise ContractError(f"{paths.hyperparameters_file} must hold a JSON object")
        sources.append(file_values)
    if env.get(SM_HPS):
        try:
            env_values = json.loads(env[SM_HPS])
        except json.JSONDecodeError as exc:
            raise ContractError(f"{SM_HPS} is not valid JSON: {exc}") from exc
        if not isinstance(env_values, dict):
            raise ContractError(f"{SM_HPS} must hold a JSON object of hyperparameters "
                                f'(e.g. {{"epochs": "3"}}), not a {_json_type(env_values)}')
        sources.append(env_values)
    sources.append(parse_cli_args(argv))
    return parse_hyperparameters(*sources)


def print_help_if_asked(argv: Sequence[str]) -> bool:
    """``-h``/``--help`` among ``argv``: print the trainer's help (no torch needed) and say so."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return False
    build_arg_parser_help().print_help()
    return True


def build_arg_parser_help() -> argparse.ArgumentParser:
    """An argparse parser used only to render ``--help`` with every hyperparameter."""
    parser = argparse.ArgumentParser(
        prog="dogbreed-train",
        description=(
            "Fine-tune a dog-breed classifier under the SageMaker training contract. Reads "
            f"{DEFAULT_BASE_DIR} (or ${BASE_DIR_ENV}); values here override hyperparameters.json."
        ),
    )
    defaults = Hyperparameters()
    for name in _FIELDS:
        choices = _CHOICES.get(name)
        default = f"default: {_to_string(getattr(defaults, name))}"
        if name == "lr":
            default = "default: " + ", ".join(f"{_to_string(v)} with {k}" for k, v in DEFAULT_LR.items())
        if name in SCRATCH_DEFAULTS:
            default += f" ({_to_string(SCRATCH_DEFAULTS[name])} with weights=none)"
        parser.add_argument(
            f"--{_dashed(name)}",
            metavar="VALUE" if not choices else "{" + ",".join(choices) + "}",
            help=f"{HYPERPARAMETER_HELP[name]} ({default})".replace("%", "%%"),  # argparse formats it
        )
    return parser


# --- local jobs -----------------------------------------------------------------------------------
def prepare_local_job(
    base: Path,
    hyperparameters: Mapping[str, Any],
    channels: Mapping[str, Path],
    copy_data: bool = False,
) -> Paths:
    """Lay out ``base`` as SageMaker lays out /opt/ml for a one-host training job.

    Hyperparameters are written as strings (all SageMaker passes); each channel is linked (or
    copied, for a container that cannot follow links out of its mount) into ``input/data``.
    Returns the :class:`Paths` for ``base`` — run the entry point with ``SAGEMAKER_BASE_DIR=base``.
    """
    paths = Paths.from_env({BASE_DIR_ENV: str(base)})
    paths.input_config_dir.mkdir(parents=True, exist_ok=True)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    strings = {k: v if isinstance(v, str) else _to_string(v) for k, v in hyperparameters.items()}
    paths.hyperparameters_file.write_text(json.dumps(strings, indent=2))
    data_config = {}
    for name, source in channels.items():
        target = paths.data_dir / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        if copy_data:
            shutil.copytree(Path(source), target)
        else:
            target.symlink_to(Path(source).resolve(), target_is_directory=True)
        data_config[name] = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                             "RecordWrapperType": "None"}
    paths.input_data_config_file.write_text(json.dumps(data_config, indent=2))
    # "localhost" keeps sagemaker-training from waiting on DNS for the host (it does for algo-N).
    paths.resource_config_file.write_text(json.dumps(
        {"current_host": "localhost", "hosts": ["localhost"], "network_interface_name": "lo"}))
    return paths


# --- model names --------------------------------------------------------------------------------
# One rule for a model's name in a multi-model store (``<name>/model.tar.gz`` is the TargetModel):
# a single path segment, so a name can never reach outside the store.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`ContractError` (also for a
    non-string, e.g. a ``model_name`` from a JSON request)."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ContractError(f"model name {name!r}: 1-128 letters, digits, '.', '_' and '-', "
                            "starting with a letter or digit, no '..'")
    return name
