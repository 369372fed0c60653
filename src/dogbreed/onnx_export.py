"""The artifact's ONNX graph: exported from the trained weights, checked against them, and the
ONNX Runtime sessions that serve it.

Training calls :func:`export_and_verify` after its final evaluation: it rebuilds the model from
``model.pt`` exactly as a server does, writes ``model.onnx`` beside it, runs ONNX Runtime and
PyTorch on the same inputs (the test split, or :func:`fixed_inputs` when there is none) and
records the comparison in ``model.json`` (``graph``). A graph whose top-1 differs from
PyTorch's on any image (but for ties within :data:`TIE_TOLERANCE`), or whose probabilities differ by more than :data:`MAX_PROB_DIFF`, is a
:class:`GraphMismatch` (the job fails with that reason); nothing falls back silently.
:func:`check_model_dir` repeats the check on fixed inputs when a model dir is packed whose files
are not the ones checked (``graph.sha256``).

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs only the ``onnx``
package, whose 1.17 release still accepts the protobuf 3.20 that smdebug pins; the
torch.export-based exporter also needs onnxscript and onnx_ir, whose onnx floor needs protobuf
>= 4.25. ``torch.onnx.export(..., dynamo=False)`` has this signature from torch 2.5 on (2.9 made
``dynamo=True`` the default, with a DeprecationWarning for this path); the exporter's Python
in torch 2.10 (the images) and 2.14 (the venv) differs only in asserts and docstrings.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy
import torch
from torch import nn

from dogbreed import artifacts, data

# onnxruntime and onnx are optional (GPU serving and torch-only installs go without them):
# imported where they are used.
if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("dogbreed.onnx")

RUNTIME = "onnxruntime"
EXPORTER = "torch.onnx.export(dynamo=False)"
# 17: the opset every ONNX Runtime since 1.14 runs; ResNet/MobileNet need nothing newer.
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The largest difference in any class probability the check accepts (float32 kernels that sum
# in another order differ by ~1e-6 here).
MAX_PROB_DIFF = 1e-4
# Two classes PyTorch itself scores within this are a tie at float32 precision (an untrained
# head answers near-uniform probabilities): either top-1 agrees with it.
TIE_TOLERANCE = 1e-6
FIXED_INPUT_COUNT = 8
FIXED_INPUT_SEED = 0
CHECK_BATCH = 32


class GraphMismatch(artifacts.ArtifactError):
    """ONNX Runtime does not answer as PyTorch does with the same weights."""


def runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_version() -> str:
    import onnxruntime  # optional (the serve extra): only where a graph is checked or served

    return onnxruntime.__version__


@dataclasses.dataclass(frozen=True)
class GraphCheck:
    """What the graph was checked against: ``model.json``'s ``graph`` (see :meth:`to_metadata`)."""

    inputs: str  # "test" (the test split) or "fixed" (FIXED_INPUT_COUNT seeded images)
    images: int
    max_prob_diff: float
    top1_agreement: float
    disagreements: int
    runtime_version: str

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.disagreements == 0 and self.max_prob_diff <= MAX_PROB_DIFF

    def to_metadata(self) -> dict[str, Any]:
        return {"file": artifacts.GRAPH_FILE, "exporter": EXPORTER, "opset": OPSET,
                "input": INPUT_NAME, "output": OUTPUT_NAME,
                "checked_on": self.inputs, "images": self.images,
                "max_prob_diff": self.max_prob_diff, "max_prob_diff_allowed": MAX_PROB_DIFF,
                "top1_agreement": self.top1_agreement, "runtime": RUNTIME,
                "runtime_version": self.runtime_version}

    def reason(self) -> str:
        return (f"ONNX Runtime {self.runtime_version} disagrees with PyTorch on the {self.inputs} "
                f"inputs: top-1 differs on {self.disagreements} of {self.images} images, "
                f"largest probability difference {self.max_prob_diff:.3g} (allowed "
                f"{MAX_PROB_DIFF:g})")


