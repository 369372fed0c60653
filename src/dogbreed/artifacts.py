"""The model artifact: ``model.pt`` + ``model.json`` in a dir, packed as ``model.tar.gz``.

``model.pt`` is a plain state_dict (``torch.load(weights_only=True)``) and ``model.json`` holds
everything else a server needs: architecture, class names, image and resize size,
normalisation, metrics, hyperparameters and library versions. Nothing is pickled.
``model.onnx`` (from training, :mod:`dogbreed.onnx_export`) is the same model as an ONNX graph
for CPU serving; ``model.json``'s ``graph`` says what it was checked against. Artifacts
without one are served by PyTorch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from dogbreed.contract import ARCHITECTURES

if TYPE_CHECKING:  # torch is imported where it is used: the launcher and router stay light
    import torch
    from torch import nn

WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"
GRAPH_FILE = "model.onnx"
ARCHIVE_NAME = "model.tar.gz"
FORMAT_VERSION = 1
# Limits on what an archive may unpack to, checked member by member before anything is written.
# Bytes: a ResNet50 model.tar.gz unpacks to ~95 MB; 2 GiB leaves room for far larger models.
MAX_UNPACKED_BYTES = 2 * 1024**3
# Members: ours hold 2 files (SageMaker's inference-code archives a few dozen more); 100,000
# empty members took 39.8 s to load before this limit and are now refused after the 1,001st
# header (~0.1 s).
MAX_MEMBERS = 1000
# Path depth: a model dir is flat (code/ adds one level); a deep path only makes directories.
MAX_PATH_DEPTH = 16
# model.json's crop and resize: at most what training makes (hyperparameter image-size's upper
# bound, 1024, and its resize ceil(1024 x 256/224), data.resize_size_for). One invoke's memory
# grows with the square of the side: a ResNet-18 at 4096 px peaked at 4.0 GB, at 1024 px it is
# a sixteenth of that, which one instance's workers can afford.
MAX_IMAGE_SIZE = 1024
MAX_RESIZE_SIZE = -(-MAX_IMAGE_SIZE * 256 // 224)


def breed_name(class_name: str) -> str:
    """A class name's label: ``"016.Beagle"`` (a dogImages folder) → ``"Beagle"``; other names
    are kept as they are."""
    prefix, dot, rest = class_name.partition(".")
    return rest if dot and prefix.isdigit() and rest else class_name


class ArtifactError(ValueError):
    """An artifact is missing files, malformed or unsafe to unpack."""


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    arch: str
    class_names: list[str]
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # model.onnx's check against model.pt (onnx_export.GraphCheck.to_metadata); {}: no graph.
    graph: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "num_classes": self.num_classes}, indent=2)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = METADATA_FILE) -> ModelMetadata:
        if not isinstance(raw, Mapping):
            raise ArtifactError(f"{source}: expected a JSON object")
        try:
            meta = cls(
                arch=str(raw["arch"]),
                class_names=[str(c) for c in raw["class_names"]],
                image_size=int(raw["image_size"]),
                resize_size=int(raw["resize_size"]),
                mean=[float(x) for x in raw["mean"]],
                std=[float(x) for x in raw["std"]],
                metrics=dict(raw.get("metrics") or {}),
                hyperparameters=dict(raw.get("hyperparameters") or {}),
                versions=dict(raw.get("versions") or {}),
                format_version=int(raw.get("format_version", FORMAT_VERSION)),
                graph=dict(raw.get("graph") or {}),
            )
        except KeyError as exc:
            raise ArtifactError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: bad field value: {exc}") from None
        if meta.format_version > FORMAT_VERSION:
            raise ArtifactError(f"{source}: format_version {meta.format_version} is newer than this server")
        if meta.arch not in ARCHITECTURES:
            raise ArtifactError(f"{source}: unknown arch {meta.arch!r} (known: {', '.join(ARCHITECTURES)})")
        if not meta.class_names:
            raise ArtifactError(f"{source}: class_names is empty")
        if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0:
            raise ArtifactError(f"{source}: mean and std need 3 values each, std > 0")
        if not 16 <= meta.image_size <= meta.resize_size or meta.image_size > MAX_IMAGE_SIZE \
                or meta.resize_size > MAX_RESIZE_SIZE:
            raise ArtifactError(f"{source}: need 16 <= image_size <= resize_size, image_size <= "
                                f"{MAX_IMAGE_SIZE} and resize_size <= {MAX_RESIZE_SIZE} (what training makes), "
                                f"not {meta.image_size} and {meta.resize_size}")
        return meta


def library_versions() -> dict[str, str]:
    import torch  # not at the top: the launcher and the server's front use this module torch-free
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def save_model_dir(model_dir: Path, model: nn.Module, metadata: ModelMetadata) -> None:
    """Write model.pt and model.json (each atomically, so a reader never sees half a file)."""
    import torch  # torch-free module (see library_versions)

    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(model_dir / WEIGHTS_FILE, buffer.getvalue())
    atomic_write(model_dir / METADATA_FILE, metadata.to_json().encode())


# Artifacts are written by training (often root) and read by a non-root model server.
FILE_MODE = 0o644
DIR_MODE = 0o755


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename: a reader (or a SIGKILL mid-write)
    sees the old file or the new one, never half of one. Creates the parent dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(model_dir: Path) -> ModelMetadata:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"model dir {model_dir} has no {METADATA_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[...": nested deeper than the parser's stack
        raise ArtifactError(f"{path}: not valid JSON: nested too deeply") from None
    return ModelMetadata.from_mapping(raw, str(path))


def find_model_dir(root: Path) -> Path:
    """The folder holding model.json: ``root`` itself or its only subfolder that has one."""
    if (root / METADATA_FILE).is_file():
        return root
    candidates = [p.parent for p in root.glob(f"*/{METADATA_FILE}")]
    if len(candidates) == 1:
        return candidates[0]
    raise ArtifactError(f"no {METADATA_FILE} in {root}")


def load_state(model_dir: Path) -> tuple[dict[str, torch.Tensor], ModelMetadata]:
    """A model dir's checked ``model.json`` and ``model.pt`` state_dict (weights_only load,
    every tensor finite), without building the module."""
    import torch  # torch-free module (see library_versions)

    model_dir = find_model_dir(Path(model_dir))
    metadata = read_metadata(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"model dir {model_dir} has no {WEIGHTS_FILE}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types; all mean a bad file
        raise ArtifactError(f"{weights}: cannot load state_dict: {exc}") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{weights}: does not hold a state_dict")
    # A diverged run's NaN weights would answer every request with "probability": NaN.
    non_finite = [name for name, value in state.items() if isinstance(value, torch.Tensor)
                  and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if non_finite:
        raise ArtifactError(f"{weights}: {len(non_finite)} tensor(s) hold NaN or infinite values "
                            f"(first: {non_finite[0]}); the training run diverged")
    return state, metadata


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the trained model from a model dir (weights_only load), in eval mode."""
    from dogbreed.models import build_for_inference  # imports torch

    state, metadata = load_state(model_dir)
    weights = find_model_dir(Path(model_dir)) / WEIGHTS_FILE
    try:
        model = build_for_inference(metadata.arch, metadata.num_classes, state)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not match {metadata.arch} with "
                            f"{metadata.num_classes} classes: {str(exc)[:300]}") from None
    return model.to(device), metadata


