"""``segment`` (instance masks or polylines from texts, boxes or points) and ``caption_regions`` on keypoints,
through the plugin's operators, ``run_*`` and ``apply_model``, on a real MongoDB.

Masks written to FiftyOne are decoded back to full-image masks (instance masks with
``masks.fo_instance_to_mask``, polylines read even-odd with ``masks.fo_points_to_polygons`` and rasterised
with ``masks.polygons_to_mask``) and compared with the predictor's own masks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
from fiftyone.operators.delegated import DelegatedOperationService
from fo_scenes import SegmentingFake
from fo_worker import running_worker
from PIL import Image

from pixelllm_plugins.geometry import fo_relative_to_xyxy
from pixelllm_plugins.integrations import fiftyone as pxfo
from pixelllm_plugins.masks import (
    fo_instance_to_mask,
    fo_points_to_polygons,
    mask_iou,
    polygons_to_mask,
    rle_to_mask,
)

HERE = Path(__file__).resolve().parent
PLUGIN = "@pixelllm/pixelllm"
SEGMENT = f"{PLUGIN}/segment"


def _size(sample):
    with Image.open(sample.filepath) as im:
        return im.size


def stored_masks(sample, field: str) -> list[np.ndarray]:
    """The full-image boolean masks a segment field holds (either output)."""
    w, h = _size(sample)
    value = sample[field]
    if isinstance(value, fo.Polylines):
        return [polygons_to_mask(fo_points_to_polygons(p.points, w, h), w, h) for p in value.polylines]
    return [fo_instance_to_mask(d.bounding_box, d.mask, w, h) for d in value.detections]


@pytest.fixture()
def segmenting(monkeypatch):
    predictor = SegmentingFake()
    monkeypatch.setattr(pxfo.predictors, "get_predictor", lambda model=None, **kw: predictor)
    return predictor


def _keypoints(*points, label="click"):
    return fo.Keypoints(keypoints=[fo.Keypoint(label=label, points=[list(p)]) for p in points])


# ---- with a fake predictor: conversions, holes, errors -----------------------------------------------------


@pytest.mark.parametrize("output", ["instance_masks", "polylines"])
def test_segment_labels_every_sample_and_keeps_holes(plugin_installed, dataset, segmenting, output):
    res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={
        "boxes_field": "ground_truth", "output": output, "batch_size": 4}))
    out = res.result
    assert (out["processed"], out["failed"], out["labels"]) == (6, 0, 12), out
    kind = fo.Polylines if output == "polylines" else fo.Detections
    assert dataset.get_field("pixelllm_masks").document_type is kind
    for sample in dataset:
        w, h = _size(sample)
        boxes = [fo_relative_to_xyxy(d.bounding_box, w, h) for d in sample.ground_truth.detections]
        expected = segmenting.segment([sample.filepath], boxes=[boxes])[0]
        masks = stored_masks(sample, "pixelllm_masks")
        labels = sample.pixelllm_masks.polylines if output == "polylines" else sample.pixelllm_masks.detections
        assert len(masks) == len(expected) == 2
        for label, mask, gt_det, r in zip(labels, masks, sample.ground_truth.detections, expected):
            want = rle_to_mask(r.mask)
            assert mask_iou(mask, want) >= 0.97
            x1, y1, x2, y2 = (int(v) for v in r.box_xyxy)
            cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
            assert want[cy, cx] == 0 and mask[cy, cx] == 0  # the hole is kept
            assert label.label == gt_det.label and label.source_id == gt_det.id
            assert label.prompt_box == pytest.approx(gt_det.bounding_box, abs=1e-6)
            assert label.model_version == "fake-1" and label.mask_score == pytest.approx(0.9)
            if output == "polylines":
                assert label.filled and label.closed and label.num_holes == 1 and len(label.points) == 2
                # FiftyOne's own rasteriser (cv2.fillPoly) reads the inner shape as a hole too (it also fills
                # the pixels each ring's edge runs through, hence the looser bound on these small rings)
                seg = label.to_segmentation(frame_size=(w, h), target=1).mask
                assert mask_iou(seg.astype(bool), want) >= 0.8 and seg[cy, cx] == 0
            else:
                assert label.mask.dtype == bool
                assert label.mask.shape == (round(label.bounding_box[3] * h), round(label.bounding_box[2] * w))
                assert np.array_equal(mask, want)  # instance masks are exact


def test_segment_text_prompts_and_resume_skip(plugin_installed, dataset, segmenting):
    res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={"prompt_field": "refexp"}))
    assert res.result["processed"] == 6
    assert dataset.distinct("pixelllm_masks.detections.prompt") == sorted(set(dataset.values("refexp")))
    calls = len(segmenting.calls)
    again = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={"prompt_field": "refexp"}))
    assert again.result["skipped"] == 6 and len(segmenting.calls) == calls  # nothing recomputed
    other = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={"prompt": "the red circle",
                                                                           "overwrite": True}))
    assert other.result["processed"] == 6
    assert dataset.distinct("pixelllm_masks.detections.prompt") == ["the red circle"]


def test_segment_points_and_bad_points_are_per_sample_errors(plugin_installed, dataset, segmenting):
    samples = list(dataset)
    samples[0]["clicks"] = _keypoints((0.3, 0.4), (0.7, 0.6))
    samples[1]["clicks"] = _keypoints((0.5, 0.5), (1.5, 0.2), (float("nan"), float("nan")))
    samples[2]["clicks"] = _keypoints((float("nan"), 0.5))  # nothing usable
    samples[3]["clicks"] = fo.Keypoints(keypoints=[fo.Keypoint(label="empty", points=[])])
    # samples[4] and [5]: no clicks at all
    for s in samples[:4]:
        s.save()
    res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={
        "points_field": "clicks", "output": "polylines", "label_field": "point_masks"}))
    out = res.result
    assert (out["processed"], out["failed"]) == (2, 4), out
    dataset.reload()
    first, second, third, fourth, fifth, _ = list(dataset)
    assert len(first.point_masks.polylines) == 2 and first[pxfo.ERROR_FIELD] is None
    assert [p.prompt_point for p in first.point_masks.polylines] == [[0.3, 0.4], [0.7, 0.6]]
    assert len(second.point_masks.polylines) == 1  # the good point is labeled, the bad ones are named
    assert "lies outside the image" in second[pxfo.ERROR_FIELD] and "not 2 finite" in second[pxfo.ERROR_FIELD]
    assert third.point_masks is None and "not 2 finite numbers" in third[pxfo.ERROR_FIELD]
    assert fourth.point_masks is None and "no points" in fourth[pxfo.ERROR_FIELD]
    assert fifth.point_masks is None and "points_field 'clicks' is empty for this sample" in fifth[pxfo.ERROR_FIELD]
    assert all(e["error"].startswith(("points_field", "keypoint")) for e in out["errors"])


@pytest.mark.parametrize("params, message", [
    ({}, "give a prompt"),
    ({"prompt": "the red circle", "boxes_field": "ground_truth"}, "give one of prompt"),
    ({"boxes_field": "nope"}, "has no field 'nope'"),
    ({"points_field": "ground_truth"}, None),  # a Detections field as points: a per-sample error
    ({"boxes_field": "ground_truth", "output": "masks"}, "output must be one of instance_masks, polylines"),
    ({"boxes_field": "ground_truth", "output": 3}, "output must be one of"),
    ({"boxes_field": "ground_truth", "label_field": "ground_truth"}, "is the boxes_field"),
    ({"prompt_field": "refexp", "label_field": "refexp"}, "is the prompt_field"),
])
def test_segment_refuses_bad_requests_clearly(plugin_installed, dataset, segmenting, params, message):
    before = dataset.count_values("pixelllm_masks") if dataset.has_field("pixelllm_masks") else None
    if message is None:
        res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params=params))
        assert res.result["failed"] == 6
        assert "holds Detections, not Keypoints" in res.result["errors"][0]["error"]
        return
    with pytest.raises(Exception, match=message):
        foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params=params))
    with pytest.raises(pxfo.PixelLLMError, match=message):
        pxfo.run_segment(dataset, predictor=segmenting, **params)
    assert segmenting.calls == []
    assert (dataset.count_values("pixelllm_masks") if dataset.has_field("pixelllm_masks") else None) == before


def test_segment_refuses_an_output_field_of_another_type(plugin_installed, dataset, segmenting):
    pxfo.run_segment(dataset, boxes_field="ground_truth", output="polylines")
    with pytest.raises(pxfo.FieldError, match="already holds Polylines, not Detections"):
        pxfo.run_segment(dataset, boxes_field="ground_truth", output="instance_masks")


def test_caption_regions_on_keypoints(plugin_installed, dataset, segmenting):
    samples = list(dataset)
    samples[0]["clicks"] = _keypoints((0.25, 0.5), (0.75, 0.5))
    samples[1]["clicks"] = fo.Keypoints(keypoints=[
        fo.Keypoint(label="two", points=[[0.5, 0.5], [float("nan"), float("nan")]]),
        fo.Keypoint(label="far", points=[[-0.2, 0.5]])])
    samples[2]["clicks"] = _keypoints((float("inf"), 0.1))
    for s in samples[:3]:
        s.save()
    ids = dataset.values("clicks.keypoints.id")
    res = foo.execute_operator(f"{PLUGIN}/caption_regions", ctx=dict(dataset=dataset, params={
        "points_field": "clicks", "boxes_field": "ground_truth"}))
    out = res.result
    # samples without keypoints have nothing to caption (skipped, as samples without boxes)
    assert (out["processed"], out["failed"], out["skipped"], out["labels"]) == (2, 1, 3, 3), out
    assert out["fields"] == ["clicks"]
    dataset.reload()
    assert dataset.values("clicks.keypoints.id") == ids  # captioned in place
    first, second, third = list(dataset)[:3]
    a, b = first.clicks.keypoints
    w, h = _size(first)
    assert a.caption == ["point 0"] and b.caption == ["point 1"] and a.caption_model_version == "fake-1"
    x1, y1, x2, y2 = fo_relative_to_xyxy(a.caption_box[0], w, h)
    assert (x1 + x2) / 2 == pytest.approx(0.25 * w) and (y1 + y2) / 2 == pytest.approx(0.5 * h)
    two, far = second.clicks.keypoints
    assert two.caption == ["point 0", ""] and two.caption_score == [0.9, 0.0] and two.caption_box[1] == []
    assert not far.has_field("caption") or far.caption is None
    assert "keypoint" in second[pxfo.ERROR_FIELD] and "outside the image" in second[pxfo.ERROR_FIELD]
    assert "not 2 finite numbers" in third[pxfo.ERROR_FIELD]
    assert not third.clicks.keypoints[0].has_field("caption") or third.clicks.keypoints[0].caption is None
    assert dataset.count("ground_truth.detections.caption") == 0  # boxes_field is ignored with points
    # a second run skips what this model version captioned
    again = pxfo.run_caption_regions(dataset, points_field="clicks")
    # (the samples whose only keypoints are unusable fail again, naming them)
    assert (again.processed, again.skipped, again.failed) == (0, 4, 2)


def test_apply_model_segment_both_outputs(dataset, segmenting):
    for output in ("instance_masks", "polylines"):
        model = pxfo.PixelLLMModel("segment", output=output)
        dataset.apply_model(model, label_field=f"seg_{output}", batch_size=4, boxes_field="ground_truth")
    sample = dataset.first()
    w, h = _size(sample)
    boxes = [fo_relative_to_xyxy(d.bounding_box, w, h) for d in sample.ground_truth.detections]
    expected = [rle_to_mask(r.mask) for r in segmenting.segment([sample.filepath], boxes=[boxes])[0]]
    for field in ("seg_instance_masks", "seg_polylines"):
        got = stored_masks(sample, field)
        assert len(got) == 2 and all(mask_iou(g, e) >= 0.97 for g, e in zip(got, expected))
    assert dataset.count("seg_instance_masks.detections") == dataset.count("seg_polylines.polylines") == 12
    dataset.apply_model(pxfo.PixelLLMModel("segment", prompt="the red circle"), label_field="seg_text")
    assert dataset.distinct("seg_text.detections.prompt") == ["the red circle"]
    # a sample without the prompt field: an empty label carrying the error, the others labeled
    dataset.first().clear_field("ground_truth")
    s = dataset.first()
    s.ground_truth = None
    s.save()
    dataset.apply_model(pxfo.PixelLLMModel("segment", output="polylines"), label_field="seg_missing",
                        boxes_field="ground_truth")
    assert "is empty for this sample" in dataset.first().seg_missing.pixelllm_error
    assert dataset.count("seg_missing.polylines") == 10
    with pytest.raises(pxfo.PixelLLMError, match="output must be one of"):
        pxfo.PixelLLMModel("segment", output="mask")


# ---- resume: a delegated segment run killed mid-way ---------------------------------------------------------


@pytest.mark.integration
def test_killed_delegated_segment_run_resumes(plugin_installed, dataset, segmenting, tmp_path, fo_subprocess_env,
                                              poll):
    svc = DelegatedOperationService()
    queued = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, request_delegation=True, params={
        "boxes_field": "ground_truth", "output": "polylines", "batch_size": 2}))
    op_id = queued.result["id"] if isinstance(queued.result, dict) else queued.result.id
    flag = tmp_path / "stalled"
    worker = subprocess.Popen([sys.executable, str(HERE / "drain_worker.py"), dataset.name, "2", str(flag)],
                              env=fo_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        poll(lambda: flag.exists() or worker.poll() is not None, 180, "the delegated worker to stall")
        assert flag.exists(), worker.communicate()[0].decode()[-3000:]
        doc = svc.get(op_id)
        assert doc.run_state == "running" and doc.status.label == "4/6 samples"
    finally:
        worker.kill()
        worker.wait(timeout=60)
    dataset.reload()
    written = {s.id: [p.id for p in s.pixelllm_masks.polylines] for s in dataset if s.pixelllm_masks is not None}
    assert len(written) == 4
    svc.set_failed(op_id)
    rerun = svc.rerun_operation(op_id)
    (result,) = svc.execute_queued_operations(dataset_name=dataset.name)
    assert (result.result["processed"], result.result["skipped"], result.result["failed"]) == (2, 4, 0)
    assert segmenting.calls == [("segment", 2)]  # only the samples the dead worker had not done
    assert svc.get(rerun.id).run_state == "completed" and svc.get(rerun.id).status.progress == 1.0
    dataset.reload()
    for sample in dataset:
        assert len(sample.pixelllm_masks.polylines) == 2
        if sample.id in written:
            assert [p.id for p in sample.pixelllm_masks.polylines] == written[sample.id]


# ---- the real model: a tiny random PixelLLM with a mask decoder and point prompts, in-process and worker ------


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory):
    """A saved tiny random PixelLLM with its own mask decoder (K=2) and point prompts (seeded)."""
    import torch

    from pixelllm_plugins.checkpoint import save_pretrained
    from pixelllm_plugins.config import get_preset
    from pixelllm_plugins.modeling.pixel_llm import PixelLLM
    from pixelllm_plugins.tokenizer import PixelTokenizer

    cfg = get_preset("tiny")
    cfg.heads.mask_decoder, cfg.prompt.points = 2, True
    tokenizer = PixelTokenizer.default()
    torch.manual_seed(0)
    model = PixelLLM(cfg, tokenizer.vocab_size).eval()
    path = tmp_path_factory.mktemp("tiny-decoder")
    save_pretrained(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def decoder_predictor(decoder_checkpoint):
    from pixelllm_plugins.inference.predictor import Predictor

    return Predictor(decoder_checkpoint, device="cpu")


def _check_against_predictor(dataset, predictor, field, source="boxes"):
    """Every sample's stored masks match ``predictor.segment`` for the same prompts (IoU >= 0.97)."""
    n = 0
    for sample in dataset:
        w, h = _size(sample)
        if source == "boxes":
            prompts = {"boxes": [[fo_relative_to_xyxy(d.bounding_box, w, h) for d in sample.ground_truth.detections]]}
        else:
            prompts = {"points": [[[x * w, y * h] for k in sample.clicks.keypoints for x, y in k.points]]}
        expected = [rle_to_mask(r.mask) for r in predictor.segment([sample.filepath], **prompts)[0]]
        got = stored_masks(sample, field)
        assert len(got) == len(expected) > 0
        for g, e in zip(got, expected):
            assert mask_iou(g, e) >= 0.97, (sample.filepath, mask_iou(g, e))
            n += 1
    return n


