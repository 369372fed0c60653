import json
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
    assert (hp.model, hp.epochs, hp.lr, hp.compile, hp.channels_last) == ("resnet50", 4, 0.001, False, False)


def test_sagemaker_added_keys_are_ignored():
    hp = parse_hyperparameters({"_tuning_objective_metric": "valid_accuracy",
                                "sagemaker_program": "train.py", "sagemaker_region": '"us-east-1"',
                                "epochs": "2"})
    assert hp.epochs == 2


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(ContractError) as excinfo:
        parse_hyperparameters({"learning-rate": "0.1"})
    message = str(excinfo.value)
    assert "learning-rate" in message
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
