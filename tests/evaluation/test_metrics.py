"""Metric functions against values computed by hand (each comment shows the arithmetic)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from pixelllm_plugins.evaluation.metrics import (
    DenseDetection,
    DenseGT,
    EvaluationError,
    attribute_accuracy,
    box_precision,
    caption_scores,
    densecap_map,
    interpolated_ap,
    java_available,
    mask_scores,
    merge_gt_boxes,
    simple_ptb_tokenize,
    trace_point_l1,
    trace_point_l1_image,
)


def test_box_precision_is_strictly_greater_than_half():
    gts = [(0, 0, 10, 10)] * 4
    preds = [(0, 0, 10, 10),  # IoU 1 -> hit
             (0, 0, 10, 20),  # IoU 100/200 = 0.5 exactly -> miss (strict)
             (0, 0, 10, 19),  # IoU 100/190 = 0.526 -> hit
             None]  # no prediction -> miss
    assert box_precision(preds, gts) == pytest.approx(0.5)
    assert box_precision(preds[:1], gts[:1], threshold=0.99) == 1.0
    with pytest.raises(EvaluationError):
        box_precision(preds[:2], gts)


def test_mask_ciou_giou():
    pred1 = np.zeros((4, 4), bool)
    pred1[:2, :] = True  # 8 px
    gt1 = np.zeros((4, 4), bool)
    gt1[:, :2] = True  # 8 px; intersection 4, union 12 -> IoU 1/3
    pred2 = np.zeros((4, 4), bool)
    pred2[3, 2:] = True
    gt2 = pred2.copy()  # intersection 2, union 2 -> IoU 1
    s = mask_scores([pred1, pred2], [gt1, gt2])
    assert s.ciou == pytest.approx(6 / 14)  # (4 + 2) / (12 + 2)
    assert s.giou == pytest.approx((1 / 3 + 1) / 2)
    assert s.ap50 == pytest.approx(0.5)


def test_merge_gt_boxes_takes_largest_cluster_first_on_ties():
    boxes = [(0, 0, 10, 10), (0, 0, 10, 13), (0, 0, 10, 17), (0, 0, 10, 22)]
    # IoU >= 0.7 neighbours: A {A,B}; B {A,B,C}; C {B,C,D}; D {C,D} -> B wins the tie with C
    merged = merge_gt_boxes(boxes, ["a", "b", "c", "d"])
    assert len(merged) == 2
    assert merged[0][1] == ["a", "b", "c"]
    assert merged[0][0] == pytest.approx((0, 0, 10, (10 + 13 + 17) / 3))
    assert merged[1] == ((0.0, 0.0, 10.0, 22.0), ["d"])


def test_interpolated_ap_100_points():
    # cum tp [1,1,2], fp [0,1,1], 4 positives: recall [.25,.25,.5], precision [1,.5,2/3]
    # t = 0..25 -> 1 (26 points); t = 26..50 -> 2/3 (25 points); t = 51..99 -> 0
    assert interpolated_ap([1, 0, 1], [0, 1, 0], 4) == pytest.approx((26 + 25 * 2 / 3) / 100)


def _exact_meteor(pairs):
    return [1.0 if cand in refs else 0.0 for cand, refs in pairs]


def test_densecap_map_protocol():
    gts = [DenseGT([(0, 0, 10, 10), (20, 20, 30, 30)], ["red circle", "blue square"]),
           DenseGT([(0, 0, 10, 10)], ["x"]),
           DenseGT([], [])]
    dets = [[DenseDetection((0, 0, 10, 10), "red circle", 0.9),  # IoU 1 with G1, METEOR 1
             DenseDetection((0, 0, 10, 10), "red circle", 0.8),  # best GT already used -> FP
             DenseDetection((20, 20, 30, 35), "green square", 0.7)],  # IoU 100/150 with G2, METEOR 0
            [],
            [DenseDetection((0, 0, 5, 5), "y", 0.95)]]  # image without GT -> FP
    out = densecap_map(dets, gts, meteor_fn=_exact_meteor)
    # ranked: FP, TP(iou 1), FP, TP(iou .667); 3 positives.
    # IoU <= 0.6: recall [0,1/3,1/3,2/3], precision [0,.5,1/3,.5] -> 0.5 for t = 0..66 -> AP 0.335
    # IoU 0.7: only the IoU-1 hit: precision .5 for t = 0..33 -> AP 0.17
    assert out["num_gt_after_merge"] == 3
    assert out["detection_breakdown"]["AP_detection_iou0.3"] == pytest.approx(0.335)
    assert out["detection_breakdown"]["AP_detection_iou0.7"] == pytest.approx(0.17)
    assert out["mAP_detection"] == pytest.approx((4 * 0.335 + 0.17) / 5)
    # METEOR must be strictly above each threshold (0 included): only the exact caption counts
    assert out["mAP"] == pytest.approx(0.17)
    assert len(out["breakdown"]) == 30


def test_densecap_empty_reference_becomes_EMPTY():
    seen = []

    def meteor(pairs):
        seen.extend(pairs)
        return [0.5] * len(pairs)

    densecap_map([[DenseDetection((0, 0, 10, 10), "anything", 1.0)]], [DenseGT([(0, 0, 10, 10)], [""])],
                 meteor_fn=meteor)
    assert seen == [("EMPTY", ["EMPTY"])]


def test_trace_point_l1():
    gt = np.array([[[0.1, 0.1], [0.5, 0.5]], [[0, 0], [0, 0]], [[0.2, 0.2], [0.4, 0.4]]])
    pred = np.array([[[0.1, 0.1], [0.4, 0.6]], [[0.9, 0.9], [0.9, 0.9]], [[0.3, 0.3], [0.3, 0.3]]])
    # token 0: point 0 -> 0 (to gt 0); point 1 -> min(.4, .1) = .1; mean .05
    # token 1: zero GT -> ignored; token 2: both points .1 from either GT -> .1
    assert trace_point_l1_image(pred, gt) == pytest.approx((0.05 + 0.1) / 2)
    assert trace_point_l1_image(pred, gt, valid=np.array([True, True, False])) == pytest.approx(0.05)
    assert math.isnan(trace_point_l1_image(pred[1:2], gt[1:2]))
    assert trace_point_l1([0.075, 0.05, float("nan")]) == pytest.approx(0.0625)


def test_attribute_accuracy():
    refs = ["a small red circle", "a big blue square", "the thing"]
    preds = ["red circle, small", "a big green square", "anything"]
    # 1st: {small, red, circle} all present; 2nd: blue missing; 3rd has no attribute word: skipped
    assert attribute_accuracy(preds, refs) == pytest.approx(0.5)


def test_simple_ptb_tokenizer_matches_toolkit_conventions():
    assert simple_ptb_tokenize("The dog's ball isn't red (really)!") == \
        "the dog 's ball is n't red -lrb- really -rrb-"
    assert simple_ptb_tokenize('A "quoted" 3.5 m, ok...') == "a quoted 3.5 m ok"


def test_caption_scores_pure_python():
    # ROUGE-L: LCS 3, P = 1, R = 3/4, beta 1.2: (1 + 1.44) * .75 / (.75 + 1.44) = 1.83 / 2.19
    s = caption_scores(["a red circle"], [["a big red circle"]], use_java=False)
    assert s.rouge_l == pytest.approx(1.83 / 2.19)
    assert s.meteor is None and s.notices
    # identical captions, no n-gram shared between items: BLEU-4 1, ROUGE-L 1, CIDEr-D 10 (cos 1 x 10)
    refs = ["a red circle on the left", "one big blue square there"]
    s = caption_scores(refs, [[r] for r in refs], use_java=False, meteor=False)
    assert s.bleu4 == pytest.approx(1.0, abs=1e-6)
    assert s.rouge_l == pytest.approx(1.0)
    assert s.cider == pytest.approx(10.0, abs=1e-6)


@pytest.mark.skipif(not java_available() or not os.environ.get("PIXELLLM_TEST_METEOR"),
                    reason="METEOR needs Java and ~20 s to start: set PIXELLLM_TEST_METEOR=1")
def test_meteor_with_java():
    from pixelllm_plugins.evaluation.metrics import shared_meteor

    total, scores = shared_meteor().score_pairs([("a red circle", ["a red circle"]), ("zebra", ["a red circle"])])
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] == 0.0
    assert 0 < total < 1
