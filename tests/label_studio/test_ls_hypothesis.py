"""Property-based fuzzing of the backend's HTTP surface (hypothesis, fixed seed, bounded run time).

Generated: batches of hostile tasks mixed with good ones, label configs with hostile attributes, interactive
contexts with hostile regions (outside the image, negative sizes, NaN-like values, wrong types, thousands of
them) and hostile request bodies and params. Property: the answer is never a 5xx; it is a 4xx with a JSON
error, or a 200 with one result per task, each either predictions or a clear error (never a raw Python
exception); good tasks in the same batch are still predicted; after the examples a good request is still
answered. The number of generated bad inputs is counted and asserted.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ls_helpers import Route, ScriptedServer, png_bytes

from label_studio_backend import labeling_config
from label_studio_backend.label_config import LabelConfigError, parse_label_config

SEED = dict(derandomize=True, deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
GENERATED: Counter[str] = Counter()  # bad inputs sent, per kind
MIN_BAD_INPUTS = 300
RAW_EXCEPTIONS = ("TypeError", "KeyError", "AttributeError", "ValueError", "IndexError", "UnicodeEncodeError",
                  "UnicodeDecodeError", "RecursionError", "OverflowError", "ZeroDivisionError", "AssertionError",
                  "the backend failed on this request", "Traceback")
CONFIGS = ("referring", "region_captioning", "dense_captioning", "word_traces")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One backend app for the whole module (the examples share it, as Label Studio would), a scripted
    Label Studio image host and a folder of local images."""
    import sys
    from pathlib import Path

    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fakes import FakePredictor

    from label_studio_backend.server import create_app

    root = tmp_path_factory.mktemp("ls-hypothesis")
    images = root / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes((200, 100), box=(20, 10, 80, 60)))
    (images / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    ls = ScriptedServer()
    ls.routes["/data/upload/1/good.png"] = Route(200, png_bytes((80, 60)))
    ls.routes["/data/upload/1/text.png"] = Route(200, b"not an image")
    ls.routes["/etc/passwd"] = Route(200, png_bytes((8, 8)))  # what a normalised '..' path would reach
    app = create_app(model_dir=root / "model_dir", predictor=FakePredictor(), local_roots=str(images),
                     label_studio_url=ls.url, label_studio_api_key="hyp-token", basic_auth_user="",
                     basic_auth_pass="", fetch_timeout_s=3, batch_size=4)
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    yield {"client": client, "ls": ls, "images": images}
    client.__exit__(None, None, None)
    ls.close()


# ---------------------------------------------------------------- strategies
def _big(kind: int) -> object:
    """A deep list, a long list or a dict holding a deep list: built anew each time, so that a body that is
    changed after the draw never ends up holding itself."""
    return _deep(400) if kind == 400 else [None] * 500 if kind == 500 else {"k": _deep(60)}


def _deep(n: int) -> object:
    value: object = "bottom"
    for _ in range(n):
        value = [value]
    return value


HOSTILE_TEXT = st.sampled_from([
    "", " ", "\x00", "\x00\x00\x07", "\ud800", "the \udfff mug", "\ud83d", "../../", "%2e%2e/%2e%2e", "x" * 3000,
    "\u202eevil", "\U0001d54f", "<script>alert(1)</script>", "nan", "-1", "1e309", "NUL\x00byte", "\n\n",
    "a\nb\nc", "'; DROP TABLE tasks; --", "\ufeff", "\u2028", "\\", "${jndi:x}",
]) | st.text(max_size=12)
HUGE_NUMBERS = st.sampled_from([10**30, -(10**30), 10**4000, 1e308, -1e308, 5e-324, 2**63, -(2**63) - 1])
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | HUGE_NUMBERS | \
    st.floats(allow_nan=False, allow_infinity=False) | HOSTILE_TEXT
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["id", "data", "image", "result", "value", "x", "type", "\ud800", ""]) | st.text(max_size=4),
    inner, max_size=3), max_leaves=6) | st.sampled_from([400, 500, 60]).map(_big)  # fresh objects per draw

