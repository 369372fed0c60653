"""`make push` (scripts/push_images.py): the ECR path against moto, docker faked on PATH.

The fake `docker` records each call's argv (and stdin for `login --password-stdin`) as a JSON
line, so these tests check exactly what would be run against a real engine, without one.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "123456789012"  # moto's default account
REGION = "eu-west-1"
ECR_HOST = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"

FAKE_DOCKER = f"""#!{sys.executable}
import hashlib, json, os, sys
argv = sys.argv[1:]
stdin = sys.stdin.read() if "--password-stdin" in argv else None
with open(os.environ["FAKE_DOCKER_LOG"], "a") as f:
    f.write(json.dumps({{"argv": argv, "stdin": stdin}}) + "\\n")
if argv[:2] == ["image", "inspect"] and "Labels" in argv[3]:  # the build's CUDA labels
    print(json.dumps({{"dogbreed.cuda.version": "12.8", "dogbreed.cuda.min-driver": "525.60.13",
                      "dogbreed.cuda.compat": "absent", "org.opencontainers.image.title": "x"}}))
elif argv[:2] == ["image", "inspect"]:  # RepoDigests of a pushed reference, as the engine reports
    name = argv[-1].rsplit(":", 1)[0]
    print(json.dumps([name + "@sha256:" + hashlib.sha256(name.encode()).hexdigest()]))
