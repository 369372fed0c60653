"""Batch transform and Clarify: requests through real boto3 clients on moto (validated against
botocore's service models), dry runs validated the same way, and the local folder walker with an
in-process predictor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import boto3
import pytest
import torch
from moto import mock_aws
from PIL import Image

from dogbreed import artifacts, data, models
from dogbreed.launcher import cli
from dogbreed.launcher.local import batch
from dogbreed.launcher.sagemaker import batch_transform, clarify
from dogbreed.launcher.sagemaker.backend import SageMakerBackend
from dogbreed.launcher.settings import Settings

REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/dogbreed-sagemaker"
BUCKET = "dogbreed-test-bucket"
SERVE_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dogbreed-serve:latest"
AWS_FLAGS = ["--sagemaker", "--region", REGION, "--role-arn", ROLE, "--bucket", BUCKET,
             "--serve-image", SERVE_IMAGE]
CLASSES = ["001.Beagle", "002.Bernese_mountain_dog", "003.Doberman"]


@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield


@pytest.fixture
def settings() -> Settings:
    return Settings(region=REGION, role_arn=ROLE, bucket=BUCKET, serve_image=SERVE_IMAGE,
                    poll_seconds=0)


@pytest.fixture(scope="module")
def model_tar(tmp_path_factory) -> Path:
    """One packed ResNet18 for the module (packing 45 MB of weights costs seconds)."""
    tmp_path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    artifacts.save_model_dir(model_dir, models.build_model("resnet18", len(CLASSES)),
                             artifacts.ModelMetadata(arch="resnet18", class_names=CLASSES,
                                                     image_size=32, resize_size=37,
                                                     mean=list(data.IMAGENET_MEAN),
                                                     std=list(data.IMAGENET_STD)))
    return artifacts.pack(model_dir, tmp_path / "model.tar.gz")


def _sm(settings: Settings, dry_run: bool = False) -> SageMakerBackend:
    return SageMakerBackend(settings, dry_run=dry_run,
                            session=boto3.session.Session(region_name=REGION))


# --- SageMaker batch transform ----------------------------------------------------------------
def test_transform_job_one_record_per_file_on_moto(aws, settings, model_tar):
    sm = _sm(settings)
    result = batch_transform.sagemaker_batch(sm, model=str(model_tar), input_uri=f"s3://{BUCKET}/test/",
                                   output_uri=None, name="dogbreed-batch-1", max_concurrent=4)
    assert result["status"] == "Completed"
    client = boto3.client("sagemaker", region_name=REGION)
    job = client.describe_transform_job(TransformJobName="dogbreed-batch-1")
    assert job["ModelName"] == "dogbreed-batch-1"
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["TransformInput"]["SplitType"] == "None"  # one record per file -> <name>.out
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/test/"
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/dogbreed/batch/dogbreed-batch-1/output"
    container = client.describe_model(ModelName="dogbreed-batch-1")["PrimaryContainer"]
    assert container["Image"] == SERVE_IMAGE and container["Mode"] == "SingleModel"
    # The local model.tar.gz went to S3 first, byte for byte.
    body = boto3.client("s3", region_name=REGION).get_object(
        Bucket=BUCKET, Key="dogbreed/batch/dogbreed-batch-1/model.tar.gz")["Body"].read()
    assert body == model_tar.read_bytes()
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/dogbreed/batch/dogbreed-batch-1/model.tar.gz"


def test_batch_dry_run_prints_botocore_valid_requests(capsys):
    assert cli.main(["batch", *AWS_FLAGS, "--dry-run", "--name", "b1", "--workers", "3",
                     f"s3://{BUCKET}/m/model.tar.gz", f"s3://{BUCKET}/in/",
                     f"s3://{BUCKET}/out/"]) == 0
    requests = json.loads(capsys.readouterr().out)
    assert [r["operation"] for r in requests] == ["CreateModel", "CreateTransformJob"]
    transform = requests[1]["request"]
    assert transform["MaxConcurrentTransforms"] == 3
    assert transform["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/out/"


def test_batch_rejects_a_local_input_for_sagemaker(capsys, tmp_path):
    assert cli.main(["batch", *AWS_FLAGS, "--dry-run", "s3://b/m.tar.gz", str(tmp_path)]) == cli.EXIT_USAGE
    assert "S3 prefix" in capsys.readouterr().err


# --- Clarify --------------------------------------------------------------------------------------
def test_clarify_image_uri_comes_from_the_sdk_table():
    assert clarify.clarify_image("us-east-1") == (
        "205585389593.dkr.ecr.us-east-1.amazonaws.com/sagemaker-clarify-processing:1.0")
    assert clarify.clarify_image("cn-north-1").endswith(".amazonaws.com.cn/sagemaker-clarify-processing:1.0")
    with pytest.raises(ValueError, match="no SageMaker Clarify image"):
        clarify.clarify_image("xx-nowhere-1")


def test_analysis_config_for_image_classification():
    config = clarify.analysis_config(model_name="m", class_names=CLASSES, instance_type="ml.m5.xlarge")
    assert config["dataset_type"] == "application/x-image"
    assert config["methods"]["shap"]["image_config"]["model_type"] == "IMAGE_CLASSIFICATION"
    predictor = config["predictor"]
    assert predictor["model_name"] == "m" and predictor["accept_type"] == "application/json"
    assert predictor["label_headers"] == ["Beagle", "Bernese_mountain_dog", "Doberman"]
    assert predictor["custom_attributes"] == "top_k=3"  # every class, so the vector is complete
    # The JMESPath really turns the server's top-k answer into the class-ordered vector.
    import jmespath

    answer = {"predictions": [{"index": 2, "probability": 0.7}, {"index": 0, "probability": 0.2},
                              {"index": 1, "probability": 0.1}]}
    assert jmespath.search(predictor["probability"], answer) == [0.2, 0.1, 0.7]


def test_clarify_job_on_moto(aws, settings, model_tar):
    sm = _sm(settings)
    model_data = batch_transform.model_data_uri(sm, str(model_tar), "clarify", "dogbreed-clarify-1")
    result = clarify.run_clarify(sm, model_data=model_data, class_names=CLASSES,
                                 data_uri=f"s3://{BUCKET}/test/", name="dogbreed-clarify-1")
    assert result["status"] == "Completed"
    job = boto3.client("sagemaker", region_name=REGION).describe_processing_job(
        ProcessingJobName="dogbreed-clarify-1")
    assert job["AppSpecification"]["ImageUri"] == clarify.clarify_image(REGION)
    inputs = {i["InputName"]: i["S3Input"] for i in job["ProcessingInputs"]}
    assert inputs["dataset"]["LocalPath"] == "/opt/ml/processing/input/data"
    config_prefix = inputs["analysis_config"]["S3Uri"]
    key = config_prefix.split(f"s3://{BUCKET}/", 1)[1] + "/analysis_config.json"
    config = json.loads(boto3.client("s3", region_name=REGION).get_object(
        Bucket=BUCKET, Key=key)["Body"].read())
    assert config["predictor"]["model_name"] == "dogbreed-clarify-1"
    assert job["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["LocalPath"] == "/opt/ml/processing/output"


def test_clarify_dry_run_validates_and_reads_labels_from_the_tar(capsys, model_tar):
    assert cli.main(["clarify", *AWS_FLAGS, "--dry-run", "--name", "c1", str(model_tar),
                     "--data", f"s3://{BUCKET}/test/"]) == 0
    requests = json.loads(capsys.readouterr().out)
    assert [r["operation"] for r in requests] == ["PutObject", "CreateModel", "PutObject",
                                                  "CreateProcessingJob"]
    config = json.loads(requests[2]["request"]["Body"])
    assert config["predictor"]["label_headers"] == ["Beagle", "Bernese_mountain_dog", "Doberman"]


# --- local batch ----------------------------------------------------------------------------------
def _write_images(root: Path) -> list[Path]:
    files = []
    for index, breed in enumerate(CLASSES):
        folder = root / breed
        folder.mkdir(parents=True)
        for n in range(2):
            pixels = torch.full((40, 48, 3), 40 * (index + 1) + 10 * n, dtype=torch.uint8)
            path = folder / f"img{n}.jpg"
            Image.fromarray(pixels.numpy()).save(path)
            files.append(path)
    return files


def test_local_batch_out_per_file_summary_accuracy_errors_and_resume(tmp_path, model_tar):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    files = _write_images(inputs)
    (inputs / CLASSES[0] / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    predict = batch.in_process_predictor(model_tar)
    summary = batch.run_local(predict, inputs, outputs, workers=2, progress=False)
    assert summary["files"] == 7 and summary["predicted"] == 7 and summary["errors"] == 1
    for file in files:
        answer = json.loads((outputs / file.relative_to(inputs).parent / (file.name + ".out")).read_text())
        assert answer == predict(file.read_bytes())  # the same answer, written as-is
    broken = json.loads((outputs / CLASSES[0] / "broken.jpg.out").read_text())
    assert "error" in broken
    rows = list(csv.DictReader((outputs / "summary.csv").open()))
    assert [r["file"] for r in rows] == sorted(str(p.relative_to(inputs)) for p in [*files, inputs / CLASSES[0] / "broken.jpg"])
    judged = [r for r in rows if r["correct"] != ""]
    assert len(judged) == 6
    assert summary["accuracy"] == sum(int(r["correct"]) for r in judged) / 6
    assert all(r["true_class"] == Path(r["file"]).parent.name for r in rows)

    # Rerun: every finished output is kept, nothing is predicted again.
    calls = []
    again = batch.run_local(lambda body: calls.append(body) or predict(body), inputs, outputs,
                            progress=False)
    assert calls == [] and again["skipped_finished"] == 7 and again["accuracy"] == summary["accuracy"]
    # A removed output is redone, and only that one.
    (outputs / CLASSES[1] / "img0.jpg.out").unlink()
    third = batch.run_local(lambda body: calls.append(body) or predict(body), inputs, outputs,
                            progress=False)
    assert len(calls) == 1 and third["predicted"] == 1


def test_local_batch_rerun_with_another_model_predicts_every_file_again(tmp_path, model_tar):
    """Finished outputs count as finished only for the model that wrote them."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    _write_images(inputs)
    first_id = batch.model_identity(model_tar)
    first = batch.run_local(batch.in_process_predictor(model_tar), inputs, outputs,
                            progress=False, model_id=first_id)
    assert first["predicted"] == 6
    other_dir = tmp_path / "other"
    torch.manual_seed(1)
    artifacts.save_model_dir(other_dir, models.build_model("mobilenet_v2", len(CLASSES)),
                             artifacts.ModelMetadata(arch="mobilenet_v2", class_names=CLASSES,
                                                     image_size=32, resize_size=37,
                                                     mean=list(data.IMAGENET_MEAN),
                                                     std=list(data.IMAGENET_STD)))
    calls = []
    predict = batch.in_process_predictor(other_dir)
    second = batch.run_local(lambda body: calls.append(body) or predict(body), inputs, outputs,
                             progress=False, model_id=batch.model_identity(other_dir))
    assert len(calls) == 6 and (second["predicted"], second["skipped_finished"]) == (6, 0)
    assert second["replaced_outputs_of"] == str(model_tar.resolve())
    assert {json.loads(p.read_text())["arch"] for p in outputs.rglob("*.out")} == {"mobilenet_v2"}
    # The same model again, packed: it is the same model, nothing is predicted.
    packed = artifacts.pack(other_dir, tmp_path / "other.tar.gz")
    assert batch.model_identity(packed) | {"model": ""} == batch.model_identity(other_dir) | {"model": ""}
    third = batch.run_local(lambda body: calls.append(body) or predict(body), inputs, outputs,
                            progress=False, model_id=batch.model_identity(packed))
    assert len(calls) == 6 and third["skipped_finished"] == 6
    # Outputs from before the folder recorded its model: unknown, so predicted again.
    (outputs / batch.MODEL_MARK).unlink()
    fourth = batch.run_local(lambda body: calls.append(body) or predict(body), inputs, outputs,
                             progress=False, model_id=batch.model_identity(packed))
    assert fourth["predicted"] == 6


