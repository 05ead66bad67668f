"""Segmentation through the model's own mask decoder (issue 17) and point prompts for region captions.

A tiny random PixelLLM with ``heads.mask_decoder=2`` and ``prompt.points`` (seeded; its masks for these
prompts are far from empty) answers ``Predictor.segment`` with no mask engine, and ``caption_regions`` takes
points. Random weights: the tests check shapes, sizes, order, the cache and errors, not quality.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scenes import make_scene

from pixelllm_plugins import cli
from pixelllm_plugins.checkpoint import save_pretrained
from pixelllm_plugins.cli import main
from pixelllm_plugins.config import get_preset
from pixelllm_plugins.errors import InvalidBoxError, InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.predictor import Predictor, _polygons, _to_original
from pixelllm_plugins.inference.preprocess import prepare_image
from pixelllm_plugins.inference.results import MaskResult, RegionCaption
from pixelllm_plugins.inference.tasks import TASKS, run_isolated
from pixelllm_plugins.masks import mask_iou, mask_to_box, mask_to_polygons, polygons_to_mask, rle_to_mask
from pixelllm_plugins.modeling.pixel_llm import PixelLLM
from pixelllm_plugins.tokenizer import PixelTokenizer

W, H = 160, 120
BOXES = [[10, 10, 70, 80], [80, 30, 150, 100], [-20, 30, 150, 500]]
POINTS = [[40, 40], [100, 60], [20, 100]]


def _model(masks: int, points: bool, seed: int = 0) -> tuple[PixelLLM, PixelTokenizer]:
    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = masks, points
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(seed)
    return PixelLLM(cfg, tokenizer.vocab_size).eval(), tokenizer


def _predictor(masks: int, points: bool, **kwargs) -> Predictor:
    model, tokenizer = _model(masks, points)
    return Predictor(model, tokenizer=tokenizer, model_version=f"tiny-m{masks}-p{int(points)}", device="cpu",
                     **kwargs)


@pytest.fixture(scope="module")
def dec():
    """Own mask decoder (K=2) and point prompts."""
    return _predictor(2, True)


@pytest.fixture(autouse=True)
def _no_env_engine(monkeypatch):
    monkeypatch.delenv("PIXELLLM_MASK_ENGINE", raising=False)


@pytest.fixture()
def scene():
    return make_scene(size=(W, H))


def _check(r: MaskResult, size=(W, H)) -> np.ndarray:
    w, h = size
    assert isinstance(r, MaskResult)
    assert r.mask["size"] == [h, w] and isinstance(r.mask["counts"], str)
    decoded = rle_to_mask(r.mask)
    assert decoded.shape == (h, w) and decoded.dtype == bool and decoded.any()
    from pycocotools import mask as coco

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = coco.decode({"size": r.mask["size"], "counts": r.mask["counts"].encode("ascii")})
    assert np.array_equal(raw.astype(bool), decoded)
    assert r.polygons and all(len(p["exterior"]) >= 3 and "holes" in p for p in r.polygons)
    assert mask_iou(polygons_to_mask(r.polygons, w, h), decoded) >= 0.9
    assert len(r.box_xyxy) == 4 and all(isinstance(v, float) for v in r.box_xyxy)
    assert 0.0 <= r.score <= 1.0 and 0.0 <= r.mask_score <= 1.0
    assert r.model_version
    assert MaskResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    return decoded


# ---- segment through the model's own decoder --------------------------------------------------------------

def test_the_mask_source_is_an_engine_asked_for_else_the_models_decoder(dec, tiny_predictor):
    assert dec.mask_source == "model" and dec.mask_engine is None
    assert tiny_predictor.mask_source is None
    assert _predictor(2, True, mask_engine=StubEngine([])).mask_source == "stub"


def test_boxes_give_masks_in_image_pixels_in_prompt_order(dec, scene):
    (results,) = dec.segment([scene], boxes=[BOXES])
    assert len(results) == 3
    for r in results:
        _check(r)
        assert r.text is None and r.score == r.mask_score
    assert [r.box_xyxy for r in results] == [(10.0, 10.0, 70.0, 80.0), (80.0, 30.0, 150.0, 100.0),
                                              (0.0, 30.0, 150.0, float(H))]
    alone = [dec.segment([scene], boxes=[[b]])[0][0] for b in BOXES]  # each prompt alone: the same answer
    assert [r.mask for r in alone] == [r.mask for r in results]
    assert [r.mask_score for r in alone] == pytest.approx([r.mask_score for r in results], abs=1e-4)


def test_the_mask_is_the_best_of_k_upsampled_from_the_decoder(dec, scene):
    """The mask equals the decoder's logits, best of K by predicted IoU, upsampled by hand."""
    (result,) = dec.segment([scene], boxes=[[BOXES[1]]])[0]
    prepared = prepare_image(scene, dec.config.vision)
    model = dec.model
    with torch.no_grad():
        emb = model.embed_images(prepared.pixel_values[None])
        box = torch.tensor([prepared.to_canvas(BOXES[1])])
        logits, iou = model.prompt_masks(emb, box, torch.tensor([0]))
    k = int(iou[0].argmax())
    assert logits.shape[1] == 2 and result.mask_score == pytest.approx(float(iou[0, k].clamp(0, 1)), abs=1e-4)
    up = torch.nn.functional.interpolate(logits[:, k:k + 1], size=(W, W), mode="bilinear", align_corners=False)
    assert np.array_equal(rle_to_mask(result.mask), (up[0, 0, :H, :W] > 0).numpy())


