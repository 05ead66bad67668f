"""Label conversions: model pixels (x1, y1, x2, y2) -> FiftyOne relative [x, y, w, h] labels."""

from __future__ import annotations

import fiftyone as fo
import pytest

from pixelllm_plugins.inference.results import Detection, RegionCaption, TracedCaption, Word
from pixelllm_plugins.integrations import fiftyone as pxfo


def _flat(points):
    return [c for p in points for c in p]


@pytest.mark.parametrize("text,expected", [
    ("a red circle to the left of a square", "red circle"),
    ("the big blue square", "big blue square"),
    ("A person holding an umbrella", "person"),
    ("an extraordinarily long red rounded shape", "extraordinarily long red"),
    ("", "region"),
    ("the", "the"),
])
def test_short_label(text, expected):
    assert pxfo.short_label(text) == expected


def test_refer_to_detections_converts_and_keeps_provenance():
    dets = [[Detection((20.0, 30.0, 60.0, 90.0), 0.75, "the red circle", "v1")], []]
    out = pxfo.refer_to_detections(dets, ["the red circle", "nothing"], 200, 120, "v1")
    assert isinstance(out, fo.Detections) and len(out.detections) == 1
    d = out.detections[0]
    assert d.bounding_box == pytest.approx([0.1, 0.25, 0.2, 0.5])
    assert d.label == "the red circle" and d.prompt == "the red circle"
    assert d.confidence == 0.75 and d.model_version == "v1"
    assert out.model_version == "v1"
    assert out.pixelllm_request == '["the red circle", "nothing"]'


def test_dense_to_detections_short_label_and_caption():
    regions = [RegionCaption((0, 0, 50, 50), "a green square next to a circle", 0.9, "v2")]
    out = pxfo.dense_to_detections(regions, 100, 100, "v2", "req")
    d = out.detections[0]
    assert d.label == "green square" and d.caption == "a green square next to a circle"
    assert d.bounding_box == pytest.approx([0, 0, 0.5, 0.5]) and d.confidence == 0.9
    assert out.pixelllm_request == "req"


def test_trace_to_labels_one_keypoint_per_word_and_a_path():
    words = [Word("a", (0, 0, 40, 20), [(0, 0), (40, 20)]), Word("circle", (40, 20, 80, 60), [(40, 20), (80, 60)])]
    caption, keypoints, path = pxfo.trace_to_labels(TracedCaption("a circle", words, 0.5, "v3"), 80, 60, "v3")
    assert isinstance(caption, fo.Classification) and caption.label == "a circle"
    assert caption.confidence == 0.5 and caption.model_version == "v3"
    assert [k.label for k in keypoints.keypoints] == ["a", "circle"]
    assert _flat(keypoints.keypoints[1].points) == pytest.approx([0.5, 1 / 3, 1.0, 1.0])
    assert keypoints.keypoints[1].word_index == 1
    assert keypoints.keypoints[0].box == pytest.approx([0, 0, 0.5, 1 / 3])
    (line,) = path.polylines
    assert line.closed is False and line.filled is False and line.words == ["a", "circle"]
    assert _flat(line.points[0]) == pytest.approx([0.25, 1 / 6, 0.75, 2 / 3])


def test_trace_without_words_has_no_path():
    _, keypoints, path = pxfo.trace_to_labels(TracedCaption("", [], 1.0, "v"), 10, 10, "v")
    assert keypoints.keypoints == [] and path.polylines == []
