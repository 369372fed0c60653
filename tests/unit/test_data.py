import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from dogbreed import data


def test_index_uses_sorted_class_folders(sample_data: Path):
    index = data.index_split(sample_data / "train")
    assert index.class_names == sorted(index.class_names)
    assert index.class_names[0] == "001.Beagle" and len(index.class_names) == 5
    assert len(index) == 80 and sorted(set(index.labels)) == [0, 1, 2, 3, 4]
    valid = data.index_split(sample_data / "valid", index.class_names)
    assert valid.class_names == index.class_names and len(valid) == 20


def test_a_corrupt_multi_frame_tiff_is_refused_not_a_crash():
    """Found by tests/reliability/test_input_fn_properties.py: a 1x1 palette TIFF with one bit
    flipped; counting its frames made PIL raise TypeError ("Missing dimensions"), which a server
    would have answered with a 500."""
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="TIFF")
    body = bytearray(buffer.getvalue())
    body[130] ^= 1
    with pytest.raises(data.ImageRejected) as refused:
        data.check_image_header(bytes(body), data.DEFAULT_MAX_IMAGE_PIXELS)
    assert refused.value.status == 415 and "TIFF" in str(refused.value)


def test_empty_class_folder_and_unknown_class_fail(sample_copy: Path):
    (sample_copy / "train" / "006.Empty_breed").mkdir()
    with pytest.raises(data.DataError, match="006.Empty_breed holds no"):
        data.index_split(sample_copy / "train")
    (sample_copy / "valid" / "007.Stray").mkdir()
    classes = [p.name for p in sorted((sample_copy / "train").iterdir()) if p.name != "006.Empty_breed"]
    with pytest.raises(data.DataError, match="not among the training classes"):
        data.index_split(sample_copy / "valid", classes)


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (200, 30, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "L")])
def test_decode_image_gives_rgb_square(fmt: str, mode: str):
    image = data.decode_image(_encoded((500, 375), fmt, mode), 74)
    assert image.shape == (3, 74, 74) and image.dtype == torch.uint8


def test_decode_rejects_empty_and_garbage():
    with pytest.raises(ValueError):
        data.decode_image(b"", 64)
    with pytest.raises(RuntimeError):
        data.decode_image(b"definitely not an image", 64)


def test_decode_split_skips_and_counts_corrupt_files(sample_copy: Path):
    victim = next((sample_copy / "train" / "001.Beagle").iterdir())
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    (sample_copy / "train" / "001.Beagle" / "junk.jpg").write_bytes(b"not a jpeg")
    index = data.index_split(sample_copy / "train")
    split = data.decode_split(index, 40, torch.device("cpu"), num_workers=2)
    assert split.skipped >= 1 and len(split) == len(index) - split.skipped
    assert split.images.shape[1:] == (3, 40, 40)


def test_all_corrupt_split_fails(sample_copy: Path):
    for path in (sample_copy / "train").rglob("*.jpg"):
        path.write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="none of the 80 images"):
        data.decode_split(data.index_split(sample_copy / "train"), 40, torch.device("cpu"))