def export(model: nn.Module, image_size: int, path: Path) -> None:
    """Write ``model`` (eval mode, CPU, float32) as an ONNX graph taking a normalised
    ``float32[batch, 3, image_size, image_size]`` and answering logits; atomically."""
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is the legacy one; see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    artifacts.atomic_write(Path(path), buffer.getvalue())


def session(graph: Path | bytes, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for one serving worker (or a check): ``threads`` intra-op
    threads, one inter-op thread (the graph is a chain; MMS runs several workers side by side)."""
    import onnxruntime  # optional: see runtime_version

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings go to stderr, one line per node
    source = str(graph) if isinstance(graph, Path) else graph
    try:
        # The exporter folded the graph's constants already; ORT's own pass (over the NCHWc
        # weight reorders) took half of a ResNet18 session's creation and changed no output
        # or forward time.
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["ConstantFolding"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise artifacts.ArtifactError(f"{artifacts.GRAPH_FILE}: ONNX Runtime cannot load it: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}") from None


def check_output_shape(ort_session: onnxruntime.InferenceSession, num_classes: int) -> None:
    """The graph answers ``num_classes`` logits, as model.json says."""
    outputs = ort_session.get_outputs()
    width = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if width != num_classes:
        raise artifacts.ArtifactError(f"{artifacts.GRAPH_FILE} answers {width} classes, "
                                      f"{artifacts.METADATA_FILE} has {num_classes} classes")


def run(ort_session: onnxruntime.InferenceSession, inputs: torch.Tensor) -> torch.Tensor:
    """Logits for a normalised float32 batch."""
    array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
    return torch.from_numpy(ort_session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def fixed_inputs(metadata: artifacts.ModelMetadata, count: int = FIXED_INPUT_COUNT,
                 seed: int = FIXED_INPUT_SEED) -> torch.Tensor:
    """``count`` seeded uint8 images at the serving crop, normalised as serving does: the
    check's inputs where there is no test split (same on every machine)."""
    generator = torch.Generator().manual_seed(seed)
    size = metadata.image_size
    pixels = torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    return data.eval_transform(pixels, size, metadata.mean, metadata.std)


def compare(model: nn.Module, ort_session: onnxruntime.InferenceSession,
            batches: Iterable[torch.Tensor], inputs: str) -> GraphCheck:
    """Run PyTorch (CPU, float32) and ONNX Runtime on each normalised batch."""
    model = model.eval()
    images = disagreements = 0
    max_diff = 0.0
    for batch in batches:
        batch = batch.detach().to("cpu", torch.float32)
        with torch.inference_mode():
            expected = torch.softmax(model(batch).float(), dim=1)
        actual = torch.softmax(run(ort_session, batch).float(), dim=1)
        if not (bool(torch.isfinite(expected).all()) and bool(torch.isfinite(actual).all())):
            max_diff = float("inf")
        else:
            max_diff = max(max_diff, float((expected - actual).abs().max()))
        expected_top, actual_top = expected.argmax(1), actual.argmax(1)
        rows = torch.arange(batch.shape[0])
        margin = expected[rows, expected_top] - expected[rows, actual_top]
        disagreements += int(((expected_top != actual_top) & (margin > TIE_TOLERANCE)).sum())
        images += batch.shape[0]
    agreement = (images - disagreements) / images if images else 0.0
    return GraphCheck(inputs, images, max_diff, round(agreement, 6), disagreements, runtime_version())


def split_batches(images: torch.Tensor, metadata: artifacts.ModelMetadata,
                 batch_size: int = CHECK_BATCH) -> Iterator[torch.Tensor]:
    """The test split's decoded ``uint8[N,3,S,S]`` images through the serving transform."""
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].cpu()
        yield data.eval_transform(chunk, metadata.image_size, metadata.mean, metadata.std)


