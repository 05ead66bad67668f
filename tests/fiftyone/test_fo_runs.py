"""The batched runs behind the operators, on a real database: labels, batching, reruns, bad input."""

from __future__ import annotations

from pathlib import Path

import fiftyone as fo
import pytest
from fiftyone import ViewField as F

from pixelllm_plugins.errors import InvalidParameterError, InvalidPromptError
from pixelllm_plugins.geometry import fo_relative_to_xyxy, iou
from pixelllm_plugins.integrations import fiftyone as pxfo


def _gt_box(sample, label):
    w, h = sample.metadata.width, sample.metadata.height
    det = next(d for d in sample.ground_truth.detections if d.label == label)
    return fo_relative_to_xyxy(det.bounding_box, w, h)


def _box(sample, det):
    return fo_relative_to_xyxy(det.bounding_box, sample.metadata.width, sample.metadata.height)


# ---- refer ----------------------------------------------------------------------------------------------


def test_refer_prompt_field_matches_ground_truth(dataset, oracle):
    summary = pxfo.run_refer(dataset, prompt_field="refexp", batch_size=4)
    assert summary.errors == [] and summary.message == ""
    assert (summary.processed, summary.skipped, summary.failed, summary.total) == (6, 0, 0, 6)
    assert oracle.calls == [("refer", 4), ("refer", 2)]  # batched: 6 samples, batch_size 4
    dataset.compute_metadata()
    for sample in dataset:
        (det,) = sample.pixelllm.detections
        assert det.prompt == sample.refexp and det.label == sample.refexp
        assert det.confidence == 0.99 and det.model_version == "oracle-1"
        label = sample.refexp.removeprefix("the ")
        assert iou(_box(sample, det), _gt_box(sample, label)) == pytest.approx(1.0, abs=1e-6)


def test_refer_whole_view_prompt_matches_model_output(dataset, fake):
    view = dataset.limit(3)
    summary = pxfo.run_refer(view, prompt="the red circle", label_field="found", batch_size=2)
    assert summary.processed == 3 and dataset.count("found") == 3  # only the view's samples
    dataset.compute_metadata()
    for sample in view:
        expected = fake.refer([sample.filepath], [["the red circle"]])[0][0][0]
        (det,) = sample.found.detections
        assert _box(sample, det) == pytest.approx(expected.box_xyxy, abs=1e-6)
        assert det.confidence == expected.score and det.prompt == "the red circle"


def test_refer_rerun_skips_same_model_version_unless_overwrite(dataset, fake):
    pxfo.run_refer(dataset, prompt="the blue square", batch_size=4)
    ids_before = dataset.values("pixelllm.detections.id")
    n_calls = len(fake.calls)
    again = pxfo.run_refer(dataset, prompt="the blue square", batch_size=4)
    assert (again.processed, again.skipped) == (0, 6)
    assert len(fake.calls) == n_calls  # no inference at all
    assert dataset.values("pixelllm.detections.id") == ids_before
    forced = pxfo.run_refer(dataset, prompt="the blue square", batch_size=4, overwrite=True)
    assert forced.processed == 6 and dataset.values("pixelllm.detections.id") != ids_before
    assert all(len(d) == 1 for d in dataset.values("pixelllm.detections"))  # replaced, not appended
    # a new prompt is a new request: recomputed without overwrite
    other = pxfo.run_refer(dataset, prompt="the green circle", batch_size=4)
    assert other.processed == 6
    assert set(dataset.distinct("pixelllm.detections.prompt")) == {"the green circle"}


