"""The worker's ``/v1/segment`` (text / box / point -> mask) and ``RemotePredictor.segment``, over the session's
tiny PixelLLM and a tiny random SAM saved and loaded by path. Shapes, types, order and errors only: a random
SAM's masks mean nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serving_helpers import ThreadedServer, image_field, png_bytes, wait_until
from tiny_sam import save_tiny_sam

from pixelllm_plugins.errors import InvalidBoxError, InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.masks import rle_to_mask
from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.batcher import make_factory
from pixelllm_plugins.serving.client import RemotePredictor
from pixelllm_plugins.serving.process_engine import engine_spec
from pixelllm_plugins.serving.schemas import SegmentResponse
from pixelllm_plugins.serving.settings import WorkerSettings


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="module")
def seg(tiny_predictor, sam_dir):
    return Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer,
                     model_version=tiny_predictor.base_version, device="cpu", mask_engine=f"sam:{sam_dir}")


def _check_detections(body: dict, size: tuple[int, int], n: int, text: bool) -> None:
    w, h = size
    SegmentResponse.model_validate(body)
    assert body["image_size"] == [w, h] and body["model_version"]
    assert len(body["detections"]) == n
    for d in body["detections"]:
        assert set(d) == {"box_xyxy", "score", "mask", "polygons", "mask_score", "model_version"} | (
            {"text"} if text else set())
        assert d["mask"]["size"] == [h, w] and isinstance(d["mask"]["counts"], str)
        assert rle_to_mask(d["mask"]).shape == (h, w) and rle_to_mask(d["mask"]).any()
        assert d["polygons"] and all({"exterior", "holes"} <= set(p) for p in d["polygons"])


def test_segment_route_answers_texts_boxes_and_points(make_client, seg):
    c = make_client(seg)
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "text": "the red circle"})
    assert r.status_code == 200, r.text
    _check_detections(r.json(), (64, 48), 1, text=True)
    r = c.post("/v1/segment", json={"image": image_field(80, 60), "texts": ["a circle", "a square"]})
    _check_detections(r.json(), (80, 60), 2, text=True)
    assert [d["text"] for d in r.json()["detections"]] == ["a circle", "a square"]
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "boxes": [[4, 4, 30, 40], [-5, 0, 90, 20]]})
    assert r.status_code == 200, r.text
    _check_detections(r.json(), (64, 48), 2, text=False)
    assert [d["box_xyxy"] for d in r.json()["detections"]] == [[4, 4, 30, 40], [0, 0, 64, 20]]
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "points": [[10, 10], [40, 30]],
                                    "point_labels": [1, 0]})
    assert r.status_code == 200, r.text
    _check_detections(r.json(), (64, 48), 2, text=False)
    assert "/v1/segment" in c.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("fields, status, words", [
    ({"texts": ["a"], "points": [[1, 1]]}, 400, "only one kind of prompt, not text/texts and points"),
    ({"text": "a", "texts": ["b"]}, 400, "not text and texts"),
    ({}, 400, "needs one of text/texts, boxes or points"),
    ({"boxes": [[0, 0, 9, 9]], "point_labels": [1]}, 400, "point_labels go with points"),
    ({"texts": []}, 400, "texts is empty"),
    ({"text": "  "}, 400, "empty"),
    ({"boxes": []}, 400, "boxes is empty"),
    ({"boxes": [[0, 0, 9]]}, 400, "boxes[0] must be 4 numbers"),
    ({"boxes": [[100, 100, 200, 200]]}, 400, "no area inside the 64x48 image"),
    ({"boxes": [[5, 5, 5, 30]]}, 400, "no area"),
    ({"points": [[500, 5]]}, 400, "(500, 5) lies outside the 64x48 image"),
    ({"points": [[1, 2, 3]]}, 400, "points[0] must be 2 finite numbers"),
    ({"points": [[1, 2]], "point_labels": [3]}, 400, "1 (the object) or 0"),
    ({"points": [[1, 2]] * 3}, 422, "len(points)=3 exceeds this worker's limit of 2"),
    ({"points": "1,2"}, 422, "points"),
])
def test_segment_route_refuses_bad_prompts(make_client, seg, fields, status, words):
    c = make_client(seg, max_boxes=2)
    r = c.post("/v1/segment", json={"image": image_field(64, 48), **fields})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    if status == 400:
        assert r.json()["type"] in ("InvalidPromptError", "InvalidBoxError")


def test_segment_without_a_mask_engine_says_how_to_get_one(make_client, tiny_predictor, monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)
    bare = Predictor(tiny_predictor.model, tokenizer=tiny_predictor.tokenizer, device="cpu")
    c = make_client(bare)
    r = c.post("/v1/segment", json={"image": image_field(), "boxes": [[0, 0, 10, 10]]})
    assert r.status_code == 400 and r.json()["type"] == "PixelLLMError"
    assert "no mask decoder yet; pass --mask-engine sam:PATH" in r.json()["error"]


def test_the_worker_passes_its_mask_engine_setting_to_the_predictor(tiny_checkpoint, sam_dir):
    spec = f"sam:{sam_dir}"
    assert WorkerSettings.from_env({"PIXELLLM_MASK_ENGINE": spec}).mask_engine == spec
    assert WorkerSettings.from_env({}).mask_engine is None
    assert engine_spec(str(tiny_checkpoint), mask_engine=spec)["mask_engine"] == spec
    assert make_factory(str(tiny_checkpoint), None, "cpu", spec)().mask_engine.name == spec
    app = create_app(str(tiny_checkpoint), WorkerSettings(engine="thread", device="cpu", mask_engine=spec,
                                                          warmup="off"))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_until(lambda: c.get("/ready").status_code == 200, 30, what="ready")
        r = c.post("/v1/segment", json={"image": image_field(64, 48), "points": [[20, 20]]})
        assert r.status_code == 200, r.text
        _check_detections(r.json(), (64, 48), 1, text=False)
    bad = create_app(str(tiny_checkpoint), WorkerSettings(engine="thread", device="cpu", warmup="off",
                                                          mask_engine=f"sam:{tiny_checkpoint}"))
    with TestClient(bad, raise_server_exceptions=False) as c:
        wait_until(lambda: c.get("/ready").status_code != 503 or c.get("/ready").json().get("error"), 30,
                   what="the model load to fail")
        assert "not a SAM checkpoint" in c.get("/ready").json()["error"]


def test_remote_segment_equals_local_segment(seg):
    images = [png_bytes(64, 48), Image.open(io.BytesIO(png_bytes(80, 60, 3))).convert("RGB"), png_bytes(50, 50)]
    texts, boxes = [["the red circle"], None, None], [None, [[5, 5, 40, 50], [0, 0, 20, 20]], None]
    points, labels = [None, None, [[10, 10], [30, 30]]], [None, None, [1, 0]]
    local = seg.segment(images, texts=texts, boxes=boxes, points=points, point_labels=labels)
    with ThreadedServer(create_app(seg, WorkerSettings())) as srv, RemotePredictor(srv.url) as remote:
        out = remote.segment(images, texts=texts, boxes=boxes, points=points, point_labels=labels)
        assert [len(r) for r in out] == [1, 2, 2]
        for got, want in zip(out, local):
            for g, w in zip(got, want):
                assert g.mask == w.mask and g.box_xyxy == pytest.approx(w.box_xyxy)
                assert g.text == w.text and g.mask_score == pytest.approx(w.mask_score)
                assert np.array_equal(g.to_mask(), w.to_mask())
        assert remote.segment([png_bytes()], boxes=[[]]) == [[]]  # nothing to ask: no request
        with pytest.raises(InvalidPromptError, match="only one of texts, boxes or points"):
            remote.segment([png_bytes()], texts=[["a"]], points=[[[1, 1]]])
        with pytest.raises(InvalidPromptError, match="lies outside"):
            remote.segment([png_bytes(64, 48)], points=[[[100, 5]]])
        with pytest.raises(InvalidBoxError, match="no area"):
            remote.segment([png_bytes(64, 48)], boxes=[[[100, 100, 200, 200]]])
        with pytest.raises(PixelLLMError, match="needs texts, boxes or points"):
            remote.segment([png_bytes()])