@pytest.mark.integration
def test_segment_with_the_real_model_matches_predictor_segment(plugin_installed, dataset, decoder_checkpoint,
                                                               decoder_predictor):
    from pixelllm_plugins import predictors

    predictors.release_predictors()
    try:
        for output in ("instance_masks", "polylines"):
            res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={
                "boxes_field": "ground_truth", "output": output, "label_field": f"m_{output}",
                "model": str(decoder_checkpoint), "batch_size": 4}))
            assert (res.result["processed"], res.result["failed"]) == (6, 0), res.result
            assert _check_against_predictor(dataset, decoder_predictor, f"m_{output}") == 12
        # delegated, with progress, from point prompts
        for sample in dataset:
            sample["clicks"] = _keypoints((0.3, 0.4), (0.6, 0.5))
            sample.save()
        foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, request_delegation=True, params={
            "points_field": "clicks", "output": "polylines", "label_field": "m_points",
            "model": str(decoder_checkpoint), "batch_size": 4}))
        (run,) = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
        assert run.result["processed"] == 6 and run.result["failed"] == 0, run.result
        assert _check_against_predictor(dataset, decoder_predictor, "m_points", source="points") == 12
        res = foo.execute_operator(f"{PLUGIN}/caption_regions", ctx=dict(dataset=dataset, params={
            "points_field": "clicks", "model": str(decoder_checkpoint)}))
        assert res.result["processed"] == 6 and res.result["failed"] == 0
        sample = dataset.first()
        w, h = _size(sample)
        expected = decoder_predictor.caption_regions([sample.filepath], points=[[[0.3 * w, 0.4 * h],
                                                                                  [0.6 * w, 0.5 * h]]])[0]
        assert [k.caption[0] for k in sample.clicks.keypoints] == [r.text for r in expected]
    finally:
        predictors.release_predictors()


