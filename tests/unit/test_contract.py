import json
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed import contract
from dogbreed.contract import ContractError, Paths, parse_hyperparameters


def test_string_values_as_sagemaker_passes_them():
    hp = parse_hyperparameters({"model": "mobilenet_v2", "epochs": "3", "batch-size": "32",
                                "lr": "0.05", "freeze-backbone": "true", "weights": "none"})
    assert (hp.model, hp.epochs, hp.batch_size, hp.lr, hp.freeze_backbone, hp.weights) == (
        "mobilenet_v2", 3, 32, 0.05, True, "none")


def test_json_encoded_values_from_the_sagemaker_sdk():
    hp = parse_hyperparameters({"model": '"resnet50"', "epochs": "\"4\"", "lr": "1e-3",
                                "compile": '"false"', "channels_last": "false"})
    assert (hp.model, hp.epochs, hp.lr, hp.compile, hp.channels_last) == ("resnet50", 4, 0.001, False, "false")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", "true"), ("false", "false"),
                                             ('"true"', "true"), ("1", "true"), ("off", "false"),
                                             (True, "true"), ("TRUE", "true")])
def test_channels_last_is_auto_or_pinned(value, expected):
    """auto (the default) times both layouts on a CPU; true/false pin one, so a retrain can
    reproduce a run whose layout a timing picked (the boolean's spellings still parse)."""
    assert contract.Hyperparameters().channels_last == "auto"
    assert parse_hyperparameters({"channels-last": value}).channels_last == expected


def test_channels_last_refuses_other_values():
    with pytest.raises(ContractError, match="choose one of auto, true, false"):
        parse_hyperparameters({"channels-last": "sometimes"})


