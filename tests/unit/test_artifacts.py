"""model.tar.gz in and out: pack, safe_extract (tar-slip, links, devices, bombs) and load_model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from dogbreed import artifacts, data, models


def tiny_model_dir(root: Path, arch: str = "mobilenet_v2", classes: int = 3) -> Path:
    torch.manual_seed(0)
    model = models.build_model(arch, classes, models.WEIGHTS_NONE).eval()
    metadata = artifacts.ModelMetadata(
        arch=arch, class_names=[f"{i + 1:03d}.Breed_{i}" for i in range(classes)], image_size=32,
        resize_size=data.resize_size_for(32), mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD),
    )
    artifacts.save_model_dir(root, model, metadata)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("artifact") / "model")


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def assert_refused(archive: Path, dest: Path, match: str, **kwargs) -> None:
    with pytest.raises(artifacts.ArtifactError, match=match):
        artifacts.safe_extract(archive, dest, **kwargs)
    assert not dest.exists()
    assert [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")] == []


def test_pack_extract_load_round_trip(model_dir: Path, tmp_path: Path) -> None:
    archive = artifacts.pack(model_dir, tmp_path / "out" / artifacts.ARCHIVE_NAME)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [artifacts.METADATA_FILE, artifacts.WEIGHTS_FILE]  # flat
    unpacked = artifacts.safe_extract(archive, tmp_path / "unpacked")
    original, meta = artifacts.load_model(model_dir)
    loaded, meta2 = artifacts.load_model(unpacked)
    assert meta == meta2 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(original(x), loaded(x))


def test_extract_replaces_an_existing_destination(model_dir: Path, tmp_path: Path) -> None:
    archive = artifacts.pack(model_dir, tmp_path / artifacts.ARCHIVE_NAME)
    dest = tmp_path / "dest"
    (dest / "stale").mkdir(parents=True)
    artifacts.safe_extract(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == [artifacts.METADATA_FILE, artifacts.WEIGHTS_FILE]


def test_find_model_dir_accepts_one_wrapping_folder(model_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "wrapped.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname="model")
    unpacked = artifacts.safe_extract(archive, tmp_path / "x")
    assert artifacts.find_model_dir(unpacked) == unpacked / "model"
    artifacts.load_model(unpacked)


@pytest.mark.parametrize("name", ["../evil.txt", "model/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_paths_outside_the_destination_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [(member("model.json"), b"{}"), (member(name), b"x")])
    assert_refused(archive, tmp_path / "dest", "unsafe path")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind,link", [(tarfile.SYMTYPE, "/etc/passwd"), (tarfile.SYMTYPE, "model.json"),
                                       (tarfile.LNKTYPE, "model.json")])
def test_links_are_refused(tmp_path: Path, kind: bytes, link: str) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [(member("model.json"), b"{}"), (member("evil", kind, link), None)])
    assert_refused(archive, tmp_path / "dest", "link or device")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(tmp_path: Path, kind: bytes) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [(member("dev", kind), None)])
    assert_refused(archive, tmp_path / "dest", "link or device")


def test_size_bomb_is_refused_before_writing(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [(member(f"f{i}"), b"\0" * 4000) for i in range(3)])
    assert_refused(archive, tmp_path / "dest", "more than 10000 bytes", max_bytes=10_000)
    # A highly compressible member: the declared size counts, not the compressed one.
    archive = make_tar(tmp_path / "b.tar.gz", [(member("zeros"), b"\0" * 200_000)])
    assert archive.stat().st_size < 5_000
    assert_refused(archive, tmp_path / "dest", "more than", max_bytes=100_000)


@pytest.mark.parametrize("content", [b"not a tar at all", b"\x1f\x8b\x08\x00garbage"])
def test_unreadable_archives_are_refused(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(content)
    assert_refused(archive, tmp_path / "dest", "not a readable tar archive")


def test_truncated_archive_is_refused(model_dir: Path, tmp_path: Path) -> None:
    archive = artifacts.pack(model_dir, tmp_path / artifacts.ARCHIVE_NAME)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert_refused(archive, tmp_path / "dest", "corrupt archive|cannot unpack")


def test_pack_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / artifacts.METADATA_FILE).write_text("{}")
    with pytest.raises(artifacts.ArtifactError, match="model.pt is missing"):
        artifacts.pack(tmp_path / "m", tmp_path / "out.tar.gz")


def _broken_copy(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    target.mkdir()
    for path in model_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("breakage,match", [
    ("no-json", "no model.json in"),
    ("bad-json", "not valid JSON"),
    ("missing-field", "missing field 'class_names'"),
    ("unknown-arch", "unknown arch"),
    ("no-weights", "has no model.pt"),
    ("corrupt-weights", "cannot load state_dict"),
    ("wrong-classes", "does not match mobilenet_v2 with 4 classes"),
])
def test_load_model_explains_a_bad_artifact(model_dir: Path, tmp_path: Path, breakage: str, match: str) -> None:
    broken = _broken_copy(model_dir, tmp_path)
    meta_file, weights = broken / artifacts.METADATA_FILE, broken / artifacts.WEIGHTS_FILE
    meta = json.loads(meta_file.read_text())
    if breakage == "no-json":
        meta_file.unlink()
    elif breakage == "bad-json":
        meta_file.write_text("{nope")
    elif breakage == "missing-field":
        meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "class_names"}))
    elif breakage == "unknown-arch":
        meta_file.write_text(json.dumps({**meta, "arch": "vgg99"}))
    elif breakage == "no-weights":
        weights.unlink()
    elif breakage == "corrupt-weights":
        weights.write_bytes(b"\0" * 100)
    elif breakage == "wrong-classes":
        meta_file.write_text(json.dumps({**meta, "class_names": [*meta["class_names"], "004.Extra"]}))
    with pytest.raises(artifacts.ArtifactError, match=match):
        artifacts.load_model(broken)


def test_weights_load_without_pickle(model_dir: Path, tmp_path: Path) -> None:
    """model.pt holding a pickled object (not tensors) is refused by weights_only loading."""
    broken = _broken_copy(model_dir, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, broken / artifacts.WEIGHTS_FILE)
    with pytest.raises(artifacts.ArtifactError, match="cannot load state_dict"):
        artifacts.load_model(broken)


def test_artifacts_are_readable_by_another_user(model_dir: Path, tmp_path: Path) -> None:
    """Training runs as root, the serve image as a non-root user: no 0600 files, no 0700 dirs."""
    import stat

    for name in (artifacts.WEIGHTS_FILE, artifacts.METADATA_FILE):
        assert stat.S_IMODE((model_dir / name).stat().st_mode) == 0o644
    archive = artifacts.pack(model_dir, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        assert {m.mode for m in tar.getmembers()} == {0o644}
    (model_dir / artifacts.WEIGHTS_FILE).chmod(0o600)
    destination = artifacts.safe_extract(artifacts.pack(model_dir, tmp_path / "m2.tar.gz"), tmp_path / "out")
    assert stat.S_IMODE(destination.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in destination.iterdir()} == {0o644}


def test_extraction_without_tarfile_filters(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Debian bookworm's Python 3.11.2 has no extraction filters: the member checks still hold."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = artifacts.pack(model_dir, tmp_path / "model.tar.gz")
    out = artifacts.safe_extract(archive, tmp_path / "out")
    assert (out / artifacts.WEIGHTS_FILE).is_file()
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(artifacts.ArtifactError, match="unsafe path"):
        artifacts.safe_extract(evil, tmp_path / "out2")


def test_resolve_model_dir_uses_dirs_and_unpacks_archives_once(model_dir: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    assert artifacts.resolve_model_dir(model_dir, staging) == (model_dir, None)  # as SageMaker hands it
    archive = artifacts.pack(model_dir, tmp_path / "store" / artifacts.ARCHIVE_NAME)
    for source in (archive, archive.parent):  # the file, or a dir holding only it
        found, unpacked = artifacts.resolve_model_dir(source, staging, "a/b")
        assert unpacked is not None and unpacked.parent == staging and found == unpacked
        assert (found / artifacts.METADATA_FILE).read_bytes() == (model_dir / artifacts.METADATA_FILE).read_bytes()
    assert len(list(staging.iterdir())) == 2  # one folder per resolve, for its caller to remove
    with pytest.raises(FileNotFoundError):
        artifacts.resolve_model_dir(tmp_path / "missing", staging)
    (tmp_path / "empty").mkdir()
    with pytest.raises(artifacts.ArtifactError, match="neither model.json nor model.tar.gz"):
        artifacts.resolve_model_dir(tmp_path / "empty", staging)
    (tmp_path / "fake.tar.gz").write_bytes(b"plain text")
    with pytest.raises(artifacts.ArtifactError, match="not a tar archive"):
        artifacts.resolve_model_dir(tmp_path / "fake.tar.gz", staging)
    assert len(list(staging.iterdir())) == 2  # a refused source leaves nothing behind


def test_breed_name():
    assert artifacts.breed_name("016.Beagle") == "Beagle"
    assert artifacts.breed_name("Labrador_retriever") == "Labrador_retriever"