EPS = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n").decode()
PPM = base64.b64encode(b"P6\n4 4\n255\n" + bytes(48)).decode()
BAD_REFS = [
    "/data/upload/../../etc/passwd", "/data/upload/1/%2e%2e/%2e%2e/etc/passwd", "/data/upload/./1/good.png",
    "/data/upload/1/..%2f..%2fetc/passwd", "/data/upload/1/%252e%252e/x.png", "/data/local-files/?d=../../etc/passwd",
    "/data/local-files/?d=a/%2e%2e/%2e%2e/etc/passwd", "/data/local-files/?x=1", "/storage-data/../etc/passwd",
    "/tasks/../etc/passwd", "/data/upload/1/missing.png", "/data/upload/1/text.png", "/data/upload/\ud800.png",
    "http://127.0.0.1:99999/a.png", "http://127.0.0.1:abc/a.png", "http://[::1/a.png", "http://[::1]:0/a.png",
    "http:///a.png", "http://u:p@example.com/a.png", "https://example.com/a b.png", "http://169.254.169.254/",
    "ftp://example.com/a.png", "javascript:alert(1)", "file:///etc/shadow", "/etc/passwd", "C:\\x.png",
    "s3://bucket/key.png", "gs://b/k.png", "data:image/png;base64,!!!", "data:image/png,raw",
    f"data:image/png;base64,{EPS}", f"data:image/png;base64,{PPM}", "/data/upload/1/" + "a" * 9000,
    "/data/upload/1/good.png\n/etc/passwd", "/data/upload/1/go\x00od.png",
]


@st.composite
def image_refs(draw) -> object:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.sampled_from(BAD_REFS))
    if kind == 1:  # a Label Studio path with generated dot segments, raw or percent-encoded
        seg = draw(st.sampled_from(["..", ".", "%2e%2e", "%2E.", ".%2e", "%2e", "..%5c", "%252e%252e"]))
        where = draw(st.sampled_from(["/data/upload/1/{}/x.png", "/data/upload/{}/{}/etc/passwd",
                                      "/data/local-files/?d=imgs/{}/x.png", "{ls}/data/upload/{}/x.png"]))
        return where.replace("{}", seg)
    if kind == 2:
        return draw(JUNK)
    return "local:x.eps"  # a format outside the allow-list, on disk


NUMBER_ISH = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e9, 1e9, allow_nan=False), HUGE_NUMBERS,
                       st.sampled_from(["nan", "inf", "-1", "1e400", "5", None, [], {}, True]))


@st.composite
def regions(draw) -> dict:
    """One hostile Label Studio result: rectangles/keypoints outside the image, negative or huge sizes,
    NaN-like strings, wrong types."""
    region = {
        "id": draw(st.one_of(st.text(max_size=6), JUNK)),
        "type": draw(st.sampled_from(["rectanglelabels", "rectangle", "RectangleLabels", "keypointlabels",
                                      "textarea", "polygonlabels", "", None, 5, ["rectanglelabels"]])),
        "from_name": draw(st.sampled_from(["label", "prompt", "caption", "", None, ["label"]])),
        "to_name": draw(st.sampled_from(["image", "image", "other", None, {"a": 1}])),
        "original_width": draw(NUMBER_ISH), "original_height": draw(NUMBER_ISH),
    }
    if draw(st.booleans()):
        value = {k: draw(NUMBER_ISH) for k in ("x", "y", "width", "height")}
        extra = draw(st.sampled_from(["rectanglelabels", "keypointlabels", "text", "rotation", None]))
        if extra:
            value[extra] = draw(st.one_of(JUNK, st.lists(HOSTILE_TEXT, max_size=3)))
        region["value"] = value
    else:
        region["value"] = draw(JUNK)
    return region


@st.composite
def region_lists(draw) -> list:
    """A few hostile regions, or one repeated thousands of times (distinct ids)."""
    if draw(st.integers(0, 4)) == 0:
        base = draw(regions())
        n = draw(st.sampled_from([200, 1000, 3000]))
        return [{**base, "id": f"m{i}"} for i in range(n)]
    return draw(st.lists(regions(), max_size=5))