@pytest.mark.parametrize("size", [(160, 120), (90, 200), (64, 64), (301, 47)])
def test_upsampling_maps_the_canvas_onto_the_original_image(dec, size):
    """A logit map positive over one canvas box becomes a mask over that box in the image's pixels."""
    w, h = size
    prepared = prepare_image(Image.new("RGB", size), dec.config.vision)
    s = dec.config.vision.image_size
    box = [0.2 * w, 0.3 * h, 0.7 * w, 0.9 * h]
    x0, y0, x1, y1 = (round(v * prepared.scale / 4) for v in box)  # the box's cells at stride 4
    logits = torch.full((s // 4, s // 4), -5.0)
    logits[y0:y1, x0:x1] = 5.0
    mask = _to_original(logits, prepared, s, torch.nn.functional)
    assert mask.shape == (h, w) and mask.any()
    got = mask_to_box(mask)
    cell = 4 / prepared.scale  # one low-res cell in original pixels
    for g, want in zip(got, (x0 * cell, y0 * cell, min(x1 * cell, w), min(y1 * cell, h))):
        assert abs(g - want) <= cell / 2 + 1


def test_polygons_traced_in_the_masks_box_equal_those_of_the_whole_mask(dec, scene):
    rng = np.random.default_rng(0)
    masks = [rle_to_mask(r.mask) for r in dec.segment([scene], boxes=[BOXES])[0]]
    speckle = np.kron(rng.random((12, 16)) > 0.5, np.ones((10, 10), bool))  # parts and holes, at the edges too
    ring = np.zeros((H, W), bool)
    ring[20:90, 30:100], ring[40:60, 50:70] = True, False
    for mask in [*masks, speckle, ring, np.ones((H, W), bool)]:
        assert _polygons(mask) == mask_to_polygons(mask)
    assert _polygons(np.zeros((H, W), bool)) == []


def test_texts_use_the_referred_box_and_score(dec, scene):
    texts = ["the red circle", "the blue square"]
    (results,) = dec.segment([scene], texts=[texts])
    (referred,) = dec.refer([scene], [texts])
    assert [r.text for r in results] == [dets[0].text for dets in referred]
    for r, (d,) in zip(results, referred):
        _check(r)
        assert r.box_xyxy == pytest.approx(d.box_xyxy) and r.score == pytest.approx(d.score)
    assert dec.segment([scene], texts=[[]]) == [[]]


def test_points_are_prompts_with_labels_and_give_the_masks_box(dec, scene):
    (results,) = dec.segment([scene], points=[POINTS], point_labels=[[1, 0, 1]])
    assert len(results) == 3
    for r in results:
        mask = _check(r)
        assert r.box_xyxy == mask_to_box(mask) and r.text is None and r.score == r.mask_score
    alone = [dec.segment([scene], points=[[p]], point_labels=[[label]])[0][0]
             for p, label in zip(POINTS, [1, 0, 1])]
    assert [r.mask for r in alone] == [r.mask for r in results]
    (positive,) = dec.segment([scene], points=[[POINTS[1]]])  # labels default to 1
    assert positive[0].mask != results[1].mask  # the label is read


def test_batches_mix_prompt_kinds_images_and_prepared_inputs(dec, scene, scene_files):
    images = [scene, str(scene_files[1]), scene_files[2].read_bytes(), dec.prepare(scene)]
    prompts = [{"texts": ["the red circle"]}, {"boxes": [[5, 5, 60, 100], [0, 0, 40, 40]]},
               {"points": [[10, 10], [30, 40]], "point_labels": [1, 0]}, {"boxes": [BOXES[0]]}]
    out = TASKS["segment"].call(dec, images, prompts, adapter=None)
    assert [len(r) for r in out] == [1, 2, 2, 1]
    assert out[0][0].text is not None and out[1][0].text is None
    for r in out[1]:
        _check(r, (90, 200))
    for r in out[2]:
        _check(r, (64, 64))
    assert out[3][0].mask == dec.segment([scene], boxes=[[BOXES[0]]])[0][0].mask  # a PreparedInput is fine


def test_the_image_embedding_is_cached_across_tasks(scene):
    fresh = _predictor(2, True)
    fresh.refer([scene], [["the red circle"]])
    assert fresh.stats["vision_calls"] == 1
    fresh.segment([scene], texts=[["the red circle"]])
    fresh.segment([scene], boxes=[BOXES[:2]])
    fresh.segment([scene], points=[POINTS[:1]])
    fresh.caption_regions([scene], points=[POINTS[:1]], max_new_tokens=2)
    assert fresh.stats["vision_calls"] == 1 and fresh.stats["cache_hits"] >= 4


class StubEngine:
    """A mask engine answering fixed masks (one per prompt, cycling): shows which source answered."""

    name = "stub"

    def __init__(self, masks):
        self.masks = masks
        self.calls = []

    def predict(self, image, boxes=None, points=None, point_labels=None):
        self.calls.append((boxes, points, point_labels))
        n = len(boxes if boxes is not None else points)
        return [(self.masks[k % len(self.masks)], 0.5) for k in range(n)]


def _square(x0=30, y0=20, x1=60, y1=40):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_an_explicit_mask_engine_wins_over_the_models_decoder(scene):
    stub = StubEngine([_square()])
    with_engine = _predictor(2, True, mask_engine=stub)
    (results,) = with_engine.segment([scene], boxes=[[BOXES[0]]])
    assert results[0].mask_score == 0.5 and len(stub.calls) == 1
    # a decoder without point prompts: points go to the engine when there is one
    no_points = _predictor(2, False, mask_engine=StubEngine([_square()]))
    (results,) = no_points.segment([scene], points=[[POINTS[0]]])
    assert results[0].box_xyxy == (30.0, 20.0, 60.0, 40.0)


def test_points_on_a_decoder_without_point_prompts_say_what_to_do(scene):
    no_points = _predictor(2, False)
    (results,) = no_points.segment([scene], boxes=[[BOXES[0]]])  # boxes and texts still work
    _check(results[0])
    with pytest.raises(InvalidPromptError, match="image 0: this model's mask decoder takes no point prompts "
                                                 "\\(prompt.points is false\\).*--mask-engine sam:PATH"):
        no_points.segment([scene], points=[[POINTS[0]]])


def test_a_model_with_neither_decoder_nor_engine_says_how_to_get_one(scene):
    bare = _predictor(0, True)
    with pytest.raises(PixelLLMError, match="no mask decoder yet; pass --mask-engine sam:PATH.*heads.mask_decoder"):
        bare.segment([scene], boxes=[[BOXES[0]]])


def test_an_empty_predicted_mask_names_its_prompt_and_the_rest_is_answered(dec, scene, monkeypatch):
    original = dec.model.prompt_masks

    def empty_for_box_1(embedding, boxes, index, *args, **kwargs):
        logits, iou = original(embedding, boxes, index, *args, **kwargs)
        logits = logits.clone()
        logits[(boxes[:, 0].float() - 80 * 0.4).abs() < 0.5] = -10.0  # box 1 starts at x = 80 px (canvas 0.4)
        return logits, iou

    monkeypatch.setattr(dec.model, "prompt_masks", empty_for_box_1)
    with pytest.raises(PixelLLMError, match="image 0 box 1: the model's mask decoder predicted an empty mask; try "
                                            "another prompt"):
        dec.segment([scene], boxes=[BOXES[:2]])
    items = [{"boxes": [BOXES[0]]}, {"boxes": BOXES[:2]}, {"points": [POINTS[0]]}]
    results = run_isolated(lambda chunk: TASKS["segment"].call(dec, [scene] * len(chunk), chunk), items)
    assert isinstance(results[1], PixelLLMError) and "box 1" in str(results[1])  # the failing image fails alone
    assert len(results[0]) == 1 and len(results[2]) == 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"points": [[[500, 10]]]}, InvalidPromptError, "point 0: \\(500, 10\\) lies outside the 160x120 image"),
    ({"points": [[[float("nan"), 10]]]}, InvalidPromptError, "finite numbers"),
    ({"points": [[[1, 2, 3]]]}, InvalidPromptError, "finite numbers"),
    ({"boxes": [[[200, 200, 300, 300]]]}, InvalidBoxError, "image 0 box 0: .*no area inside the 160x120 image"),
    ({"texts": [[""]]}, InvalidPromptError, "empty"),
    ({"texts": [[5]]}, InvalidPromptError, "text 0: must be a string"),
    ({"texts": [["a"]], "boxes": [[[1, 1, 9, 9]]]}, InvalidPromptError, "only one of texts, boxes or points"),
    ({}, InvalidPromptError, "needs texts, boxes or points"),
    ({"points": [[[1, 1]]], "point_labels": [[1, 0]]}, InvalidPromptError, "1 points but 2 point_labels"),
    ({"points": [[[1, 1]]], "point_labels": [[2]]}, InvalidPromptError, "must be 1 .* or 0"),
])
def test_segment_refuses_bad_input(dec, scene, kwargs, error, message):
    with pytest.raises(error, match=message):
        dec.segment([scene], **kwargs)


