"""RemotePredictor against a real (in-thread) worker, retries with backoff, error mapping, URL images."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
from fakes import FakePredictor
from PIL import Image
from serving_helpers import GateFake, ThreadedServer, free_port, png_bytes, wait_until
from serving_helpers import image_host as serve_image_host

from pixelllm_plugins.errors import (
    ImageFetchError,
    ImageTooLargeError,
    InvalidBoxError,
    InvalidImageError,
    RemoteError,
)
from pixelllm_plugins.inference.protocol import PredictorProtocol
from pixelllm_plugins.io import ImageLimits, open_encoded
from pixelllm_plugins.predictors import get_predictor, release_predictors
from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.client import RemotePredictor, encode_image
from pixelllm_plugins.serving.settings import WorkerSettings

TOKEN = "client-test-token"


@pytest.fixture()
def no_sleep(monkeypatch):
    """Record the client's backoff delays instead of sleeping them."""
    delays: list[float] = []
    monkeypatch.setattr(RemotePredictor, "_sleep", staticmethod(delays.append))
    return delays


@pytest.fixture(scope="module")
def worker():
    with ThreadedServer(create_app(FakePredictor(), WorkerSettings(token=TOKEN))) as srv:
        yield srv


def _inputs(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes(80, 60, 1))
    pil = Image.open(path).convert("RGB")
    return [str(path), path.read_bytes(), open_encoded(path), pil, np.asarray(pil)]


def test_files_bytes_and_encoded_images_are_sent_as_they_are(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 240)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg)
    for source in (path, str(path), jpeg, open_encoded(jpeg)):
        assert base64.b64decode(encode_image(source)["b64"]) == jpeg  # no PNG re-encode of a JPEG
    png = base64.b64decode(encode_image(Image.open(path))["b64"])  # decoded pixels go as PNG
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (300, 200)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        encode_image(open_encoded(jpeg), ImageLimits(max_bytes=100))


def test_remote_results_equal_local_results_for_every_input_kind(worker, tmp_path):
    local = FakePredictor()
    images = _inputs(tmp_path)
    with RemotePredictor(worker.url, token=TOKEN) as remote:
        assert isinstance(remote, PredictorProtocol)
        assert remote.model_version == "fake-1"
        texts = [["the circle", "the square"]] * len(images)
        assert _dicts(remote.refer(images, texts)) == _dicts(local.refer(images, texts))
        boxes = [[[0, 0, 20, 20], [10, 10, 70, 50]]] * len(images)
        assert _dicts(remote.caption_regions(images, boxes)) == _dicts(local.caption_regions(images, boxes))
        assert _dicts(remote.caption(images)) == _dicts(local.caption(images))
        assert _dicts(remote.caption(images, trace=False)) == _dicts(local.caption(images, trace=False))
        assert _dicts(remote.dense_caption(images, min_score=0.7)) == _dicts(
            local.dense_caption(images, min_score=0.7))


def test_images_without_prompts_need_no_request(worker):
    with RemotePredictor(worker.url, token=TOKEN) as remote:
        out = remote.refer([png_bytes(), png_bytes()], [[], "just one"])
        assert out[0] == [] and out[1][0][0].text == "just one"
        assert remote.caption_regions([png_bytes()], [[]]) == [[]]
        assert remote.stats["requests"] == 1
        with pytest.raises(InvalidBoxError, match="4 numbers"):
            remote.caption_regions([png_bytes()], [[[1, 2, 3]]])


def _dicts(obj):
    if isinstance(obj, list):
        return [_dicts(o) for o in obj]
    return obj.to_dict()


def test_worker_errors_come_back_as_the_local_exception_types(worker, tmp_path):
    with RemotePredictor(worker.url, token=TOKEN, max_retries=1) as remote:
        with pytest.raises(InvalidImageError, match="file not found"):
            remote.caption([str(tmp_path / "missing.png")])
        with pytest.raises(InvalidImageError, match="not a readable image"):
            remote.caption([b"definitely not an image"])
        with pytest.raises(InvalidBoxError, match="no area"):
            remote.caption_regions([png_bytes(64, 48)], [[[500, 500, 600, 600]]])
        with pytest.raises(ImageFetchError, match="PIXELLLM_WORKER_ALLOWED_HOSTS"):
            remote.caption(["http://example.com/a.png"])
    with RemotePredictor(worker.url, token="Xq7-not-the-token", max_retries=1) as remote:
        with pytest.raises(RemoteError, match="401 Unauthorized") as info:
            remote.caption([png_bytes()])
        assert "Xq7" not in str(info.value)
        assert "Xq7" not in repr(remote)


def test_a_call_with_many_images_is_sent_concurrently_and_batched_by_the_worker():
    fake = GateFake()
    with ThreadedServer(create_app(fake, WorkerSettings(max_batch_size=16, max_wait_ms=0))) as srv:
        remote = RemotePredictor(srv.url, concurrency=8)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", remote.refer(
            [png_bytes(seed=i) for i in range(8)], [[f"t{i}"] for i in range(8)])))
        t.start()
        assert fake.entered.wait(10)
        wait_until(lambda: sum(n for _, n, _ in fake.batches) + httpx.get(srv.url + "/ready").json()[
            "queue_depth"] == 8, 10, what="all 8 requests at the worker")
        fake.gate.set()
        t.join(30)
        assert [r[0][0].text for r in result["r"]] == [f"t{i}" for i in range(8)]
        assert sum(n for _, n, _ in fake.batches) == 8 and len(fake.batches) < 8
        remote.close()


