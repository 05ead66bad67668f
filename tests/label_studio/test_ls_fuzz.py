"""Bad input: 200+ malformed tasks and requests. No crash, a per-task error message, and the good tasks of
the same batch still predicted."""

from __future__ import annotations

import base64
import json
import random

import pytest
from conftest import REFERRING, predict_body
from ls_helpers import Route, ScriptedServer, huge_png_header, png_bytes

from label_studio_backend import labeling_config


@pytest.fixture()
def ls():
    server = ScriptedServer()
    server.routes["/data/upload/1/good.png"] = Route(200, png_bytes((80, 60)))
    server.routes["/data/upload/1/missing.png"] = Route(404, b"not found")
    server.routes["/data/upload/1/text.png"] = Route(200, b"this is not an image at all")
    server.routes["/data/upload/1/trunc.png"] = Route(200, png_bytes((300, 300), box=(1, 1, 200, 200))[:100])
    server.routes["/data/upload/1/huge.png"] = Route(200, huge_png_header(30000, 30000))
    server.routes["/data/upload/1/empty.png"] = Route(200, b"")
    server.routes["/data/upload/1/forbidden.png"] = Route(403, b"no")
    server.routes["/data/upload/1/gif.png"] = Route(200, b"GIF89a" + b"\x00" * 20)
    server.routes["/tasks/9/presign/"] = Route(404, b"no storage")
    yield server
    server.close()


@pytest.fixture()
def fuzz_client(make_client, ls):
    return make_client(label_studio_url=ls.url, label_studio_api_key="fuzz-token-123", batch_size=8,
                       fetch_timeout_s=5)


GOOD = {"image": "/data/upload/1/good.png", "expression": "the red mug"}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
PPM = b"P6\n4 4\n255\n" + bytes(48)