# ---- caption_regions with points -----------------------------------------------------------------------

def test_a_point_is_captioned_as_the_region_of_its_mask_and_names_its_point(dec, scene):
    (caps,) = dec.caption_regions([scene], points=[POINTS[:2]], max_new_tokens=4)
    (masks,) = dec.segment([scene], points=[POINTS[:2]])
    assert [c.point for c in caps] == [(40.0, 40.0), (100.0, 60.0)]
    assert [c.box_xyxy for c in caps] == [m.box_xyxy for m in masks]
    for c in caps:
        assert isinstance(c, RegionCaption) and isinstance(c.text, str) and 0 <= c.score <= 1
        assert c.to_dict()["point"] == list(c.point)
        assert RegionCaption.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_boxes_keep_working_positionally_and_mix_with_points(dec, scene):
    (by_box,) = dec.caption_regions([scene], [[BOXES[0]]], max_new_tokens=4)
    assert by_box[0].point is None and "point" not in by_box[0].to_dict()
    assert by_box[0].box_xyxy == (10.0, 10.0, 70.0, 80.0)
    mixed = dec.caption_regions([scene, scene, scene], boxes=[[BOXES[0]], None, []],
                                points=[None, POINTS, None], max_new_tokens=4)
    assert [len(m) for m in mixed] == [1, 3, 0]
    assert mixed[0][0].text == by_box[0].text
    assert [c.point for c in mixed[1]] == [tuple(map(float, p)) for p in POINTS]  # prompt order
    alone = [dec.caption_regions([scene], points=[[p]], max_new_tokens=4)[0][0] for p in POINTS]
    assert [(c.text, c.box_xyxy) for c in alone] == [(c.text, c.box_xyxy) for c in mixed[1]]
    via_registry = TASKS["caption_regions"].call(dec, [scene, scene], [[BOXES[0]], {"points": POINTS[:1]}],
                                                 max_new_tokens=4)
    assert via_registry[0][0].text == by_box[0].text and via_registry[1][0].point == (40.0, 40.0)