def validate_model_archive(archive: Path) -> ModelMetadata:
    """Check that ``archive`` is a model.tar.gz a server can load, and return its metadata.

    Unpacks it (with :func:`safe_extract`'s limits) into a temp dir and loads it exactly as a
    server does: model.json parsed and checked, weights matching the architecture and finite,
    a ``model.onnx`` answering as the weights do.
    Raises :class:`ArtifactError` saying what is wrong; nothing is kept.
    """
    from dogbreed import onnx_export  # imports this module, and torch

    archive = Path(archive)
    if not archive.is_file():
        raise ArtifactError(f"{archive}: no such file")
    try:
        with tempfile.TemporaryDirectory(prefix="dogbreed-validate-") as tmp:
            model_dir = find_model_dir(safe_extract(archive, Path(tmp) / "model"))
            _, metadata = load_model(model_dir)
            onnx_export.check_model_dir(model_dir)
    except ArtifactError as exc:
        raise type(exc)(f"{archive} is not a loadable model archive: {exc}") from None
    return metadata


# --- model.tar.gz -------------------------------------------------------------------------------
def checked_files_digest(model_dir: Path) -> dict[str, str]:
    """sha256 of ``model.pt`` and ``model.onnx``: the bytes a graph check was made on
    (recorded in ``model.json``'s ``graph``, compared by :func:`pack`)."""
    digests = {}
    for name in (WEIGHTS_FILE, GRAPH_FILE):
        with open(Path(model_dir) / name, "rb") as file:
            digests[name] = hashlib.file_digest(file, "sha256").hexdigest()
    return digests


