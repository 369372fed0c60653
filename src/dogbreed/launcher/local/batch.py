"""``dogbreed batch --local``: batch transform of a folder of images on this machine, as
SageMaker's (:mod:`dogbreed.launcher.sagemaker.batch_transform`) does it.

Local (``--local``, :func:`served_batch`): the same server as the serve image, started on
127.0.0.1 in single-model mode (:class:`~dogbreed.serve.server.ModelServer`, a model.tar.gz
unpacked once), asked ``GET /execution-parameters`` as SageMaker's transform agent asks it, then
fed one ``POST /invocations`` per file, ``MaxConcurrentTransforms`` at a time.
:func:`run_local` walks the folder and calls a ``predict(bytes) -> dict`` for each file,
writing the same ``<name>.out`` JSON (sub-folders mirrored), ``summary.csv`` and, when the
folder has the dogImages class layout (``NNN.Breed/*.jpg``), the accuracy. A rerun with the
same model skips the finished outputs; with another model (``MODEL_MARK`` records which one
wrote the folder) it predicts every file again, as a new transform job overwrites its output
prefix. An unreadable image gets an error record and the run goes on.
:func:`in_process_predictor` is the same answer without a server: the throughput ceiling
(``scripts/bench_serve.py`` measures both).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import http.client
import io
import json
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dogbreed import artifacts, contract
from dogbreed.launcher import events
from dogbreed.launcher.sagemaker.requests import is_name
from dogbreed.serve.client import ServeClient
from dogbreed.serve.server import ModelServer, ServerError

Predict = Callable[[bytes], Mapping[str, Any]]

OUT_SUFFIX = ".out"  # what SageMaker batch transform appends to each input's name
SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = ("file", "top1", "probability", "error", "true_class", "correct")
# Which model wrote the outputs of a local batch folder. Hidden (input_files skips dot files), so
# an output folder inside the input is never read back as an image.
MODEL_MARK = ".dogbreed-batch-model.json"
MAX_METADATA_BYTES = 16 * 1024**2  # model.json is kilobytes; never read a huge member
CLASS_DIR = re.compile(r"^\d{3}\.")  # dogImages: 001.Affenpinscher/


# --- local ----------------------------------------------------------------------------------------
def input_files(input_dir: Path, output_dir: Path | None = None) -> list[Path]:
    """Every file under ``input_dir`` (as SageMaker takes every object), hidden ones aside,
    and nothing under ``output_dir`` when that folder is inside ``input_dir`` (a rerun must
    not read its own ``.out`` files and ``summary.csv`` as images)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError(f"no such input folder {input_dir}")
    skipped: tuple[str, ...] | None = None
    if output_dir is not None:
        inside = Path(output_dir).resolve()
        if inside == input_dir.resolve():
            raise ValueError(f"OUTPUT {output_dir} is the input folder itself: give another "
                             "folder (a sub-folder of the input is fine)")
        if inside.is_relative_to(input_dir.resolve()):
            skipped = inside.relative_to(input_dir.resolve()).parts
    return sorted(p for p in input_dir.rglob("*")
                  if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
                  and not (skipped and p.relative_to(input_dir).parts[:len(skipped)] == skipped))


def output_for(input_dir: Path, output_dir: Path, file: Path) -> Path:
    relative = Path(file).relative_to(input_dir)
    return Path(output_dir) / relative.parent / (relative.name + OUT_SUFFIX)


def true_class(input_dir: Path, file: Path) -> str | None:
    """The breed folder of a dogImages-layout file (``NNN.Breed/x.jpg``), else None."""
    parent = Path(file).relative_to(input_dir).parent
    return parent.name if parent.parts and CLASS_DIR.match(parent.name) else None


