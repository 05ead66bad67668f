"""Bad mask-related input: 100+ malformed configs, clicks, rectangles, prompts, polygons, brush masks and
annotation events. Every one gets a clear per-task error (or is handled), never a crash or a 500, and the good
tasks of the same batch are still answered."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import predict_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ls_segmentation import INT_SEG, REF_SEG, seg_predictor  # noqa: F401 (module fixture)

from label_studio_backend import convert
from label_studio_backend.errors import InvalidRegionError
from pixelllm_plugins.masks import mask_to_ls_rle

GOOD_RLE = mask_to_ls_rle(np.pad(np.ones((4, 4), bool), 2))  # an 8x8 image


@pytest.fixture()
def seg_client(make_client, seg_predictor):  # noqa: F811
    return make_client(predictor=seg_predictor)


def _task(images_dir, i=1, name="a.png", expression="the red square"):
    return {"id": i, "data": {"image": str(images_dir / name), "expression": expression}}


# ------------------------------------------------------------------------------------------- broken configs
BROKEN_CONFIGS = {
    "not-xml": "<View><Image name='image' value='$image'>",
    "doctype": "<!DOCTYPE x [<!ENTITY a 'b'>]><View><Image name='image' value='$image'/></View>",
    "no-image": "<View><PolygonLabels name='m' toName='image'><Label value='o'/></PolygonLabels></View>",
    "no-control": "<View><Image name='image' value='$image'/><Text name='e' value='$expression'/></View>",
    "polygon-to-missing": "<View><Image name='image' value='$image'/><PolygonLabels name='m' toName='nope'/></View>",
    "brush-to-text": ("<View><Image name='image' value='$image'/><Text name='t' value='$expression'/>"
                      "<BrushLabels name='m' toName='t'/></View>"),
    "polygon-no-toname": "<View><Image name='image' value='$image'/><PolygonLabels name='m'/></View>",
    "bad-model-task": REF_SEG.replace('name="mask" toName="image"', 'name="mask" toName="image" model_task="paint"'),
    "threshold-text": REF_SEG.replace('name="mask" toName="image"',
                                      'name="mask" toName="image" model_score_threshold="high"'),
    "threshold-big": REF_SEG.replace('name="mask" toName="image"', 'name="mask" toName="image" model_score_threshold="7"'),
    "threshold-nan": REF_SEG.replace('name="mask" toName="image"', 'name="mask" toName="image" model_score_threshold="nan"'),
    "image-key-missing": REF_SEG.replace('value="$image"', 'value="$picture"'),
    "empty": "",
    "blank": "   ",
    "int": 5,
    "list": ["<View/>"],
    "none": None,
    "surrogate": REF_SEG.replace("object", "\ud800"),
    "deep": "<View>" * 100 + "</View>" * 100,
    "brush-no-image-object": "<View><BrushLabels name='m' toName='image'/></View>",
}


@pytest.mark.parametrize("name", list(BROKEN_CONFIGS))
def test_broken_config_is_every_tasks_error(seg_client, images_dir, name):
    import json

    body = predict_body([_task(images_dir, 1), _task(images_dir, 2, "c.png")], BROKEN_CONFIGS[name])
    r = seg_client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 422), r.text  # a clear refusal, never a 500
    if r.status_code == 200:
        results = r.json()["results"]
        assert len(results) == 2 and all(p.get("error") and p["result"] == [] for p in results), results


# ---------------------------------------------------------------------------------------- interactive input
def _kp(value, **extra):
    return {"id": "k", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "original_width": 200, "original_height": 100, "value": value, **extra}


def _rect(value):
    return {"id": "r", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": 200, "original_height": 100, "value": value}


def _prompt(text):
    return {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": text}}


BAD_CONTEXTS = {
    **{f"click-x-{i}": [_kp({"x": x, "y": 50})] for i, x in enumerate(
        [-5, 100.5, 1e9, -1e9, "abc", None, True, [1], {"a": 1}, float("inf"), "nan", ""])},
    **{f"click-y-{i}": [_kp({"x": 50, "y": y})] for i, y in enumerate([-0.01, 101, 1e300, "1", None, [], False])},
    "click-no-value": [{"type": "keypointlabels", "to_name": "image"}],
    "click-value-list": [_kp([10, 20])],
    "click-value-str": [_kp("10,20")],
    "click-missing-y": [_kp({"x": 10})],
    "click-only-negative": [_kp({"x": 10, "y": 10}, is_positive=False)],
    "clicks-too-many": [_kp({"x": 10, "y": 10}) for _ in range(1000)],
    "rect-zero-area": [_rect({"x": 10, "y": 10, "width": 0, "height": 0})],
    "rect-outside": [_rect({"x": 150, "y": 150, "width": 10, "height": 10})],
    "rect-negative": [_rect({"x": -50, "y": -50, "width": 10, "height": 10})],
    "rect-strings": [_rect({"x": "a", "y": "b", "width": "c", "height": "d"})],
    "rect-nan": [_rect({"x": float("nan"), "y": 1, "width": 1, "height": 1})],
    "rect-value-none": [_rect(None)],
    "prompt-int": [_prompt(5)],
    "prompt-list-ints": [_prompt([1, 2])],
    "prompt-dict": [_prompt({"a": "b"})],
    "prompt-blank": [_prompt(["   "])],
    "prompt-nul": [_prompt(["\x00\x00"])],
    "prompt-surrogate": [_prompt(["the \ud800 mug"])],
    "prompt-huge": [_prompt(["x" * 100_000])],
    "prompt-too-many": [_prompt(["\n".join(f"thing {i}" for i in range(500))])],
    "wrong-to-name": [_kp({"x": 10, "y": 10}) | {"to_name": "other"}],
    "type-int": [{"type": 5, "value": {"x": 1, "y": 1}}],
    "type-list": [{"type": ["keypointlabels"], "value": {"x": 1, "y": 1}}],
    "result-strings": ["a", "b"],
    "result-nested": [[[[_kp({"x": 10, "y": 10})]]]],
    "polygon-in-context": [{"type": "polygonlabels", "to_name": "image", "value": {"points": [[1, 2]]}}],
    "brush-in-context": [{"type": "brushlabels", "to_name": "image", "value": {"rle": [1, 2, 3]}}],
}


def _ok_or_error(pred):
    assert isinstance(pred, dict) and isinstance(pred.get("result"), list)
    if pred.get("error"):
        assert isinstance(pred["error"], str) and pred["error"].strip() and "Traceback" not in pred["error"]
        assert pred["result"] == []


@pytest.mark.parametrize("name", list(BAD_CONTEXTS))
def test_bad_interactive_context(seg_client, images_dir, name):
    import json

    body = predict_body([_task(images_dir)], INT_SEG, context={"result": BAD_CONTEXTS[name]})
    r = seg_client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    if "NaN" in r.request.content.decode() or "Infinity" in r.request.content.decode():
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]  # refused whole, clearly
        return
    assert r.status_code == 200, r.text
    pred = r.json()["results"][0]
    _ok_or_error(pred)
    if name.startswith(("click-x", "click-y", "click-only", "clicks-too", "rect-zero", "rect-outside",
                        "rect-negative", "prompt-int", "prompt-surrogate", "prompt-huge", "prompt-too-many")):
        assert pred.get("error"), pred


def test_interactive_on_a_deleted_or_broken_task(seg_client, images_dir):
    ctx = {"result": [_kp({"x": 10, "y": 10})]}
    for task in [None, {}, {"id": 9}, {"id": 9, "data": {}}, {"id": 9, "data": {"image": str(images_dir / "gone.png")}},
                 {"id": 9, "data": {"image": 5}}]:
        r = seg_client.post("/predict", json=predict_body([task], INT_SEG, context=ctx))
        assert r.status_code == 200
        assert r.json()["results"][0].get("error")


# ------------------------------------------------------------------------------------ batch, good and bad
BAD_TASKS = [None, 5, "task", {}, {"id": 1, "data": None}, {"id": 2, "data": {"expression": "x"}},
             {"id": 3, "data": {"image": None, "expression": "x"}}, {"id": 4, "data": {"image": "/etc/passwd"}},
             {"id": 5, "data": {"image": "http://evil.example.com/a.png", "expression": "x"}},
             {"id": 6, "data": {"image": "IMG", "expression": 5}},
             {"id": 7, "data": {"image": "IMG", "expression": ["a", 3]}},
             {"id": 8, "data": {"image": "IMG", "expression": "bad \ud800"}},
             {"id": 9, "data": {"image": "IMG", "expression": "\n".join(["x"] * 500)}},
             {"id": 10, "data": {"image": "BADIMG", "expression": "x"}}]


@pytest.mark.parametrize("config", ["ref", "int"])
def test_batch_good_tasks_still_answered(seg_client, images_dir, config):
    import json

    (images_dir / "bad.png").write_bytes(b"not an image")
    good = str(images_dir / "a.png")
    bad_tasks = json.loads(json.dumps(BAD_TASKS).replace('"IMG"', json.dumps(good)).replace(
        '"BADIMG"', json.dumps(str(images_dir / "bad.png"))))
    tasks = [_task(images_dir, 100)] + bad_tasks + [_task(images_dir, 101, "c.png")]
    body = predict_body(tasks, REF_SEG if config == "ref" else INT_SEG)
    r = seg_client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(tasks)
    for pred in results[1:-1]:
        _ok_or_error(pred)
    if config == "ref":
        assert [bool(x.get("error")) for x in results[1:-1]] == [True] * len(bad_tasks)
        assert results[0]["result"] and results[-1]["result"] and not results[0].get("error")
    else:
        assert not results[0].get("error") and not results[-1].get("error")


# ------------------------------------------------------------------------------- annotations (training)
def _poly(points, **extra):
    return {"id": "p", "type": "polygonlabels", "original_width": 8, "original_height": 8,
            "value": {"points": points}, **extra}


def _brush(rle, **extra):
    return {"id": "b", "type": "brushlabels", "original_width": 8, "original_height": 8,
            "value": {"format": "rle", "rle": rle}, **extra}


BAD_REGIONS = {
    "poly-none": _poly(None), "poly-empty": _poly([]), "poly-1": _poly([[1, 1]]), "poly-2": _poly([[1, 1], [5, 5]]),
    "poly-str": _poly("1,2,3,4,5,6"), "poly-flat": _poly([1, 2, 3, 4, 5, 6]),
    "poly-3d": _poly([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), "poly-nan": _poly([[0, 0], [float("nan"), 5], [5, 5]]),
    "poly-inf": _poly([[0, 0], [float("inf"), 5], [5, 5]]), "poly-str-pts": _poly([["a", "b"], [1, 1], [2, 2]]),
    "poly-none-pts": _poly([None, None, None]), "poly-bool": _poly([[True, False], [1, 1], [2, 2]]),
    "poly-far": _poly([[0, 0], [1e12, 0], [0, 1e12]]), "poly-degenerate": _poly([[10, 10], [10, 10], [10, 10]]),
    "poly-line": _poly([[0, 0], [50, 50], [100, 100]]), "poly-outside": _poly([[200, 200], [300, 200], [300, 300]]),
    "poly-width-0": _poly([[0, 0], [50, 0], [50, 50]], original_width=0),
    "poly-width-neg": _poly([[0, 0], [50, 0], [50, 50]], original_width=-8),
    "poly-width-str": _poly([[0, 0], [50, 0], [50, 50]], original_width="8"),
    "poly-width-frac": _poly([[0, 0], [50, 0], [50, 50]], original_width=8.5),
    "poly-width-huge": _poly([[0, 0], [50, 0], [50, 50]], original_width=10**9),
    "poly-no-size": {"type": "polygonlabels", "value": {"points": [[0, 0], [50, 0], [50, 50]]}},
    "poly-value-list": {"type": "polygonlabels", "original_width": 8, "original_height": 8, "value": []},
    "brush-none": _brush(None), "brush-empty": _brush([]), "brush-str": _brush("abc"),
    "brush-garbage": _brush([1, 2, 3, 4, 5]), "brush-truncated": _brush(GOOD_RLE[:len(GOOD_RLE) // 2]),
    "brush-negative": _brush([-1] + GOOD_RLE[1:]), "brush-big-values": _brush([256] + GOOD_RLE[1:]),
    "brush-floats": _brush([float(v) for v in GOOD_RLE]), "brush-bools": _brush([True] * 20),
    "brush-wrong-size": _brush(GOOD_RLE, original_width=9),
    "brush-empty-mask": _brush(mask_to_ls_rle(np.zeros((8, 8), bool))),
    "brush-format-png": _brush(GOOD_RLE) | {"value": {"format": "png", "rle": GOOD_RLE}},
    "brush-huge-count": _brush([255] * 4 + GOOD_RLE[4:]),
    "brush-nested": _brush([GOOD_RLE]),
    "brush-zero-size": _brush(GOOD_RLE, original_width=0, original_height=0),
    "type-rect": {"type": "rectanglelabels", "value": {"x": 1}},
    "not-dict": "polygon", "value-none": {"type": "polygonlabels", "value": None},
}


JSON_INVALID = ("poly-nan", "poly-inf")  # NaN / Infinity: Label Studio never sends them (not JSON)


@pytest.mark.parametrize("name", list(BAD_REGIONS))
def test_bad_region_is_a_clear_region_error(name):
    with pytest.raises(InvalidRegionError) as info:
        convert.mask_from_result(BAD_REGIONS[name])
    assert str(info.value).strip() and "Traceback" not in str(info.value)
    errors: list[str] = []
    good = _brush(GOOD_RLE)
    found = convert.masks_from_results([BAD_REGIONS[name], good], errors=errors)
    assert len(found) == 1 and found[0].mask.sum() == 16
    assert len(errors) == (0 if name in ("type-rect", "not-dict") else 1)  # not a mask region: ignored


def test_bad_annotation_events_never_break_training(make_client, fake_trainer, images_dir):
    client = make_client()
    project = {"id": 8, "label_config": REF_SEG}
    good_task = {"id": 1, "data": {"image": str(images_dir / "a.png"), "expression": "the red square"}}
    good = [_poly([[10, 10], [60, 10], [60, 80]]) | {"original_width": 200, "original_height": 100}]
    events = [
        {"action": "ANNOTATION_CREATED", "project": project, "task": None, "annotation": {"id": 50, "result": good}},
        {"action": "ANNOTATION_CREATED", "project": project, "annotation": {"id": 51, "result": good}},
        {"action": "ANNOTATION_CREATED", "project": project, "task": {"id": 3, "data": {"image": str(
            images_dir / "deleted.png"), "expression": "x"}}, "annotation": {"id": 52, "result": good}},
        {"action": "ANNOTATIONS_DELETED", "project": project, "annotations": [{"id": 999}, {"id": "x"}, None]},
        {"action": "ANNOTATION_UPDATED", "project": project, "task": good_task,
         "annotation": {"id": 53, "result": [r for n, r in BAD_REGIONS.items() if n not in JSON_INVALID]}},
        {"action": "ANNOTATION_CREATED", "project": project, "task": good_task,
         "annotation": {"id": 54, "result": "not a list"}},
        {"action": "ANNOTATION_CREATED", "project": project, "task": good_task, "annotation": {"id": 55, "result": good}},
    ]
    for event in events:
        r = client.post("/webhook", json=event)
        assert r.status_code < 500, r.text
    runtime = client.app.state.runtime
    assert runtime.training.wait_idle(60)
    state = runtime.training.state("8")
    assert state["status"] == "idle" and state["last_error"] is None, state
    anns = fake_trainer.calls[-1]["refcoco"]["annotations"]
    assert len(anns) == 1 and "segmentation" in anns[0]  # only the good annotation became a sample


# --------------------------------------------------------------------------------------------- hypothesis
_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=5), st.lists(st.integers(-300, 300), max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["polygonlabels", "brushlabels", "PolygonLabels", "brush", "polygon"]),
       points=st.one_of(_values, st.lists(st.one_of(_values, st.lists(_values, max_size=3)), max_size=6)),
       rle=st.one_of(_values, st.lists(st.integers(-2, 300), max_size=40)),
       w=st.one_of(st.integers(-3, 40), _values), h=st.one_of(st.integers(-3, 40), _values))
def test_random_regions_raise_only_region_errors(kind, points, rle, w, h):
    r = {"type": kind, "original_width": w, "original_height": h, "value": {"points": points, "rle": rle}}
    try:
        region = convert.mask_from_result(r)
    except InvalidRegionError as exc:
        assert str(exc)
        return
    assert region.mask.any() and region.mask.shape == (region.height, region.width)
    assert all(math.isfinite(v) for v in region.box_xyxy)
