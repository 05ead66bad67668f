"""The protocol routes through an HTTP test client, with FakePredictor."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from conftest import REFERRING, predict_body
from ls_helpers import png_bytes

from label_studio_backend import labeling_config
from pixelllm_plugins.geometry import ls_percent_to_xyxy


def _task(images_dir, i, name="a.png", expression="the red mug"):
    return {"id": i, "data": {"image": str(images_dir / name), "expression": expression}}


def test_health_and_setup(client):
    health = client.get("/health").json()
    assert health["status"] == "UP" and health["model_class"] == "PixelLLMBackend"
    assert health["model_version"] == "fake-1"
    r = client.post("/setup", json={"project": "7.1700000000", "schema": REFERRING, "hostname": "http://ls",
                                    "access_token": "tok", "extra_params": {"a": 1}})
    assert r.status_code == 200 and r.json() == {"model_version": "fake-1"}


def test_setup_never_logs_the_access_token(make_client, caplog):
    secret = "legacy-token-that-must-not-leak-3f9a"
    client = make_client(log_level="DEBUG")
    with caplog.at_level(logging.DEBUG):
        client.post("/setup", json={"project": "7.1", "schema": REFERRING, "access_token": secret})
        client.post("/predict", json=predict_body([], context=None) | {"access_token": secret})
    assert caplog.records  # something was logged
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_batch_predict_one_result_per_task(client, images_dir, fake_predictor):
    tasks = [_task(images_dir, 1), _task(images_dir, 2, "b.png", "a dog"), _task(images_dir, 3, "c.png", "")]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3
    for pred in results:
        assert pred["model_version"] == "fake-1" and 0 <= pred["score"] <= 1 and "error" not in pred
    # text -> box: a rectangle plus its per-region caption under the same id
    rect, cap = results[0]["result"]
    assert rect["type"] == "rectanglelabels" and cap["type"] == "textarea" and rect["id"] == cap["id"]
    assert rect["from_name"] == "label" and cap["from_name"] == "caption" and rect["to_name"] == "image"
    assert cap["value"]["text"] == ["the red mug"] and rect["value"]["rectanglelabels"] == ["object"]
    assert (rect["original_width"], rect["original_height"]) == (200, 100)
    det = fake_predictor.refer([str(images_dir / "a.png")], [["the red mug"]])[0][0][0]
    assert ls_percent_to_xyxy(rect["value"], 200, 100) == pytest.approx(det.box_xyxy, abs=0.01)
    assert rect["score"] == pytest.approx(det.score) and results[0]["score"] == pytest.approx(det.score)
    # no text -> dense captions
    assert [x["value"].get("text") for x in results[2]["result"] if x["type"] == "textarea"] == \
        [["a thing"], ["another thing"]]


def test_tasks_are_batched_through_the_model(make_client, images_dir, fake_predictor):
    client = make_client(batch_size=4)
    fake_predictor.calls.clear()
    tasks = [_task(images_dir, i) for i in range(10)]
    assert len(client.post("/predict", json=predict_body(tasks)).json()["results"]) == 10
    assert fake_predictor.calls == [("refer", 4), ("refer", 4), ("refer", 2)]


def test_a_bad_task_does_not_cost_the_batch(client, images_dir, fake_predictor):
    (images_dir / "bad.png").write_bytes(b"not an image")
    (images_dir / "cut.png").write_bytes((images_dir / "a.png").read_bytes()[:120])  # header whole, body cut
    tasks = [_task(images_dir, 1), _task(images_dir, 2, "bad.png"), _task(images_dir, 3, "cut.png"),
             _task(images_dir, 4)]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert [bool(r["result"]) for r in results] == [True, False, False, True]
    assert "not a readable image" in results[1]["error"]  # found from the header, before the model
    assert "truncated or corrupt" in results[2]["error"]  # found where the predictor decodes it
    assert results[1]["model_version"] == "fake-1-failed"  # Label Studio will ask again next time


def test_a_local_predictor_prepares_images_in_the_download_threads(make_client, images_dir, tiny_predictor,
                                                                   monkeypatch):
    import threading

    from pixelllm_plugins.inference.predictor import PreparedInput
    from pixelllm_plugins.io import EncodedImage

    seen = []
    prepare = tiny_predictor.prepare

    def recording_prepare(image, limits=None):
        seen.append((type(image), threading.current_thread().name))
        return prepare(image, limits)

    monkeypatch.setattr(tiny_predictor, "prepare", recording_prepare)
    client = make_client(predictor=tiny_predictor)
    tasks = [_task(images_dir, 1), _task(images_dir, 2, "b.png", "a dog"), _task(images_dir, 3, "c.png")]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert all(r["result"] and "error" not in r for r in results)
    decoded = [name for kind, name in seen if kind is EncodedImage]
    assert len(decoded) == 3 and all(name.startswith("ls-fetch") for name in decoded)
    assert all(kind in (EncodedImage, PreparedInput) for kind, _ in seen)  # the model got them prepared
    rect = results[1]["result"][0]
    assert (rect["original_width"], rect["original_height"]) == (64, 96)
    det = tiny_predictor.refer([images_dir / "b.png"], [["a dog"]])[0][0][0]
    assert ls_percent_to_xyxy(rect["value"], 64, 96) == pytest.approx(det.box_xyxy, abs=0.01)


def test_model_failure_is_isolated_to_its_task(make_client, images_dir, fake_predictor):
    original = fake_predictor.refer

    def refer(images, texts, **kw):
        if any("boom" in t for ts in texts for t in ts):
            raise RuntimeError("model exploded")
        return original(images, texts, **kw)

    fake_predictor.refer = refer
    client = make_client()
    tasks = [_task(images_dir, 1), _task(images_dir, 2, expression="boom"), _task(images_dir, 3)]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert [bool(r["result"]) for r in results] == [True, False, True]
    assert "model exploded" in results[1]["error"]


def test_time_budget_leaves_remaining_tasks_for_the_next_request(make_client, images_dir):
    client = make_client(predict_budget_s=0.0)
    results = client.post("/predict", json=predict_body([_task(images_dir, 1)])).json()["results"]
    assert len(results) == 1 and results[0]["result"] == []
    assert "budget" in results[0]["error"] and results[0]["model_version"].endswith("-failed")


def test_interactive_prompt_and_drawn_box(client, images_dir):
    ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                       "value": {"text": ["the blue cup"]}}]}
    pred = client.post("/predict", json=predict_body([_task(images_dir, 1)], context=ctx)).json()["results"][0]
    types = [r["type"] for r in pred["result"]]
    assert types == ["rectanglelabels", "textarea"] and pred["result"][1]["value"]["text"] == ["the blue cup"]
    drawn = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
             "original_width": 200, "original_height": 100,
             "value": {"x": 10, "y": 10, "width": 20, "height": 30, "rectanglelabels": ["object"]}}
    captioned = {"id": "r0", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                 "original_width": 200, "original_height": 100,
                 "value": {"x": 50, "y": 50, "width": 20, "height": 30, "rectanglelabels": ["object"]}}
    its_caption = {"id": "r0", "from_name": "caption", "to_name": "image", "type": "textarea",
                   "value": {"x": 50, "y": 50, "width": 20, "height": 30, "text": ["kept"]}}
    ctx = {"result": [captioned, its_caption, drawn]}
    pred = client.post("/predict", json=predict_body([_task(images_dir, 1)], context=ctx)).json()["results"][0]
    assert [(r["type"], r["id"]) for r in pred["result"]] == [("rectanglelabels", "r1"), ("textarea", "r1")]
    assert pred["result"][1]["value"]["text"] == ["region 0"]
    assert pred["result"][1]["value"]["x"] == 10 and pred["result"][0]["value"]["rectanglelabels"] == ["object"]
    # moving an already captioned box suggests nothing (a caption is never overwritten)
    ctx = {"result": [captioned, its_caption]}
    pred = client.post("/predict", json=predict_body([_task(images_dir, 1)], context=ctx)).json()["results"][0]
    assert pred["result"] == []


@pytest.mark.parametrize("config,kind,expected", [
    ("region_captioning", "caption_regions", {"textarea", "rectanglelabels"}),
    ("dense_captioning", "dense_caption", {"textarea", "rectanglelabels"}),
    ("word_traces", "caption", {"textarea", "rectanglelabels", "keypointlabels"}),
])
def test_other_shipped_configs(client, images_dir, fake_predictor, config, kind, expected):
    fake_predictor.calls.clear()
    task = {"id": 1, "data": {"image": str(images_dir / "a.png")},
            "annotations": [{"result": [{"id": "x", "type": "rectanglelabels", "original_width": 200,
                                         "original_height": 100,
                                         "value": {"x": 5, "y": 5, "width": 50, "height": 50}}]}]}
    pred = client.post("/predict", json=predict_body([task], labeling_config(config))).json()["results"][0]
    assert {r["type"] for r in pred["result"]} == expected
    assert fake_predictor.calls[-1][0] == kind
    if config == "word_traces":
        whole = [r for r in pred["result"] if r["from_name"] == "caption"]
        assert whole[0]["value"]["text"] == ["a shape"] and "x" not in whole[0]["value"]
        words = [r["value"]["text"][0] for r in pred["result"] if r["from_name"] == "word"]
        assert words == ["a", "shape"]


def test_labels_map_through_predicted_values(client, images_dir):
    cfg = REFERRING.replace('<Label value="object" background="#e53935" predicted_values="object,thing"/>',
                            '<Label value="Cup" predicted_values="mug,cup"/><Label value="Other"/>')
    results = client.post("/predict", json=predict_body([_task(images_dir, 1, expression="the red mug"),
                                                         _task(images_dir, 2, expression="a cat")], cfg)).json()
    labels = [r["result"][0]["value"]["rectanglelabels"] for r in results["results"]]
    assert labels == [["Cup"], ["Cup"]]  # no match: the first label


def test_basic_auth(make_client):
    client = make_client(basic_auth_user="ls", basic_auth_pass="s3cret:with:colons")
    assert client.get("/health").status_code == 401
    assert client.get("/health").headers["www-authenticate"].startswith("Basic")
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/health", auth=("LS", "s3cret:with:colons")).status_code == 401
    assert client.get("/health", headers={"Authorization": "Basic !!!not-base64"}).status_code == 401
    assert client.get("/health", headers={"Authorization": "Bearer abc"}).status_code == 401
    assert client.post("/predict", json={"tasks": []}).status_code == 401
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 401
    ok = base64.b64encode(b"ls:s3cret:with:colons").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {ok}"}).status_code == 200


def test_basic_auth_compares_in_constant_time(monkeypatch):
    import hmac

    from label_studio_backend import server

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert server._auth_ok("Basic " + base64.b64encode(b"u:p").decode(), "u", "p")
    assert not server._auth_ok("Basic " + base64.b64encode(b"x:p").decode(), "u", "p")
    assert len(calls) == 4  # user and password are both compared, even when the user is already wrong


def test_versions_metrics_validate_and_unknown_webhook(client):
    assert client.get("/versions").json()["versions"] == ["fake-1"]
    assert client.post("/versions", json={"project": "7.1"}).json()["model_version"] == "fake-1"
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}}).json() == \
        {"status": "Unknown event"}
    assert client.post("/validate", json={"config": REFERRING}).json() == {"status": "ok", "task": "refer"}
    assert client.post("/validate", json={"config": "<View/>"}).status_code == 422
    metrics = client.get("/metrics").json()
    assert "counters" in metrics and metrics["counters"]["http_200"] >= 2


def test_request_body_limit(make_client):
    client = make_client(max_request_bytes=2048)
    r = client.post("/predict", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_images_from_label_studio_need_its_url(client):
    task = {"id": 5, "data": {"image": "/data/upload/1/x.png", "expression": "x"}}
    err = client.post("/predict", json=predict_body([task])).json()["results"][0]["error"]
    assert "LABEL_STUDIO_URL" in err


def test_data_uri_images(client):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((32, 16))).decode()
    pred = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": uri, "expression": "x"}}]))
    assert pred.json()["results"][0]["result"][0]["original_width"] == 32


# ---------------------------------------------------------------- bad input (issue 23)
def _post(client, path, body):
    """POST a body that may hold lone surrogates (httpx's json= cannot encode them; Label Studio's JSON
    escapes them as \\ud800)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _dense(attrs: str) -> str:
    return ('<View><Image name="image" value="$image"/>'
            f'<RectangleLabels name="label" toName="image" {attrs}><Label value="object"/></RectangleLabels>'
            '<TextArea name="caption" toName="image" perRegion="true"/></View>')


