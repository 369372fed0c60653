"""Dataset discovery, decode-once image cache and on-device augmentation.

Every image is decoded and resized once into a fixed ``cache_size`` square of uint8 pixels
(on the GPU when it fits), so JPEG decode is paid once per run instead of once per epoch.
Training augmentation (random resized crop + flip + normalise) and the evaluation transform
(centre crop + normalise) then run batched on the device. Serving uses the same
:func:`decode_image` and :func:`eval_transform`, so a served prediction sees exactly the pixels
an evaluation batch saw.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random-resized-crop bounds (torchvision's reference recipe uses scale 0.08; with the image
# already centre-cropped to a square cache, 0.25 keeps most of the dog in view).
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class DataError(ValueError):
    """The data on disk cannot be used (missing/empty split or class, nothing decodable)."""


def resize_size_for(image_size: int) -> int:
    """Short side images are resized to before the centre crop (256 for 224, as ImageNet)."""
    return int(math.ceil(image_size * 256 / 224))


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    root: Path
    class_names: list[str]
    files: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


def index_split(root: Path, class_names: Sequence[str] | None = None) -> SplitIndex:
    """List ``root/<class>/*.jpg|png``. Without ``class_names`` the sorted folders define them.

    With ``class_names`` (valid/test use train's), a folder absent from train is an error, since
    the model has no output for it.
    """
    if not root.is_dir():
        raise DataError(f"data split folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data split {root} has no class folders (expected NNN.Breed_name/)")
    names = [p.name for p in folders] if class_names is None else list(class_names)
    positions = {name: i for i, name in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in positions:
            raise DataError(f"class folder {folder} is not among the training classes")
        images = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images and class_names is None:
            raise DataError(f"class folder {folder} holds no .jpg/.jpeg/.png images")
        files.extend(images)
        labels.extend([positions[folder.name]] * len(images))
    if not files:
        raise DataError(f"data split {root} holds no images")
    return SplitIndex(root=root, class_names=names, files=files, labels=labels)


# --- decoding ----------------------------------------------------------------------------------
def decode_image(data: bytes | torch.Tensor, cache_size: int) -> torch.Tensor:
    """Decode JPEG/PNG bytes to a ``uint8[3, cache_size, cache_size]`` tensor (RGB).

    Short side resized to ``cache_size`` (antialiased), then centre-cropped to a square. Raises
    ``ValueError``/``RuntimeError`` for undecodable input.
    """
    raw = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if raw.numel() == 0:
        raise ValueError("empty image")
    if raw.numel() >= len(PNG_SIGNATURE) and bytes(raw[:len(PNG_SIGNATURE)].tolist()) == PNG_SIGNATURE:
        check_png(raw.numpy().tobytes())
    image = torchvision.io.decode_image(
        raw, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True
    )
    return resize_and_crop(image, cache_size)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- limits read from an image's header, before anything is decoded ------------------------------
# One check for every path that decodes an image it was given (serving answers 413/415/400,
# `dogbreed explain` refuses the file): a 274-byte 200000x1 PNG passes a pixel count alone, and its
# short-side resize (to 1 x 292 -> 58 M x 292 pixels) allocates gigabytes for seconds.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000; a 224 px model needs far less
MAX_IMAGE_SIDE = 16_384  # each side
MAX_ASPECT_RATIO = 100  # the long side over the short one
IMAGE_FORMATS = frozenset({"JPEG", "PNG"})


class ImageRejected(ValueError):
    """An image refused before decoding; ``status`` is serving's HTTP answer (400, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resized_pixels(size: tuple[int, int], resize_size: int) -> int:
    """Pixels the short-side resize to ``resize_size`` allocates (what the aspect ratio bounds)."""
    short, long = sorted(size)
    return resize_size * -(-long * resize_size // short)


# A PNG's bit depth per channel: the IHDR byte after the signature, chunk length, type, width
# and height (PNG spec 11.2.2); PIL opened only when the IHDR is there.
PNG_BIT_DEPTH_OFFSET = 24


def check_image_header(image: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       resize_size: int | None = None) -> tuple[str, tuple[int, int]]:
    """``(format, (width, height))`` from the header alone (PIL opens lazily), or
    :class:`ImageRejected`: not JPEG/PNG, a 16-bit or multi-frame (APNG) PNG (415, as training
    refuses them), more than ``max_pixels`` or :data:`MAX_IMAGE_SIDE` per
    side, an aspect ratio over :data:`MAX_ASPECT_RATIO`, or (given ``resize_size``) a short-side
    resize to it over ``max_pixels``."""
    if not image:
        raise ImageRejected(400, "empty image: send a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as opened:  # lazy: parses the header only
                fmt, size = opened.format, opened.size
                # APNG: from its acTL chunk, before any IDAT. Other formats are refused below
                # unread: counting a TIFF's frames parses every IFD (a corrupt one: TypeError).
                frames = getattr(opened, "n_frames", 1) if fmt == "PNG" else 1
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(413, f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, EOFError):
        raise ImageRejected(400, "not a readable image (JPEG or PNG expected)") from None
    if fmt not in IMAGE_FORMATS:
        raise ImageRejected(415, f"image format {fmt} is not supported; send JPEG or PNG")
    if fmt == "PNG" and image[PNG_BIT_DEPTH_OFFSET] > 8:
        # A 4000x4000 16-bit PNG took 275 MB to decode before being refused after decoding.
        raise ImageRejected(415, f"16-bit images are not supported (PNG bit depth {image[PNG_BIT_DEPTH_OFFSET]}): "
                                 "the model trains on 8 bits per channel")
    if frames > 1:
        raise ImageRejected(415, f"animated/multi-frame image ({frames} frames) is not supported")
    width, height = size
    if width < 1 or height < 1:
        raise ImageRejected(400, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels or max(width, height) > MAX_IMAGE_SIDE:
        raise ImageRejected(413, f"image is {width}x{height} pixels, more than the {max_pixels} pixels "
                                 f"or {MAX_IMAGE_SIDE} per side allowed")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(413, f"image is {width}x{height} pixels: an aspect ratio over "
                                 f"{MAX_ASPECT_RATIO}:1 is not supported")
    if resize_size is not None and resized_pixels(size, resize_size) > max_pixels:
        raise ImageRejected(413, f"image is {width}x{height} pixels: resized to {resize_size} on its "
                                 f"short side it would be over the {max_pixels} pixels allowed")
    return fmt, size


def check_png(data: bytes) -> None:
    """Read a PNG fully with PIL first: ``ValueError`` if it is corrupt.

    libpng under ``torchvision.io.decode_png`` ends the whole process on some corrupt streams
    instead of raising (an IDAT whose zlib header is wrong: "libpng error: IDAT: incorrect header
    check", then exit; found by the generated live-server tests: it killed a model
    worker), or on a chunk whose CRC is wrong ("libpng error: IDAT: CRC error", then a segfault;
    found by the same tests: PIL's ``load`` skips IDAT's CRC, its ``verify`` checks
    every chunk's). PIL raises for these files. Costs one extra decode per PNG; JPEGs are not
    affected.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # every chunk's CRC
        with Image.open(io.BytesIO(data)) as image:  # verify leaves the image unusable: reopen
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a corrupt file
        raise ValueError(f"corrupt PNG: {type(exc).__name__}: {exc}") from None


def resize_and_crop(image: torch.Tensor, cache_size: int) -> torch.Tensor:
    image = TF.resize(image, [cache_size], antialias=True)
    return TF.center_crop(image, [cache_size, cache_size])


def check_decoded(image: torch.Tensor) -> torch.Tensor:
    """``image`` if it is what :func:`decode_image` promises (``uint8[3, S, S]``), else
    ``ValueError`` saying why. :func:`decode_image` gives ``uint16`` for a 16-bit PNG and
    ``[frames, 3, S, S]`` for an animated GIF (whatever its file name): one such file used to
    reach ``torch.stack`` and end the job with a message naming no file. (Serving refuses both
    itself, with 415: 16-bit after decoding, GIF from the header.)"""
    if image.dtype != torch.uint8:
        raise ValueError(f"16-bit images are not supported ({image.dtype}): the model trains on 8 bits per channel")
    if image.dim() != 3:
        raise ValueError(f"animated/multi-frame image ({image.shape[0]} frames) is not supported")
    return image


def _decode_file(path: Path, cache_size: int) -> torch.Tensor | None:
    try:
        return check_decoded(decode_image(torchvision.io.read_file(str(path)), cache_size))
    except (RuntimeError, ValueError, OSError) as exc:
        log.warning("event=skip_image path=%s reason=%s", path, str(exc).splitlines()[0][:200])
        return None


EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(jpeg: torch.Tensor) -> int:
    """The EXIF orientation (1-8) in a JPEG's header, 1 when there is none (PIL reads the
    header only)."""
    try:
        with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
            value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1
    return value if 1 <= value <= 8 else 1


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a ``[C, H, W]`` image the way EXIF ``orientation`` says, as
    ``decode_image(apply_exif_orientation=True)`` does (nvJPEG's batch decoder ignores EXIF)."""
    flip_w, flip_h, transpose = {1: (0, 0, 0), 2: (1, 0, 0), 3: (1, 1, 0), 4: (0, 1, 0),
                                 5: (0, 0, 1), 6: (1, 0, 1), 7: (1, 1, 1), 8: (0, 1, 1)}[orientation]
    if transpose:
        image = image.transpose(-2, -1)
    dims = [d for d, on in ((-1, flip_w), (-2, flip_h)) if on]
    return image.flip(dims) if dims else image


def decode_jpeg_batches(files: Sequence[Path], cache_size: int, device: torch.device,
                        batch: int = 256) -> list[torch.Tensor | None]:
    """Batched JPEG decode on ``device`` (nvJPEG on CUDA); PNGs and anything the batch decoder
    refuses go through :func:`decode_image` one by one. ``None`` marks an undecodable file.
    EXIF orientation is applied as :func:`decode_image` applies it: train pixels = serve pixels."""
    results: list[torch.Tensor | None] = [None] * len(files)
    for start in range(0, len(files), batch):
        chunk = list(range(start, min(start + batch, len(files))))
        jpeg_positions, jpeg_data = [], []
        for i in chunk:
            if files[i].suffix.lower() in (".jpg", ".jpeg"):
                try:
                    jpeg_data.append(torchvision.io.read_file(str(files[i])))
                    jpeg_positions.append(i)
                except (RuntimeError, OSError):
                    pass
        decoded: list[torch.Tensor] | None = None
        if jpeg_data:
            try:
                decoded = torchvision.io.decode_jpeg(
                    jpeg_data, mode=torchvision.io.ImageReadMode.RGB, device=device
                )
            except RuntimeError:
                decoded = None  # one bad file fails the whole batch: redo those on the CPU
        if decoded is not None:
            for i, data, image in zip(jpeg_positions, jpeg_data, decoded):
                results[i] = resize_and_crop(apply_exif_orientation(image, exif_orientation(data)), cache_size)
        for i in chunk:
            if results[i] is None:
                cpu = _decode_file(files[i], cache_size)
                results[i] = None if cpu is None else cpu.to(device)
    return results


@dataclasses.dataclass
class DecodedSplit:
    """A split decoded once: ``images uint8[N,3,S,S]`` and ``labels int64[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    skipped: int

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def device(self) -> torch.device:
        return self.images.device


def decode_split(
    index: SplitIndex,
    cache_size: int,
    device: torch.device,
    num_workers: int = 0,
    keep_on_device: bool = True,
) -> DecodedSplit:
    """Decode every file of ``index`` once. Unreadable files are skipped, counted and logged.

    On CUDA, JPEGs go through nvJPEG; otherwise ``num_workers`` threads decode on the CPU
    (torchvision's decoders release the GIL). With ``keep_on_device=False`` the cache stays in
    pinned host memory and batches are copied to the device as they are used.
    """
    workers = num_workers or min(32, os.cpu_count() or 1)
    if device.type == "cuda":
        decoded = decode_jpeg_batches(index.files, cache_size, device)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda p: _decode_file(p, cache_size), index.files))
    kept = [(img, label) for img, label in zip(decoded, index.labels) if img is not None]
    skipped = len(index.files) - len(kept)
    if not kept:
        raise DataError(f"none of the {len(index.files)} images in {index.root} could be decoded")
    # A class whose every image fails to decode would train (or be scored) as if it did not
    # exist, and the run would still exit 0: refuse it by name.
    listed = collections.Counter(index.labels)
    decodable = collections.Counter(label for _, label in kept)
    dead = [f"{index.class_names[c]} (0 of {listed[c]})" for c in sorted(listed) if not decodable[c]]
    if dead:
        raise DataError(f"no decodable image in class folder(s) {', '.join(dead)} under "
                        f"{index.root}: fix or remove those files")
    if skipped:
        log.warning("event=skipped_images split=%s skipped=%d kept=%d", index.root, skipped, len(kept))
    target = device if keep_on_device else torch.device("cpu")
    images = torch.stack([img.to(target) for img, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64, device=target)
    if not keep_on_device and device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return DecodedSplit(images=images, labels=labels, class_names=index.class_names, skipped=skipped)


class DecodeCache:
    """Decoded splits kept for the life of a process, so HPO trials run back to back in one
    process (or a benchmark's runs) pay for JPEG decode once."""

    def __init__(self) -> None:
        self._splits: dict[tuple, DecodedSplit] = {}

    def get(self, index: SplitIndex, cache_size: int, device: torch.device, num_workers: int = 0,
            keep_on_device: bool = True) -> DecodedSplit:
        # Resolved: each trial sees the same data through its own /opt/ml channel link.
        key = (str(index.root.resolve()), tuple(index.class_names), len(index), cache_size,
               str(device), keep_on_device)
        if key not in self._splits:
            self._splits[key] = decode_split(index, cache_size, device, num_workers, keep_on_device)
        return self._splits[key]

    def clear(self) -> None:
        self._splits.clear()


def fits_on_device(num_images: int, cache_size: int, device: torch.device, fraction: float = 0.5) -> bool:
    """Whether a uint8 cache of ``num_images`` fits in ``fraction`` of the device's free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return num_images * 3 * cache_size * cache_size <= free * fraction


# --- transforms on batches -------------------------------------------------------------------
def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0,255] float ``[N,3,H,W]`` → normalised float32."""
    mean_t = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (batch.float() - mean_t) / std_t


def eval_geometry(image_size: int, eval_image_size: int = 0) -> tuple[int, int]:
    """(crop, resize) sizes evaluation and serving use: ``eval_image_size`` when set (FixRes:
    evaluating above the training crop undoes the apparent zoom of random resized crops),
    else the training crop; the resize keeps ImageNet's 256/224 ratio."""
    crop = eval_image_size or image_size
    return crop, resize_size_for(crop)


def eval_transform(
    batch: torch.Tensor,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The evaluation (and serving) transform: centre crop ``image_size`` + normalise."""
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    return normalize(TF.center_crop(batch, [image_size, image_size]), mean, std)


def random_resized_crop_flip(
    batch: torch.Tensor,
    image_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crop + horizontal flip of a uint8 batch → float pixels in [0, 255].

    Each sample gets its own crop box (area fraction in ``CROP_SCALE``, aspect in
    ``CROP_RATIO``) expressed as an affine map; ``grid_sample`` then resamples all of them to
    ``image_size`` at once, on whatever device the batch lives on.
    """
    n = batch.shape[0]
    device = batch.device
    rand = torch.rand(n, 5, generator=generator, device=generator.device if generator else "cpu").to(device)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * rand[:, 0]
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    center_x = (1 - width) * (2 * rand[:, 2] - 1)
    center_y = (1 - height) * (2 * rand[:, 3] - 1)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0).to(device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [n, 3, image_size, image_size], align_corners=False)
    return F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)