@st.composite
def bad_tasks(draw) -> object:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(JUNK)  # not a task at all
    data: dict = {"image": draw(image_refs()), "expression": draw(st.one_of(HOSTILE_TEXT, JUNK))}
    if kind == 1:
        data = draw(st.one_of(JUNK, st.just({"expression": "no image key"})))
    elif kind in (2, 3):  # a good image, a hostile text
        data["image"] = "local:a.png"
        data["expression"] = draw(st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=40),
                                            st.just(["e"] * 33), JUNK))
    task = {"id": draw(st.one_of(st.integers(), JUNK)), "data": data}
    if kind in (4, 5):  # hostile existing regions (caption_regions reads them)
        task["data"]["image"] = "local:a.png"
        task[draw(st.sampled_from(["annotations", "predictions"]))] = draw(st.one_of(
            st.lists(st.fixed_dictionaries({"result": region_lists()}), min_size=1, max_size=2), JUNK))
    return task


@st.composite
def label_configs(draw) -> tuple[str, str]:
    """(what was made hostile, config XML)."""
    attrs = {
        "model_max_regions": draw(st.sampled_from(["1000000000", "0", "-5", "nan", "inf", "1e400", "2.5", "abc",
                                                   "257", "20", "", None])),
        "model_max_boxes": draw(st.sampled_from(["129", "100000", "0", "-1", "NaN", "1", "x", None])),
        "model_score_threshold": draw(st.sampled_from(["1.5", "-0.1", "nan", "-inf", "0.3", "1e-400", "high", None])),
        "model_task": draw(st.sampled_from(["refer", "caption_regions", "dense_caption", "caption_trace", "zzz",
                                            "", "DENSE_CAPTION", None])),
        "toName": draw(st.sampled_from(["image", "image", "nope", "", "image,other"])),
        "model_default_prompt": draw(st.sampled_from([None, "", "the mug", "&#x1F600;", "x" * 2000])),
    }
    rect_attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items() if v is not None)
    image = '<Image name="image" value="$image"/>' if draw(st.integers(0, 6)) else ""
    rect = f'<RectangleLabels name="label" {rect_attrs}><Label value="object"/></RectangleLabels>' \
        if draw(st.integers(0, 6)) else ""
    caption = '<TextArea name="caption" toName="image" perRegion="true"/>' if draw(st.booleans()) else ""
    prompt = '<TextArea name="prompt" toName="image" showSubmitButton="true"/>' if draw(st.booleans()) else ""
    text = '<Text name="expression" value="$expression"/>' if draw(st.booleans()) else ""
    body = image + text + prompt + rect + caption
    depth = draw(st.sampled_from([0, 0, 10, 62, 64, 200]))
    body = "<View>" * depth + body + "</View>" * depth
    many = draw(st.sampled_from([0, 0, 50, 10_001]))
    body += '<Header value="h"/>' * many
    xml = f"<View>{body}</View>"
    mangle = draw(st.integers(0, 9))
    if mangle == 0:
        xml = xml[: draw(st.integers(0, len(xml)))]  # truncated
    elif mangle == 1:
        xml = '<!DOCTYPE x [<!ENTITY a "b">]>' + xml
    elif mangle == 2:
        xml = xml.replace('value="$image"', 'value="$image\ud800"')
    elif mangle == 3:
        xml = xml.replace("<View>", "<View>\x00", 1)
    return f"attrs={attrs} depth={depth} tags+{many} mangle={mangle}", xml


# ---------------------------------------------------------------- checks
def _post(client, path: str, body: object):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def _assert_answer(r, n_tasks: int | None) -> list[dict]:
    """Never a 5xx; a 4xx carries a JSON error; a 200 has one result per task, each predictions or a clear
    error. Returns the results (empty for a 4xx)."""
    assert r.status_code < 500, r.text[:500]
    body = r.json()
    if r.status_code >= 400:
        assert 400 <= r.status_code < 500 and isinstance(body.get("error"), str) and body["error"], body
        return []
    assert r.status_code == 200
    results = body["results"]
    assert isinstance(results, list)
    if n_tasks is not None:
        assert len(results) == max(n_tasks, 0) or (n_tasks == 0 and len(results) <= 1)
    for pred in results:
        assert isinstance(pred, dict) and isinstance(pred["result"], list), pred
        assert isinstance(pred["score"], float) and 0.0 <= pred["score"] <= 1.0
        assert isinstance(pred["model_version"], str) and pred["model_version"]
        if "error" in pred:
            error = pred["error"]
            assert isinstance(error, str) and len(error) > 10 and pred["result"] == [], pred
            assert not error.startswith(RAW_EXCEPTIONS) and "Traceback" not in error, error
            assert pred["model_version"].endswith("-failed")
    return results


