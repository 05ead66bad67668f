"""Box-score calibration: fitting, applying, storing in a checkpoint, and the Predictor using it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pixelllm_plugins.checkpoint import load_pretrained
from pixelllm_plugins.errors import CheckpointError
from pixelllm_plugins.evaluation.metrics import ece_floor, expected_calibration_error
from pixelllm_plugins.inference.calibration import ScoreCalibration, fit_calibration
from pixelllm_plugins.inference.predictor import Predictor


def _overconfident(n=2000, seed=0):
    """Scores in [0.5, 1] whose real hit rate is score - 0.4: badly over-confident but well ordered."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.5, 1.0, n)
    right = rng.uniform(size=n) < scores - 0.4
    return scores, right


def test_ece_of_a_perfect_and_a_wrong_score():
    right = np.array([True] * 80 + [False] * 20)
    assert expected_calibration_error(np.full(100, 0.8), right) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.3), right) == pytest.approx(0.5)
    assert expected_calibration_error([], []) == 0.0
    scores = np.array([0.05, 0.15, 0.55, 0.95, 0.99])  # one bin each, and the last two share the top bin
    right = np.array([False, True, True, True, False])
    assert expected_calibration_error(scores, right) == pytest.approx((0.05 + 0.85 + 0.45 + 2 * 0.47) / 5)


def test_ece_floor_is_what_a_calibrated_score_reads_on_that_many_boxes():
    rng = np.random.default_rng(5)
    scores = rng.uniform(0.2, 0.9, 600)
    few, many = ece_floor(scores[:150]), ece_floor(scores)
    assert 0.05 < few < 0.11 and 0.025 < many < 0.055 and many < few  # noise shrinks with more boxes
    calibrated = [expected_calibration_error(scores, rng.random(600) < scores) for _ in range(50)]
    assert np.mean(calibrated) == pytest.approx(many, abs=0.01)
    off = rng.random(600) < scores + 0.1  # under-confident by 0.1
    assert expected_calibration_error(scores, off) > 1.5 * many
    assert ece_floor([]) == 0.0 and ece_floor([0.0, 1.0, 1.0]) == 0.0  # certain scores: no noise


def test_fitted_map_removes_the_bias_on_fresh_data_and_keeps_the_order():
    scores, right = _overconfident(seed=0)
    calibration = fit_calibration(scores, right, fitted_on="synthetic")
    fresh, fresh_right = _overconfident(seed=1)
    before = expected_calibration_error(fresh, fresh_right)
    after = expected_calibration_error(calibration(fresh), fresh_right)
    assert before > 0.3 and after < 0.05
    grid = np.linspace(0, 1, 101)
    assert np.all(np.diff(calibration(grid)) >= 0)  # monotone: sorting by score is unchanged
    assert len(calibration.x) <= 48


def test_round_trip_and_bad_knots():
    c = ScoreCalibration((0.0, 0.5, 1.0), (0.1, 0.4, 0.9), "val")
    assert ScoreCalibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c([0.25, 2.0]).tolist() == pytest.approx([0.25, 0.9])
    with pytest.raises(ValueError, match="non-decreasing"):
        ScoreCalibration((0.0, 1.0), (0.9, 0.1))
    with pytest.raises(ValueError, match="at least 20"):
        fit_calibration([0.5] * 5, [True] * 5)


@pytest.fixture()
def calibrated_checkpoint(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["score_calibration"] = ScoreCalibration((0.0, 1.0), (0.25, 0.25), "constant").to_dict()
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_predictor_applies_the_checkpoint_calibration(calibrated_checkpoint, tiny_checkpoint, scene_files):
    texts = [["the red circle", "the blue square"]]
    calibrated = Predictor(calibrated_checkpoint, device="cpu")
    (per_text,) = calibrated.refer([scene_files[0]], texts)
    assert [dets[0].score for dets in per_text] == [0.25, 0.25]
    calibrated.calibrated = False
    (raw,) = calibrated.refer([scene_files[0]], texts)
    (plain,) = Predictor(tiny_checkpoint, device="cpu").refer([scene_files[0]], texts)
    assert [d[0].score for d in raw] == [d[0].score for d in plain]
    assert [d[0].box_xyxy for d in raw] == [d[0].box_xyxy for d in per_text]  # boxes are untouched


def test_a_malformed_calibration_names_the_file(calibrated_checkpoint):
    meta = json.loads((calibrated_checkpoint / "meta.json").read_text())
    meta["score_calibration"] = {"x": [0.0, 1.0], "y": [1.0, 0.0]}
    (calibrated_checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="score_calibration is malformed"):
        load_pretrained(calibrated_checkpoint)


def test_the_embedded_default_is_calibrated():
    model, _, _ = load_pretrained()
    calibration = model.score_calibration
    assert calibration.fitted_on and calibration.report
    held_out = [v for split, v in calibration.report.items() if split != "val" and not split.startswith("unknown")]
    assert held_out and all(v["ECE_calibrated"] <= 0.05 for v in held_out)
    # a shape it never learned: the unknown-word map (fitted on other such shapes) beats the known-word one
    (never_seen,) = [v for split, v in calibration.report.items() if split == "unknown: pentagon"]
    assert never_seen["ECE_calibrated"] < never_seen["ECE_with_the_known_word_map"]
    assert {"red", "circle", "the"} <= calibration.known_words and "pentagon" not in calibration.known_words
    assert calibration.for_text("the red pentagon") is calibration.unknown is not None
    assert calibration.for_text("The RED circle!") is calibration


def test_texts_with_an_unknown_word_get_the_unknown_map():
    unknown = fit_calibration(*_overconfident(seed=2), method="platt")
    c = ScoreCalibration((0.0, 1.0), (0.0, 1.0), "known", known_words=frozenset({"the", "red", "circle"}),
                         unknown=unknown)
    assert c.unknown_words("the red pentagon 2") == ["pentagon"] and c.unknown_words("The red CIRCLE") == []
    assert c.for_text("the red pentagon") is unknown and c.for_text("the red circle") is c
    back = ScoreCalibration.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.for_text("a dog") == unknown
    assert ScoreCalibration((0.0, 1.0), (0.0, 1.0)).for_text("anything at all").unknown is None  # no word list


def test_platt_scaling_is_monotone_and_steady_on_few_boxes():
    scores, right = _overconfident(n=240, seed=3)
    platt = fit_calibration(scores, right, method="platt")
    fresh, fresh_right = _overconfident(seed=4)
    assert expected_calibration_error(platt(fresh), fresh_right) < 0.06
    assert np.all(np.diff(platt(np.linspace(0, 1, 101))) >= 0)
    assert fit_calibration([0.5] * 30, [True] * 30, method="platt")([0.1, 0.9]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(scores, right, method="beta")


def test_predictor_scores_a_text_with_an_unknown_word_by_its_map(calibrated_checkpoint, scene_files):
    meta = json.loads((calibrated_checkpoint / "meta.json").read_text())
    meta["score_calibration"] = ScoreCalibration(
        (0.0, 1.0), (0.25, 0.25), "constant", known_words=frozenset({"the", "red", "circle"}),
        unknown=ScoreCalibration((0.0, 1.0), (0.05, 0.05), "unknown")).to_dict()
    (calibrated_checkpoint / "meta.json").write_text(json.dumps(meta))
    predictor = Predictor(calibrated_checkpoint, device="cpu")
    (per_text,) = predictor.refer([scene_files[0]], [["the red circle", "the red pentagon", "the red circle"]])
    assert [dets[0].score for dets in per_text] == [0.25, 0.05, 0.25]