@pytest.mark.parametrize("attrs,fragment", [
    ('model_task="dense_caption" model_max_regions="1000000000"', "model_max_regions must be an integer from 1 to 256"),
    ('model_max_regions="-1"', "model_max_regions must be an integer from 1 to 256"),
    ('model_max_boxes="100000"', "model_max_boxes must be an integer from 1 to 128"),
    ('model_score_threshold="NaN"', "model_score_threshold must be a number from 0 to 1"),
])
def test_config_attributes_out_of_bounds_are_clear_errors_not_runs(client, images_dir, fake_predictor, attrs,
                                                                   fragment):
    config = _dense(attrs)
    where = '<RectangleLabels name="label">'
    r = client.post("/validate", json={"config": config})
    assert r.status_code == 422 and where in r.json()["errors"][0] and fragment in r.json()["errors"][0]
    r = client.post("/setup", json={"project": "9.1", "schema": config})
    assert r.status_code == 400 and where in r.json()["error"] and fragment in r.json()["error"]
    fake_predictor.calls.clear()
    tasks = [_task(images_dir, i) for i in range(3)]
    results = client.post("/predict", json=predict_body(tasks, config)).json()["results"]
    assert len(results) == 3 and all(fragment in p["error"] and p["result"] == [] for p in results)
    assert fake_predictor.calls == []  # nothing ran
    ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["x"]}}]}
    pred = client.post("/predict", json=predict_body(tasks[:1], config, context=ctx)).json()["results"][0]
    assert fragment in pred["error"]


