"""Masks, polygons and clicks in Label Studio: conversions, /predict with a tiny segmenting model for both
segmentation configs, interactive clicks / boxes / prompts, and masks as training data.

The tiny random model (``tiny`` grown with ``heads.mask_decoder=2`` and ``prompt.points``, seeded) has no
skill; its masks are ragged (many parts, many holes), which is what the conversions need to survive."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import predict_body

from label_studio_backend import convert, labeling_config
from label_studio_backend.label_config import parse_label_config
from label_studio_backend.training import mask_examples_from_annotation
from pixelllm_plugins.masks import (
    keyhole_ring,
    ls_rle_to_mask,
    mask_iou,
    mask_to_ls_rle,
    mask_to_polygons,
    polygon_to_ls_points,
    rle_to_mask,
)

REF_SEG = labeling_config("referring_segmentation")
INT_SEG = labeling_config("interactive_segmentation")
LS_PYTHON = Path(__file__).resolve().parents[2] / ".ci-cache" / "ls-venv" / "bin" / "python"


def tiny_segmenter(version: str = "tiny-seg"):
    import torch

    from pixelllm_plugins.config import get_preset
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM
    from pixelllm_plugins.tokenizer import PixelTokenizer

    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = 2, True
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    return PixelLLM(cfg, tokenizer.vocab_size).eval(), tokenizer, cfg


@pytest.fixture(scope="module")
def seg_predictor():
    from pixelllm_plugins.inference.predictor import Predictor

    model, tokenizer, _ = tiny_segmenter()
    return Predictor(model, tokenizer=tokenizer, model_version="tiny-seg", device="cpu")


@pytest.fixture()
def seg_client(make_client, seg_predictor):
    return make_client(predictor=seg_predictor)


def _holed() -> np.ndarray:
    m = np.zeros((60, 90), bool)
    m[5:50, 10:70] = True
    m[15:25, 20:30] = False  # hole 1
    m[30:40, 45:60] = False  # hole 2
    m[52:58, 75:88] = True  # a second part
    return m


def _rasterise(results: list[dict], w: int, h: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    for r in results:
        if r["type"] == "polygonlabels":
            out |= convert.mask_from_result(r).mask
    return out


# ---------------------------------------------------------------------------------------------- conversions
def test_polygon_percent_round_trip():
    ring = [[10.0, 5.0], [70.0, 5.0], [70.0, 50.0], [10.0, 50.0]]
    pts = polygon_to_ls_points(ring, 90, 60)
    assert pts[1] == pytest.approx([100 * 70 / 90, 100 * 5 / 60])
    r = {"id": "p", "type": "polygonlabels", "original_width": 90, "original_height": 60,
         "value": {"points": pts, "polygonlabels": ["object"]}}
    region = convert.mask_from_result(r)
    expected = np.zeros((60, 90), bool)
    expected[5:50, 10:70] = True
    assert np.array_equal(region.mask, expected) and region.label == "object"
    assert region.box_xyxy == (10.0, 5.0, 70.0, 50.0)


def test_holes_survive_as_keyhole_polygons_and_parts_as_results():
    m = _holed()
    polys = mask_to_polygons(m)
    assert len(polys) == 2 and len(polys[0]["holes"]) == 2
    cfg = parse_label_config(REF_SEG)
    results = convert.polygon_results(cfg.mask_control, "image", polys, 90, 60, label="object", score=0.7)
    assert len(results) == 2  # one result per part
    assert all(r["type"] == "polygonlabels" and r["value"]["closed"] for r in results)
    assert all("holes" not in r["value"] for r in results)  # Label Studio polygons have one ring
    back = _rasterise(results, 90, 60)
    assert mask_iou(back, m) == 1.0  # the holes are empty after the round trip
    assert not back[20, 25] and not back[35, 50] and back[10, 12]
    # a polygon without holes keeps its ring as it is
    assert keyhole_ring(polys[1]) == polys[1]["exterior"]


def test_brush_rle_round_trip():
    m = _holed()
    rle = mask_to_ls_rle(m)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    assert np.array_equal(ls_rle_to_mask(rle, 90, 60), m)
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 7), (300, 257)]:
        noise = rng.random(shape) > 0.5
        assert np.array_equal(ls_rle_to_mask(mask_to_ls_rle(noise), shape[1], shape[0]), noise)
    full = np.ones((400, 300), bool)  # runs longer than 2**16 values are split
    assert np.array_equal(ls_rle_to_mask(mask_to_ls_rle(full), 300, 400), full)
    with pytest.raises(ValueError, match="another size"):
        ls_rle_to_mask(rle, 60, 90 + 1)


@pytest.mark.skipif(not LS_PYTHON.exists(), reason="the Label Studio virtualenv (.ci-cache/ls-venv) is not built")
def test_brush_rle_matches_label_studio_sdk():
    """Our encoder's output decodes with the SDK's ``decode_rle``; the SDK's ``mask2rle`` decodes with ours."""
    m = _holed()
    noise = np.random.default_rng(2).random((33, 41)) > 0.6
    code = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import decode_rle, mask2rle\n"
        "out = []\n"
        "for item in json.load(sys.stdin):\n"
        "    m = np.array(item['mask'], dtype=np.uint8)\n"
        "    dec = decode_rle(item['rle']).reshape(m.shape[0], m.shape[1], 4)[:, :, 3]\n"
        "    out.append({'same': bool(((dec > 0) == (m > 0)).all()), 'sdk': mask2rle(m * 255)})\n"
        "print(json.dumps(out))\n")
    payload = [{"mask": x.astype(int).tolist(), "rle": mask_to_ls_rle(x)} for x in (m, noise)]
    out = subprocess.run([str(LS_PYTHON), "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    for x, ans in zip((m, noise), answers):
        assert ans["same"]
        assert np.array_equal(ls_rle_to_mask(ans["sdk"], x.shape[1], x.shape[0]), x)


def test_config_roles():
    ref = parse_label_config(REF_SEG)
    assert ref.task == "segment" and ref.mask_control.name == "mask" and ref.image.name == "image"
    assert ref.expression_object.value == "expression" and ref.box_control is None
    inter = parse_label_config(INT_SEG)
    assert inter.task == "segment" and inter.brush_control.name == "mask" and inter.mask_control.type == "brushlabels"
    assert inter.keypoint_control.name == "click" and inter.box_control.name == "box"
    assert inter.prompt_control.name == "prompt" and inter.caption_control.name == "caption"


# ------------------------------------------------------------------------------------------- /predict batch
def _seg_task(images_dir, i, name="a.png", expression="the red square"):
    return {"id": i, "data": {"image": str(images_dir / name), "expression": expression}}


def test_referring_segmentation_predict_matches_segment(seg_client, seg_predictor, images_dir):
    tasks = [_seg_task(images_dir, 1), _seg_task(images_dir, 2, "b.png", "a dog\nthe sky"),
             _seg_task(images_dir, 3, "c.png", "the blue square")]
    r = seg_client.post("/predict", json=predict_body(tasks, REF_SEG))
    assert r.status_code == 200
    preds = r.json()["results"]
    assert len(preds) == 3
    for task, pred in zip(tasks, preds):
        assert "error" not in pred and pred["model_version"] == "tiny-seg" and 0 <= pred["score"] <= 1
        path = task["data"]["image"]
        texts = task["data"]["expression"].splitlines()
        expected = [rle_to_mask(m.mask) for m in seg_predictor.segment([path], texts=[texts])[0]]
        result = pred["result"]
        assert result and all(x["type"] == "polygonlabels" and x["from_name"] == "mask" for x in result)
        assert all(x["value"]["polygonlabels"] == ["object"] and len(x["value"]["points"]) >= 3 for x in result)
        h, w = expected[0].shape
        assert all((x["original_width"], x["original_height"]) == (w, h) for x in result)
        union = np.logical_or.reduce(expected)
        assert mask_iou(_rasterise(result, w, h), union) >= 0.97


def test_interactive_config_batch_segments_boxes_and_dense_regions(seg_client, seg_predictor, images_dir):
    rect = {"id": "r1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"x": 10, "y": 10, "width": 30, "height": 50,
                                              "rectanglelabels": ["object"]}}
    tasks = [{"id": 1, "data": {"image": str(images_dir / "a.png")}, "annotations": [{"result": [rect]}]},
             {"id": 2, "data": {"image": str(images_dir / "c.png")}}]
    # the random model's proposals score ~0.01: keep them all (model_score_threshold, as a project would set it)
    config = INT_SEG.replace('name="box" toName="image"', 'name="box" toName="image" model_score_threshold="0"')
    preds = seg_client.post("/predict", json=predict_body(tasks, config)).json()["results"]
    assert all("error" not in p for p in preds), preds
    brushes = [x for x in preds[0]["result"] if x["type"] == "brushlabels"]
    assert len(brushes) == 1 and brushes[0]["value"]["format"] == "rle"
    expected = seg_predictor.segment([str(images_dir / "a.png")], boxes=[[[20.0, 10.0, 80.0, 60.0]]])[0][0]
    got = ls_rle_to_mask(brushes[0]["value"]["rle"], 200, 100)
    assert np.array_equal(got, rle_to_mask(expected.mask))
    # no text, no boxes: each dense-caption region gets a mask and its caption (same region id)
    result = preds[1]["result"]
    masks = [x for x in result if x["type"] == "brushlabels"]
    caps = {x["id"]: x for x in result if x["type"] == "textarea"}
    assert masks and {m["id"] for m in masks} == set(caps)


# ---------------------------------------------------------------------------------------------- interactive
def _click(x, y, positive=True, rid="k1"):
    r = {"id": rid, "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
         "original_width": 200, "original_height": 100, "image_rotation": 0,
         "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": ["object"]}}
    if not positive:
        r["is_positive"] = False
    return r