class _HuffmanGzip(io.RawIOBase):
    """A gzip stream (zlib's own header and trailer) deflated with Huffman coding only: float
    tensors hold no repeated strings for LZ77 to find, so this keeps the ~7% the exponent bytes
    give at a third of the default's time (``scripts/bench_pack.py``)."""

    def __init__(self, file: io.BufferedWriter) -> None:
        super().__init__()
        self.file = file
        self.deflate = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.file.write(self.deflate.compress(data))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.file.write(self.deflate.flush())
        super().close()


def pack(model_dir: Path, archive: Path) -> Path:
    """Pack the files of ``model_dir`` (flat, as SageMaker does) into ``archive``.

    A ``model.onnx`` must answer as ``model.pt`` does (:func:`dogbreed.onnx_export.check_model_dir`):
    a graph that disagrees with its weights is refused, naming the difference. When ``model.json``
    records a check made on exactly these two files (their sha256, as training writes it), that
    check stands and is not run again.
    """
    model_dir = Path(model_dir)
    for required in (WEIGHTS_FILE, METADATA_FILE):
        if not (model_dir / required).is_file():
            raise ArtifactError(f"cannot pack {model_dir}: {required} is missing")
    try:
        graph = model_dir / GRAPH_FILE
        if graph.is_file() and read_metadata(model_dir).graph.get("sha256") != checked_files_digest(model_dir):
            from dogbreed import onnx_export  # and torch: imported only when the check must run

            onnx_export.check_model_dir(model_dir)
    except ArtifactError as exc:
        raise type(exc)(f"cannot pack {model_dir}: {exc}") from None  # GraphMismatch stays one
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".partial")
    def readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mode = DIR_MODE if info.isdir() else FILE_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with open(tmp, "wb") as file, _HuffmanGzip(file) as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False,
                        filter=readable)
    os.replace(tmp, archive)
    return archive


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts or "\x00" in name:
        raise ArtifactError(f"unsafe path in archive: {name[:200]!r}")
    if len(parts) > MAX_PATH_DEPTH:
        raise ArtifactError(f"archive path {name[:200]!r} is deeper than {MAX_PATH_DEPTH} levels")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise ArtifactError(f"archive member {name[:200]!r} is a link or device (or a sparse "
                            "file); refusing to unpack")