def test_config_attributes_within_bounds_reach_the_model(client, images_dir, fake_predictor, monkeypatch):
    seen = {}
    original = fake_predictor.dense_caption

    def dense_caption(images, **kw):
        seen.update(kw)
        return original(images, **kw)

    monkeypatch.setattr(fake_predictor, "dense_caption", dense_caption)
    config = _dense('model_max_regions="256" model_score_threshold="0.7"')
    assert client.post("/setup", json={"project": "9.1", "schema": config}).status_code == 200
    assert client.post("/validate", json={"config": config}).json() == {"status": "ok", "task": "dense_caption"}
    pred = client.post("/predict", json=predict_body([_task(images_dir, 1)], config)).json()["results"][0]
    assert seen == {"max_regions": 256, "min_score": 0.7} and len(pred["result"]) == 2  # the 0.8 region only


@pytest.mark.parametrize("params", [{"tasks": 1}, {"tasks": [1, 2]}, {"self": "x"}, {"tasks": None, "login": "a"}])
def test_params_that_clash_with_predict_arguments_are_a_400(client, images_dir, params):
    r = client.post("/predict", json=predict_body([_task(images_dir, 1)]) | {"params": params})
    assert r.status_code == 400 and "'params' must not contain" in r.json()["error"]


def test_a_400_and_a_bug_leave_the_keep_alive_connection_usable(tmp_path, images_dir, fake_predictor, monkeypatch):
    """params {"tasks": 1} used to be a 500 that uvicorn followed by closing the keep-alive connection:
    now a 400, and even an unexpected error (a bug) is answered without dropping the connection."""
    import socket

    from ls_server import BackendServer

    from label_studio_backend.server import create_app

    app = create_app(model_dir=tmp_path / "md", predictor=fake_predictor, local_roots=str(images_dir),
                     label_studio_url="", label_studio_api_key="", basic_auth_user="", basic_auth_pass="")
    server = BackendServer(app)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        reader = sock.makefile("rb")

        def request(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
            data = json.dumps(body).encode() if body is not None else b""
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            status = int(reader.readline().split()[1])
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            assert headers.get("connection", "").lower() != "close"
            return status, json.loads(reader.read(int(headers["content-length"])))

        good = predict_body([_task(images_dir, 1)])
        assert request("POST", "/predict", good | {"params": {"tasks": 1}})[0] == 400
        status, body = request("POST", "/predict", good)  # the same connection
        assert status == 200 and "error" not in body["results"][0]
        monkeypatch.setattr(app.state.runtime, "health_fields", lambda: 1 / 0)
        assert request("GET", "/health") == (500, {"error": "internal error: ZeroDivisionError"})
        status, body = request("POST", "/predict", good)
        assert status == 200 and "error" not in body["results"][0]
        sock.close()
    finally:
        server.close()


def test_lone_surrogates_and_nul_only_texts(client, images_dir):
    tasks = [_task(images_dir, 1, expression="the \ud800 mug"), _task(images_dir, 2, expression=["ok", "\udfff"]),
             _task(images_dir, 3, expression="\x00"), _task(images_dir, 4, expression="\x00\x00 \x07\n\x00"),
             _task(images_dir, 5, expression=""), _task(images_dir, 6, expression="the\x00mug")]
    r = _post(client, "/predict", predict_body(tasks))
    assert r.status_code == 200
    results = r.json()["results"]
    for pred in results[:2]:
        assert "not valid Unicode (a lone surrogate" in pred["error"] and pred["result"] == []
    # NUL-only text counts as no text, exactly like an empty expression: dense captions
    assert results[2]["result"] and "error" not in results[2]
    assert [len(p["result"]) for p in results[2:5]] == [4, 4, 4]
    assert results[5]["result"][1]["value"]["text"] == ["the mug"]  # control characters become spaces
    ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["\ud83d"]}}]}
    pred = _post(client, "/predict", predict_body([_task(images_dir, 1)], context=ctx)).json()["results"][0]
    assert "prompt is not valid Unicode" in pred["error"]
    ctx["result"][0]["value"]["text"] = ["\x00"]
    pred = _post(client, "/predict", predict_body([_task(images_dir, 1)], context=ctx)).json()["results"][0]
    assert "neither a prompt text nor a rectangle" in pred["error"]  # as for an empty prompt