def test_click_gives_brush_mask_and_caption(seg_client, seg_predictor, images_dir):
    task = _seg_task(images_dir, 1)
    r = seg_client.post("/predict", json=predict_body([task], INT_SEG, context={"result": [_click(20, 40)]}))
    assert r.status_code == 200
    pred = r.json()["results"][0]
    assert "error" not in pred, pred
    brush, cap = pred["result"]
    assert brush["type"] == "brushlabels" and brush["value"]["brushlabels"] == ["object"]
    assert cap["type"] == "textarea" and cap["id"] == brush["id"] and cap["from_name"] == "caption"
    path = str(images_dir / "a.png")
    expected = seg_predictor.segment([path], points=[[[40.0, 40.0]]])[0][0]
    assert np.array_equal(ls_rle_to_mask(brush["value"]["rle"], 200, 100), rle_to_mask(expected.mask))
    assert cap["value"]["text"] == [seg_predictor.caption_regions([path], points=[[[40.0, 40.0]]])[0][0].text]
    # an Alt-click subtracts the object under it
    ctx = {"result": [_click(20, 40), _click(75, 80, positive=False, rid="k2")]}
    pred = seg_client.post("/predict", json=predict_body([task], INT_SEG, context=ctx)).json()["results"][0]
    if "error" not in pred:
        neg = rle_to_mask(seg_predictor.segment([path], points=[[[150.0, 80.0]]])[0][0].mask)
        got = ls_rle_to_mask(pred["result"][0]["value"]["rle"], 200, 100)
        assert np.array_equal(got, rle_to_mask(expected.mask) & ~neg)
    else:
        assert "remove the whole mask" in pred["error"]


