"""Worker HTTP surface with FakePredictor: shapes, errors, limits, auth, readiness, metrics, OpenAPI."""

from __future__ import annotations

import json
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
    ({"image": image_field(), "text": "\u200b\u200b"}, 400, "empty"),  # zero-width spaces: nothing to read
    ({"image": image_field(), "text": "x", "timeout_s": True}, 422, "timeout_s: must be a number"),
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
    # JSON sent as another content type is not read as JSON: the message says how to send it
    r = c.post("/v1/refer", content=b'{"text": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]
    # a body that is not UTF-8 (Latin-1 here) cannot be read: a 400 that says so
    r = c.post("/v1/refer", content='{"text": "caf\u00e9"}'.encode("latin-1"),
               headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8 JSON object" in r.json()["error"]
    # an endless timeout is no timeout (Python's JSON reads Infinity, and 1e400 overflows to it)
    for raw in (b"Infinity", b"1e400"):
        body = b'{"image": %s, "text": "x", "timeout_s": %s}' % (json.dumps(image_field()).encode(), raw)
        r = c.post("/v1/refer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "timeout_s: Input should be a finite number" in r.json()["error"]
    # true is not a coordinate, nor a point label
    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": [[True, 0, 10, 10]]})
    assert r.status_code == 422 and "boxes.0.0: must be a number, not true or false" in r.json()["error"]
    r = c.post("/v1/segment", json={"image": image_field(), "points": [[3, 4]], "point_labels": [True]})
    assert r.status_code == 422 and "point_labels.0: must be a number" in r.json()["error"]
    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": [[1, 2, 3]]})
    assert r.status_code == 400 and "4 numbers" in r.json()["error"]
    r = c.post("/v1/caption_regions", json={"image": image_field(), "boxes": []})
    assert r.status_code == 400 and "boxes is empty" in r.json()["error"]
    # a box with no area inside the image fails inside the model call: still a 400, same message as local
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "boxes": [[100, 100, 200, 200]]})
    assert r.status_code == 400 and "no area" in r.json()["error"]
    # numeric fields are checked against the shared bounds table; the worker's settings may lower it
    r = c.post("/v1/caption", json={"image": image_field(), "max_new_tokens": 100000})
    assert r.status_code == 422 and "max_new_tokens: must be an integer from 1 to 128" in r.json()["error"]
    r = c.post("/v1/caption", json={"image": image_field(), "num_beams": True})
    assert r.status_code == 422 and "num_beams: must be a number" in r.json()["error"]
    low = make_client(FakePredictor(), max_new_tokens=16)
    r = low.post("/v1/caption", json={"image": image_field(), "max_new_tokens": 100})
    assert r.status_code == 422 and "exceeds this worker's limit of 16" in r.json()["error"]
    with pytest.raises(ValueError, match="max_beams must be an integer from 1 to 8"):
        WorkerSettings(max_beams=9)  # settings lower the shared bounds, never raise them
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


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PIXELLLM_WORKER_MAX_BATCH", "many", "PIXELLLM_WORKER_MAX_BATCH='many' is not a valid int; fix it or unset it"),
    ("PIXELLLM_WORKER_TIMEOUT_S", "nan", "invalid worker settings: request_timeout_s=nan"),
    ("PIXELLLM_MAX_PIXELS", "0", "invalid worker settings: max_pixels=0"),
])
def test_a_bad_worker_setting_is_one_line_and_exit_2(tmp_path, variable, value, message):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pixelllm_plugins.cli", "serve", "--model", "tiny", "--port", "0"],
                          env=os.environ | {variable: value}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and message in done.stderr


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

        def prepare(self, image, limits=None):  # gets the io.EncodedImage checked from the header
            self.threads.append((len(image.data), threading.current_thread().name))
            return load_image(image, limits)

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


# ---- hostile input: tiny files of huge canvases, the decode budget, bad text and URLs (issue 23) --------

def _one_bit_png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, "PNG")
    return buf.getvalue()


class _Gated(FakePredictor):
    """Records each ``prepare`` call and blocks it until ``gate`` is set."""

    def __init__(self):
        super().__init__()
        import threading

        self.gate = threading.Event()
        self.entered: list[tuple[tuple[int, int], str]] = []

    def prepare(self, image, limits=None):
        import threading

        from pixelllm_plugins.io import load_image

        self.entered.append((image.size, threading.current_thread().name))
        if not self.gate.wait(30):
            raise RuntimeError("gate never opened")
        return load_image(image, limits)