def _proposals(monkeypatch, predictor, boxes_px, scores):
    """The model proposes exactly ``boxes_px`` (image pixels of the W x H scene) with ``scores``."""
    boxes = torch.tensor([[[x0 / W, y0 / H, x1 / W, y1 / H] for x0, y0, x1, y1 in boxes_px]])
    monkeypatch.setattr(predictor.model, "propose",
                        lambda embedding, sizes, k, min_score: (boxes.repeat(len(sizes), 1, 1),
                                                                torch.tensor([scores]).repeat(len(sizes), 1)))


def test_a_point_takes_the_proposal_that_holds_it_with_the_nearest_centre(monkeypatch, scene):
    from pixelllm_plugins.inference.predictor import _MaskPrompt

    dec = _predictor(2, True)
    far, near, elsewhere, faint = (0, 0, 150, 110), (20, 20, 64, 64), (90, 10, 150, 50), (38, 38, 42, 42)
    _proposals(monkeypatch, dec, [far, near, elsewhere, faint], [0.9, 0.3, 0.8, 0.01])
    (caps,) = dec.caption_regions([scene], points=[[POINTS[0], [100, 100]]], max_new_tokens=4)
    assert caps[0].box_xyxy == pytest.approx(near)  # held by far and near; faint scores under the floor
    assert caps[1].box_xyxy == pytest.approx(far)  # only far holds (100, 100)
    (by_box,) = dec.caption_regions([scene], [[near]], max_new_tokens=4)
    assert caps[0].point == (40.0, 40.0) and caps[0].text == by_box[0].text != ""
    (masks,) = dec.segment([scene], points=[[POINTS[0], POINTS[0]]], point_labels=[[1, 0]])
    loaded = dec._load([scene])
    to_canvas = loaded[0].prepared.to_canvas
    with torch.inference_mode():
        (expected, _), (negative, _) = dec._decode_masks(loaded, [
            _MaskPrompt(0, to_canvas(near), tuple(to_canvas(POINTS[0])), 1, "near"),
            _MaskPrompt(0, dec._global_box(loaded[0]), tuple(to_canvas(POINTS[0])), 0, "whole image")])
    assert np.array_equal(rle_to_mask(masks[0].mask), expected)  # the proposal box and the point
    assert np.array_equal(rle_to_mask(masks[1].mask), negative)  # a negative point keeps the whole image