def test_surrogates_anywhere_else_never_break_the_response(client, images_dir):
    drawn = {"id": "r\ud800", "from_name": "label\udc00", "to_name": "image", "type": "rectanglelabels",
             "original_width": 200, "original_height": 100,
             "value": {"x": 10, "y": 10, "width": 20, "height": 30, "rectanglelabels": ["obj\ud800"]}}
    tasks = [_task(images_dir, 1), {"id": 2, "data": {"im\ud800": "x", "expression": "x"}},
             {"id": 3, "data": {"image": "/data/upload/\ud800.png"}}]
    r = _post(client, "/predict", predict_body(tasks, context={"result": [drawn]}))
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["result"][0]["id"] == "r\ud800" and results[0]["result"][1]["value"]["text"] == ["region 0"]
    assert "task data keys: [expression, im\\ud800]" in results[1]["error"]
    bad_config = REFERRING.replace('value="$image"', 'value="$image\ud800"')
    r = _post(client, "/predict", predict_body([_task(images_dir, 1)], bad_config))
    assert r.status_code == 200 and "not valid Unicode" in r.json()["results"][0]["error"]
    assert _post(client, "/validate", {"config": bad_config}).status_code == 422
    assert _post(client, "/setup", {"project": "3.1", "schema": bad_config}).status_code == 200  # logged only
    assert client.post("/predict", json=predict_body([_task(images_dir, 1)])).json()["results"][0]["result"]