def test_every_hyperparameter_has_a_meaning_in_help(capsys):
    """`dogbreed-train --help` listed defaults without meanings."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(contract.Hyperparameters)}
    assert set(contract.HYPERPARAMETER_HELP) == fields
    text = " ".join(contract.build_arg_parser_help().format_help().split())
    for name, meaning in contract.HYPERPARAMETER_HELP.items():
        assert " ".join(meaning.split()) in text, name


def test_the_entry_points_help_needs_no_torch():
    """`dogbreed-train --help` (the console script and the image's program) answers before the
    trainer, and torch, are imported."""
    probe = ("import sys; sys.argv = ['dogbreed-train', '--help']; from dogbreed import stopping; "
             "code = stopping.main(); print('torch imported:', 'torch' in sys.modules); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: dogbreed-train") and "--lr" in result.stdout
    assert result.stdout.rstrip().endswith("torch imported: False")


def test_sagemaker_added_keys_are_ignored():
    hp = parse_hyperparameters({"_tuning_objective_metric": "valid_accuracy",
                                "sagemaker_program": "train.py", "sagemaker_region": '"us-east-1"',
                                "epochs": "2"})
    assert hp.epochs == 2


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(ContractError) as excinfo:
        parse_hyperparameters({"learning-rte": "0.1"})
    message = str(excinfo.value)
    assert "learning-rte" in message
    for name in ("batch-size", "lr", "model", "weights", "freeze-backbone", "amp"):
        assert name in message


@pytest.mark.parametrize("key,value,fragment", [
    ("model", "vgg16", "choose one of"),
    ("epochs", "0", "outside"),
    ("epochs", "2.5", "whole number"),
    ("batch-size", "many", "batch-size"),
    ("lr", "0", "greater than 0"),
    ("freeze-backbone", "maybe", "true or false"),
    ("amp", "fp8", "choose one of"),
])
def test_bad_values_name_the_hyperparameter(key, value, fragment):
    with pytest.raises(ContractError, match=fragment):
        parse_hyperparameters({key: value})


def test_cli_args_accept_dashes_underscores_and_equals():
    raw = contract.parse_cli_args(["--batch_size", "8", "--image-size=96", "--model", "resnet50"])
    hp = parse_hyperparameters(raw)
    assert (hp.batch_size, hp.image_size, hp.model) == (8, 96, "resnet50")
    with pytest.raises(ContractError, match="needs a value"):
        contract.parse_cli_args(["--epochs"])
    with pytest.raises(ContractError, match="unexpected argument"):
        contract.parse_cli_args(["epochs", "3"])


def test_precedence_file_then_sm_hps_then_cli(tmp_path: Path):
    paths = contract.prepare_local_job(tmp_path, {"epochs": "2", "lr": "0.5", "seed": "1"}, {})
    env = {contract.BASE_DIR_ENV: str(tmp_path), contract.SM_HPS: json.dumps({"lr": "0.25", "seed": 7})}
    hp = contract.load_hyperparameters(["--seed", "9"], paths, env)
    assert (hp.epochs, hp.lr, hp.seed) == (2, 0.25, 9)


def test_round_trip_to_sagemaker_strings():
    hp = parse_hyperparameters({"freeze-backbone": "true", "lr": "0.002"})
    rendered = hp.to_sagemaker()
    assert all(isinstance(v, str) for v in rendered.values())
    assert rendered["freeze-backbone"] == "true"
    assert parse_hyperparameters(rendered) == hp


def test_paths_follow_base_dir_and_sm_overrides(tmp_path: Path):
    paths = Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path)})
    assert paths.model_dir == tmp_path / "model"
    assert paths.failure_file == tmp_path / "output" / "failure"
    assert paths.hyperparameters_file == tmp_path / "input" / "config" / "hyperparameters.json"
    assert paths.checkpoints_dir == tmp_path / "checkpoints"
    moved = Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path), "SM_MODEL_DIR": "/elsewhere/model"})
    assert moved.model_dir == Path("/elsewhere/model")
    assert Paths.from_env({}).base == Path("/opt/ml")


def test_write_failure_keeps_sagemakers_1024_character_limit(tmp_path: Path):
    paths = Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path)})
    contract.write_failure("x" * 5000, paths)
    assert len(paths.failure_file.read_text().strip()) == 1024


def test_training_channel_with_split_folders(tmp_path: Path, sample_data: Path):
    paths = contract.prepare_local_job(tmp_path, {}, {"training": sample_data})
    splits = contract.resolve_splits(paths, env={})
    assert {k: v.name for k, v in splits.items()} == {"train": "train", "valid": "valid", "test": "test"}


def test_one_channel_per_split_and_sm_channel_env(tmp_path: Path, sample_data: Path):
    paths = contract.prepare_local_job(
        tmp_path, {}, {"train": sample_data / "train", "validation": sample_data / "valid"})
    splits = contract.resolve_splits(paths, env={})
    assert set(splits) == {"train", "valid"}
    env = {"SM_CHANNELS": '["train","valid"]', "SM_CHANNEL_TRAIN": str(sample_data / "train"),
           "SM_CHANNEL_VALID": str(sample_data / "valid")}
    assert contract.resolve_splits(paths, env=env)["valid"] == sample_data / "valid"


def test_missing_split_is_a_clear_error(tmp_path: Path, sample_data: Path):
    paths = contract.prepare_local_job(tmp_path, {}, {"train": sample_data / "train"})
    with pytest.raises(ContractError, match="missing data split.*valid.*channels found: train"):
        contract.resolve_splits(paths, env={})


def test_pipe_mode_is_refused(tmp_path: Path, sample_data: Path):
    paths = contract.prepare_local_job(tmp_path, {}, {"training": sample_data})
    paths.input_data_config_file.write_text(json.dumps({"training": {"TrainingInputMode": "Pipe"}}))
    with pytest.raises(ContractError, match="Pipe mode"):
        contract.resolve_splits(paths, env={})


def test_env_int_is_the_one_whole_number_setting_parser():
    env = {"A": " 3 ", "B": "", "C": "x", "D": "0"}
    assert contract.env_int(env, "A", 1) == 3
    assert contract.env_int(env, "B", 1, None) is None and contract.env_int(env, "unset", 0, 7) == 7
    with pytest.raises(contract.ContractError, match="C='x' is not a whole number"):
        contract.env_int(env, "C")
    with pytest.raises(contract.ContractError, match="D='0' must be at least 1"):
        contract.env_int(env, "D", 1)


# --- values int()/float() are too lenient about -------------------------------------------------
@pytest.mark.parametrize("key", ["epochs", "lr", "seed", "momentum"])
@pytest.mark.parametrize("value", ["true", "false", True, False])
def test_booleans_are_not_numbers(key, value):
    """"true" unwraps to True and int(True) is 1: epochs=true trained one epoch, lr=false was 0."""
    with pytest.raises(ContractError, match=f"hyperparameter {key}=.*not a boolean"):
        parse_hyperparameters({key: value})


@pytest.mark.parametrize("key,value", [
    ("epochs", "1_0"), ("epochs", "\u0663"), ("batch-size", "\uff11\uff16"), ("lr", "1_0"),
    ("lr", "\u0660.\u0661"), ("lr", "0.0_1"), ("seed", "\u0967"), ("epochs", "0x10"),
])
def test_numbers_must_be_ascii_digits(key, value):
    """int("1_0") is 10 and int("٣") is 3: a typo or a stray script must fail, not train."""
    with pytest.raises(ContractError, match=f"hyperparameter {key}=.*ASCII digits"):
        parse_hyperparameters({key: value})


@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "3", 3), ("epochs", " 4 ", 4), ("epochs", "+5", 5), ("epochs", '"6"', 6),
    ("epochs", "7.0", 7), ("epochs", "1e1", 10), ("epochs", 8, 8), ("epochs", 9.0, 9),
    ("lr", "0.001", 0.001), ("lr", "1e-05", 1e-05), ("lr", "1E-3", 0.001), ("lr", '"0.25"', 0.25),
    ("lr", ".5", 0.5), ("lr", "2.", 2.0), ("lr", "+0.1", 0.1), ("lr", 1, 1.0), ("seed", "-0", 0),
])
def test_every_form_the_sdk_and_callers_send_still_parses(key, value, expected):
    value_out = getattr(parse_hyperparameters({key: value}), key.replace("-", "_"))
    assert value_out == expected and type(value_out) is type(expected)


def test_env_int_takes_ascii_digits_only():
    with pytest.raises(ContractError, match="is not a whole number"):
        contract.env_int({contract.SM_NUM_GPUS: "1_0"}, contract.SM_NUM_GPUS)
    with pytest.raises(ContractError, match="is not a whole number"):
        contract.env_int({contract.SM_NUM_GPUS: "\u0663"}, contract.SM_NUM_GPUS)


# --- ranges whose bound has a reason -----------------------------------------------------------
def test_batch_size_1_is_refused_naming_batchnorm():
    """batch-size=1 passed and crashed in BatchNorm ("Expected more than 1 value per channel")."""
    with pytest.raises(ContractError, match=r"batch-size=1 is outside \[2, 65536\]: BatchNorm needs at least 2"):
        parse_hyperparameters({"batch-size": "1", "image-size": "32"})
    assert parse_hyperparameters({"batch-size": "2"}).batch_size == 2
    assert parse_hyperparameters({"eval-batch-size": "1"}).eval_batch_size == 1  # eval: running stats


@pytest.mark.parametrize("value", ["99999999999999999999999", str(2**63), str(2**31), "-1", "1e30"])
def test_out_of_range_seed_is_refused_naming_the_bound(value):
    """A seed of 2**63 or more ended the job in torch.manual_seed ("Overflow when unpacking long long")."""
    with pytest.raises(ContractError, match=r"hyperparameter seed=.* is outside \[0, 2147483647\]"):
        parse_hyperparameters({"seed": value})


def test_largest_seed_seeds_every_generator_train_uses():
    """The bound is safe for random, torch and the per-rank offset train.py adds."""
    import random

    import torch

    seed = parse_hyperparameters({"seed": str(2**31 - 1)}).seed
    random.seed(seed)
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed + 7919 * (4096 + 1) + 10_000)


def test_batch_size_1_fails_the_job_with_a_clear_reason(make_job, run_entry_point):
    paths = make_job({"batch-size": "1", "image-size": "32", "epochs": "1", "weights": "none"})
    result = run_entry_point(paths, timeout=120)
    assert result.returncode == 1
    failure = paths.failure_file.read_text()
    assert failure.startswith("ContractError: hyperparameter batch-size=1") and "BatchNorm" in failure, failure
    assert "Traceback" not in result.stderr


# --- keys SageMaker adds -------------------------------------------------------------------------
def test_only_the_known_underscore_key_is_ignored():
    """A bare "_" prefix also swallowed typos: _epochs=3 trained the default 10 epochs."""
    with pytest.raises(ContractError, match="unknown hyperparameter.*_epochs"):
        parse_hyperparameters({"_epochs": "3"})
    with pytest.raises(ContractError, match="unknown hyperparameter.*_lr"):
        parse_hyperparameters({"_lr": "0.1", "_tuning_objective_metric": "valid_accuracy"})
    assert "_tuning_objective_metric".startswith(contract.IGNORED_HYPERPARAMETER_PREFIXES)
    assert not "_epochs".startswith(contract.IGNORED_HYPERPARAMETER_PREFIXES)


# --- malformed config inputs -------------------------------------------------------------------
def test_sm_channels_must_be_a_json_list(tmp_path: Path):
    paths = Paths.from_env({contract.BASE_DIR_ENV: str(tmp_path)})
    with pytest.raises(ContractError, match="SM_CHANNELS must be a JSON list.*'training' is not valid JSON"):
        contract.channel_names(paths, {contract.SM_CHANNELS: "training"})
    for value in ('"training"', '{"training": {}}', "[1]"):
        with pytest.raises(ContractError, match="SM_CHANNELS must be a JSON list of channel names"):
            contract.channel_names(paths, {contract.SM_CHANNELS: value})
    assert contract.channel_names(paths, {contract.SM_CHANNELS: '["valid", "train"]'}) == ["train", "valid"]


@pytest.mark.parametrize("config,fragment", [
    (["training"], "inputdataconfig.json must hold a JSON object of channel name -> channel settings, not a list"),
    ({"training": "File"}, "inputdataconfig.json: channel 'training' must be a JSON object"),
])
def test_input_data_config_shape_is_checked(tmp_path: Path, sample_data: Path, config, fragment):
    paths = contract.prepare_local_job(tmp_path, {}, {"training": sample_data})
    paths.input_data_config_file.write_text(json.dumps(config))
    with pytest.raises(ContractError, match=fragment):
        contract.resolve_splits(paths, env={})


@pytest.mark.parametrize("config,fragment", [
    (["algo-1"], "resourceconfig.json must hold a JSON object, not a list"),
    ({"current_host": "algo-1", "hosts": "algo-1"}, 'resourceconfig.json: "hosts" must be a JSON list of host names'),
    ({"current_host": "algo-1", "hosts": ["algo-1", 2]}, '"hosts" must be a JSON list of host names'),
    ({"current_host": ["algo-1"], "hosts": ["algo-1"]}, '"current_host" must be a string'),
])
def test_resource_config_shape_is_checked(tmp_path: Path, config, fragment):
    paths = contract.prepare_local_job(tmp_path, {}, {})
    paths.resource_config_file.write_text(json.dumps(config))
    with pytest.raises(ContractError, match=fragment):
        contract.cluster_hosts(paths, env={})


def test_sm_hosts_must_be_a_json_list(tmp_path: Path):
    paths = contract.prepare_local_job(tmp_path, {}, {})
    env = {contract.SM_HOSTS: '"algo-1"', contract.SM_CURRENT_HOST: "algo-1"}
    with pytest.raises(ContractError, match="SM_HOSTS must be a JSON list of host names"):
        contract.cluster_hosts(paths, env)


@pytest.mark.parametrize("value", ['["x"]', '"epochs"', "3"])
def test_sm_hps_must_be_a_json_object(tmp_path: Path, value):
    paths = contract.prepare_local_job(tmp_path, {}, {})
    env = {contract.BASE_DIR_ENV: str(tmp_path), contract.SM_HPS: value}
    with pytest.raises(ContractError, match="SM_HPS must hold a JSON object of hyperparameters"):
        contract.load_hyperparameters([], paths, env)


def test_the_seeds_hyperparameter_names_are_aliases_warned_once(caplog):
    """The seeds' notebooks and scripts passed learning_rate, batch_size and test-batch-size:
    each trial of their tuner definitions failed as unknown."""
    caplog.set_level("WARNING")
    contract._warned_aliases.clear()
    hp = contract.parse_hyperparameters({"learning_rate": "0.05", "batch_size": "32",
                                         "test-batch-size": "64"})
    assert (hp.lr, hp.batch_size, hp.eval_batch_size) == (0.05, 32, 64)
    contract.parse_hyperparameters({"learning_rate": "0.01"})
    warned = [r.getMessage() for r in caplog.records if "hyperparameter_alias" in r.getMessage()]
    assert len(warned) == 2  # learning_rate and test-batch-size, once each
    assert any("name=learning_rate use=lr" in m for m in warned)
    # The SDK's JSON-quoted values and --name forms work as for the names themselves.
    assert contract.parse_hyperparameters({"--test_batch_size": '"16"'}).eval_batch_size == 16
    with pytest.raises(contract.ContractError, match="learning_rate and lr name the same setting"):
        contract.parse_hyperparameters({"learning_rate": "0.05", "lr": "0.1"})
    assert contract.parse_hyperparameters({"learning_rate": "0.05", "lr": "0.05"}).lr == 0.05


def test_the_seeds_objective_regex_reads_the_trainers_epoch_line():
    import re

    from dogbreed.metrics import SEED_OBJECTIVE_REGEX, seed_objective_line

    line = seed_objective_line(0.61234, 0.7)
    assert re.search(SEED_OBJECTIVE_REGEX, line).group(1) == "0.6123"
    # The regex as the seeds' notebooks spelled it in metric_definitions.
    assert re.search(r"Test set: Average loss: ([0-9\.]+)", line)