def test_model_identity_never_opens_model_pt(tmp_path, model_tar):
    """The server reads model.pt (a test holds its load with a FIFO there): the batch process
    only stat()s it."""
    import os

    model_dir = tmp_path / "fifo-model"
    model_dir.mkdir()
    (model_dir / artifacts.METADATA_FILE).write_text("{}")
    os.mkfifo(model_dir / artifacts.WEIGHTS_FILE)
    identity = batch.model_identity(model_dir)  # would block on open()
    assert identity["weights_size"] == 0 and "model_json_sha256" in identity


def test_local_batch_cli_checks_before_starting_a_server(tmp_path, model_tar, capsys):
    """The served run itself: tests/integration/test_batch_served.py (real MMS)."""
    _write_images(tmp_path / "in")
    assert cli.main(["batch", "--local", "--dry-run", str(model_tar), str(tmp_path / "in"),
                     str(tmp_path / "out"), "--workers", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["workers"] == 3
    assert cli.main(["batch", "--local", str(tmp_path / "missing.tar.gz"), str(tmp_path / "in"),
                     str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "no such model" in capsys.readouterr().err
    assert cli.main(["batch", "--local", str(model_tar), str(tmp_path / "nowhere"),
                     str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "no such input folder" in capsys.readouterr().err


def test_local_batch_redoes_transient_failures_only(tmp_path, model_tar):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    files = _write_images(inputs)

    def flaky(body: bytes) -> dict:
        if body == files[0].read_bytes():
            raise ConnectionResetError("server went away")
        if body == files[1].read_bytes():
            return {"error": "HTTP 503: busy", "status": 503}
        if body == files[2].read_bytes():
            return {"error": "HTTP 400: not an image", "status": 400}
        return {"predictions": [{"class_name": CLASSES[0], "probability": 1.0}]}

    first = batch.run_local(flaky, inputs, outputs, progress=False)
    assert first["errors"] == 3
    again = batch.run_local(flaky, inputs, outputs, progress=False)
    assert again["predicted"] == 2  # the reset and the 503, not the 400


def test_local_batch_output_inside_the_input_is_not_read_back(tmp_path, model_tar):
    """`batch --local M mixed mixed/preds` twice read preds/*.out and summary.csv as inputs
    (preds/preds/*.jpg.out.out, summary.csv.out, extra summary rows)."""
    inputs = tmp_path / "mixed"
    files = _write_images(inputs)
    outputs = inputs / "preds"
    predict = batch.in_process_predictor(model_tar)
    first = batch.run_local(predict, inputs, outputs, progress=False)
    again = batch.run_local(predict, inputs, tmp_path / "mixed" / "x" / ".." / "preds", progress=False)
    assert first["files"] == again["files"] == len(files) == 6
    assert (again["predicted"], again["skipped_finished"]) == (0, 6)
    written = sorted(p.relative_to(outputs).as_posix() for p in outputs.rglob("*") if p.is_file())
    assert written == sorted([*(f"{f.parent.name}/{f.name}.out" for f in files), "summary.csv"])
    assert len(list(csv.DictReader((outputs / "summary.csv").open()))) == 6
    # Only the output folder is left out, not a folder whose name merely starts the same.
    sibling = inputs / "preds-more" / "img.jpg"
    sibling.parent.mkdir()
    sibling.write_bytes(files[0].read_bytes())
    assert batch.input_files(inputs, outputs) == sorted([*files, sibling])
    with pytest.raises(ValueError, match="is the input folder itself"):
        batch.input_files(inputs, inputs / ".")


def test_local_batch_model_may_be_a_local_training_job(tmp_path, model_tar, capsys):
    """The help says "model.tar.gz (local or S3 URI) or a training job name": locally that is
    <workdir>/jobs/<name>/output/model.tar.gz, else the job's model/ dir, as `report` finds jobs."""
    workdir = tmp_path / "work"
    packed = workdir / "jobs" / "best-1" / "output" / "model.tar.gz"
    packed.parent.mkdir(parents=True)
    packed.write_bytes(model_tar.read_bytes())
    assert batch.local_model("best-1", workdir) == packed
    model_dir = workdir / "jobs" / "unpacked" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / artifacts.METADATA_FILE).write_text("{}")
    assert batch.local_model("unpacked", workdir) == model_dir
    assert batch.local_model(model_tar, workdir) == model_tar  # a path that exists comes first
    with pytest.raises(ValueError, match="jobs/nope/output/model.tar.gz"):
        batch.local_model("nope", workdir)
    _write_images(tmp_path / "in")
    assert cli.main(["batch", "--local", "--workdir", str(workdir), "nope", str(tmp_path / "in"),
                     str(tmp_path / "out")]) == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert "no such model nope" in error and "local training job" in error
