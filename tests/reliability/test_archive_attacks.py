"""Hostile model archives, generated and hand-made (the parts outside the server).

- ``safe_extract`` refuses tar-slip, links, devices, sparse files, deep paths, huge declared
  sizes and huge member counts (100,000 empty members used to take 39.8 s to load), leaves
  nothing behind when it refuses, and never fails with anything but ``ArtifactError``.
- ``dogbreed add-model --local`` stores only an archive a server can load
  (:func:`artifacts.validate_model_archive`): a text file, a tarball without model.json, a bad
  model.json or NaN weights are refused with a clear error and nothing stored.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dogbreed import artifacts, data, models
from dogbreed.launcher import cli

# --- building archives ---------------------------------------------------------------------------
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE,
         "fifo": tarfile.FIFOTYPE, "sparse": tarfile.GNUTYPE_SPARSE}


def header(name: str, kind: str = "file", size: int = 0, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = KINDS[kind], size, link, 0o644
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def raw_archive(path: Path, blocks: list[bytes], level: int = 1) -> Path:
    """A gzip'd tar written block by block: lets a test declare sizes it never supplies."""
    with gzip.open(path, "wb", compresslevel=level) as out:
        for block in blocks:
            out.write(block)
        out.write(b"\0" * 1024)  # end-of-archive marker
    return path


def member_blocks(name: str, kind: str = "file", payload: bytes = b"", link: str = "") -> bytes:
    padding = b"\0" * (-len(payload) % tarfile.BLOCKSIZE)
    return header(name, kind, len(payload), link) + payload + padding


def assert_refused(archive: Path, dest: Path, match: str | None = None) -> artifacts.ArtifactError:
    with pytest.raises(artifacts.ArtifactError, match=match) as excinfo:
        artifacts.safe_extract(archive, dest)
    assert not dest.exists(), "a refused archive must leave no destination"
    leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    assert leftovers == [], f"staging dirs left behind: {leftovers}"
    return excinfo.value