def test_drawn_box_and_typed_prompt_give_masks(seg_client, seg_predictor, images_dir):
    task = _seg_task(images_dir, 1)
    path = str(images_dir / "a.png")
    rect = {"id": "d1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"x": 10, "y": 10, "width": 30, "height": 50,
                                              "rectanglelabels": ["object"]}}
    pred = seg_client.post("/predict", json=predict_body([task], INT_SEG, context={"result": [rect]})).json()
    brush = pred["results"][0]["result"][0]
    expected = seg_predictor.segment([path], boxes=[[[20.0, 10.0, 80.0, 60.0]]])[0][0]
    assert np.array_equal(ls_rle_to_mask(brush["value"]["rle"], 200, 100), rle_to_mask(expected.mask))
    prompt = {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["the red square"]}}
    pred = seg_client.post("/predict", json=predict_body([task], INT_SEG, context={"result": [prompt]})).json()
    brush, cap = pred["results"][0]["result"]
    expected = seg_predictor.segment([path], texts=[["the red square"]])[0][0]
    assert np.array_equal(ls_rle_to_mask(brush["value"]["rle"], 200, 100), rle_to_mask(expected.mask))
    assert cap["value"]["text"] == ["the red square"] and cap["id"] == brush["id"]


# ------------------------------------------------------------------------------------------------- training
def _polygon(points, rid="p1", w=200, h=100):
    return {"id": rid, "from_name": "mask", "to_name": "image", "type": "polygonlabels", "original_width": w,
            "original_height": h, "value": {"points": points, "polygonlabels": ["object"]}}