def _rect(i: int, x: float, w: float = 5) -> dict:
    return {"id": f"r{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 200, "original_height": 100,
            "value": {"x": x, "y": 10, "width": w, "height": 20, "rectanglelabels": ["object"]}}


def test_interactive_boxes_are_capped_at_128_most_recent_first(client, images_dir, fake_predictor, monkeypatch):
    sizes = []
    original = fake_predictor.caption_regions
    monkeypatch.setattr(fake_predictor, "caption_regions",
                        lambda images, boxes, **kw: sizes.append(len(boxes[0])) or original(images, boxes, **kw))
    rects = [_rect(i, (i % 90) + 0.5) for i in range(5000)]
    rects[4990]["value"]["x"] = 150  # outside the image: skipped, not counted
    started = time.monotonic()
    pred = client.post("/predict", json=predict_body([_task(images_dir, 1)], context={"result": rects})).json()
    assert time.monotonic() - started < 20
    pred = pred["results"][0]
    assert sizes == [128]
    ids = [r["id"] for r in pred["result"] if r["type"] == "textarea"]
    # the most recently drawn (last in the context)
    assert ids == [f"r{i}" for i in range(5000 - 129, 5000) if i != 4990]
    assert "128 most recently drawn of 4,999" in pred["warning"]
    small = client.post("/predict", json=predict_body([_task(images_dir, 1)], context={"result": rects[:3]})).json()
    assert "warning" not in small["results"][0]