# --- hand-made corpus -------------------------------------------------------------------------
HOSTILE = {
    "tar-slip parent": [member_blocks("../evil.txt", payload=b"x")],
    "tar-slip nested parent": [member_blocks("model/../../evil.txt", payload=b"x")],
    "absolute path": [member_blocks("/tmp/evil.txt", payload=b"x")],
    "windows drive": [member_blocks("C:/evil.txt", payload=b"x")],
    "symlink out": [member_blocks("model.json", "symlink", link="/etc/passwd")],
    "symlink then write through it": [member_blocks("d", "symlink", link="/tmp"),
                                      member_blocks("d/evil.txt", payload=b"x")],
    "hardlink": [member_blocks("model.json", "hardlink", link="/etc/passwd")],
    "char device": [member_blocks("null", "chardev")],
    "block device": [member_blocks("sda", "blockdev")],
    "fifo": [member_blocks("pipe", "fifo")],
    "sparse file": [member_blocks("model.pt", "sparse", payload=b"x" * 10)],
    "nested 200 levels": [member_blocks("a/" * 200 + "x", payload=b"x")],
    "declared 3 GiB, never supplied": [header("model.pt", size=3 * 1024**3)],
    "declared sizes adding past the limit": [header(f"part{i}", size=1024**3) for i in range(3)],
    "60 KB name": [member_blocks("n" * 60_000, payload=b"x")],
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hand_made_hostile_archives_are_refused(tmp_path: Path, attack: str) -> None:
    archive = raw_archive(tmp_path / "evil.tar.gz", HOSTILE[attack])
    assert_refused(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


@pytest.fixture(scope="module")
def hundred_thousand_members(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One name repeated (building 100,000 distinct headers costs seconds; the count is the attack).
    return raw_archive(tmp_path_factory.mktemp("many") / "many.tar.gz", [header("f")] * 100_000)


def test_100000_empty_members_are_refused_at_the_member_limit(hundred_thousand_members: Path,
                                                              tmp_path: Path) -> None:
    error = assert_refused(hundred_thousand_members, tmp_path / "out", "more than 1000 members")
    assert str(artifacts.MAX_MEMBERS) in str(error)


def test_a_model_archive_with_code_dir_is_well_inside_the_limits(tmp_path: Path) -> None:
    """The limits refuse attacks, not real archives: a model plus a SageMaker code/ dir."""
    blocks = [member_blocks("model.json", payload=b"{}"), member_blocks("code", "dir")]
    blocks += [member_blocks(f"code/lib/pkg/mod{i}.py", payload=b"pass\n") for i in range(200)]
    out = artifacts.safe_extract(raw_archive(tmp_path / "ok.tar.gz", blocks), tmp_path / "out")
    assert len(list((out / "code" / "lib" / "pkg").iterdir())) == 200


# --- generated corpus ----------------------------------------------------------------------------
COMPONENTS = st.one_of(
    st.sampled_from(["..", ".", "", "model.json", "model.pt", "code", "C:", "~", "\\..\\x"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=1, max_size=12),
)
MEMBERS = st.lists(
    st.tuples(
        st.lists(COMPONENTS, min_size=1, max_size=20).map("/".join),
        st.sampled_from(sorted(KINDS)),
        st.binary(max_size=64),
        st.sampled_from(["", "/etc/passwd", "../x", "model.json", "a/" * 20]),
        st.booleans(),  # leading slash
    ),
    min_size=1, max_size=12,
)


def expected_safe(name: str, kind: str) -> bool:
    parts = Path(name).parts
    return (kind in ("file", "dir") and not name.startswith(("/", "\\")) and ".." not in parts
            and not (parts and ":" in parts[0]) and len(parts) <= artifacts.MAX_PATH_DEPTH)


def contents_under(root: Path) -> list[Path]:
    return [Path(dirpath) / n for dirpath, dirs, files in os.walk(root) for n in dirs + files]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=MEMBERS)
def test_generated_archives_are_refused_or_unpack_only_inside_the_destination(members) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        blocks, names = [], []
        for name, kind, payload, link, absolute in members:
            name = ("/" if absolute else "") + name
            names.append((name, kind))
            body = payload if kind in ("file", "sparse") else b""
            blocks.append(member_blocks(name, kind, body, link))
        archive = raw_archive(root / "gen.tar.gz", blocks)
        dest = root / "box" / "out"
        try:
            artifacts.safe_extract(archive, dest)
        except artifacts.ArtifactError:
            assert not dest.exists()
            assert [p for p in dest.parent.iterdir() if p.name.startswith(".out.")] == []
            return
        # Accepted: every member was a plain file or dir with a safe path, and nothing escaped.
        assert all(expected_safe(name, kind) for name, kind in names if name.strip("/")), names
        assert sorted(p.name for p in root.iterdir()) == ["box", "gen.tar.gz"]
        for path in contents_under(dest):
            mode = os.lstat(path).st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), path
            assert path.resolve().is_relative_to(dest.resolve())


@pytest.fixture(scope="module")
def valid_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("valid")
    model_dir = save_tiny_model(root / "model")
    return artifacts.pack(model_dir, root / artifacts.ARCHIVE_NAME)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)),
                                                max_size=4))
def test_truncated_or_corrupted_real_archives_fail_only_with_artifact_error(valid_archive, cut, flips) -> None:
    raw = bytearray(valid_archive.read_bytes())
    for where, xor in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] ^= xor
    raw = raw[:max(1, int(cut * len(raw)))] if cut < 1.0 else raw
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "bad.tar.gz"
        archive.write_bytes(bytes(raw))
        try:
            artifacts.validate_model_archive(archive)
        except artifacts.ArtifactError:
            pass
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["bad.tar.gz"]


# --- add-model validates what it stores --------------------------------------------------------------
def save_tiny_model(model_dir: Path, poison: bool = False) -> Path:
    torch.manual_seed(0)
    model = models.build_model("mobilenet_v2", 2, models.WEIGHTS_NONE).eval()
    if poison:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    metadata = artifacts.ModelMetadata(
        arch="mobilenet_v2", class_names=["001.A", "002.B"], image_size=32,
        resize_size=data.resize_size_for(32), mean=list(data.IMAGENET_MEAN),
        std=list(data.IMAGENET_STD))
    artifacts.save_model_dir(model_dir, model, metadata)
    return model_dir