def _record(predict: Predict, file: Path) -> dict[str, Any]:
    try:
        answer = dict(predict(file.read_bytes()))
    except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "transient": True}  # redone on a rerun
    except Exception as exc:  # noqa: BLE001 - one bad file is recorded; the batch goes on
        return {"error": f"{type(exc).__name__}: {exc}"}
    if "error" not in answer and not answer.get("predictions"):
        return {"error": f"no predictions in the answer: {json.dumps(answer)[:200]}"}
    return answer


def _load_finished(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # unreadable: predict it again
    if not isinstance(record, dict):
        return None
    if record.get("transient") or int(record.get("status") or 0) >= 500:
        return None  # a server or connection failure, not the file's fault: try it again
    return record


def model_identity(model: Path) -> dict[str, Any]:
    """What tells two models apart without loading either: the SHA-256 of its model.json (which
    records the training's metrics and timings, so two trainings never share one) and the size
    of model.pt — read from a model dir (model.pt is only stat()ed: the server reads it) or
    from a model.tar.gz's members, so a model and its packed archive are the same model."""
    model = Path(model)
    identity: dict[str, Any] = {"model": str(model.resolve())}
    if model.is_file():
        identity.update(_archive_identity(model))
        return identity
    with contextlib.suppress(OSError):
        identity["model_json_sha256"] = hashlib.sha256(
            (model / artifacts.METADATA_FILE).read_bytes()).hexdigest()
    with contextlib.suppress(OSError):
        identity["weights_size"] = (model / artifacts.WEIGHTS_FILE).stat().st_size
    return identity


def _archive_identity(archive: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name == artifacts.WEIGHTS_FILE and member.isfile():
                    found["weights_size"] = member.size
                elif name == artifacts.METADATA_FILE and member.isfile() \
                        and member.size <= MAX_METADATA_BYTES:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        found["model_json_sha256"] = hashlib.sha256(handle.read()).hexdigest()
    except (OSError, tarfile.TarError):
        pass
    if "model_json_sha256" not in found:  # not a model archive the server reads: its bytes
        digest = hashlib.sha256()
        with open(archive, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        found = {"sha256": digest.hexdigest()}
    return found


def _same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("model_json_sha256", "weights_size", "sha256")
    return any(k in a for k in keys) and all(a.get(k) == b.get(k) for k in keys)


def _previous_model(output_dir: Path) -> dict[str, Any] | None:
    try:
        mark = json.loads((Path(output_dir) / MODEL_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def _outputs_of_another_model(input_dir: Path, output_dir: Path, files: Sequence[Path],
                              model_id: Mapping[str, Any]) -> tuple[list[Path], dict[str, Any] | None]:
    """The existing outputs for ``files`` when the model that wrote them is not ``model_id``
    (or is unknown), with what the folder says about that model."""
    previous = _previous_model(output_dir)
    if previous is not None and _same_model(previous, model_id):
        return [], previous
    return [out for out in (output_for(input_dir, output_dir, f) for f in files) if out.is_file()], previous


def run_local(predict: Predict, input_dir: Path, output_dir: Path, *, workers: int = 1,
              progress: bool | None = None,
              model_id: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Predict every file of ``input_dir`` into ``output_dir``; returns the run's summary.

    A rerun skips the outputs already finished — when ``model_id`` (:func:`model_identity`)
    says the same model wrote them. Outputs of another model, or of an unknown one, are
    predicted again, as a new SageMaker transform job into the same S3OutputPath overwrites
    every ``<name>.out``: the accuracy is always the asked model's."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = input_files(input_dir, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    replaced: dict[str, Any] | None = None
    if model_id is not None:
        stale, previous = _outputs_of_another_model(input_dir, output_dir, files, model_id)
        if stale:
            replaced = previous or {"model": "unknown (no record of the model)"}
            events.warning("batch_model_changed", output=output_dir, outputs=len(stale),
                           previous_model=replaced.get("model"), model=model_id.get("model"),
                           action="predicting every file again")
            # Gone before the mark names the new model: an interrupted run never leaves an old
            # model's output looking like the new one's.
            for out in stale:
                out.unlink()
        artifacts.atomic_write(output_dir / MODEL_MARK, (json.dumps(dict(model_id)) + "\n").encode())
    records: dict[Path, dict[str, Any]] = {}
    todo = []
    for file in files:
        finished = _load_finished(output_for(input_dir, output_dir, file))
        if finished is None:
            todo.append(file)
        else:
            records[file] = finished
    started = time.perf_counter()
    bar = events.Progress(enabled=progress).bar("batch", total=len(todo), unit="img")
    every = max(1, len(todo) // 10)  # off a terminal: an event line per tenth of the run

    def one(file: Path) -> tuple[Path, dict[str, Any]]:
        record = _record(predict, file)
        artifacts.atomic_write(output_for(input_dir, output_dir, file),
                               (json.dumps(record) + "\n").encode())
        return file, record

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (file, record) in enumerate(pool.map(one, todo), 1):
            records[file] = record
            bar.advance()
            if bar.is_null and (done % every == 0 or done == len(todo)):
                elapsed = time.perf_counter() - started
                events.event("batch_progress", done=done, total=len(todo),
                             images_per_sec=round(done / elapsed, 2) if elapsed > 0 else None)
    bar.close()
    seconds = time.perf_counter() - started

    rows, correct, judged = [], 0, 0
    for file in files:
        record = records[file]
        top = (record.get("predictions") or [{}])[0]
        truth = true_class(input_dir, file)
        row = {"file": str(file.relative_to(input_dir)), "top1": top.get("class_name", ""),
               "probability": top.get("probability", ""), "error": record.get("error", ""),
               "true_class": truth or "", "correct": ""}
        if truth and not row["error"]:
            judged += 1
            row["correct"] = int(top.get("class_name") == truth)
            correct += row["correct"]
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.atomic_write(output_dir / SUMMARY_FILE, buffer.getvalue().encode())
    summary = {"input": str(input_dir), "output": str(output_dir), "files": len(files),
               "predicted": len(todo), "skipped_finished": len(files) - len(todo),
               "errors": sum(1 for r in rows if r["error"]),
               "seconds": round(seconds, 3),
               "images_per_sec": round(len(todo) / seconds, 2) if todo and seconds > 0 else None,
               "summary_csv": str(output_dir / SUMMARY_FILE)}
    if replaced is not None:
        summary["replaced_outputs_of"] = replaced.get("model")
    if judged:
        summary["accuracy"] = correct / judged
        summary["judged"] = judged
    events.event("batch_done", **{k: v for k, v in summary.items() if k not in ("input", "output")})
    return summary


def http_predictor(url: str, timeout: float = 120.0) -> Predict:
    """``predict(bytes)`` as ``POST /invocations`` to a serve endpoint (one keep-alive
    connection per thread); an HTTP error becomes the record ``{"error", "status"}``."""
    local = threading.local()

    def predict(body: bytes) -> dict[str, Any]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = ServeClient(url, timeout, keep_alive=True)
        reply = client.invoke(None, body, contract.BATCH_RECORD_CONTENT_TYPE, {"Accept": "application/json"})
        if reply.status != 200:
            return {"error": f"HTTP {reply.status}: {reply.message()}", "status": reply.status}
        return reply.json()

    return predict


def local_model(model: str | Path, workdir: Path | None = None) -> Path:
    """MODEL of ``batch --local``: a model dir or model.tar.gz that exists, else the name of a
    local training job, as ``report`` finds one: ``<workdir>/jobs/<name>/output/model.tar.gz``
    (what ``train --local`` packs), else that job's ``model/`` dir."""
    path = Path(model)
    if path.exists():
        return path
    looked = []
    name = str(model)
    if workdir is not None and is_name(name):  # the local job name rule: never a folder outside
        job = Path(workdir) / "jobs" / name
        for candidate in (job / "output" / artifacts.ARCHIVE_NAME, job / "model"):
            if candidate.is_file() or (candidate / artifacts.METADATA_FILE).is_file():
                events.event("batch_model_from_job", job=name, model=candidate)
                return candidate
            looked.append(str(candidate))
    where = f"; looked for {' and '.join(looked)}" if looked else ""
    raise ValueError(f"no such model {model} (a model dir with model.json, a model.tar.gz or a "
                     f"local training job name{where})")


def served_batch(model: Path, input_dir: Path, output_dir: Path, *, workers: int | None = None,
                 progress: bool | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """``dogbreed batch --local``: MODEL (a model dir, a model.tar.gz or a local training job
    name, found under ``workdir``) served by the serve image's server on 127.0.0.1 with
    ``workers`` model workers, then :func:`run_local` over ``input_dir`` with as many
    concurrent requests as its ``/execution-parameters`` allow."""
    model = local_model(model, workdir)
    files = input_files(Path(input_dir), Path(output_dir))  # a bad folder fails before a server starts
    model_id = model_identity(model)
    stale, _ = _outputs_of_another_model(Path(input_dir), Path(output_dir), files, model_id)
    if not stale and all(_load_finished(output_for(Path(input_dir), Path(output_dir), f)) for f in files):
        def finished(body: bytes) -> dict[str, Any]:
            raise AssertionError("every output is finished")
        events.event("batch_all_finished", files=len(files))  # no server to start
        return {**run_local(finished, input_dir, output_dir, progress=progress, model_id=model_id),
                "model": str(model)}
    with tempfile.TemporaryDirectory(prefix="dogbreed-batch-") as tmp:
        server = ModelServer(port=0, host="127.0.0.1", multi_model=False, model_dir=model,
                             workers=workers, run_dir=Path(tmp) / "run", log_file=Path(tmp) / "serve.log")
        # One try/finally from the first process started to the last request: Ctrl-C, SIGTERM
        # (KeyboardInterrupt / SystemExit) or a failure at any point, start-up included, stops
        # MMS and the zygote before the temp dir goes (stop() is idempotent).
        try:
            events.event("batch_server_starting", model=model, workers=server.workers)
            server.start()
            server.wait_ready(timeout=180)
            reply = server.client.request("GET", "/execution-parameters")
            if reply.status != 200:
                raise ServerError(f"GET /execution-parameters answered {reply.status}: {reply.message()}")
            parameters = reply.json()
            events.event("batch_server_ready", url=server.url, **parameters)
            summary = run_local(http_predictor(server.url), input_dir, output_dir,
                                workers=int(parameters["MaxConcurrentTransforms"]), progress=progress,
                                model_id=model_id)
        finally:
            server.stop()
    return {**summary, "model": str(model), "execution_parameters": parameters}


def in_process_predictor(model_path: Path, top_k: int = 5, device: str = "cpu") -> Predict:
    """``predict(bytes)`` with the serving preprocessing, in this process: the same JSON
    fields the server answers (model, arch, predictions[label, class_name, index, probability])."""
    import torch  # the in-process predictor alone needs torch

    from dogbreed import data, explain  # both import torch

    model, metadata = explain.load(Path(model_path), device)
    name = Path(model_path).name

    def predict(body: bytes) -> dict[str, Any]:
        pixels = data.check_decoded(data.decode_image(body, metadata.resize_size))
        inputs = data.eval_transform(pixels.to(device), metadata.image_size, metadata.mean,
                                     metadata.std)
        with torch.no_grad():
            probabilities = model(inputs).float().softmax(1)[0].cpu()
        top = probabilities.topk(min(top_k, len(metadata.class_names)))
        return {"model": name, "arch": metadata.arch, "predictions": [
            {"label": artifacts.breed_name(metadata.class_names[i]), "class_name": metadata.class_names[i],
             "index": i, "probability": round(p, 6)}
            for i, p in zip(top.indices.tolist(), top.values.tolist())]}

    return predict