def post_json(client, path: str, body: object):
    """POST JSON that may hold lone surrogates (escaped as \\ud800, as Label Studio's JSON does; httpx's
    ``json=`` cannot encode them)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def malformed_tasks(images_dir, ls_url: str = "http://127.0.0.1:9") -> list[tuple[str, object, str]]:
    """(name, task, expectation) with expectation "error" (must carry a reason) or "ok" (handled, e.g. an
    empty prompt falls back to dense captions)."""
    cases: list[tuple[str, object, str]] = []
    # the task object itself
    for name, task in [("none", None), ("int", 3), ("str", "task"), ("list", [GOOD]), ("empty", {}),
                       ("data-none", {"id": 1, "data": None}), ("data-list", {"id": 1, "data": [1, 2]}),
                       ("data-str", {"id": 1, "data": "image.png"}), ("data-int", {"id": 1, "data": 5})]:
        cases.append((f"task-{name}", task, "error"))
    # missing / wrong image key and value
    bad_refs = {
        "missing-key": None, "empty": "", "spaces": "   ", "int": 42, "float": 1.5, "dict": {"url": "x"},
        "list": ["/data/upload/1/good.png"], "bool": True, "404": "/data/upload/1/missing.png",
        "403": "/data/upload/1/forbidden.png", "non-image": "/data/upload/1/text.png",
        "truncated": "/data/upload/1/trunc.png", "30000x30000": "/data/upload/1/huge.png",
        "zero-bytes": "/data/upload/1/empty.png", "bad-gif": "/data/upload/1/gif.png",
        "disallowed-host": "http://169.254.169.254/latest/meta-data", "disallowed-https": "https://example.com/a.png",
        "ftp": "ftp://example.com/a.png", "javascript": "javascript:alert(1)", "etc-passwd": "/etc/passwd",
        "traversal": f"{images_dir}/../../../etc/passwd", "file-url": "file:///etc/shadow",
        "local-files-no-d": "/data/local-files/?x=1", "local-files-traversal": "/data/local-files/?d=../../etc/passwd",
        "s3-without-presign": "s3://bucket/key.png", "gs": "gs://bucket/key.png", "azure": "azure-blob://c/k.png",
        "data-not-base64": "data:image/png,rawbytes", "data-garbage": "data:image/png;base64,!!!!",
        "data-text": "data:image/png;base64," + base64.b64encode(b"hello").decode(),
        "long-url": "/data/upload/1/" + "a" * 9000, "nul-byte": "/data/upload/1/go\x00od.png",
        "unicode": "/data/upload/1/\u00fc\u2603.png", "relative": "images/a.png", "windows": "C:\\images\\a.png",
        "url-no-host": "http:///a.png", "newline": "/data/upload/1/good.png\n/etc/passwd",
        "port-99999": "http://127.0.0.1:99999/a.png", "port-abc": "http://127.0.0.1:abc/a.png",
        "ipv6-unclosed": "http://[::1/a.png", "credentials": "http://u:p@example.com/a.png",
        "upload-dot-dot": "/data/upload/../../etc/passwd", "upload-dot": "/data/upload/./1/good.png",
        "upload-encoded-dots": "/data/upload/1/%2e%2e/%2E%2E/api/users",
        "local-files-encoded-dots": "/data/local-files/?d=a/%2e%2e/%2e%2e/etc/passwd",
        "ls-absolute-dots": f"{ls_url}/data/upload/1/../../../api/users",
        "ls-absolute-bad-port": f"{ls_url}:99999/data/upload/1/good.png",
        "tasks-path-dots": "/tasks/../api/users", "surrogate-path": "/data/upload/1/\ud800.png",
        "eps": "data:image/png;base64," + base64.b64encode(EPS).decode(),
        "ppm": "data:image/png;base64," + base64.b64encode(PPM).decode(),
    }
    for name, ref in bad_refs.items():
        data = {"expression": "the red mug"} if name == "missing-key" else {"image": ref, "expression": "x"}
        cases.append((f"image-{name}", {"id": 100 + len(cases), "data": data}, "error"))
    # prompts
    prompts = {
        "10000-chars": ("x" * 10_000, "error"), "int": (12, "error"), "dict": ({"a": 1}, "error"),
        "list-of-ints": ([1, 2], "error"), "list-with-none": (["ok", None], "error"),
        "51-expressions": (["e"] * 51, "error"), "1001-chars": ("y" * 1001, "error"),
        "33-expressions": (["e"] * 33, "error"), "33-lines": ("\n".join(["e"] * 33), "error"),
        "surrogate": ("the \ud800 mug", "error"), "surrogate-list": (["ok", "\udc00"], "error"),
        "surrogate-only": ("\udfff", "error"), "nul-only": ("\x00\x00", "ok"), "controls-only": ("\x00\x07\x1b", "ok"),
        "empty": ("", "ok"), "spaces": ("   ", "ok"), "newlines": ("\n\n", "ok"), "none": (None, "ok"),
        "empty-list": ([], "ok"), "unicode": ("la tasse rouge \u2615 \u00e9\u00e8", "ok"),
        "control-chars": ("the\x00red\x07mug", "ok"), "multi-line": ("a mug\nthe cup", "ok"),
        "list": (["the mug", "the cup"], "ok"), "html": ("<script>alert(1)</script>", "ok"),
        "sql": ("'; DROP TABLE tasks; --", "ok"), "emoji": ("\U0001f600" * 20, "ok"),
        "rtl": ("\u05d4\u05db\u05d5\u05e1 \u05d4\u05d0\u05d3\u05d5\u05dd", "ok"),
    }
    for name, (text, expect) in prompts.items():
        cases.append((f"prompt-{name}", {"id": 200 + len(cases), "data": {**GOOD, "expression": text}}, expect))
    # odd but harmless task shapes
    cases.append(("extra-keys", {"id": 300, "data": {**GOOD, "junk": {"deep": [1, 2, {"x": None}]}},
                                 "annotations": "garbage", "predictions": [None, 1]}, "ok"))
    cases.append(("id-str", {"id": "abc", "data": dict(GOOD)}, "ok"))
    cases.append(("id-missing", {"data": dict(GOOD)}, "ok"))
    return cases


def mutated_tasks(n: int, seed: int = 0) -> list[dict]:
    """Seeded random mutations of a good task (keys dropped, values replaced by wrong types)."""
    rng = random.Random(seed)
    junk = [None, 0, -1, 3.5, "", " ", "x" * 2000, [], {}, [None], {"a": "b"}, True, "/data/upload/1/missing.png",
            "/data/upload/1/text.png", "\ufffd", "%00", "../../", "http://[::1]:1/x.png"]
    out = []
    for i in range(n):
        task = {"id": 1000 + i, "data": dict(GOOD)}
        for _ in range(rng.randint(1, 3)):
            target = rng.choice(["image", "expression", "data", "id", "drop-image", "drop-data"])
            if target == "drop-image":
                task["data"].pop("image", None) if isinstance(task.get("data"), dict) else None
            elif target == "drop-data":
                task.pop("data", None)
            elif target == "data":
                task["data"] = rng.choice(junk)
            elif target == "id":
                task["id"] = rng.choice(junk)
            elif isinstance(task.get("data"), dict):
                task["data"][target] = rng.choice(junk)
        out.append(task)
    return out


def _check_prediction(pred: dict) -> None:
    assert isinstance(pred, dict) and isinstance(pred["result"], list)
    assert isinstance(pred["score"], float) and 0.0 <= pred["score"] <= 1.0
    assert isinstance(pred["model_version"], str) and pred["model_version"]
    if "error" in pred:
        assert isinstance(pred["error"], str) and len(pred["error"]) > 10 and pred["result"] == []


def test_malformed_tasks_in_one_batch_with_good_tasks(fuzz_client, images_dir, ls):
    cases = malformed_tasks(images_dir, ls.url)
    mutated = mutated_tasks(150)
    assert len(cases) + len(mutated) >= 200
    tasks, expect = [], []
    good_every = 5
    for i, (name, task, expectation) in enumerate(cases + [(f"mutated-{k}", t, "any") for k, t in enumerate(mutated)]):
        if i % good_every == 0:
            tasks.append({"id": 9000 + i, "data": dict(GOOD)})
            expect.append(("good", "good"))
        tasks.append(task)
        expect.append((name, expectation))
    r = post_json(fuzz_client, "/predict", predict_body(tasks))
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(tasks)
    # no '.'/'..' path ever reached the Label Studio host (the API key goes with every request there)
    assert not [q["path"] for q in ls.requests if "/." in q["path"] or "%2e" in q["path"].lower()]
    good = 0
    for (name, expectation), pred in zip(expect, results):
        _check_prediction(pred)
        if expectation == "good":
            assert "error" not in pred and len(pred["result"]) == 2, pred
            good += 1
        elif expectation == "error":
            assert "error" in pred, f"{name}: expected a per-task error, got {pred}"
        elif expectation == "ok":
            assert "error" not in pred, f"{name}: {pred.get('error')}"
    assert good == len([e for e in expect if e[1] == "good"]) >= 40
    assert fuzz_client.get("/health").json()["status"] == "UP"


@pytest.mark.parametrize("config,reason", [
    ("<View><Image", "well-formed"),
    ("not xml at all", "well-formed"),
    ("", "missing"),
    ("<View/>", "no <Image"),
    ('<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="nope"><Label value="a"/>'
     '</RectangleLabels></View>', "RectangleLabels"),
    ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', "DOCTYPE"),
    ('<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image" model_task="zzz">'
     '<Label value="a"/></RectangleLabels></View>', "model_task"),
])
def test_malformed_config_gives_per_task_errors(fuzz_client, config, reason):
    tasks = [{"id": 1, "data": dict(GOOD)}, {"id": 2, "data": dict(GOOD)}]
    r = fuzz_client.post("/predict", json=predict_body(tasks, label_config=config))
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 2 and all(reason in p["error"] for p in results)


def test_wrong_to_name_in_interactive_context_is_ignored(fuzz_client):
    ctx = {"result": [{"id": "r", "from_name": "label", "to_name": "other_image", "type": "rectanglelabels",
                       "original_width": 80, "original_height": 60,
                       "value": {"x": 1, "y": 1, "width": 50, "height": 50}},
                      {"from_name": "prompt", "to_name": "other_image", "type": "textarea",
                       "value": {"text": ["mug"]}}]}
    pred = fuzz_client.post("/predict", json=predict_body([{"id": 1, "data": dict(GOOD)}], context=ctx)).json()
    assert "error" in pred["results"][0] and "neither" in pred["results"][0]["error"]


BAD_BODIES: list[tuple[str, bytes | str, int]] = [
    ("empty", b"", 400), ("garbage", b"\x00\xff\xfe garbage", 400), ("truncated-json", b'{"tasks": [', 400),
    ("json-list", b"[1, 2]", 400), ("json-number", b"42", 400), ("json-string", b'"tasks"', 400),
    ("json-null", b"null", 400), ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("nan", b'{"tasks": NaN}', 400), ("bad-utf8", b'{"tasks": ["\xff\xfe"]}', 400),
    ("trailing", b'{"tasks": []} trailing', 400), ("single-quotes", b"{'tasks': []}", 400),
]
BAD_PREDICT_JSON: list[tuple[str, object]] = [
    ("tasks-missing", {}), ("tasks-dict", {"tasks": {"a": 1}}), ("tasks-str", {"tasks": "abc"}),
    ("tasks-int", {"tasks": 5}), ("tasks-null", {"tasks": None}),
    ("params-tasks", {"tasks": [{"id": 1, "data": GOOD}], "params": {"tasks": 1}}),
    ("params-self", {"tasks": [], "params": {"self": [1]}}),
]
ODD_PREDICT_JSON: list[tuple[str, dict]] = [
    ("params-list", {"params": [1]}), ("params-str", {"params": "x"}), ("context-str", {"params": {"context": "x"}}),
    ("context-list", {"params": {"context": [1]}}), ("context-result-str", {"params": {"context": {"result": "x"}}}),
    ("context-result-junk", {"params": {"context": {"result": [None, 1, "x", {"type": "rectanglelabels"},
                                                                {"type": "textarea", "value": "x"}]}}}),
    ("context-rect-nan", {"params": {"context": {"result": [{"type": "rectanglelabels", "value": {
        "x": "nan", "y": 1, "width": 1e308, "height": -5}}]}}}),
    ("context-prompt-huge", {"params": {"context": {"result": [{"from_name": "prompt", "type": "textarea",
                                                                "value": {"text": ["z" * 10_000]}}]}}}),
    ("project-junk", {"project": {"x": 1}}), ("project-traversal", {"project": "../../etc.1"}),
    ("label-config-int", {"label_config": 5}), ("label-config-list", {"label_config": ["<View/>"]}),
    ("login-int", {"params": {"login": 5, "password": ["x"]}}),
]
BAD_WEBHOOKS: list[tuple[str, object]] = [
    ("no-action", {"project": {"id": 1}}), ("action-int", {"action": 5}), ("action-unknown", {"action": "NOPE"}),
    ("no-project", {"action": "ANNOTATION_CREATED"}), ("project-str", {"action": "START_TRAINING", "project": "x/../y"}),
    ("project-null", {"action": "START_TRAINING", "project": None}),
    ("annotation-junk", {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": "x", "task": 5}),
    ("annotation-no-id", {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"result": [1]},
                          "task": {"id": 1}}),
    ("annotations-list-mismatch", {"action": "ANNOTATIONS_CREATED", "project": {"id": 3},
                                   "annotation": [{"id": 1}], "task": "x"}),
    ("deleted-junk", {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [None, "x", {"id": "../1"}]}),
    ("updated-cancelled", {"action": "ANNOTATION_UPDATED", "project": {"id": 3, "label_config": 7},
                           "annotation": {"id": 5, "was_cancelled": True, "result": []}, "task": {"id": 1}}),
]


def test_malformed_requests(fuzz_client):
    statuses = {}
    for name, body, expected in BAD_BODIES:
        for route in ("/predict", "/setup", "/webhook"):
            r = fuzz_client.post(route, content=body, headers={"content-type": "application/json"})
            statuses[f"{route}:{name}"] = r.status_code
            assert r.status_code == expected, (route, name, r.text)
            assert r.json()["error"]
    for name, body in BAD_PREDICT_JSON:
        r = fuzz_client.post("/predict", json=body)
        assert r.status_code == 400 and "tasks" in r.json()["error"], name
    for name, extra in ODD_PREDICT_JSON:
        body = predict_body([{"id": 1, "data": dict(GOOD)}]) | extra
        if "params" in extra:
            body["params"] = extra["params"]
        r = fuzz_client.post("/predict", json=body)
        assert r.status_code == 200, (name, r.text)
        results = r.json()["results"]
        assert len(results) == 1, name
        _check_prediction(results[0])
    for name, body in BAD_WEBHOOKS:
        r = fuzz_client.post("/webhook", json=body)
        assert r.status_code in (200, 201, 400), (name, r.text)
    for body in ({"schema": 5}, {"schema": ["x"]}, {"project": None, "schema": "<bad"}, {"extra_params": "x"}):
        assert fuzz_client.post("/setup", json=body).status_code in (200, 400)
    for route in ("/versions", "/validate", "/train"):
        assert fuzz_client.post(route, content=b"\xff", headers={"content-type": "application/json"}).status_code \
            in (400, 422)
    assert fuzz_client.post("/validate", json={"config": None}).status_code == 422
    assert fuzz_client.post("/train", json={"project": "1.2", "annotations": [None, 1, {"annotations": "x"}]}
                            ).status_code == 201
    total = len(statuses) + len(BAD_PREDICT_JSON) + len(ODD_PREDICT_JSON) + len(BAD_WEBHOOKS) + 4 + 3 + 2
    assert total >= 60
    health = fuzz_client.get("/health").json()
    assert health["status"] == "UP"
    fuzz_client.app.state.runtime.training.wait_idle(30)
    # the server still predicts normally afterwards
    r = fuzz_client.post("/predict", json=predict_body([{"id": 1, "data": dict(GOOD)}]))
    assert "error" not in r.json()["results"][0]


def test_other_configs_survive_malformed_tasks(fuzz_client, images_dir):
    tasks = [t for _, t, _ in malformed_tasks(images_dir)][:60] + [{"id": 1, "data": dict(GOOD)}]
    for name in ("region_captioning", "dense_captioning", "word_traces"):
        r = post_json(fuzz_client, "/predict", predict_body(tasks, label_config=labeling_config(name)))
        assert r.status_code == 200
        results = r.json()["results"]
        assert len(results) == len(tasks)
        for pred in results:
            _check_prediction(pred)
        assert "error" not in results[-1] and results[-1]["result"]


def test_fuzz_does_not_leak_the_token_in_errors(fuzz_client):
    r = fuzz_client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "/data/upload/1/forbidden.png",
                                                                            "expression": "x"}}]))
    assert "fuzz-token-123" not in json.dumps(r.json())
    assert REFERRING  # the shipped config is what the other fuzz tests use
