"""Mask metrics (cIoU / mIoU / P@0.5, holes, the point prompt) and the caption object parser and F1, on
hand-made masks and captions (each comment shows the arithmetic)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from pixelllm_plugins.evaluation.metrics import (
    EvaluationError,
    caption_object_f1,
    caption_objects,
    has_holes,
    interior_point,
    mask_holes,
    mask_intersection_union,
    mask_scores,
    mask_scores_from_counts,
    object_prf,
)


def _square(h, w, y0, x0, side):
    m = np.zeros((h, w), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def _ring(h=20, w=20, y0=2, x0=3, side=10, hole=4):
    """A side x side square with a centred hole x hole hole: 100 - 16 = 84 pixels."""
    m = _square(h, w, y0, x0, side)
    k = (side - hole) // 2
    m[y0 + k:y0 + k + hole, x0 + k:x0 + k + hole] = False
    return m


@pytest.fixture(params=["scipy", "numpy"])
def backend(request, monkeypatch):
    """Run with scipy, and with the pure numpy fallbacks (scipy and OpenCV made unimportable)."""
    if request.param == "numpy":
        monkeypatch.setitem(sys.modules, "scipy", None)
        monkeypatch.setitem(sys.modules, "cv2", None)
    return request.param


# ---- cIoU, mIoU, P@0.5 -------------------------------------------------------------------------------------

def test_ciou_weighs_large_objects_and_miou_weighs_expressions_equally():
    big_gt, small_gt = _square(30, 30, 0, 0, 10), _square(30, 30, 20, 20, 2)  # 100 px and 4 px
    big_pred = big_gt.copy()  # IoU 1
    small_pred = _square(30, 30, 25, 25, 2)  # disjoint: inter 0, union 8, IoU 0
    s = mask_scores_from_counts(*zip(*[mask_intersection_union(big_pred, big_gt),
                                       mask_intersection_union(small_pred, small_gt)]))
    assert s["cIoU"] == pytest.approx(100 / 108)  # (100 + 0) / (100 + 8)
    assert s["mIoU"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert s["P@0.5"] == pytest.approx(0.5) and s["count"] == 2
    # the other way round: the small one right, the big one missed -> cIoU far below mIoU
    s = mask_scores_from_counts(*zip(*[mask_intersection_union(small_gt, small_gt),
                                       mask_intersection_union(None, big_gt)]))
    assert s["cIoU"] == pytest.approx(4 / 104) and s["mIoU"] == pytest.approx(0.5)
    legacy = mask_scores([big_pred, small_pred], [big_gt, small_gt])  # the older API agrees
    assert (legacy.ciou, legacy.giou, legacy.ap50) == pytest.approx((100 / 108, 0.5, 0.5))


def test_mask_precision_is_strict_and_empty_inputs():
    gt = _square(10, 10, 0, 0, 4)  # 16 px
    half = _square(10, 10, 0, 0, 4)
    half[2:] = False  # 8 px inside: IoU 8 / 16 = 0.5 exactly -> a miss
    s = mask_scores_from_counts(*zip(mask_intersection_union(half, gt)))
    assert s["mIoU"] == pytest.approx(0.5) and s["P@0.5"] == 0.0
    assert mask_intersection_union(None, gt) == (0, 16)  # no prediction: an empty mask
    empty = mask_scores_from_counts([], [])
    assert empty["count"] == 0 and math.isnan(empty["cIoU"]) and math.isnan(empty["mIoU"])
    assert mask_scores_from_counts([0], [0])["mIoU"] == 0.0  # both empty: IoU 0, no division error
    with pytest.raises(EvaluationError, match="shapes differ"):
        mask_intersection_union(np.zeros((5, 5), bool), gt)


def test_holes_count(backend):
    ring, filled = _ring(), _square(20, 20, 2, 3, 10)
    assert int(ring.sum()) == 84
    assert has_holes(ring) and not has_holes(filled)
    assert int(mask_holes(ring).sum()) == 16 and not (mask_holes(ring) & ring).any()
    # a prediction that fills the hole: IoU 84 / 100, not 1
    inter, union = mask_intersection_union(filled, ring)
    assert (inter, union) == (84, 100)
    # a hole open to the outside is no hole (a "C"); a ring touching the image border still has its hole
    c_shape = ring.copy()
    c_shape[7:11, 6:13] = False  # cut from the hole out through the right side
    assert not has_holes(c_shape)
    at_border = _ring(h=10, w=10, y0=0, x0=0, side=10)
    assert has_holes(at_border) and int(mask_holes(at_border).sum()) == 16
    assert not has_holes(np.zeros((5, 5), bool))
    # two holes
    two = _square(12, 20, 0, 0, 12)
    two[3:5, 3:5] = two[7:9, 7:9] = False
    assert int(mask_holes(two).sum()) == 8


def test_interior_point_is_deep_inside_and_deterministic(backend):
    square = _square(20, 30, 4, 10, 9)  # odd side: one centre pixel (8, 14)
    assert interior_point(square) == (14.5, 8.5)
    ring = _ring()
    x, y = interior_point(ring)
    assert ring[int(y), int(x)]  # on the band, never in the hole
    assert not mask_holes(ring)[int(y), int(x)]
    assert interior_point(ring) == (x, y)
    l_shape = np.zeros((20, 20), bool)
    l_shape[0:20, 0:4] = True
    l_shape[16:20, 0:20] = True
    x, y = interior_point(l_shape)
    assert l_shape[int(y), int(x)]
    with pytest.raises(EvaluationError):
        interior_point(np.zeros((4, 4), bool))


def test_numpy_fallbacks_agree_with_scipy(monkeypatch):
    rng = np.random.default_rng(0)
    masks = [_ring(), _square(16, 16, 3, 3, 7)]
    for _ in range(5):
        m = rng.random((24, 24)) > 0.35
        m[0] = False
        masks.append(m)
    with_scipy = [mask_holes(m) for m in masks]
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    for m, expected in zip(masks, with_scipy):
        assert np.array_equal(mask_holes(m), expected)


# ---- caption objects ---------------------------------------------------------------------------------------

def test_caption_objects_parses_triples():
    assert caption_objects("a large red circle, a small blue square and a large green ring") == [
        ("large", "red", "circle"), ("small", "blue", "square"), ("large", "green", "ring")]
    assert caption_objects("An SMALL Orange star.") == [("small", "orange", "star")]  # case, "an", period
    assert caption_objects("a large white cross and other shapes") == [("large", "white", "cross")]
    assert caption_objects("a small black pentagon") == [("small", "black", "pentagon")]  # extra shape
    # duplicates are kept, in order
    assert caption_objects("a large red circle and a large red circle") == [("large", "red", "circle")] * 2


def test_caption_objects_ignores_what_is_not_a_full_triple():
    assert caption_objects("a red circle and other objects") == []  # no size
    assert caption_objects("three shapes on a background") == []
    assert caption_objects("large red") == [] and caption_objects("") == []
    assert caption_objects("zz%% 123 large large red circle") == [("large", "red", "circle")]
    assert caption_objects("large red red circle") == []  # a repeated word breaks the triple
    assert caption_objects("large red circles") == []  # plural: not a synthetic-caption form
    assert caption_objects("a large red blue circle") == []  # two colours: not one object
    assert caption_objects("large red circle", vocabulary=(["big"], ["red"], ["circle"])) == []


def test_object_prf_wrong_objects_duplicates_and_empty():
    scene = [("large", "red", "circle"), ("small", "blue", "square"), ("large", "green", "ring")]
    r = object_prf([("large", "red", "circle"), ("small", "red", "square")], scene)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((0.5, 1 / 3, 0.4))  # F1 = 2*1 / (2+3)
    dup = object_prf([("large", "red", "circle")] * 2, scene)  # the scene has one: matched once
    assert (dup["precision"], dup["recall"], dup["matched"]) == pytest.approx((0.5, 1 / 3, 1))
    two = object_prf([("large", "red", "circle")] * 2, [("large", "red", "circle")] * 2)
    assert two["f1"] == 1.0
    empty_caption = object_prf([], scene)
    assert (empty_caption["precision"], empty_caption["recall"], empty_caption["f1"]) == (0.0, 0.0, 0.0)
    empty_scene = object_prf([], [])
    assert (empty_scene["precision"], empty_scene["recall"], empty_scene["f1"]) == (1.0, 1.0, 1.0)
    hallucinated = object_prf([("large", "red", "circle")], [])
    assert (hallucinated["precision"], hallucinated["recall"], hallucinated["f1"]) == (0.0, 0.0, 0.0)


def test_caption_object_f1_micro_and_per_image():
    scenes = [[("large", "red", "circle")],
              [("small", "blue", "square"), ("large", "green", "ring"), ("small", "white", "star")]]
    preds = ["a large red circle", "a large black star"]
    r = caption_object_f1(preds, scenes)
    # micro: matched 1, named 2, in scenes 4 -> P 1/2, R 1/4, F1 2*1 / (2+4)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((0.5, 0.25, 1 / 3))
    # per image: image 1 is perfect (1, 1, 1), image 2 all wrong (0, 0, 0)
    assert (r["precision_per_image"], r["recall_per_image"], r["f1_per_image"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (r["matched"], r["predicted"], r["ground_truth"], r["images"]) == (1, 2, 4, 2)
    assert caption_object_f1(["", "garbage !!"], scenes)["f1"] == 0.0
    assert caption_object_f1(["", ""], [[], []])["f1"] == 1.0  # nothing to name, nothing named
    assert math.isnan(caption_object_f1([], [])["f1"])
    with pytest.raises(EvaluationError):
        caption_object_f1(["a"], scenes)