def tar_of(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def bad_archives(root: Path, valid_archive: Path) -> dict[str, tuple[Path, str]]:
    real = root / "real"
    artifacts.safe_extract(valid_archive, real)
    weights = (real / artifacts.WEIGHTS_FILE).read_bytes()
    metadata = json.loads((real / artifacts.METADATA_FILE).read_text())
    text = root / "notes.txt"
    text.write_text("just some text, not a model\n")
    return {
        "text file": (text, "not a readable tar archive"),
        "empty file": (root.joinpath("empty.tar.gz"), "not a readable tar archive"),
        "no model.json": (tar_of(root / "nojson.tar.gz", {"model.pt": weights}), "no model.json"),
        "model.json not JSON": (tar_of(root / "notjson.tar.gz", {"model.pt": weights,
                                                                  "model.json": b"{nope"}),
                                "not valid JSON"),
        "model.json missing a field": (tar_of(root / "field.tar.gz", {
            "model.pt": weights, "model.json": json.dumps({"arch": "resnet18"}).encode()}),
            "missing field"),
        "unknown arch": (tar_of(root / "arch.tar.gz", {"model.pt": weights, "model.json": json.dumps(
            {**metadata, "arch": "vgg16"}).encode()}), "unknown arch"),
        "weights of another model": (tar_of(root / "other.tar.gz", {"model.pt": weights,
            "model.json": json.dumps({**metadata, "class_names": ["a", "b", "c"]}).encode()}),
            "does not match"),
        "no weights": (tar_of(root / "noweights.tar.gz", {
            "model.json": json.dumps(metadata).encode()}), "no model.pt"),
        "NaN weights": (artifacts.pack(save_tiny_model(root / "nan", poison=True),
                                       root / "nan.tar.gz"), "NaN or infinite"),
        "tar-slip": (raw_archive(root / "slip.tar.gz", HOSTILE["tar-slip parent"]), "unsafe path"),
        "one byte flipped": (flipped(valid_archive, root / "flipped.tar.gz"), "checksum does not match"),
    }


def flipped(archive: Path, out: Path) -> Path:
    """``archive`` with one bit of one byte flipped mid-stream: it still inflates, into other
    weights; only gzip's CRC at the end of the stream tells (``gzip -t`` fails)."""
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    out.write_bytes(bytes(raw))
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        gzip.decompress(bytes(raw))
    return out


def test_a_flipped_byte_is_refused_not_unpacked(tmp_path: Path, valid_archive: Path) -> None:
    """tarfile stops at the tar end marker and never reached gzip's CRC: the archive unpacked
    (and served) with changed weights."""
    with pytest.raises(artifacts.ArtifactError, match="checksum does not match"):
        artifacts.safe_extract(flipped(valid_archive, tmp_path / "bad.tar.gz"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_data_after_the_tar_end_is_bounded(tmp_path: Path) -> None:
    """Reading to the end of the stream must not become a way round the unpacked-size limit."""
    archive = tmp_path / "padded.tar.gz"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        info = tarfile.TarInfo("model.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    archive.write_bytes(gzip.compress(tar_bytes.getvalue() + b"\0" * 200_000))
    with pytest.raises(artifacts.ArtifactError, match="more than the limit"):
        artifacts.safe_extract(archive, tmp_path / "out", max_bytes=50_000)
    assert artifacts.safe_extract(archive, tmp_path / "ok", max_bytes=1_000_000).is_dir()


def test_add_model_local_stores_only_loadable_archives(tmp_path: Path, valid_archive: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    work = tmp_path / "work"
    store = work / "models"
    for label, (archive, reason) in bad_archives(tmp_path, valid_archive).items():
        code = cli.main(["add-model", "bad", "--file", str(archive), "--local", "--workdir", str(work)])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, label
        assert reason in err and str(archive) in err, f"{label}: {err}"
        assert not store.exists() or list(store.rglob("*.tar.gz*")) == [], f"{label} was stored"
    code = cli.main(["add-model", "good", "--file", str(valid_archive), "--local", "--workdir", str(work)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["target_model"] == "good/model.tar.gz"


def test_validate_model_archive_returns_the_metadata(valid_archive: Path) -> None:
    metadata = artifacts.validate_model_archive(valid_archive)
    assert metadata.arch == "mobilenet_v2" and metadata.class_names == ["001.A", "002.B"]


def test_nan_weights_never_load_into_a_server(tmp_path: Path) -> None:
    """A model that would answer "probability": NaN is refused where every server loads it."""
    model_dir = save_tiny_model(tmp_path / "nan", poison=True)
    with pytest.raises(artifacts.ArtifactError, match="NaN or infinite"):
        artifacts.load_model(model_dir)
    shutil.rmtree(model_dir)