def test_refer_batch_error_isolated_to_one_sample(dataset, fake, monkeypatch):
    real = fake.refer

    def picky(images, texts, **kw):
        if any(t == ["poison"] for t in texts):
            raise InvalidPromptError("poison is not a referring expression")
        return real(images, texts, **kw)

    monkeypatch.setattr(fake, "refer", picky)
    first = dataset.first()
    first.refexp = "poison"
    first.save()
    summary = pxfo.run_refer(dataset, prompt_field="refexp", batch_size=3)
    assert (summary.processed, summary.failed) == (5, 1)
    assert summary.errors[0]["sample_id"] == first.id and "poison" in summary.errors[0]["error"]
    assert dataset.count("pixelllm") == 5
    assert dataset.first()[pxfo.ERROR_FIELD] == "refer: poison is not a referring expression"
    # fixing the input and rerunning processes only that sample and clears its error
    first.refexp = "the red circle"
    first.save()
    again = pxfo.run_refer(dataset, prompt_field="refexp", batch_size=3)
    assert (again.processed, again.skipped, again.failed) == (1, 5, 0)
    assert dataset.first()[pxfo.ERROR_FIELD] is None and dataset.count("pixelllm") == 6


# ---- caption_regions ------------------------------------------------------------------------------------


def test_caption_regions_every_box_keeps_ids(dataset, oracle):
    ids = dataset.values("ground_truth.detections.id")
    summary = pxfo.run_caption_regions(dataset, boxes_field="ground_truth", batch_size=4)
    assert summary.processed == 6 and summary.labels == 12
    assert dataset.values("ground_truth.detections.id") == ids
    for sample in dataset:
        for det in sample.ground_truth.detections:
            assert det.caption == f"a {det.label}"  # the oracle captions the ground-truth box it got
            assert det.caption_score == 0.95 and det.caption_model_version == "oracle-1"
    again = pxfo.run_caption_regions(dataset, boxes_field="ground_truth")
    assert (again.processed, again.skipped) == (0, 6)


def test_caption_regions_default_field_and_custom_attribute(dataset, fake):
    summary = pxfo.run_caption_regions(dataset, caption_attribute="desc")  # boxes_field: first Detections
    assert summary.fields == ["ground_truth"] and summary.labels == 12
    assert set(dataset.distinct("ground_truth.detections.desc")) == {"region 0", "region 1"}
    assert dataset.count("ground_truth.detections.caption") == 0


def test_caption_regions_selected_labels_only(dataset, fake):
    sample = dataset.first()
    target = sample.ground_truth.detections[1]
    selected = [{"label_id": target.id, "sample_id": sample.id, "field": "ground_truth"}]
    summary = pxfo.run_caption_regions(dataset, selected_labels=selected)
    assert summary.total == 1 and summary.labels == 1
    assert dataset.count("ground_truth.detections.caption") == 1
    assert dataset.first().ground_truth.detections[1].caption == "region 0"
    assert fake.calls == [("caption_regions", 1)]


def test_caption_regions_respects_filtered_view(dataset, fake):
    view = dataset.filter_labels("ground_truth", F("label").contains_str("circle"))
    pxfo.run_caption_regions(view, boxes_field="ground_truth")
    for sample in dataset:
        for det in sample.ground_truth.detections:
            assert (getattr(det, "caption", None) is not None) == ("circle" in det.label)
    assert dataset.count("ground_truth.detections") == 12  # nothing dropped by writing through a view


# ---- dense_caption / caption_with_trace -----------------------------------------------------------------


def test_dense_caption_short_label_and_caption(dataset, oracle):
    summary = pxfo.run_dense_caption(dataset, batch_size=5)
    assert summary.processed == 6 and summary.labels == 12
    assert oracle.calls == [("dense_caption", 5), ("dense_caption", 1)]
    dataset.compute_metadata()
    for sample in dataset:
        for det in sample.pixelllm_regions.detections:
            assert det.caption == f"a {det.label} on a plain background"  # short label = "<color> <shape>"
            assert iou(_box(sample, det), _gt_box(sample, det.label)) == pytest.approx(1.0, abs=1e-6)
    assert pxfo.run_dense_caption(dataset).skipped == 6
    assert pxfo.run_dense_caption(dataset, max_regions=1).processed == 6  # a different request
    assert dataset.count("pixelllm_regions.detections") == 6