def test_a_point_no_proposal_holds_falls_back_to_its_mask(monkeypatch, scene):
    dec = _predictor(2, True)
    _proposals(monkeypatch, dec, [(90, 10, 150, 50)], [0.9])
    (caps,) = dec.caption_regions([scene], points=[[POINTS[0]]], max_new_tokens=4)
    (masks,) = dec.segment([scene], points=[[POINTS[0]]])
    assert caps[0].box_xyxy == masks[0].box_xyxy == mask_to_box(rle_to_mask(masks[0].mask))


def test_a_points_model_without_a_mask_source_captions_the_point_over_the_whole_image(scene):
    points_only = _predictor(0, True)
    (caps,) = points_only.caption_regions([scene], points=[POINTS[:2]], max_new_tokens=4)
    assert [c.box_xyxy for c in caps] == [(0.0, 0.0, float(W), float(H))] * 2
    assert [c.point for c in caps] == [(40.0, 40.0), (100.0, 60.0)]


def test_a_model_without_points_turns_a_point_into_the_box_of_the_engines_mask(scene):
    stub = StubEngine([_square(), np.zeros((H, W), bool)])
    boxes_only = _predictor(2, False, mask_engine=stub)
    (caps,) = boxes_only.caption_regions([scene], points=[[POINTS[0]]], max_new_tokens=4)
    (by_box,) = boxes_only.caption_regions([scene], [[(30, 20, 60, 40)]], max_new_tokens=4)
    assert caps[0].box_xyxy == (30.0, 20.0, 60.0, 40.0) and caps[0].point == (40.0, 40.0)
    assert caps[0].text == by_box[0].text  # the language model read the mask's box alone
    with pytest.raises(PixelLLMError, match="image 0 point 1 \\(100, 60\\): the mask engine found no object"):
        boxes_only.caption_regions([scene], points=[POINTS[:2]], max_new_tokens=4)


