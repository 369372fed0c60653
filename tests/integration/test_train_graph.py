"""A training job whose ONNX graph does not answer as its weights do fails with that reason in
the failure file, and keeps no graph: never a silent fallback to a model without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dogbreed import artifacts, contract

pytestmark = pytest.mark.slow

# The real entry point, with the exporter handed another model's weights (what a broken export
# would write): everything else is the job as SageMaker runs it.
BROKEN_EXPORT = """
import sys, torch
from dogbreed import models, onnx_export, train
real_export = onnx_export.export
def export_other_weights(model, image_size, path):
    torch.manual_seed(12345)
    other = models.build_model("resnet18", model.fc.out_features, models.WEIGHTS_NONE)
    real_export(other, image_size, path)
onnx_export.export = export_other_weights
sys.exit(train.main([]))
"""


def test_a_graph_that_disagrees_with_the_weights_fails_the_job(make_job) -> None:
    paths = make_job({"model": "resnet18", "epochs": "1", "batch-size": "16", "image-size": "32",
                      "weights": "none"})
    env = {**os.environ, contract.BASE_DIR_ENV: str(paths.base), "OMP_NUM_THREADS": "1"}
    env.pop(contract.SM_HPS, None)
    result = subprocess.run([sys.executable, "-c", BROKEN_EXPORT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    failure = paths.failure_file.read_text()
    assert failure.startswith("GraphMismatch: "), failure
    assert "ONNX Runtime" in failure and "disagrees with PyTorch on the test inputs" in failure, failure
    assert "\n" not in failure.strip(), failure
    assert not (paths.model_dir / artifacts.GRAPH_FILE).exists()
