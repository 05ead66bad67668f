"""The protocol routes through an HTTP test client, with FakePredictor."""

from __future__ import annotations

import base64
import logging

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