def _mock(responses):
    """A transport answering from a list (status, headers) and then 200s; records each request."""
    seen = []

    def handler(request: httpx.Request):
        seen.append(request)
        if responses:
            status, headers = responses.pop(0)
            if status == "reset":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(status, headers=headers, json={"error": "busy", "type": "Busy"})
        return httpx.Response(200, json={"model_version": "m", "image_size": [1, 1], "caption": "ok",
                                         "score": 1.0, "words": []})

    return httpx.MockTransport(handler), seen


def test_retries_503_honouring_retry_after_then_connection_errors_with_backoff(no_sleep):
    transport, seen = _mock([(503, {"Retry-After": "2"}), (503, {"Retry-After": "1"}), ("reset", {}),
                             (502, {})])
    remote = RemotePredictor("http://worker.test", token=TOKEN, transport=transport, backoff_s=0.1,
                             max_backoff_s=5)
    out = remote.caption([png_bytes()])
    assert out[0].text == "ok" and len(seen) == 5 and remote.stats["retries"] == 4
    assert 2.0 <= no_sleep[0] <= 2.4 and 1.0 <= no_sleep[1] <= 1.2  # Retry-After honoured
    assert 0.2 <= no_sleep[2] <= 0.4 and 0.4 <= no_sleep[3] <= 0.8  # exponential backoff with jitter
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in seen)


def test_retry_after_is_capped_and_retries_are_bounded(no_sleep):
    transport, seen = _mock([(503, {"Retry-After": "3600"})] * 10)
    remote = RemotePredictor("http://worker.test", transport=transport, max_backoff_s=0.5, max_retries=3)
    with pytest.raises(RemoteError, match="after 3 attempt"):
        remote.caption([png_bytes()])
    assert len(seen) == 3 and all(d <= 0.6 for d in no_sleep)
    transport, seen = _mock([(400, {})])
    with pytest.raises(RemoteError, match="400"):
        RemotePredictor("http://worker.test", transport=transport).caption([png_bytes()])
    assert len(seen) == 1  # 4xx is not retried


@pytest.mark.parametrize("body, reason", [({"error": None, "detail": "model loading"}, "model loading"),
                                           ({"status": "loading"}, "loading"),
                                           (None, "Service Unavailable")])
def test_retry_error_names_the_workers_reason(no_sleep, body, reason):
    def handler(request: httpx.Request):
        return httpx.Response(503, json=body) if body is not None else httpx.Response(503)

    remote = RemotePredictor("http://worker.test", transport=httpx.MockTransport(handler), max_retries=2)
    with pytest.raises(RemoteError) as info:
        remote.caption([png_bytes()])
    assert f"HTTP 503 ({reason})" in str(info.value) and "None" not in str(info.value)


def test_unreachable_worker_gives_a_clear_error(no_sleep):
    remote = RemotePredictor(f"http://127.0.0.1:{free_port()}", max_retries=4, backoff_s=0.01)
    with pytest.raises(RemoteError, match=r"did not answer /v1/caption after 4 attempt\(s\) over [0-9.]+ s.*"
                                          "PIXELLLM_WORKER_URL"):
        remote.caption([png_bytes()])
    assert len(no_sleep) == 3
    with pytest.raises(RemoteError, match="must start with http"):
        RemotePredictor("worker:8000")


def test_get_predictor_returns_a_remote_predictor_when_the_worker_url_is_set(monkeypatch, worker):
    monkeypatch.setenv("PIXELLLM_WORKER_URL", worker.url)
    monkeypatch.setenv("PIXELLLM_WORKER_TOKEN", TOKEN)
    release_predictors()
    try:
        predictor = get_predictor()
        assert isinstance(predictor, RemotePredictor)
        assert predictor.caption([png_bytes()])[0].text == "a shape"
    finally:
        release_predictors()


# ---- image URLs from allowed hosts ---------------------------------------------------------------------

URL_PNG = png_bytes(50, 40)


@pytest.fixture(scope="module")
def image_host():
    routes = {"/img.png": (200, URL_PNG), "/hop": (302, "/img.png"), "/away": (302, "http://elsewhere.test/img.png"),
              "/big": (200, URL_PNG + bytes(200_000))}
    with serve_image_host(routes) as host:
        yield host


def test_url_images_only_from_allowed_hosts_with_limits(make_client, image_host):
    c = make_client(FakePredictor(), allowed_hosts=(image_host,), max_image_bytes=100_000)
    ask = lambda path: c.post("/v1/caption", json={"image": {"url": f"http://{image_host}{path}"}})  # noqa: E731
    r = ask("/img.png")
    assert r.status_code == 200 and r.json()["image_size"] == [50, 40]
    assert ask("/hop").status_code == 200
    r = ask("/away")
    assert r.status_code == 403 and "'elsewhere.test' is not allowed" in r.json()["error"]
    r = ask("/big")
    assert r.status_code == 413 and "exceeds the limit of 100,000" in r.json()["error"]
    r = ask("/missing")
    assert r.status_code == 400 and "HTTP 404" in r.json()["error"]
    other_port = c.post("/v1/caption", json={"image": {"url": f"http://127.0.0.1:{free_port()}/img.png"}})
    assert other_port.status_code == 403


def test_host_allow_list_matching():
    from pixelllm_plugins.serving.images import host_allowed

    allowed = ("images.example.com", "*.cdn.example.org", "10.0.0.5:8080")
    assert host_allowed("https://images.example.com/a.png", allowed)
    assert host_allowed("https://IMAGES.example.com:8443/a.png", allowed)
    assert host_allowed("https://eu.cdn.example.org/a.png", allowed)
    assert not host_allowed("https://cdn.example.org/a.png", allowed)
    assert not host_allowed("https://evilcdn.example.org/a.png", allowed)
    assert not host_allowed("https://images.example.com.evil.net/a.png", allowed)
    assert host_allowed("http://10.0.0.5:8080/x", allowed) and not host_allowed("http://10.0.0.5/x", allowed)