def test_batch_boxes_of_an_annotation_are_capped_at_the_first_128(client, images_dir, fake_predictor, monkeypatch):
    sizes = []
    original = fake_predictor.caption_regions
    monkeypatch.setattr(fake_predictor, "caption_regions",
                        lambda images, boxes, **kw: sizes.append([len(b) for b in boxes]) or original(images, boxes,
                                                                                                    **kw))
    task = {"id": 1, "data": {"image": str(images_dir / "a.png")},
            "annotations": [{"result": [_rect(i, i % 90) for i in range(300)]}]}
    pred = client.post("/predict", json=predict_body([task], labeling_config("region_captioning"))).json()
    pred = pred["results"][0]
    assert sizes == [[128]] and "captioned the first 128 of 300 boxes" in pred["warning"]
    assert len([r for r in pred["result"] if r["type"] == "textarea"]) == 128


def test_more_than_32_texts_per_task_are_refused(client, images_dir):
    results = client.post("/predict", json=predict_body([_task(images_dir, 1, expression=["e"] * 33),
                                                         _task(images_dir, 2, expression=["e"] * 32)])).json()
    assert "more than 32 texts" in results["results"][0]["error"] and "error" not in results["results"][1]


@pytest.mark.parametrize("name,data", [
    ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"),
    ("x.ppm", b"P6\n10 10\n255\n" + bytes(300)),
])
def test_eps_and_ppm_tasks_get_a_per_task_error(client, images_dir, name, data):
    (images_dir / name).write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    tasks = [_task(images_dir, 1, name), {"id": 2, "data": {"image": uri, "expression": "x"}}, _task(images_dir, 3)]
    results = client.post("/predict", json=predict_body(tasks)).json()["results"]
    assert all("not a readable image (PNG, JPEG, WebP, BMP, TIFF, GIF)" in p["error"] for p in results[:2])
    assert "error" not in results[2] and results[2]["result"]