def test_caption_with_trace_fields(dataset, oracle):
    summary = pxfo.run_caption_with_trace(dataset, caption_field="cap", trace_field="trace", batch_size=4)
    assert summary.fields == ["cap", "trace", "trace_path"] and summary.processed == 6
    dataset.compute_metadata()
    for sample in dataset:
        words = sample.cap.label.split()
        assert [k.label for k in sample.trace.keypoints] == words
        (path,) = sample.trace_path.polylines
        assert path.words == words and len(path.points[0]) == len(words)
        a = sample.ground_truth.detections[0]
        first = sample.trace.keypoints[1]  # "<color>" of the first object points at its box
        assert first.box == pytest.approx(a.bounding_box, abs=1e-6)
    assert pxfo.run_caption_with_trace(dataset, caption_field="cap", trace_field="trace").skipped == 6


# ---- bad input ------------------------------------------------------------------------------------------


def test_missing_and_corrupt_images_fail_alone(dataset, fake, tmp_path):
    samples = list(dataset)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples[1].filepath = str(tmp_path / "missing.png")
    samples[1].save()
    samples[4].filepath = str(broken)
    samples[4].save()
    cut = tmp_path / "cut.png"  # the header is whole: only decoding it, inside the batch, finds the fault
    cut.write_bytes(Path(samples[2].filepath).read_bytes()[:100])
    samples[2].filepath = str(cut)
    samples[2].save()
    pxfo.run_caption_with_trace(dataset.select([samples[0].id]))  # written earlier: must survive
    summary = pxfo.run_refer(dataset, prompt="the red circle", batch_size=2)
    assert (summary.processed, summary.failed) == (3, 3)
    by_id = {e["sample_id"]: e["error"] for e in summary.errors}
    assert "file not found" in by_id[samples[1].id]
    assert "not a readable image" in by_id[samples[4].id] or "corrupt" in by_id[samples[4].id]
    assert "truncated or corrupt" in by_id[samples[2].id]
    errors = dict(zip(dataset.values("id"), dataset.values(pxfo.ERROR_FIELD)))
    assert errors[samples[1].id].startswith("refer: ") and errors[samples[0].id] is None
    assert errors[samples[3].id] is None  # its batch partner's fault did not cost it
    assert dataset.count("pixelllm") == 3 and dataset.count("pixelllm_caption") == 1
    assert "3 of 6 samples failed" in summary.message


def test_empty_prompts_and_wrong_types_are_per_sample_errors(dataset, fake):
    s = list(dataset)
    s[0].refexp = "   "
    s[0].save()
    s[1].refexp = None
    s[1].save()
    summary = pxfo.run_refer(dataset, prompt_field="refexp")
    assert (summary.processed, summary.failed) == (4, 2)
    msgs = {e["sample_id"]: e["error"] for e in summary.errors}
    assert "empty prompt" in msgs[s[0].id] and "is empty" in msgs[s[1].id]
    assert dataset.count("pixelllm") == 4
    # a list of expressions per sample: one box each
    dataset.add_sample_field("several", fo.ListField, subfield=fo.StringField)
    s[2].several = ["the red circle", "the blue square"]
    s[2].save()
    out = pxfo.run_refer(dataset.select([s[2].id]), prompt_field="several", label_field="multi")
    assert out.labels == 2 and dataset[s[2].id].multi.detections[1].prompt == "the blue square"
    # fields of the wrong type, sample by sample
    wrong = fo.Dataset()
    try:
        wrong.add_samples([fo.Sample(filepath=s[3].filepath, boxes=fo.Classification(label="oops"), num=3),
                           fo.Sample(filepath=s[4].filepath, num=4)])
        out = pxfo.run_caption_regions(wrong, boxes_field="boxes")
        assert (out.failed, out.skipped) == (1, 1)  # no boxes on the second sample: nothing to do
        assert "holds Classification, not Detections" in out.errors[0]["error"]
        out = pxfo.run_refer(wrong, prompt_field="num")
        assert out.failed == 2 and "holds int" in out.errors[0]["error"]
        assert wrong.count_values(pxfo.ERROR_FIELD)  # recorded on the samples too
    finally:
        wrong.delete()