def test_eval_transform_is_centre_crop_and_normalise():
    batch = torch.randint(0, 256, (2, 3, 74, 74), dtype=torch.uint8)
    out = data.eval_transform(batch, 64)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    expected = (batch[:, :, 5:69, 5:69].float() / 255 - torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert data.eval_transform(batch[0], 64).shape == (1, 3, 64, 64)


def test_random_resized_crop_flip_random_crops_are_seeded_and_varied():
    batch = torch.randint(0, 256, (8, 3, 74, 74), dtype=torch.uint8)
    a = data.normalize(data.random_resized_crop_flip(batch, 64, torch.Generator().manual_seed(1)), data.IMAGENET_MEAN, data.IMAGENET_STD)
    b = data.normalize(data.random_resized_crop_flip(batch, 64, torch.Generator().manual_seed(1)), data.IMAGENET_MEAN, data.IMAGENET_STD)
    c = data.normalize(data.random_resized_crop_flip(batch, 64, torch.Generator().manual_seed(2)), data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert a.shape == (8, 3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Values stay within the normalised range of real pixels (reflection padding adds none).
    low = (0 - max(data.IMAGENET_MEAN)) / min(data.IMAGENET_STD)
    high = (1 - min(data.IMAGENET_MEAN)) / min(data.IMAGENET_STD)
    assert a.min() >= low - 1e-4 and a.max() <= high + 1e-4


def test_random_resized_crop_flip_full_crop_without_flip_is_identity_resample():
    # With scale (1,1), ratio (1,1) and no flip the affine map is the identity.
    batch = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    original = (data.CROP_SCALE, data.CROP_RATIO)
    try:
        data.CROP_SCALE, data.CROP_RATIO = (1.0, 1.0), (1.0, 1.0)
        # random_resized_crop_flip draws 5 numbers per sample; the 5th < 0.5 means "flip": avoid it.
        seed = next(s for s in range(100) if torch.rand(1, 5, generator=torch.Generator().manual_seed(s))[0, 4] >= 0.5)
        gen = torch.Generator().manual_seed(seed)
        out = data.normalize(data.random_resized_crop_flip(batch, 32, gen), data.IMAGENET_MEAN, data.IMAGENET_STD)
    finally:
        data.CROP_SCALE, data.CROP_RATIO = original
    assert torch.allclose(out, data.eval_transform(batch, 32), atol=1e-4)


def test_resize_size_matches_imagenet_ratio():
    assert data.resize_size_for(224) == 256
    assert data.resize_size_for(64) == 74


def test_batched_jpeg_decode_matches_single_decode_and_falls_back(sample_copy: Path):
    """The nvJPEG code path, run on the CPU: same pixels as decode_image, PNG and bad files handled."""
    files = sorted((sample_copy / "train" / "001.Beagle").iterdir())[:5]
    png = files[0].with_suffix(".png")
    Image.open(files[0]).save(png)
    bad = files[1].parent / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    batch = [*files, png, bad]
    decoded = data.decode_jpeg_batches(batch, 74, torch.device("cpu"), batch=3)
    assert decoded[-1] is None
    for path, image in zip(batch[:-1], decoded[:-1]):
        assert torch.equal(image, data.decode_image(path.read_bytes(), 74)), path.name


def test_host_memory_cache(sample_data: Path):
    index = data.index_split(sample_data / "valid")
    split = data.decode_split(index, 40, torch.device("cpu"), keep_on_device=False)
    assert split.device.type == "cpu" and len(split) == 20


def test_decode_cache_decodes_once(sample_data: Path, monkeypatch):
    calls = []
    real = data.decode_split
    monkeypatch.setattr(data, "decode_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = data.DecodeCache()
    index = data.index_split(sample_data / "valid")
    first = cache.get(index, 40, torch.device("cpu"))
    assert cache.get(index, 40, torch.device("cpu")) is first
    cache.get(index, 48, torch.device("cpu"))
    assert len(calls) == 2


def _png_16bit(path: Path, size: tuple[int, int] = (50, 37)) -> Path:
    """A grayscale 16-bit PNG (PIL mode ``I;16``): decode_image gives uint16 pixels for it."""
    import numpy as np

    pixels = (np.arange(size[0] * size[1], dtype=np.uint32).reshape(size[1], size[0]) * 37 % 65536)
    Image.fromarray(pixels.astype(np.uint16)).save(path, format="PNG")
    return path


def _animated_gif(path: Path, size: tuple[int, int] = (50, 37)) -> Path:
    """A 2-frame GIF (saved under any name, e.g. x.jpg): decode_image gives [2, 3, S, S]."""
    first, second = Image.new("RGB", size, (200, 30, 60)), Image.new("RGB", size, (30, 200, 60))
    first.save(path, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return path


def test_16bit_png_and_animated_gif_are_skipped_named_and_counted(sample_copy: Path, caplog):
    """One such file in train/ used to end the job at torch.stack ("Promotion for uint16 ... not
    supported", "stack expects each tensor to be equal size") without naming it."""
    folder = sample_copy / "train" / "001.Beagle"
    deep = _png_16bit(folder / "deep.png")
    gif = _animated_gif(folder / "moving.jpg")
    assert data.decode_image(deep.read_bytes(), 40).dtype == torch.uint16  # what the check is for
    assert data.decode_image(gif.read_bytes(), 40).shape == (2, 3, 40, 40)
    index = data.index_split(sample_copy / "train")
    caplog.set_level("WARNING", logger=data.__name__)
    split = data.decode_split(index, 40, torch.device("cpu"), num_workers=2)
    assert split.skipped == 2 and len(split) == len(index) - 2
    assert split.images.shape[1:] == (3, 40, 40) and split.images.dtype == torch.uint8
    skips = [r.getMessage() for r in caplog.records if "event=skip_image" in r.getMessage()]
    assert any(str(deep) in m and "16-bit images are not supported" in m for m in skips), skips
    assert any(str(gif) in m and "animated/multi-frame image" in m for m in skips), skips


def test_batched_jpeg_decode_skips_16bit_and_animated_files(sample_copy: Path):
    """The nvJPEG path (run on the CPU): a GIF named .jpg fails the batch decoder, so its
    fallback (decode_image one by one) must refuse it too, like a 16-bit PNG."""
    folder = sample_copy / "train" / "001.Beagle"
    files = sorted(folder.iterdir())[:3]
    batch = [*files, _png_16bit(folder / "deep.png"), _animated_gif(folder / "moving.jpg")]
    decoded = data.decode_jpeg_batches(batch, 40, torch.device("cpu"), batch=4)
    assert decoded[-2:] == [None, None]
    assert all(image is not None and image.shape == (3, 40, 40) for image in decoded[:-2])


def test_class_of_only_16bit_images_fails_naming_it(sample_copy: Path):
    folder = sample_copy / "train" / "004.Labrador_retriever"
    images = sorted(folder.iterdir())
    for image in images:
        image.unlink()
        _png_16bit(image.with_suffix(".png"))
    with pytest.raises(data.DataError, match=f"no decodable image.*{folder.name} \\(0 of {len(images)}\\)"):
        data.decode_split(data.index_split(sample_copy / "train"), 40, torch.device("cpu"), num_workers=1)
