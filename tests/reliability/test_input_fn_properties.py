"""Generated hostile requests against ``dogbreed.serve.inference.input_fn``.

Property: ``input_fn`` either returns a request or raises ``RequestError`` with a 4xx status and
a JSON body — never another exception (which MMS turns into a 500). Image headers vary in
format, mode, bit depth, declared size and aspect ratio, and are truncated or corrupted;
content types and JSON shapes are generated too. The live server is covered after the serving
rewrite lands; if ``input_fn`` moves, only the import below changes.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from dogbreed.serve.inference import (
    DEFAULT_MAX_IMAGE_PIXELS,
    InferenceRequest,
    RequestError,
    Settings,
    input_fn,
)

CONFIG = Settings()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def call(body, content_type):
    """input_fn's outcome: a request, or the (status, parsed JSON body) of its RequestError."""
    try:
        return input_fn(body, content_type, CONFIG)
    except RequestError as exc:
        assert 400 <= exc.status_code < 500, (exc.status_code, exc.message)
        payload = json.loads(exc.to_json())
        assert isinstance(payload, dict) and payload.get("message")
        return exc.status_code, payload


# --- image headers ---------------------------------------------------------------------------
def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height``, with a valid CRC and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


@SETTINGS
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0]), color=st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
def test_declared_png_sizes_aspect_ratios_and_bit_depths(width, height, depth, color):
    outcome = call(png_header(width, height, depth, color), "image/png")
    if isinstance(outcome, InferenceRequest):
        assert 1 <= width * height <= DEFAULT_MAX_IMAGE_PIXELS
    elif width * height > DEFAULT_MAX_IMAGE_PIXELS and width and height:
        assert outcome[0] in (400, 413)  # too big, or a header PIL refuses first


def encoded_image(mode: str, fmt: str, width: int, height: int) -> bytes:
    image = Image.new(mode, (width, height))
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # this mode cannot be written in this format
    return buffer.getvalue()


IMAGES = st.builds(
    encoded_image,
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]),
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]),
    width=st.integers(1, 48), height=st.integers(1, 48),
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the corrupt TIFFs we make
@SETTINGS
@given(image=IMAGES, cut=st.one_of(st.none(), st.integers(0, 64)),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
       content_type=st.sampled_from(["image/png", "image/jpeg", "application/x-image", "image/jpg"]))
def test_real_images_of_every_mode_and_format_truncated_or_corrupted(image, cut, flips, content_type):
    body = bytearray(image if cut is None else image[:cut])
    for where, xor in flips:
        if body:
            body[where % len(body)] ^= xor
    outcome = call(bytes(body), content_type)
    if isinstance(outcome, InferenceRequest):
        assert outcome.image == bytes(body)


# --- content types and JSON shapes ----------------------------------------------------------------
CONTENT_TYPES = st.one_of(
    st.sampled_from(["", "application/json", "APPLICATION/JSON; charset=utf-8", "image/png;q=1",
                     "text/csv", "application/x-npy", "multipart/form-data; boundary=x", ";;;",
                     "image/*", "*/*", "application/json\x00"]),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
TINY_PNG = base64.b64encode(encoded_image("RGB", "PNG", 4, 3)).decode()
JSON_BODIES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"image": st.one_of(JSON_VALUES, st.just(TINY_PNG),
                                              st.just("data:image/png;base64," + TINY_PNG),
                                              st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))},
                          optional={"top_k": JSON_VALUES, "url": JSON_VALUES}),
    st.fixed_dictionaries({"url": JSON_VALUES}),
)


@SETTINGS
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200)), content_type=CONTENT_TYPES)
def test_arbitrary_bodies_and_content_types(body, content_type):
    call(body, content_type)


@SETTINGS
@given(payload=JSON_BODIES)
def test_generated_json_shapes(payload):
    outcome = call(json.dumps(payload).encode(), "application/json")
    if isinstance(outcome, InferenceRequest):
        assert isinstance(payload, dict) and payload.get("image") in (
            TINY_PNG, "data:image/png;base64," + TINY_PNG)


@pytest.mark.parametrize("depth", [100_000])
def test_deeply_nested_json_is_a_400(depth):
    outcome = call(b"[" * depth + b"]" * depth, "application/json")
    assert outcome[0] == 400
