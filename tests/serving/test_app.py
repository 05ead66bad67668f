"""Worker HTTP surface with FakePredictor: shapes, errors, limits, auth, readiness, metrics, OpenAPI."""

from __future__ import annotations

import logging

import pytest
from fakes import FakePredictor
from fastapi.testclient import TestClient
from serving_helpers import b64, image_field, png_bytes, wait_until

from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.settings import WorkerSettings

TOKEN = "s3cret-token-value"


def test_four_tasks_answer_with_the_cli_shapes(make_client):
    fake = FakePredictor()
    c = make_client(fake)
    r = c.post("/v1/refer", json={"image": image_field(64, 48), "text": "the red circle"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [64, 48] and body["model_version"] == "fake-1"
    assert len(body["detections"]) == 1 and body["detections"][0]["text"] == "the red circle"
    assert body["per_text"] == [body["detections"]]
    x1, y1, x2, y2 = body["detections"][0]["box_xyxy"]
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48

    r = c.post("/v1/refer", json={"image": image_field(), "texts": ["a", "b"]})
    assert [d[0]["text"] for d in r.json()["per_text"]] == ["a", "b"]

    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": [[0, 0, 10, 10], [5, 5, 60, 40]]})
    assert r.status_code == 200, r.text
    assert [cap["text"] for cap in r.json()["captions"]] == ["region 0", "region 1"]

    r = c.post("/v1/caption", json={"image": image_field(), "trace": True})
    body = r.json()
    assert body["caption"] == "a shape" and [w["text"] for w in body["words"]] == ["a", "shape"]
    assert r.json()["words"][0]["points"] == [[0, 0], [32, 24]]
    assert c.post("/v1/caption", json={"image": image_field(), "trace": False}).json()["words"] == []

    r = c.post("/v1/dense_caption", json={"image": image_field(), "min_score": 0.7})
    assert [reg["text"] for reg in r.json()["regions"]] == ["a thing"]


def test_health_ready_metrics_openapi(make_client):
    c = make_client(FakePredictor())
    assert c.get("/health").json() == {"status": "ok", "ready": True}
    ready = c.get("/ready").json()
    assert ready["ready"] and ready["model_version"] == "fake-1"
    assert ready["settings"]["max_batch_size"] == 8 and "token" not in ready["settings"]
    c.post("/v1/refer", json={"image": image_field(), "text": "x"})
    text = c.get("/metrics").text
    assert 'pixelllm_requests_total{route="/v1/refer",status="200"} 1.0' in text
    assert "pixelllm_batch_size_bucket" in text and "pixelllm_inference_seconds" in text
    schema = c.get("/openapi.json").json()
    assert {"/v1/refer", "/v1/caption_regions", "/v1/caption", "/v1/dense_caption", "/health", "/ready",
            "/metrics"} <= set(schema["paths"])
    assert "ImageRef" in schema["components"]["schemas"]


@pytest.mark.parametrize("body, status, words", [
    ({"image": {"b64": "!!!not base64!!!"}, "text": "x"}, 400, "not valid base64"),
    ({"image": {"b64": b64(b"hello, not an image")}, "text": "x"}, 400, "not a readable image"),
    ({"image": {"b64": b64(png_bytes()[:60])}, "text": "x"}, 400, "truncated or corrupt"),
    ({"text": "x"}, 422, "image: is required"),
    ({"image": image_field()}, 422, "exactly one of 'text'"),
    ({"image": {}, "text": "x"}, 422, "exactly one of 'b64'"),
    ({"image": image_field(), "text": "x", "bogus": 1}, 422, "bogus: is not a known field"),
    ({"image": image_field(), "text": "   "}, 400, "empty"),
    ({"image": image_field(), "texts": []}, 400, "texts is empty"),
    ({"image": image_field(), "text": "x", "adapter": "../etc"}, 422, "adapter"),
    ({"image": {"url": "http://example.com/a.png"}, "text": "x"}, 403, "PIXELLLM_WORKER_ALLOWED_HOSTS"),
    ({"image": {"url": "file:///etc/passwd"}, "text": "x"}, 400, "http(s)"),
])
def test_malformed_requests_get_a_clear_4xx_and_the_worker_keeps_serving(make_client, body, status, words):
    c = make_client(FakePredictor())
    r = c.post("/v1/refer", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert "type" in r.json()
    assert c.post("/v1/refer", json={"image": image_field(), "text": "ok"}).status_code == 200


def test_more_malformed_bodies(make_client):
    c = make_client(FakePredictor())
    r = c.post("/v1/refer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": [[1, 2, 3]]})
    assert r.status_code == 400 and "4 numbers" in r.json()["error"]
    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": []})
    assert r.status_code == 400 and "boxes is empty" in r.json()["error"]
    # a box with no area inside the image fails inside the model call: still a 400, same message as local
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "boxes": [[100, 100, 200, 200]]})
    assert r.status_code == 400 and "no area" in r.json()["error"]
    r = c.post("/v1/caption", json={"image": image_field(), "max_new_tokens": 100000})
    assert r.status_code == 422 and "exceeds this worker's limit" in r.json()["error"]
    r = c.post("/v1/dense_caption", json={"image": image_field(), "min_score": 2})
    assert r.status_code == 422 and "min_score" in r.json()["error"]
    r = c.get("/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]
    # the response never echoes the (possibly huge) input
    r = c.post("/v1/refer", json={"image": {"b64": 123}, "text": "x"})
    assert r.status_code == 422 and "input" not in str(r.json()["detail"])


def test_request_and_pixel_limits(make_client):
    c = make_client(FakePredictor(), max_request_bytes=20_000, max_pixels=100 * 100)
    big = png_bytes(400, 300)
    r = c.post("/v1/refer", json={"image": {"b64": b64(big + bytes(20_000))}, "text": "x"})
    assert r.status_code == 413 and "PIXELLLM_WORKER_MAX_REQUEST_BYTES" in r.json()["error"]
    r = c.post("/v1/refer", json={"image": {"b64": b64(png_bytes(200, 200))}, "text": "x"})
    assert r.status_code == 413 and "exceeds the limit of 10,000" in r.json()["error"]
    assert c.post("/v1/refer", json={"image": image_field(64, 48), "text": "x"}).status_code == 200


def test_bearer_auth_when_a_token_is_set(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    c = make_client(FakePredictor(), token=TOKEN)
    body = {"image": image_field(), "text": "x"}
    r = c.post("/v1/refer", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "PIXELLLM_WORKER_TOKEN" in r.json()["error"]
    assert c.post("/v1/refer", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/v1/refer", json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    ok = c.post("/v1/refer", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # probes stay open
    assert TOKEN not in c.get("/ready").text
    # checked before the body is read: no buffering, no parsing for unauthenticated clients
    r = c.post("/v1/refer", content=b"x" * 100_000_000 + b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(WorkerSettings(token=TOKEN))


def test_not_ready_then_ready_and_load_failure():
    import threading

    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return FakePredictor()

    with TestClient(create_app(slow_factory, WorkerSettings(retry_after_s=2))) as c:
        assert c.get("/health").json() == {"status": "ok", "ready": False}
        r = c.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        r = c.post("/v1/refer", json={"image": image_field(), "text": "x"})
        assert r.status_code == 503 and "still loading" in r.json()["error"] and r.headers["retry-after"] == "2"
        release.set()
        wait_until(lambda: c.get("/ready").status_code == 200, 10, what="ready")
        assert c.post("/v1/refer", json={"image": image_field(), "text": "x"}).status_code == 200

    def broken():
        raise FileNotFoundError("no checkpoint at /nowhere")

    with TestClient(create_app(broken, WorkerSettings())) as c:
        wait_until(lambda: c.get("/ready").json().get("error"), 10, what="load error")
        assert "no checkpoint" in c.get("/ready").json()["error"]
        r = c.post("/v1/refer", json={"image": image_field(), "text": "x"})
        assert r.status_code == 500 and "failed to load" in r.json()["error"]


def test_unexpected_model_errors_are_500_without_internals(make_client):
    class Exploding(FakePredictor):
        def caption(self, images, **kw):
            raise ZeroDivisionError("secret internal detail")

    c = make_client(Exploding())
    r = c.post("/v1/caption", json={"image": image_field()})
    assert r.status_code == 500 and r.json()["type"] == "InferenceError"
    assert "secret" not in r.text
    assert c.post("/v1/refer", json={"image": image_field(), "text": "x"}).status_code == 200


def test_settings_from_env():
    env = {"PIXELLLM_WORKER_TOKEN": TOKEN, "PIXELLLM_WORKER_MAX_BATCH": "4", "PIXELLLM_WORKER_MAX_WAIT_MS": "2.5",
           "PIXELLLM_WORKER_ALLOWED_HOSTS": "images.example.com, *.cdn.example.org,127.0.0.1:8080",
           "PIXELLLM_WORKER_MAX_QUEUE": ""}
    s = WorkerSettings.from_env(env, max_queue=7)
    assert (s.token, s.max_batch_size, s.max_wait_ms, s.max_queue) == (TOKEN, 4, 2.5, 7)
    assert s.allowed_hosts == ("images.example.com", "*.cdn.example.org", "127.0.0.1:8080")
    assert s.public_dict()["auth"] is True and "token" not in s.public_dict()
    assert WorkerSettings.from_env({}).token is None and not WorkerSettings(max_batch_size=1).batching
    with pytest.raises(ValueError, match="PIXELLLM_WORKER_MAX_BATCH='many' is not a valid int"):
        WorkerSettings.from_env({"PIXELLLM_WORKER_MAX_BATCH": "many"})
    with pytest.raises(ValueError, match="max_queue=0"):
        WorkerSettings(max_queue=0)
    with pytest.raises(TypeError, match="unknown worker setting"):
        WorkerSettings.from_env({}, colour="red")
    assert WorkerSettings.from_env({}).otel is False
    assert WorkerSettings.from_env({"PIXELLLM_WORKER_OTEL": "true"}).otel is True
    with pytest.raises(ValueError, match="PIXELLLM_WORKER_OTEL='maybe' is not a valid bool"):
        WorkerSettings.from_env({"PIXELLLM_WORKER_OTEL": "maybe"})


def test_fastapi_telemetry_is_off_unless_asked_for():
    from pixelllm_plugins.serving.app import _telemetry_kwargs

    assert _telemetry_kwargs(True) == {}
    off = _telemetry_kwargs(False)
    if off:  # FastAPI with native telemetry
        assert off["telemetry"] == {"tracing": False, "metrics": False, "logs": False}
        app = create_app(FakePredictor(), WorkerSettings(otel=False))
        assert not app._native_telemetry.enabled()


def test_small_images_are_decoded_on_the_event_loop_large_ones_in_the_pool(make_client):
    import threading

    from pixelllm_plugins.io import load_image

    class Preparing(FakePredictor):
        def __init__(self):
            super().__init__()
            self.threads: list[tuple[int, str]] = []

        def prepare(self, data, limits=None):
            self.threads.append((len(data), threading.current_thread().name))
            return load_image(data, limits)

    fake = Preparing()
    small, large = png_bytes(16, 12), png_bytes(400, 300)
    assert len(small) < 1000 < len(large)
    c = make_client(fake, inline_decode_bytes=1000)
    for data in (small, large):
        r = c.post("/v1/refer", json={"image": {"b64": b64(data)}, "text": "the red circle"})
        assert r.status_code == 200, r.text
    (n_small, where_small), (n_large, where_large) = fake.threads
    assert (n_small, n_large) == (len(small), len(large))
    assert not where_small.startswith("pixelllm-decode") and where_large.startswith("pixelllm-decode")
    assert r.json()["image_size"] == [400, 300]
    fake.threads.clear()
    c = make_client(fake, inline_decode_bytes=0)  # 0: every image goes to the pool
    c.post("/v1/refer", json={"image": {"b64": b64(small)}, "text": "x"})
    assert fake.threads[0][1].startswith("pixelllm-decode")
    with pytest.raises(ValueError, match="inline_decode_bytes=-1"):
        WorkerSettings(inline_decode_bytes=-1)
    assert WorkerSettings.from_env({"PIXELLLM_WORKER_INLINE_DECODE_BYTES": "0"}).inline_decode_bytes == 0