def test_a_tiny_file_of_a_huge_canvas_is_decoded_off_the_event_loop(make_client):
    fake = _Gated()
    fake.gate.set()
    tiny_file = _one_bit_png(2000, 2000)  # 4 MP in a few hundred bytes: far under inline_decode_bytes
    assert len(tiny_file) < 2000
    c = make_client(fake, inline_decode_pixels=512 * 512)
    r = c.post("/v1/refer", json={"image": {"b64": b64(tiny_file)}, "text": "the red circle"})
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == [2000, 2000]
    assert fake.entered[-1][1].startswith("pixelllm-decode")  # by the header's pixel count, not the bytes
    r = c.post("/v1/refer", json={"image": image_field(64, 48), "text": "x"})  # small file, few pixels
    assert r.status_code == 200 and not fake.entered[-1][1].startswith("pixelllm-decode")
    with pytest.raises(ValueError, match="inline_decode_pixels=-1"):
        WorkerSettings(inline_decode_pixels=-1)
    env = {"PIXELLLM_WORKER_INLINE_DECODE_PIXELS": "0", "PIXELLLM_WORKER_DECODE_BUDGET_BYTES": "1000000"}
    s = WorkerSettings.from_env(env)
    assert (s.inline_decode_pixels, s.decode_budget_bytes) == (0, 1_000_000)
    assert WorkerSettings().decode_budget_bytes == 1024 ** 3


