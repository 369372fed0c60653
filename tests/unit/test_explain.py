"""Grad-CAM through Captum on both architectures, and the overlay PNGs of `dogbreed explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dogbreed import artifacts, data, explain, models
from dogbreed.launcher import cli

CLASSES = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]


def _model_dir(tmp_path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    model = models.build_model(arch, len(CLASSES))
    metadata = artifacts.ModelMetadata(arch=arch, class_names=CLASSES, image_size=64,
                                       resize_size=73, mean=list(data.IMAGENET_MEAN),
                                       std=list(data.IMAGENET_STD))
    model_dir = tmp_path / arch
    artifacts.save_model_dir(model_dir, model, metadata)
    return model_dir


def _photo(path: Path) -> Path:
    """A dog-free but structured image: a bright disc off-centre on a gradient."""
    y, x = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    disc = ((x - 40) ** 2 + (y - 50) ** 2 < 400).to(torch.uint8) * 200
    image = torch.stack([disc + x.to(torch.uint8) // 3, y.to(torch.uint8), 255 - disc])
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_heatmap_shape_range_and_it_depends_on_the_target_class(tmp_path, arch):
    model, metadata = artifacts.load_model(_model_dir(tmp_path, arch))
    pixels = data.decode_image(_photo(tmp_path / "p.png").read_bytes(), metadata.resize_size)
    inputs = data.eval_transform(pixels, metadata.image_size, metadata.mean, metadata.std)
    maps = explain.explain(model, inputs, [0, 1, 2], arch)
    assert maps.shape == (3, 64, 64)
    assert maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert float(maps.amax()) == pytest.approx(1.0)  # each non-empty map is scaled to peak 1
    # Different classes, different evidence: the maps are not the same picture.
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)
    assert not torch.allclose(maps[1], maps[2], atol=1e-3)
    # One target or a list; [1,3,H,W] or [3,H,W]: the same map for the same class.
    assert torch.allclose(explain.explain(model, inputs[0], 1, arch)[0], maps[1], atol=1e-5)


def test_explain_cli_writes_overlay_pngs_with_top_k_from_a_model_tar_gz(tmp_path, capsys):
    archive = artifacts.pack(_model_dir(tmp_path, "resnet18"), tmp_path / "model.tar.gz")
    images = [_photo(tmp_path / "a.png"), _photo(tmp_path / "b.jpg")]
    out = tmp_path / "out"
    assert cli.main(["explain", str(archive), *map(str, images), "--top-k", "2",
                     "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["overlay"]).name for r in results] == ["a.gradcam.png", "b.gradcam.png"]
    for result in results:
        assert len(result["predictions"]) == 2
        assert result["predictions"][0]["probability"] >= result["predictions"][1]["probability"]
        with Image.open(result["overlay"]) as png:
            assert png.format == "PNG"
            assert png.size[0] > 2 * png.size[1]  # photo + two overlays side by side
            colours = len(png.convert("RGB").getcolors(1 << 20) or [])
            assert colours > 1000  # a rendered heat map, not a blank canvas


def test_target_layer_is_the_last_stage_unless_the_input_is_too_small():
    resnet = models.build_model("resnet18", 3)
    mobilenet = models.build_model("mobilenet_v2", 3)
    assert explain.target_layer(resnet, "resnet18", 224) is resnet.layer4
    assert explain.target_layer(resnet, "resnet18", 64) is resnet.layer3
    assert explain.target_layer(mobilenet, "mobilenet_v2", 224) is mobilenet.features[-1]
    assert explain.target_layer(mobilenet, "mobilenet_v2", 64) is mobilenet.features[13]
    with torch.no_grad():  # features[13] really is the last stride-16 block
        out = mobilenet.features[:14](torch.zeros(1, 3, 64, 64))
    assert out.shape[-1] == 4


def test_overlay_png_is_a_png_of_the_image_size():
    png = explain.overlay_png(torch.zeros(3, 40, 50, dtype=torch.uint8), torch.rand(40, 50))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_image_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert cli.main(["explain", str(_model_dir(tmp_path, "resnet18")), str(bad),
                     "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "not a readable image" in capsys.readouterr().err


def test_a_16_bit_png_is_refused_not_explained_at_257_times_the_scale(tmp_path, capsys):
    from PIL import Image

    deep = tmp_path / "deep.png"
    Image.new("I;16", (40, 30), 40_000).save(deep)
    assert cli.main(["explain", str(_model_dir(tmp_path, "resnet18")), str(deep),
                     "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "16-bit images are not supported" in capsys.readouterr().err


def test_images_sharing_a_file_name_get_their_own_overlays(tmp_path, capsys):
    """`explain M ca/x.jpg cb/x.jpg` wrote one x.gradcam.png and listed it for both images."""
    model_dir = _model_dir(tmp_path, "resnet18")
    (tmp_path / "ca").mkdir()
    (tmp_path / "cb").mkdir()
    first = _photo(tmp_path / "ca" / "x.jpg")
    second = tmp_path / "cb" / "x.jpg"
    Image.open(first).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)  # another photo
    third = _photo(tmp_path / "cb" / "x.png")  # same stem, other extension
    out = tmp_path / "out"
    assert cli.main(["explain", str(model_dir), str(first), str(second), str(third),
                     "--top-k", "1", "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(first), str(second), str(third)]
    assert [Path(r["overlay"]).name for r in results] == [
        "x.gradcam.png", "x-2.gradcam.png", "x-3.gradcam.png"]
    assert sorted(p.name for p in out.glob("*.png")) == [
        "x-2.gradcam.png", "x-3.gradcam.png", "x.gradcam.png"]
    assert json.loads((out / "explanations.json").read_text()) == results
    assert (out / "x.gradcam.png").read_bytes() != (out / "x-2.gradcam.png").read_bytes()


def test_overlay_names_are_unique_and_deterministic():
    names = explain.overlay_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("x-2.jpg"), Path("y.jpg")])
    assert names == ["x.gradcam.png", "x-2.gradcam.png", "x-2-2.gradcam.png", "y.gradcam.png"]
    assert explain.overlay_names([Path("a/x.jpg"), Path("b/x.jpg")]) == names[:2]


@pytest.mark.parametrize("size", [(200_000, 1), (1, 200_000), (8_000, 6_000)])
def test_images_serving_refuses_are_refused_from_the_header_before_any_decode(tmp_path, capsys,
                                                                               monkeypatch, size):
    """A 274-byte 200000x1 PNG ran 26 s at 4.9 GB and exited 0 (serving: 413 in 10 ms): explain
    applies serving's header check (data.check_image_header) to every image first."""
    wide = tmp_path / "wide.png"
    Image.new("L", size).save(wide, optimize=True)
    photo = _photo(tmp_path / "dog.jpg")
    model_dir = _model_dir(tmp_path, "resnet18")
    decoded = []
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    out = tmp_path / "o"
    assert cli.main(["explain", str(model_dir), str(photo), str(wide), "--out", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{wide}: image is {size[0]}x{size[1]} pixels" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not decoded and not list(out.glob("*.png")), "nothing is decoded or written"


def test_explain_honours_servings_pixel_limit_setting(tmp_path, capsys, monkeypatch):
    photo = _photo(tmp_path / "dog.jpg")
    with Image.open(photo) as opened:
        width, height = opened.size
    monkeypatch.setenv("DOGBREED_MAX_IMAGE_PIXELS", str(width * height - 1))
    assert cli.main(["explain", str(_model_dir(tmp_path, "resnet18")), str(photo),
                     "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert f"more than the {width * height - 1} pixels" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["/proc/dogbreed-explain", "a-file"])
def test_an_output_folder_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("taken")
    target = out if out.startswith("/") else str(tmp_path / out)
    assert cli.main(["explain", str(_model_dir(tmp_path, "resnet18")), str(_photo(tmp_path / "dog.jpg")),
                     "--out", target]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"cannot create the output folder {target}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
