"""README.md walked as a new user: the command blocks marked ``<!-- readme-walk -->`` run in
order, in one bash session, in a temp dir laid out like the checkout (``.venv``,
``../shared/data/dogs-sample``), so a README command that stops working fails ``make test``.

What the walk changes, and only this (the commands keep their shape):

* ``make ...`` lines are left out (install, demo and the images have their own tests);
* small budgets: ``--image-size 64`` becomes 32, ``--time-budget 5m`` gets ``--trials 1
  --epochs-max 1`` beside it (whichever comes first stops a study);
* fixed ports become free ones (``8080``), the local endpoint takes any free port
  (``DOGBREED_PORT=0``, the documented setting);
* SageMaker lines (a ``<!-- readme-walk: sagemaker -->`` block, or a line naming ``s3://`` or
  ``--sagemaker``) run with ``--dry-run`` in a subshell with example settings and fake
  credentials: they validate every request against botocore and send nothing; ``dogImages``
  (the full data set) is the sample there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dogbreed.contract import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"^<!-- readme-walk(?:: (?P<kind>\w+))? -->\n```bash\n(?P<body>.*?)^```", re.M | re.S)
SMALL = (("--image-size 64", "--image-size 32"), ('"image-size": "64"', '"image-size": "32"'),
         ("--time-budget 5m", "--time-budget 5m --trials 1 --epochs-max 1"))
SAGEMAKER_ENV = {
    "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "walk", "AWS_SECRET_ACCESS_KEY": "walk",
    "DOGBREED_BUCKET": "my-bucket",
    "DOGBREED_ROLE_ARN": "arn:aws:iam::123456789012:role/SageMakerExecution",
    "DOGBREED_TRAIN_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/dogbreed-train:walk",
    "DOGBREED_SERVE_IMAGE": "123456789012.dkr.ecr.us-east-1.amazonaws.com/dogbreed-serve:walk",
}


def walk_blocks(text: str) -> list[tuple[str, str]]:
    """(kind, body) of every marked block, in README order."""
    return [(m.group("kind") or "local", m.group("body")) for m in BLOCK.finditer(text)]


def logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined; comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dry_run(line: str) -> str:
    """A SageMaker command as a dry run: optional ``[...]`` arguments given, ``--dry-run`` once."""
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)
    command, _, comment = line.partition(" #")
    command = command.replace("--data dogImages", "--data ../shared/data/dogs-sample")
    if command.lstrip().startswith("dogbreed ") and "--dry-run" not in command:
        command = command.rstrip() + " --dry-run"
    return command


def walk_script(text: str, serve_port: int) -> str:
    exports = " ".join(f"{k}={v}" for k, v in SAGEMAKER_ENV.items())
    out = ["set -eo pipefail", "set -x",
           # Whatever a failing step leaves running stops with the walk.
           "trap 'status=$?; set +e; kill $(jobs -p) 2>/dev/null; "
           "dogbreed cleanup --local >/dev/null 2>&1; exit $status' EXIT"]
    for kind, body in walk_blocks(text):
        lines = []
        for line in logical_lines(body):
            if line.lstrip().startswith("make "):
                continue
            for big, small in SMALL:
                line = line.replace(big, small)
            line = line.replace("8080", str(serve_port))
            if kind == "sagemaker":
                lines.append(line if line.lstrip().startswith("export ") else _dry_run(line))
            elif "s3://" in line or "--sagemaker" in line:
                lines.append(f"( export {exports}; {_dry_run(line)} )")
            else:
                lines.append(line)
        if kind == "sagemaker":  # its exports stay in the subshell: the local flow goes on local
            lines = ["(", f"export {exports}"] + lines + [")"]
        out += lines
    return "\n".join(out) + "\n"


def test_the_walk_covers_every_flow_of_the_readme() -> None:
    kinds = [kind for kind, _ in walk_blocks(README.read_text())]
    assert kinds.count("sagemaker") == 1 and kinds.count("local") >= 5
    script = walk_script(README.read_text(), 48123)
    for step in (". .venv/bin/activate", "dogbreed-train", "dogbreed-serve", "dogbreed tune --local",
                 "--from-tuning-job hpo-1", "dogbreed deploy --local", "dogbreed invoke --local",
                 "dogbreed report", "dogbreed explain", "dogbreed batch --local best-1"):
        assert step in script, step
    assert "dogbreed upload-data --data ../shared/data/dogs-sample --dry-run" in script
    assert not re.search(r"^make ", script, re.M) and ":8080" not in script


@pytest.fixture
def checkout(sample_data: Path) -> Iterator[Path]:
    """A folder laid out as the README expects: ``.venv`` and ``../shared/data/dogs-sample``.
    Under a short /tmp path: the local endpoint's unix sockets live in ``.dogbreed/endpoint``
    (at most 91 characters), too deep under pytest's tmp_path."""
    top = Path(tempfile.mkdtemp(prefix="rw-"))
    try:
        root = top / "c"
        root.mkdir()
        (root / ".venv").symlink_to(Path(sys.executable).parents[1])
        (top / "shared" / "data").mkdir(parents=True)
        (top / "shared" / "data" / "dogs-sample").symlink_to(sample_data)
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_readme_commands_run_as_written(checkout: Path) -> None:
    root = checkout
    script = walk_script(README.read_text(), free_port())
    (root / "walk.sh").write_text(script)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOGBREED_", "SAGEMAKER_", "SM_", "AWS_", "VIRTUAL_ENV"))}
    env.update(DOGBREED_PORT="0", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(["bash", "walk.sh"], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the README walk did not finish in 25 minutes:\n{output[-6000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-8000:]
    # The Serving block's "resnet18" is the Training block's ResNet18 (it loaded MobileNetV2).
    assert re.search(r'"model": "resnet18", "arch": "resnet18"', output), output[-8000:]
    # invoke prints JSON named by the TargetModel asked for.
    assert '"model": "dog-breed-classifier/model.tar.gz"' in output
    # The second batch into predictions/ is another model's: every image predicted again.
    mark = json.loads((root / "predictions" / ".dogbreed-batch-model.json").read_text())
    assert mark["model"].endswith("jobs/best-1/output/model.tar.gz")
    assert '"predicted": 20' in output.rsplit("dogbreed batch --local best-1", 1)[1]
