"""Generated hostile requests against the live server: the Hypothesis
strategies of ``test_input_fn_properties.py`` (image modes, formats, declared sizes, aspect
ratios, bit depths, truncation and corruption; content types; JSON shapes) sent through the HTTP
front to real MMS workers. Every answer is a 200 with finite probabilities or a 4xx JSON error;
never a 5xx, a dropped connection or a worker restart."""

from __future__ import annotations

import http.client
import io
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_artifacts import tiny_model_dir  # noqa: E402
from test_input_fn_properties import CONTENT_TYPES, IMAGES, JSON_BODIES, png_header  # noqa: E402

from dogbreed.serve.server import ModelServer  # noqa: E402

pytestmark = pytest.mark.slow
LIVE = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("live") / "model")
    with ModelServer(port=0, host="127.0.0.1", multi_model=True) as server:
        assert server.client.load_model("m", str(model_dir)).status == 200
        workers = {p.pid for p in psutil.Process(server.zygote.pid).children(recursive=True)}
        yield {"server": server, "workers": workers}
        assert {p.pid for p in psutil.Process(server.zygote.pid).children(recursive=True)} == workers
        assert server.front.models.recoveries == 0


def send(live: dict, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    headers = {} if content_type is None else {"Content-Type": content_type}
    conn = http.client.HTTPConnection("127.0.0.1", live["server"].port, timeout=20)
    try:
        try:
            conn.putrequest("POST", "/models/m/invoke")
            for key, value in headers.items():
                conn.putheader(key, value)
        except ValueError:  # a header value http.client will not send (e.g. a newline in it)
            assume(False)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def not_json(constant: str) -> float:
    raise AssertionError(f"the answer holds {constant}, which is not JSON")


def check(status: int, raw: bytes) -> None:
    # Every answer is JSON, with no NaN / Infinity token (json.loads takes them unless told not
    # to; a message quoting a caller's "NaN" inside a string is fine).
    payload = json.loads(raw, parse_constant=not_json)
    if status == 200:
        assert all(math.isfinite(p["probability"]) for p in payload["predictions"])
    else:
        assert 400 <= status < 500 and payload["code"] == status, (status, payload)


@LIVE
@given(image=IMAGES, cut=st.one_of(st.none(), st.integers(0, 200)),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
       content_type=st.sampled_from(["image/png", "image/jpeg", "application/x-image"]))
def test_live_images_of_every_mode_truncated_or_corrupted(live: dict, image, cut, flips, content_type) -> None:
    body = bytearray(image if cut is None else image[:cut])
    for where, xor in flips:
        if body:
            body[where % len(body)] ^= xor
    check(*send(live, bytes(body), content_type))


@LIVE
@given(width=st.integers(1, 300_000), height=st.integers(1, 300_000),
       depth=st.sampled_from([1, 8, 16]), color=st.sampled_from([0, 2, 6]))
def test_live_declared_sizes_and_aspect_ratios(live: dict, width, height, depth, color) -> None:
    status, raw = send(live, png_header(width, height, depth, color), "image/png")
    check(status, raw)
    assert status != 200  # a header without pixels never decodes


@LIVE
@given(body=st.one_of(st.binary(max_size=300), JSON_BODIES.map(lambda p: json.dumps(p).encode())),
       content_type=st.one_of(st.none(), CONTENT_TYPES))
@example(body=b'{"":"","top_k":{"NaN":null}}', content_type="application/json")  # "NaN" quoted back
def test_live_bodies_content_types_and_json_shapes(live: dict, body, content_type) -> None:
    check(*send(live, body, content_type))


def test_live_server_still_serves(live: dict) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "green").save(buffer, "JPEG")
    status, raw = send(live, buffer.getvalue(), "image/jpeg")
    assert status == 200 and json.loads(raw)["predictions"]