def test_decoding_waits_for_the_memory_budget_and_an_image_over_it_is_a_413():
    import concurrent.futures

    import httpx
    from serving_helpers import ThreadedServer

    from pixelllm_plugins.io import open_encoded

    fake = _Gated()
    png = _one_bit_png(1000, 1000)
    one = open_encoded(png).decode_bytes  # 1 MB of 1-bit pixels kept as bytes + 4 MB of RGB(X)
    assert one == 5_000_000
    app = create_app(fake, WorkerSettings(decode_budget_bytes=one + one // 2, inline_decode_pixels=0))
    budget = app.state.decode_budget
    body = {"image": {"b64": b64(png)}, "text": "the red circle"}
    with ThreadedServer(app) as srv, concurrent.futures.ThreadPoolExecutor(2) as pool:
        post = lambda b: httpx.post(srv.url + "/v1/refer", json=b, timeout=60)  # noqa: E731
        first, second = pool.submit(post, body), pool.submit(post, body)
        wait_until(lambda: len(fake.entered) == 1 and budget.waiting == 1, 20, what="one decoding, one waiting")
        assert budget.free < one
        # a request whose deadline passes while it waits for the budget: a 504, and it leaves the queue
        r = post({**body, "timeout_s": 0.3})
        assert r.status_code == 504 and budget.waiting == 1
        # an image that alone costs more than the whole budget: refused from its header, nothing decoded
        r = post({**body, "image": {"b64": b64(_one_bit_png(2000, 2000))}})
        assert r.status_code == 413 and r.json()["type"] == "ImageTooLargeError"
        assert "PIXELLLM_WORKER_DECODE_BUDGET_BYTES" in r.json()["error"] and len(fake.entered) == 1
        fake.gate.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        assert len(fake.entered) == 2
        wait_until(lambda: budget.free == budget.total, 10, what="the budget to be whole again")


def test_the_budget_is_given_back_when_the_decode_ends_not_when_the_request_gives_up():
    import httpx
    from serving_helpers import ThreadedServer

    fake = _Gated()
    app = create_app(fake, WorkerSettings(inline_decode_pixels=0))
    budget = app.state.decode_budget
    with ThreadedServer(app) as srv:
        r = httpx.post(srv.url + "/v1/refer", json={"image": image_field(), "text": "x", "timeout_s": 0.3},
                       timeout=60)
        assert r.status_code == 504
        assert budget.free < budget.total  # the decode thread still runs and still holds the memory
        fake.gate.set()
        wait_until(lambda: budget.free == budget.total, 10, what="the budget to be given back")


def test_decode_budget_is_first_come_first_served_small_ones_pass_and_it_survives_cancellation():
    import asyncio

    from pixelllm_plugins.serving.images import DecodeBudget

    async def scenario():
        budget = DecodeBudget(160)  # small: at most 10
        await budget.acquire(60)
        big = asyncio.create_task(budget.acquire(120))
        mid = asyncio.create_task(budget.acquire(30))  # would fit now, but waits behind the older request
        await asyncio.sleep(0)
        assert not big.done() and not mid.done() and budget.waiting == 2
        await budget.acquire(10)  # a small one that fits goes ahead of both
        assert budget.free == 90 and budget.waiting == 2
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        await mid  # the head left: the next one fits
        assert budget.free == 60
        tail = asyncio.create_task(budget.acquire(100))
        await asyncio.sleep(0)
        assert not tail.done()
        budget.release(60)
        await tail
        for cost in (10, 30, 100):
            budget.release(cost)
        assert budget.free == 160 and budget.waiting == 0

    asyncio.run(scenario())


def test_release_memory_runs_on_glibc_and_is_skipped_elsewhere():
    import sys

    from pixelllm_plugins import memory

    if memory._LIBC is None:
        assert memory.release_memory() is False
    else:
        assert sys.platform.startswith("linux") and memory.release_memory() is True


@pytest.mark.parametrize("raw_text, words", [
    ('"a\\ud800b"', "not valid Unicode"),  # a lone surrogate as a JSON escape
    ('"\\u0000\\u0000"', "empty"),  # control characters only
    ('"x\\u0007\\u0000 "', None),  # control characters around a word: fine
])
def test_texts_that_are_not_text_are_a_400(make_client, raw_text, words):
    import json

    c = make_client(FakePredictor())
    body = '{"image": ' + json.dumps(image_field()) + ', "texts": ["ok", ' + raw_text + "]}"
    r = c.post("/v1/refer", content=body.encode(), headers={"content-type": "application/json"})
    if words is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["type"] == "InvalidPromptError", r.text
        assert words in r.json()["error"] and "texts[1]" in r.json()["error"]


@pytest.mark.parametrize("url, status", [
    ("http://secret-host.example:99999/token=abc", 400),
    ("http://secret-host.example:xyzzy/token=abc", 400),
    ("http://[::1/token=abc", 400),
    ("http://user:pw@secret-host.example/token=abc", 400),
    ("http://secret-host.example/a/../token=abc", 400),
    ("gopher://secret-host.example/token=abc", 400),
    ("http://secret-host.example/token=abc", 403),
    ("http:///token=abc", 400),
])
def test_malformed_or_refused_urls_are_a_4xx_that_does_not_repeat_the_url(make_client, url, status):
    c = make_client(FakePredictor(), allowed_hosts=("images.example", "[::1]"))
    r = c.post("/v1/refer", json={"image": {"url": url}, "text": "x"})
    assert r.status_code == status, r.text
    assert r.json()["type"] in ("ImageFetchError", "HostNotAllowedError") and r.json()["error"]
    for part in ("secret", "token=abc", "xyzzy", "99999", "gopher", "user:pw"):
        assert part not in r.text, r.text


def test_odd_field_names_are_not_repeated_back(make_client):
    c = make_client(FakePredictor())
    body = '{"image": {"b64": "AAAA"}, "text": "x", "' + "k" * 300 + '": 1}'
    r = c.post("/v1/refer", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "<field>: is not a known field" in r.json()["error"]
    assert "k" * 100 not in r.text


def test_a_slow_image_host_is_cut_off_at_the_total_url_deadline(make_client):
    import http.server
    import threading

    stop = threading.Event()

    # a byte every 0.2 s for 20 s: no single read ever waits 1 s, so only a deadline on the whole download
    # ends it (else the 100 bytes arrive and are "not a readable image")
    class Dribble(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    if stop.wait(0.2):
                        return
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:  # the worker hung up
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dribble)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        c = make_client(FakePredictor(), allowed_hosts=(host,), url_timeout_s=1)
        r = c.post("/v1/caption", json={"image": {"url": f"http://{host}/slow.png"}})
        assert r.status_code == 400 and r.json()["type"] == "ImageFetchError", r.text
        assert "no answer within 1 s" in r.json()["error"] and host not in r.json()["error"]
    finally:
        stop.set()
        server.shutdown()


def test_caption_passes_from_regions_through(make_client):
    seen = []

    class Recording(FakePredictor):
        def caption(self, images, **kw):
            seen.append(kw.get("from_regions", "missing"))
            return super().caption(images, **{k: v for k, v in kw.items() if k != "from_regions"})

    c = make_client(Recording())
    assert c.post("/v1/caption", json={"image": image_field(), "from_regions": False}).status_code == 200
    assert c.post("/v1/caption", json={"image": image_field()}).status_code == 200
    assert c.post("/v1/caption", json={"image": image_field(), "from_regions": "sometimes"}).status_code == 422
    assert seen == [False, None]
