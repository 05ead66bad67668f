"""The worker with a model that has its own mask decoder and point prompts (issue 17): ``/v1/segment`` with no
mask engine, ``/v1/caption_regions`` with ``points``, and ``RemotePredictor`` over loopback giving what the
in-process Predictor gives. A tiny random model: shapes, schema, order and errors, not quality."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving_helpers import ThreadedServer, image_field, png_bytes, wait_until

from pixelllm_plugins.checkpoint import save_pretrained
from pixelllm_plugins.config import get_preset
from pixelllm_plugins.errors import InvalidBoxError, InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.predictor import Predictor
from pixelllm_plugins.masks import rle_to_mask
from pixelllm_plugins.modeling.pixel_llm import PixelLLM
from pixelllm_plugins.serving.app import create_app
from pixelllm_plugins.serving.client import RemotePredictor
from pixelllm_plugins.serving.schemas import CaptionRegionsResponse, SegmentResponse
from pixelllm_plugins.serving.settings import WorkerSettings
from pixelllm_plugins.tokenizer import PixelTokenizer


def _model(masks: int = 2, points: bool = True):
    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = masks, points
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    return PixelLLM(cfg, tokenizer.vocab_size).eval(), tokenizer


@pytest.fixture(autouse=True)
def _no_env_engine(monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)


@pytest.fixture(scope="module")
def dec():
    model, tokenizer = _model()
    return Predictor(model, tokenizer=tokenizer, model_version="tiny-decoder", device="cpu")


@pytest.fixture(scope="module")
def dec_checkpoint(tmp_path_factory):
    model, tokenizer = _model()
    path = tmp_path_factory.mktemp("tiny-decoder")
    save_pretrained(model, tokenizer, path)
    return path


def _check_masks(body: dict, size: tuple[int, int], n: int) -> None:
    w, h = size
    SegmentResponse.model_validate(body)
    assert body["image_size"] == [w, h] and len(body["detections"]) == n
    for d in body["detections"]:
        assert d["mask"]["size"] == [h, w] and rle_to_mask(d["mask"]).shape == (h, w)
        assert rle_to_mask(d["mask"]).any() and d["polygons"]


def _check_captions(body: dict, size: tuple[int, int], points: list | None) -> None:
    CaptionRegionsResponse.model_validate(body)
    assert body["image_size"] == list(size)
    if points is None:
        assert all("point" not in c for c in body["captions"])
    else:
        assert [c["point"] for c in body["captions"]] == points
        assert all(set(c) == {"box_xyxy", "text", "score", "model_version", "point"} for c in body["captions"])


def test_segment_route_uses_the_models_own_decoder(make_client, dec):
    c = make_client(dec)
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "texts": ["a circle", "a square"]})
    assert r.status_code == 200, r.text
    _check_masks(r.json(), (64, 48), 2)
    assert [d["text"] for d in r.json()["detections"]] == ["a circle", "a square"]
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "boxes": [[4, 4, 30, 40], [-5, 0, 90, 20]]})
    assert r.status_code == 200, r.text
    _check_masks(r.json(), (64, 48), 2)
    assert [d["box_xyxy"] for d in r.json()["detections"]] == [[4, 4, 30, 40], [0, 0, 64, 20]]
    r = c.post("/v1/segment", json={"image": image_field(80, 60), "points": [[10, 10], [40, 30]],
                                    "point_labels": [1, 0]})
    assert r.status_code == 200, r.text
    _check_masks(r.json(), (80, 60), 2)
    r = c.post("/v1/segment", json={"image": image_field(64, 48), "points": [[500, 5]]})
    assert r.status_code == 400 and "lies outside the 64x48 image" in r.json()["error"]


def test_caption_regions_route_takes_points(make_client, dec):
    c = make_client(dec, max_boxes=3)
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "points": [[10, 10], [40, 30]],
                                            "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    _check_captions(r.json(), (64, 48), [[10, 10], [40, 30]])
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "boxes": [[4, 4, 30, 40]],
                                            "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    _check_captions(r.json(), (64, 48), None)
    assert "points" in c.get("/openapi.json").json()["components"]["schemas"]["CaptionRegionsRequest"]["properties"]


@pytest.mark.parametrize("fields, status, words", [
    ({"boxes": [[0, 0, 9, 9]], "points": [[1, 1]]}, 400, "give boxes or points, not both"),
    ({}, 400, "caption_regions needs boxes or points"),
    ({"points": []}, 400, "points is empty"),
    ({"boxes": []}, 400, "boxes is empty"),
    ({"points": [[1, 2, 3]]}, 400, "points[0] must be 2 finite numbers"),
    ({"points": [[500, 5]]}, 400, "(500, 5) lies outside the 64x48 image"),
    ({"points": [[1, 2]] * 4}, 422, "len(points)=4 exceeds this worker's limit of 3"),
    ({"points": "1,2"}, 422, "points"),
    ({"points": [[1, 2]], "point_labels": [1]}, 422, "point_labels"),
])
def test_caption_regions_route_refuses_bad_points(make_client, dec, fields, status, words):
    c = make_client(dec, max_boxes=3)
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), **fields})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    if status == 400:
        assert r.json()["type"] in ("InvalidPromptError", "InvalidBoxError")


def test_caption_regions_points_on_a_model_that_cannot_take_them_is_a_clear_400(make_client, tiny_predictor):
    c = make_client(tiny_predictor)
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "points": [[10, 10]]})
    assert r.status_code == 400 and "takes no point prompts" in r.json()["error"]
    r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "boxes": [[4, 4, 30, 40]],
                                            "max_new_tokens": 2})
    assert r.status_code == 200  # boxes still work


def test_remote_predictor_equals_the_local_one(dec):
    images = [png_bytes(64, 48), Image.open(io.BytesIO(png_bytes(80, 60, 3))).convert("RGB"), png_bytes(50, 50)]
    texts, boxes = [["the red circle"], None, None], [None, [[5, 5, 40, 50], [0, 0, 20, 20]], None]
    points, labels = [None, None, [[10, 10], [30, 30]]], [None, None, [1, 0]]
    local_masks = dec.segment(images, texts=texts, boxes=boxes, points=points, point_labels=labels)
    region_boxes, region_points = [[[5, 5, 40, 40]], None, []], [None, [[10, 10], [60, 50]], None]
    local_caps = dec.caption_regions(images, boxes=region_boxes, points=region_points, max_new_tokens=4)
    with ThreadedServer(create_app(dec, WorkerSettings())) as srv, RemotePredictor(srv.url) as remote:
        out = remote.segment(images, texts=texts, boxes=boxes, points=points, point_labels=labels)
        assert [len(r) for r in out] == [1, 2, 2]
        for got, want in zip(out, local_masks):
            for g, w in zip(got, want):
                assert g.mask == w.mask and g.box_xyxy == pytest.approx(w.box_xyxy)
                assert g.text == w.text and g.mask_score == pytest.approx(w.mask_score)
        caps = remote.caption_regions(images, boxes=region_boxes, points=region_points, max_new_tokens=4)
        assert [len(r) for r in caps] == [1, 2, 0]
        assert caps == local_caps  # texts, boxes, scores and the points they answer
        assert caps[1][1].point == (60.0, 50.0)
        positional = remote.caption_regions(images[:1], [[[5, 5, 40, 40]]], max_new_tokens=4)
        assert positional[0][0].text == local_caps[0][0].text and positional[0][0].point is None
        assert remote.caption_regions([png_bytes()], points=[[]]) == [[]]  # nothing to ask: no request
        with pytest.raises(InvalidPromptError, match="image 0: give boxes or points, not both"):
            remote.caption_regions([png_bytes()], boxes=[[[0, 0, 9, 9]]], points=[[[1, 1]]])
        with pytest.raises(InvalidPromptError, match="needs boxes or points"):
            remote.caption_regions([png_bytes()])
        with pytest.raises(InvalidPromptError, match="point 0: must be 2 finite numbers"):
            remote.caption_regions([png_bytes()], points=[[[float("nan"), 1]]])
        with pytest.raises(InvalidPromptError, match="lies outside the 64x48 image"):
            remote.caption_regions([png_bytes(64, 48)], points=[[[100, 5]]])
        with pytest.raises(InvalidBoxError, match="no area"):
            remote.caption_regions([png_bytes(64, 48)], [[[100, 100, 200, 200]]])
        with pytest.raises(PixelLLMError, match="1 images but 2 point lists"):
            remote.caption_regions([png_bytes()], points=[[[1, 1]], [[1, 1]]])


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_a_worker_loading_a_decoder_checkpoint_segments_without_a_mask_engine(dec_checkpoint, engine):
    app = create_app(str(dec_checkpoint), WorkerSettings(engine=engine, device="cpu", warmup="off"))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_until(lambda: c.get("/ready").status_code == 200, 60, what="ready")
        r = c.post("/v1/segment", json={"image": image_field(64, 48), "points": [[20, 20]]})
        assert r.status_code == 200, r.text
        _check_masks(r.json(), (64, 48), 1)
        r = c.post("/v1/caption_regions", json={"image": image_field(64, 48), "points": [[20, 20], [50, 40]],
                                                "max_new_tokens": 3})
        assert r.status_code == 200, r.text
        _check_captions(r.json(), (64, 48), [[20, 20], [50, 40]])