def test_masks_become_training_samples(make_client, fake_trainer, images_dir):
    client = make_client()
    m = _holed()
    brush = {"id": "b1", "from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 90,
             "original_height": 60, "value": {"format": "rle", "rle": mask_to_ls_rle(m), "brushlabels": ["object"]}}
    caption = {"id": "b1", "from_name": "caption", "to_name": "image", "type": "textarea",
               "value": {"text": ["a holed plate"]}}
    record = {"task": {"id": 1, "data": {"image": "x", "expression": "the red square"}},
              "annotation": {"id": 1, "result": [brush, caption]}, "label_config": INT_SEG}
    (text, box, rle), = mask_examples_from_annotation(record)
    assert text == "a holed plate" and box == (10.0, 5.0, 88.0, 58.0) and np.array_equal(rle_to_mask(rle), m)
    # two polygon parts without captions are together the mask of the task's expression
    parts = [_polygon([[10, 10], [40, 10], [40, 60], [10, 60]], "p1"), _polygon([[50, 50], [70, 50], [70, 90]], "p2")]
    record = {"task": {"id": 2, "data": {"image": "x", "expression": "the red square"}},
              "annotation": {"id": 2, "result": parts}, "label_config": REF_SEG}
    (text, box, rle), = mask_examples_from_annotation(record)
    assert text == "the red square" and rle["size"] == [100, 200] and box[0] == 20.0
    # through the webhook: the trainer gets refcoco with segmentation, and the version moves on
    project = {"id": 5, "label_config": REF_SEG}
    for i, (name, result) in enumerate([("a.png", parts), ("c.png", [_polygon([[0, 0], [50, 0], [50, 50]], w=120,
                                                                                h=120)])], start=1):
        task = {"id": i, "data": {"image": str(images_dir / name), "expression": "the red square"}}
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project, "task": task,
                                          "annotation": {"id": 100 + i, "result": result}})
        assert r.status_code in (200, 201)
    runtime = client.app.state.runtime
    assert runtime.training.wait_idle(60)
    call = fake_trainer.calls[-1]
    anns = call["refcoco"]["annotations"]
    assert anns and all("segmentation" in a for a in anns)
    assert rle_to_mask(anns[-1]["segmentation"]).shape == (120, 120)
    assert runtime.training.state("5")["examples"]["masks"] >= 2
    assert "+ls-p5-ft" in runtime.version_for("5")


def test_referring_segmentation_through_the_worker(make_client, seg_predictor, images_dir):
    """The backend on a ``RemotePredictor``: polygons come from the worker's ``/v1/segment`` (real HTTP on
    loopback) and match the in-process ``segment`` of the same model."""
    from ls_server import BackendServer

    from pixelllm_plugins.serving.app import create_app as create_worker
    from pixelllm_plugins.serving.client import RemotePredictor
    from pixelllm_plugins.serving.settings import WorkerSettings

    worker = BackendServer(create_worker(seg_predictor, WorkerSettings(token="ls-seg-worker-token")))
    try:
        with RemotePredictor(worker.url, token="ls-seg-worker-token") as remote:
            client = make_client(predictor=remote)
            tasks = [_seg_task(images_dir, 1), _seg_task(images_dir, 2, "b.png", "the blue square")]
            r = client.post("/predict", json=predict_body(tasks, REF_SEG))
            assert r.status_code == 200
            for task, pred in zip(tasks, r.json()["results"]):
                assert "error" not in pred, pred
                path = task["data"]["image"]
                expected = rle_to_mask(seg_predictor.segment([path], texts=[[task["data"]["expression"]]])[0][0].mask)
                h, w = expected.shape
                assert mask_iou(_rasterise(pred["result"], w, h), expected) >= 0.97
    finally:
        worker.close()