def _resolve(task: object, images) -> object:
    """Replace the ``local:NAME`` / ``{ls}`` markers by real paths (generated data cannot know them)."""
    if isinstance(task, dict) and isinstance(task.get("data"), dict):
        ref = task["data"].get("image")
        if isinstance(ref, str) and ref.startswith("local:"):
            task["data"]["image"] = str(images / ref[6:])
    return task


def _good(i: int, images) -> dict:
    image = str(images / "a.png") if i % 2 else "/data/upload/1/good.png"
    return {"id": 50_000 + i, "data": {"image": image, "expression": "the red mug"}}


def _no_dot_requests(ls) -> None:
    seen = [q["path"] for q in ls.requests if "/." in q["path"] or "%2e" in q["path"].lower()
            or q["path"] == "/etc/passwd"]
    assert not seen, seen


def _still_answers(env) -> None:
    client, images = env["client"], env["images"]
    r = client.post("/predict", json={"tasks": [_good(1, images), _good(2, images)],
                                      "label_config": labeling_config("referring"), "project": "5.1"})
    assert r.status_code == 200
    assert all("error" not in p and p["result"] for p in r.json()["results"])
    assert client.get("/health").json()["status"] == "UP"


# ---------------------------------------------------------------- properties
def test_hostile_task_batches(env):
    client, images, ls = env["client"], env["images"], env["ls"]

    @settings(max_examples=70, **SEED)
    @given(bad=st.lists(bad_tasks(), min_size=1, max_size=6), config=st.sampled_from(CONFIGS),
           where=st.integers(0, 6))
    def run(bad, config, where):
        bad = [_resolve(t, images) for t in bad]
        for t in bad:
            if isinstance(t, dict) and isinstance(t.get("data"), dict) and isinstance(t["data"].get("image"), str):
                t["data"]["image"] = t["data"]["image"].replace("{ls}", ls.url)
        tasks = list(bad)
        goods = [_good(where, images), _good(where + 1, images)]
        tasks.insert(min(where, len(tasks)), goods[0])
        tasks.append(goods[1])
        GENERATED["tasks"] += len(bad)
        r = _post(client, "/predict", {"tasks": tasks, "label_config": labeling_config(config), "project": "5.1",
                                       "params": {"login": None, "password": None, "context": None}})
        results = _assert_answer(r, len(tasks))
        assert results, r.text[:300]
        for good in goods:
            pred = results[tasks.index(good)]
            assert "error" not in pred and pred["result"], pred

    run()
    _no_dot_requests(ls)
    assert GENERATED["tasks"] >= 150
    _still_answers(env)


def test_hostile_label_configs(env):
    client, images = env["client"], env["images"]
    refused = Counter()

    @settings(max_examples=90, **SEED)
    @given(made=label_configs())
    def run(made):
        what, xml = made
        GENERATED["configs"] += 1
        try:
            parse_label_config(xml).check()
            valid = True
        except LabelConfigError:
            valid = False
        refused[valid] += 1
        r = _post(client, "/validate", {"config": xml})
        assert r.status_code in (200, 422), (what, r.text[:300])
        assert (r.status_code == 200) == valid and (valid or r.json()["errors"][0])
        r = _post(client, "/setup", {"project": "6.1", "schema": xml})
        assert r.status_code in (200, 400) and r.json(), (what, r.text[:300])
        tasks = [_good(1, images), _good(2, images)]
        results = _assert_answer(_post(client, "/predict", {"tasks": tasks, "label_config": xml, "project": "6.1"}),
                                 2)
        if not valid or not parse_label_config(xml).box_control:
            assert all("error" in p for p in results), (what, results)

    run()
    assert refused[False] >= 40 and refused[True] >= 5, refused
    _still_answers(env)