@pytest.fixture()
def decoder_worker(decoder_checkpoint, fo_subprocess_env, poll, tmp_path):
    pytest.importorskip("pixelllm_plugins.serving.app", reason="the GPU worker is not available")
    with running_worker(decoder_checkpoint, tmp_path, fo_subprocess_env(), poll) as url:
        yield url


@pytest.mark.integration
def test_segment_and_point_captions_through_the_worker(plugin_installed, dataset, decoder_worker,
                                                       decoder_predictor, monkeypatch):
    from pixelllm_plugins import predictors
    from pixelllm_plugins.serving.client import RemotePredictor

    monkeypatch.setenv("PIXELLLM_WORKER_URL", decoder_worker)
    predictors.release_predictors()
    try:
        for output in ("instance_masks", "polylines"):
            res = foo.execute_operator(SEGMENT, ctx=dict(dataset=dataset, params={
                "boxes_field": "ground_truth", "output": output, "label_field": f"w_{output}", "batch_size": 3}))
            assert (res.result["processed"], res.result["failed"]) == (6, 0), res.result
            assert _check_against_predictor(dataset, decoder_predictor, f"w_{output}") == 12
        assert [type(p) for p in predictors._predictors.values()] == [RemotePredictor]
        for sample in dataset:
            sample["clicks"] = _keypoints((0.3, 0.4), (float("nan"), 0.2))
            sample.save()
        res = foo.execute_operator(f"{PLUGIN}/caption_regions", ctx=dict(dataset=dataset, params={
            "points_field": "clicks"}))
        assert res.result["processed"] == 6 and res.result["labels"] == 6
        assert all("not 2 finite numbers" in e["error"] for e in res.result["errors"])
        sample = dataset.first()
        w, h = _size(sample)
        (expected,) = decoder_predictor.caption_regions([sample.filepath], points=[[[0.3 * w, 0.4 * h]]])[0]
        assert sample.clicks.keypoints[0].caption == [expected.text]
        model = pxfo.PixelLLMModel("segment", output="polylines")
        dataset.apply_model(model, label_field="w_apply", batch_size=4, boxes_field="ground_truth")
        assert _check_against_predictor(dataset, decoder_predictor, "w_apply") == 12
    finally:
        predictors.release_predictors()