def test_a_model_without_points_or_mask_engine_says_what_it_needs(tiny_predictor, scene):
    with pytest.raises(PixelLLMError, match="takes no point prompts \\(prompt.points is false\\) and has no mask "
                                            "engine.*--mask-engine sam:PATH"):
        tiny_predictor.caption_regions([scene], points=[[POINTS[0]]])


@pytest.mark.parametrize("kwargs, message", [
    ({"boxes": [[BOXES[0]]], "points": [[POINTS[0]]]}, "image 0: give boxes or points, not both"),
    ({}, "needs boxes or points"),
    ({"points": [None]}, "image 0: caption_regions needs boxes or points"),
    ({"points": [[POINTS[0]], [POINTS[0]]]}, "1 images but 2 point lists"),
    ({"points": [[[500, 5]]]}, "point 0: \\(500, 5\\) lies outside the 160x120 image"),
    ({"points": [[[float("inf"), 5]]]}, "finite numbers"),
    ({"points": [[[5]]]}, "finite numbers"),
])
def test_caption_regions_refuses_bad_points(dec, scene, kwargs, message):
    with pytest.raises(InvalidPromptError, match=message):
        dec.caption_regions([scene], **kwargs)


def test_caption_regions_with_no_points_for_an_image_answers_nothing(dec, scene):
    assert dec.caption_regions([scene], points=[[]]) == [[]]