def export_and_verify(model_dir: Path, test_images: torch.Tensor | None = None) -> GraphCheck:
    """Write ``model_dir/model.onnx`` from its ``model.pt``, check it and record the check in
    ``model.json``. ``test_images``: the test split's decoded images (uint8); None checks on
    :func:`fixed_inputs`. Raises :class:`GraphMismatch` (and removes the graph) if the check fails.
    """
    model_dir = Path(model_dir)
    start = time.perf_counter()
    model, metadata = artifacts.load_model(model_dir)  # what the torch engine serves
    graph_path = model_dir / artifacts.GRAPH_FILE
    export(model, metadata.image_size, graph_path)
    exported = time.perf_counter()
    if test_images is not None and test_images.shape[0] > 0:
        check = compare(model, session(graph_path), split_batches(test_images, metadata), "test")
    else:
        check = compare(model, session(graph_path), [fixed_inputs(metadata)], "fixed")
    if not check.passed:
        graph_path.unlink(missing_ok=True)
        raise GraphMismatch(f"{graph_path} was not kept: {check.reason()}")
    graph = {**check.to_metadata(), "bytes": graph_path.stat().st_size,
             "sha256": artifacts.checked_files_digest(model_dir)}
    artifacts.atomic_write(model_dir / artifacts.METADATA_FILE,
                           dataclasses.replace(metadata, graph=graph).to_json().encode())
    log.info("event=graph_exported file=%s bytes=%d checked_on=%s images=%d max_prob_diff=%.3g "
             "top1_agreement=%.4f runtime_version=%s export_s=%.2f check_s=%.2f", graph_path,
             graph["bytes"], check.inputs, check.images, check.max_prob_diff, check.top1_agreement,
             check.runtime_version, exported - start, time.perf_counter() - exported)
    return check


def check_model_dir(model_dir: Path) -> GraphCheck | None:
    """Before packing: a dir with a graph must have one that agrees with its weights, on
    :func:`fixed_inputs`, and model.json must say it was checked. None when there is no graph."""
    model_dir = Path(model_dir)
    graph_path = model_dir / artifacts.GRAPH_FILE
    if not graph_path.is_file():
        return None  # a model.json naming a graph that is not there is refused where it is loaded
    metadata = artifacts.read_metadata(model_dir)
    if not metadata.graph:
        raise artifacts.ArtifactError(f"{graph_path} was never checked against {artifacts.WEIGHTS_FILE} "
                                      f"({artifacts.METADATA_FILE} has no graph entry)")
    if not runtime_available():
        raise artifacts.ArtifactError(f"cannot check {graph_path}: onnxruntime is not installed "
                                      "(pip install 'dogbreed[serve]')")
    model, metadata = artifacts.load_model(model_dir)
    ort_session = session(graph_path)
    check_output_shape(ort_session, metadata.num_classes)
    check = compare(model, ort_session, [fixed_inputs(metadata)], "fixed")
    if not check.passed:
        raise GraphMismatch(f"{graph_path} does not match {artifacts.WEIGHTS_FILE}: {check.reason()}")
    return check


def warm_up_runtime(size: int = 224) -> bool:
    """Create and run a one-layer graph (convolution, pooling, linear): ONNX Runtime's
    one-time set-up (its environment, the CPU kernels' registries) then happens in the process
    that calls this (the fork server), not in each worker's first model load. Builds the graph
    with the ``onnx`` package's helpers (no torch export: that starts a thread); False if
    either package is missing. Runs on one thread and leaves none behind."""
    try:
        from onnx import TensorProto, helper, numpy_helper  # optional, like onnxruntime
    except ImportError:
        return False
    if not runtime_available():
        return False
    rng = numpy.random.default_rng(0)
    weights = {
        "conv_w": rng.standard_normal((8, 3, 3, 3), dtype=numpy.float32),
        "conv_b": numpy.zeros(8, dtype=numpy.float32),
        "fc_w": rng.standard_normal((2, 8), dtype=numpy.float32),
        "fc_b": numpy.zeros(2, dtype=numpy.float32),
    }
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [OUTPUT_NAME], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "warm_up",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # what every ONNX Runtime since 1.14 reads
    ort_session = session(model.SerializeToString(), threads=1)
    ort_session.run([OUTPUT_NAME], {INPUT_NAME: numpy.zeros((1, 3, size, size), numpy.float32)})
    return True