sys.exit(3 if argv and argv[0] == os.environ.get("FAKE_DOCKER_FAIL_ON") else 0)
"""


def _load_push_images():
    spec = importlib.util.spec_from_file_location("push_images", REPO_ROOT / "scripts" / "push_images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


push_images = _load_push_images()


@pytest.fixture
def docker_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `docker` first on PATH; returns the file its calls are recorded in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(FAKE_DOCKER)
    fake.chmod(0o755)
    log = tmp_path / "docker-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    monkeypatch.delenv("FAKE_DOCKER_FAIL_ON", raising=False)
    monkeypatch.delenv("DOCKER", raising=False)
    monkeypatch.delenv("REGISTRY", raising=False)
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield boto3.client("ecr", region_name=REGION)


def test_ecr_creates_repositories_logs_in_with_token_on_stdin_and_pushes_both_tags(
        aws, docker_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert push_images.main(["--tag", "abc1234", "dogbreed-train", "dogbreed-serve"]) == 0

    repos = {r["repositoryName"]: r for r in aws.describe_repositories()["repositories"]}
    assert set(repos) == {"dogbreed-train", "dogbreed-serve"}
    for repo in repos.values():
        assert repo["imageTagMutability"] == "MUTABLE"  # `latest` must be able to move
        assert repo["imageScanningConfiguration"] == {"scanOnPush": True}

    recorded = calls(docker_log)
    login, rest = recorded[0], recorded[1:]
    password = base64.b64decode(
        aws.get_authorization_token()["authorizationData"][0]["authorizationToken"]).decode().split(":", 1)[1]
    assert login["argv"] == ["login", "--username", "AWS", "--password-stdin", ECR_HOST]
    assert login["stdin"] == password
    assert all(password not in " ".join(c["argv"]) for c in recorded)

    expected = []
    for image in ("dogbreed-train", "dogbreed-serve"):
        for tag in ("abc1234", "latest"):
            remote = f"{ECR_HOST}/{image}:{tag}"
            expected += [["tag", f"{image}:abc1234", remote], ["push", remote]]
    assert [c["argv"] for c in rest] == expected
    assert capsys.readouterr().out.split() == [e[1] for e in expected if e[0] == "push"]


def test_existing_repositories_are_reused(aws, docker_log: Path) -> None:
    aws.create_repository(repositoryName="dogbreed-train",
                          imageScanningConfiguration={"scanOnPush": False})
    assert push_images.main(["--tag", "abc1234", "dogbreed-train", "dogbreed-serve"]) == 0
    repos = {r["repositoryName"]: r for r in aws.describe_repositories()["repositories"]}
    assert repos["dogbreed-train"]["imageScanningConfiguration"] == {"scanOnPush": False}
    assert repos["dogbreed-serve"]["imageScanningConfiguration"] == {"scanOnPush": True}


def test_region_option_picks_the_registry(aws, docker_log: Path) -> None:
    assert push_images.main(["--tag", "t1", "--region", "us-west-2", "dogbreed-train"]) == 0
    host = f"{ACCOUNT}.dkr.ecr.us-west-2.amazonaws.com"
    assert calls(docker_log)[0]["argv"][-1] == host
    assert boto3.client("ecr", region_name="us-west-2").describe_repositories()["repositories"]
    assert calls(docker_log)[-1]["argv"] == ["push", f"{host}/dogbreed-train:latest"]


def test_no_region_is_a_clear_error(aws, docker_log: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    assert push_images.main(["--tag", "t1", "dogbreed-train"]) == 1
    assert "no AWS region" in capsys.readouterr().err
    assert calls(docker_log) == []


def test_registry_bypasses_aws(docker_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_aws(*args, **kwargs):
        raise AssertionError("REGISTRY must not touch AWS")

    monkeypatch.setattr(boto3.session, "Session", no_aws)
    monkeypatch.setenv("REGISTRY", "127.0.0.1:5000")  # as `make push REGISTRY=...` exports it
    assert push_images.main(["--tag", "t1", "--also-tag", "stable", "dogbreed-serve"]) == 0
    assert [c["argv"] for c in calls(docker_log)] == [
        ["tag", "dogbreed-serve:t1", "127.0.0.1:5000/dogbreed-serve:t1"],
        ["push", "127.0.0.1:5000/dogbreed-serve:t1"],
        ["tag", "dogbreed-serve:t1", "127.0.0.1:5000/dogbreed-serve:stable"],
        ["push", "127.0.0.1:5000/dogbreed-serve:stable"],
    ]


def test_docker_failure_stops_with_non_zero_exit(docker_log: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FAKE_DOCKER_FAIL_ON", "push")
    assert push_images.main(["--tag", "t1", "--registry", "r.example:5000", "a", "b"]) == 1
    assert [c["argv"][0] for c in calls(docker_log)] == ["tag", "push"]  # nothing after the failure
    assert "exit code 3" in capsys.readouterr().err


@pytest.mark.parametrize("image, name", [
    ("dogbreed-train", "dogbreed-train"),
    ("dogbreed-train:abc", "dogbreed-train"),
    ("127.0.0.1:5000/team/dogbreed-serve", "dogbreed-serve"),
])
def test_repository_name(image: str, name: str) -> None:
    assert push_images.repository_name(image) == name


def test_record_names_the_sha_tag_and_digest_the_launcher_uses(
        aws, docker_log: Path, tmp_path: Path) -> None:
    """`make push` records what it pushed; the launcher's default images are those, pinned."""
    import hashlib

    from dogbreed.launcher.sagemaker.backend import SageMakerBackend
    from dogbreed.launcher.settings import Settings, SettingsError

    record = tmp_path / "work" / "pushed-images.json"
    assert push_images.main(["--tag", "abc1234", "--record", str(record),
                             "train=dogbreed-train-x", "serve=dogbreed-serve-x"]) == 0
    written = json.loads(record.read_text())
    assert written["tag"] == "abc1234" and written["registry"] == ECR_HOST
    train = written["images"]["train"]
    digest = "sha256:" + hashlib.sha256(f"{ECR_HOST}/dogbreed-train-x".encode()).hexdigest()
    assert train == {"repository": "dogbreed-train-x",
                     "reference": f"{ECR_HOST}/dogbreed-train-x:abc1234", "digest": digest,
                     "pinned": f"{ECR_HOST}/dogbreed-train-x@{digest}",
                     # The build's CUDA labels, for the launcher's driver check; no others.
                     "labels": {"dogbreed.cuda.version": "12.8", "dogbreed.cuda.min-driver": "525.60.13",
                                "dogbreed.cuda.compat": "absent"}}
    assert ["image", "inspect", "--format", "{{json .Config.Labels}}",
            "dogbreed-train-x:abc1234"] in [c["argv"] for c in calls(docker_log)]
    assert ["image", "inspect", "--format", "{{json .RepoDigests}}",
            f"{ECR_HOST}/dogbreed-serve-x:abc1234"] in [c["argv"] for c in calls(docker_log)]

    settings = Settings(region=REGION, role_arn="arn:aws:iam::123456789012:role/r", bucket="b",
                        workdir=str(tmp_path / "work"))
    sm = SageMakerBackend(settings, dry_run=True)
    assert sm.image_uri("train") == train["pinned"]
    sm.train(name="dogbreed-train-pinned", hyperparameters={})
    assert sm.recorded[-1].request["AlgorithmSpecification"]["TrainingImage"] == train["pinned"]
    # SageMaker pulls from its own region: a record from another region is refused, by name.
    other = SageMakerBackend(Settings(region="us-west-2", workdir=str(tmp_path / "work")), dry_run=True)
    with pytest.raises(SettingsError, match="pushed to eu-west-1.*region is us-west-2"):
        other.image_uri("serve")
    # --latest-images: the account's :latest, as before.
    latest = SageMakerBackend(settings, dry_run=True, latest_images=True)
    assert latest.image_uri("serve").endswith("/dogbreed-serve:latest")