# ---- the CLI -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dec_checkpoint(tmp_path_factory):
    model, tokenizer = _model(2, True)
    path = tmp_path_factory.mktemp("tiny-decoder")
    save_pretrained(model, tokenizer, path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_segment_uses_the_models_decoder(capsys, dec_checkpoint, scene_files, tmp_path):
    drawing = tmp_path / "masks.png"
    code, out, err = run(capsys, "segment", scene_files[0], "the red circle", "--model", dec_checkpoint, "--json",
                         "--draw", drawing)
    assert code == 0, err
    result = json.loads(out)
    (det,) = result["detections"]
    assert set(det) == {"text", "box_xyxy", "score", "mask", "polygons", "mask_score", "model_version"}
    assert det["mask"]["size"] == [120, 160] and rle_to_mask(det["mask"]).shape == (120, 160)
    with Image.open(drawing) as im:
        assert im.size == (160, 120)
    code, out, err = run(capsys, "segment", scene_files[0], "--point", "40,40", "--point", "100,60,0",
                         "--model", dec_checkpoint, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["point_labels"] == [1, 0] and len(result["detections"]) == 2
    code, out, err = run(capsys, "segment", scene_files[0], "--box", "10,10,70,80", "--model", dec_checkpoint)
    assert code == 0 and "mask score" in out, err


def test_cli_segment_batch_with_the_models_decoder(capsys, dec_checkpoint, scene_files, tmp_path):
    img = str(scene_files[0])
    lines = [
        {"image": img, "text": "the red circle"},
        {"image": img, "points": [[40, 40], [500, 5]]},
        {"image": img, "boxes": [[10, 10, 70, 80], [0, 0, 30, 30]]},
        {"image": img, "points": [[40, 40], [100, 60]], "point_labels": [1, 0]},
        {"image": img, "boxes": [[10, 10, 70, 80]], "points": [[1, 1]]},
    ]
    batch = tmp_path / "seg.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, _ = run(capsys, "segment", "--batch", batch, "--model", dec_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines)
    assert len(results[0]["detections"]) == 1
    assert "points[1] (500, 5) lies outside the 160x120 image" in results[1]["error"]
    assert [d["box_xyxy"] for d in results[2]["detections"]] == [[10, 10, 70, 80], [0, 0, 30, 30]]
    assert len(results[3]["detections"]) == 2 and results[3]["image_size"] == [160, 120]
    assert "only one kind of prompt" in results[4]["error"]


def test_cli_caption_regions_points(capsys, dec_checkpoint, scene_files, tmp_path):
    drawing = tmp_path / "regions.png"
    code, out, err = run(capsys, "caption-regions", scene_files[0], "--point", "40,40", "--point", "100,60",
                         "--model", dec_checkpoint, "--json", "--draw", drawing)
    assert code == 0, err
    result = json.loads(out)
    assert result["points"] == [[40, 40], [100, 60]] and "boxes" not in result
    assert [c["point"] for c in result["captions"]] == [[40, 40], [100, 60]]
    assert all(set(c) == {"box_xyxy", "text", "score", "model_version", "point"} for c in result["captions"])
    assert drawing.is_file()
    code, out, err = run(capsys, "caption-regions", scene_files[0], "--box", "10,10,70,80", "--model",
                         dec_checkpoint, "--json")
    assert code == 0 and "point" not in json.loads(out)["captions"][0], err
    code, out, err = run(capsys, "caption-regions", scene_files[0], "--point", "40,40", "--model", dec_checkpoint)
    assert code == 0 and "point (40, 40) -> [" in out, err
    code, out, err = run(capsys, "caption-regions", scene_files[0], "--point", "40,40", "--box", "1,1,9,9",
                         "--model", dec_checkpoint, "--json")
    assert code == 1 and "not both" in json.loads(out)["error"]
    code, _, err = run(capsys, "caption-regions", scene_files[0], "--point", "40,40,0", "--model", dec_checkpoint)
    assert code == 2 and "points on the object only" in err
    code, _, err = run(capsys, "caption-regions", scene_files[0], "--point", "4a,40", "--model", dec_checkpoint)
    assert code == 2 and "--point 4a,40" in err
    code, _, err = run(capsys, "caption-regions", scene_files[0], "--model", dec_checkpoint)
    assert code == 2 and "give at least one --box x1,y1,x2,y2 or --point x,y" in err
    code, _, err = run(capsys, "caption-regions", scene_files[0], "--point", "500,40", "--model", dec_checkpoint)
    assert code == 1 and "lies outside the 160x120 image" in err


def test_cli_caption_regions_batch_points(capsys, dec_checkpoint, tiny_checkpoint, scene_files, tmp_path):
    img = str(scene_files[0])
    lines = [
        {"image": img, "points": [[40, 40], [100, 60]]},
        {"image": img, "boxes": [[10, 10, 70, 80]]},
        {"image": img, "boxes": [[10, 10, 70, 80]], "points": [[40, 40]]},
        {"image": img, "points": []},
        {"image": img, "points": [[40, 40, 1]]},
        {"image": img, "points": [[900, 40]]},
        {"image": img, "points": [[40, 40]], "point_labels": [1]},
        {"image": img},
        {"image": str(scene_files[1]), "points": [[45, 150]]},
    ]
    batch = tmp_path / "regions.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, _ = run(capsys, "caption-regions", "--batch", batch, "--model", dec_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(results) == len(lines)
    assert [c["point"] for c in results[0]["captions"]] == [[40, 40], [100, 60]]
    assert "point" not in results[1]["captions"][0]
    assert "give 'boxes' or 'points', not both" in results[2]["error"]
    assert "'points' must be a non-empty list" in results[3]["error"]
    assert "points[0] must be 2 finite numbers" in results[4]["error"]
    assert "points[0] (900, 40) lies outside the 160x120 image" in results[5]["error"]
    assert "'point_labels' go with segment" in results[6]["error"]
    assert "request needs 'boxes'" in results[7]["error"] and "'points'" in results[7]["error"]
    assert results[8]["captions"][0]["point"] == [45, 150] and results[8]["image_size"] == [90, 200]
    # a model that cannot take points: every point line says so, box lines are answered
    code, out, _ = run(capsys, "caption-regions", "--batch", batch, "--model", tiny_checkpoint)
    results = [json.loads(line) for line in out.splitlines()]
    assert "takes no point prompts" in results[0]["error"] and results[1]["captions"]


def test_cli_caption_regions_passes_the_mask_engine(capsys, monkeypatch, dec, scene_files):
    seen = {}

    def load(model, device, **options):
        seen.update(options)
        return dec

    monkeypatch.setattr(cli, "_load_predictor", load)
    code, out, _ = run(capsys, "caption-regions", scene_files[0], "--point", "40,40", "--mask-engine", "sam:X",
                       "--json")
    assert code == 0 and seen == {"mask_engine": "sam:X"} and json.loads(out)["captions"][0]["point"] == [40, 40]