def test_hostile_interactive_contexts(env):
    client, images = env["client"], env["images"]
    sure = {"id": "zz-sure-rect", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 200, "original_height": 100,
            "value": {"x": 10, "y": 10, "width": 20, "height": 30, "rectanglelabels": ["object"]}}

    @settings(max_examples=70, **SEED)
    @given(hostile=region_lists(), add_sure=st.booleans(), extra_task=st.one_of(st.none(), bad_tasks()),
           prompt=st.one_of(st.none(), HOSTILE_TEXT, JUNK), config=st.sampled_from(["referring", "region_captioning"]))
    def run(hostile, add_sure, extra_task, prompt, config):
        result = list(hostile)
        if prompt is not None:
            result.append({"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [prompt]}})
        if add_sure:
            result.append(sure)
        tasks = [_good(3, images)] + ([_resolve(extra_task, images)] if extra_task is not None else [])
        GENERATED["contexts"] += 1
        r = _post(client, "/predict", {"tasks": tasks, "label_config": labeling_config(config), "project": "7.1",
                                       "params": {"context": {"result": result}}})
        results = _assert_answer(r, len(tasks))
        assert results
        plain = not any(isinstance(x, dict) and isinstance(x.get("type"), str) and x["type"].lower() == "textarea"
                        for x in result)
        if add_sure and plain:  # the drawn box is always captioned, however hostile the other regions
            ids = [x["id"] for x in results[0]["result"] if x["type"] == "textarea"]
            assert "zz-sure-rect" in ids, results[0]

    run()
    assert GENERATED["contexts"] >= 70
    _still_answers(env)


RAW_BODIES = [b"", b"{", b"[]", b"null", b'{"tasks": NaN}', b'{"tasks": [Infinity]}', b"\xff\xfe",
              b'{"tasks": [], "tasks": 5}', b"[" * 5000 + b"]" * 5000, b'{"tasks": [1' + b"0" * 5000 + b"]}",
              b'{"tasks": ["\\ud800"]}', b'{"tasks": [{"data": {"image": "\\udfff"}}]}']


@st.composite
def bodies(draw) -> object:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(RAW_BODIES))
    body = {"tasks": draw(st.one_of(st.lists(bad_tasks(), max_size=3), JUNK)), "label_config": draw(
        st.one_of(st.sampled_from([labeling_config("referring"), None]), JUNK)), "project": draw(JUNK)}
    params = draw(st.one_of(JUNK, st.dictionaries(
        st.sampled_from(["tasks", "self", "context", "login", "password", "kwargs", "", "\ud800"]), JUNK, max_size=4)))
    body["params"] = params
    if kind == 1 and isinstance(body["params"], dict):
        body["params"]["context"] = draw(st.one_of(JUNK, st.fixed_dictionaries({"result": st.one_of(
            region_lists(), JUNK)})))
    if kind == 2:
        body[draw(st.text(max_size=5))] = draw(JUNK)
    return body


def test_hostile_request_bodies_and_params(env):
    client, images = env["client"], env["images"]

    @settings(max_examples=90, **SEED)
    @given(body=bodies())
    def run(body):
        GENERATED["bodies"] += 1
        if isinstance(body, dict) and isinstance(body.get("tasks"), list):
            body["tasks"] = [_resolve(t, images) for t in body["tasks"]]
        r = _post(client, "/predict", body)
        n = len(body["tasks"]) if isinstance(body, dict) and isinstance(body.get("tasks"), list) else None
        _assert_answer(r, n)
        if isinstance(body, dict) and not isinstance(body.get("tasks"), list):
            assert r.status_code == 400
        for route in ("/setup", "/webhook", "/versions"):
            r = _post(client, route, body)
            assert r.status_code < 500 and isinstance(r.json(), dict), (route, r.text[:300])

    run()
    assert GENERATED["bodies"] >= 90
    _still_answers(env)


def test_enough_bad_inputs_were_generated():
    """Runs last in this file: at least MIN_BAD_INPUTS hostile inputs went through the properties above."""
    if set(GENERATED) != {"tasks", "configs", "contexts", "bodies"}:
        pytest.skip("only part of the property tests ran")
    total = sum(GENERATED.values())
    print(f"generated bad inputs: {dict(GENERATED)} = {total}")
    assert total >= MIN_BAD_INPUTS, GENERATED