def _make_readable(root: Path) -> None:
    """Owner-writable, world-readable: a server running as another user can load the model."""
    os.chmod(root, DIR_MODE)  # mkdtemp creates 0700
    for path in root.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _read_to_the_end(tar: tarfile.TarFile, archive: Path, allowance: int) -> None:
    """Read the compressed stream past the tar end marker to its end, so that gzip (bz2, xz)
    checks its CRC and length: tarfile stops at the end marker, and an archive with a flipped
    byte would otherwise unpack into changed weights. At most ``allowance`` more bytes (plus
    tar's padding) are read: a stream that goes on beyond is refused like a bomb."""
    stream = tar.fileobj
    limit = allowance + tarfile.RECORDSIZE
    try:
        while limit > 0 and (chunk := stream.read(min(1 << 20, limit))):
            limit -= len(chunk)
        if limit <= 0 and stream.read(1):
            raise ArtifactError(f"{archive}: unpacks to more than the limit (data after the tar end)")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ArtifactError(f"{archive}: corrupt archive (its checksum does not match: {exc})") from None


def safe_extract(archive: Path, destination: Path, max_bytes: int = MAX_UNPACKED_BYTES,
                 max_members: int = MAX_MEMBERS) -> Path:
    """Unpack ``archive`` into ``destination``, refusing tar-slip, links, devices and bombs
    (more than ``max_bytes`` declared, more than ``max_members`` members).

    One pass over the (compressed) stream: each member is checked before it is written, into a
    temp dir beside ``destination`` that is renamed into place only when every member passed,
    so a refused archive leaves nothing behind. (Listing first and extracting after would
    decompress a gzip twice: half of a cold model load.) The stream is read to its end, so a
    corrupted archive fails gzip's CRC check instead of serving changed weights.
    """
    destination = Path(destination)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a cut-off gzip header
        raise ArtifactError(f"{archive}: not a readable tar archive: {exc}") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    # PEP 706's "data" filter re-checks each member as it is written; Pythons before 3.11.4
    # (Debian bookworm's 3.11.2) lack it, and the checks below stand on their own.
    extract_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tar:
            total = members = 0
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise ArtifactError(f"{archive}: corrupt archive: {exc}") from None
                if member is None:
                    break
                members += 1
                if members > max_members:
                    raise ArtifactError(f"{archive}: more than {max_members} members")
                _check_member(member)
                total += member.size
                if total > max_bytes:
                    raise ArtifactError(f"{archive}: unpacks to more than {max_bytes} bytes")
                try:
                    tar.extract(member, staging, **extract_kwargs)
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise ArtifactError(f"{archive}: cannot unpack {member.name[:200]!r}: {exc}") from None
            _read_to_the_end(tar, archive, max_bytes - total)
        _make_readable(staging)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def resolve_model_dir(path: Path, staging: Path, name: str = "model") -> tuple[Path, Path | None]:
    """A model dir from ``path``: ``(model_dir, unpacked)``, what servers and tools load from.

    A dir holding ``model.json`` (or one subfolder that does) is used as it is, as SageMaker
    hands it over; a ``model.tar.gz`` (the file, or a dir holding only it) is unpacked once with
    :func:`safe_extract` into a new folder under ``staging``, returned as ``unpacked`` for the
    caller to remove. ``FileNotFoundError`` for a missing path, :class:`ArtifactError` otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    archive = path if path.is_file() else None
    if path.is_dir() and not (path / METADATA_FILE).is_file() and (path / ARCHIVE_NAME).is_file():
        archive = path / ARCHIVE_NAME
    if archive is None:
        try:
            return find_model_dir(path), None
        except ArtifactError:
            raise ArtifactError(f"{path} holds neither {METADATA_FILE} nor {ARCHIVE_NAME}") from None
    if not tarfile.is_tarfile(archive):
        raise ArtifactError(f"{archive} is not a tar archive (model.tar.gz)")
    unpacked = Path(staging) / f"{quote(name, safe='')[:80] or 'model'}-{uuid.uuid4().hex[:8]}"
    try:
        return find_model_dir(safe_extract(archive, unpacked)), unpacked
    except BaseException:
        shutil.rmtree(unpacked, ignore_errors=True)
        raise