def test_degenerate_box_is_reported_and_others_captioned(dataset, fake):
    sample = dataset.first()
    sample.ground_truth.detections.append(fo.Detection(label="flat", bounding_box=[0.2, 0.2, 0.0, 0.3]))
    sample.save()
    summary = pxfo.run_caption_regions(dataset.select([sample.id]), boxes_field="ground_truth")
    assert summary.processed == 1 and summary.labels == 2
    assert "no area" in dataset.first()[pxfo.ERROR_FIELD]
    assert [getattr(d, "caption", None) for d in dataset.first().ground_truth.detections] == ["region 0", "region 1", None]


def test_empty_view_is_not_an_error(dataset, fake):
    summary = pxfo.run_refer(dataset.match(F("refexp") == "nothing matches"), prompt="x")
    assert summary.total == 0 and summary.processed == 0 and "no samples" in summary.message
    assert fake.calls == []


def test_request_level_errors_write_nothing(dataset, fake):
    with pytest.raises(InvalidPromptError, match="prompt"):
        pxfo.run_refer(dataset)
    with pytest.raises(InvalidPromptError, match="empty"):
        pxfo.run_refer(dataset, prompt="  ")
    with pytest.raises(pxfo.FieldError, match="no field 'nope'"):
        pxfo.run_refer(dataset, prompt_field="nope")
    with pytest.raises(pxfo.FieldError, match="already holds Detections"):
        pxfo.run_caption_with_trace(dataset, caption_field="ground_truth")
    with pytest.raises(pxfo.FieldError, match="not a valid field name"):
        pxfo.run_refer(dataset, prompt="x", label_field="bad.name")
    with pytest.raises(InvalidParameterError, match="batch_size"):
        pxfo.run_refer(dataset, prompt="x", batch_size=0)
    assert fake.calls == [] and not dataset.has_field(pxfo.ERROR_FIELD)


def test_foreign_labels_in_output_field_are_not_clobbered(dataset, fake):
    summary = pxfo.run_refer(dataset, prompt="x", label_field="ground_truth")
    assert summary.failed == 6 and "not written by PixelLLM" in summary.errors[0]["error"]
    assert dataset.count("ground_truth.detections") == 12
    assert dataset.count("ground_truth.detections.prompt") == 0


def test_a_trace_never_overwrites_the_users_own_keypoints_or_polylines(dataset, fake):
    """``caption_with_trace`` writes three fields; the trace and its path are checked like the caption."""
    import fiftyone as fo

    for sample in dataset:
        sample["clicks"] = fo.Keypoints(keypoints=[fo.Keypoint(label="mine", points=[(0.5, 0.5)])])
        sample["t_path"] = fo.Polylines(polylines=[fo.Polyline(label="p", points=[[(0.1, 0.1), (0.2, 0.2)]])])
        sample.save()
    for trace_field in ("clicks", "t"):  # the user's keypoints, then the user's polylines under t_path
        summary = pxfo.run_caption_with_trace(dataset, caption_field="cap", trace_field=trace_field)
        assert summary.failed == 6 and "not written by PixelLLM" in summary.errors[0]["error"], summary
    assert dataset.distinct("clicks.keypoints.label") == ["mine"] and dataset.distinct("t_path.polylines.label") == ["p"]
    assert not dataset.has_field("cap") or not dataset.exists("cap").count()
    summary = pxfo.run_caption_with_trace(dataset, caption_field="cap", trace_field="clicks", overwrite=True)
    assert summary.processed == 6  # asked for: written


def test_free_model_releases_cached_predictors():
    from pixelllm_plugins import predictors

    predictors._predictors[("local", "dummy", None)] = object()
    assert pxfo.free_model() >= 1
    assert predictors._predictors == {}
