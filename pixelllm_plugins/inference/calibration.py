"""Box-score calibration: the refer score as the probability that the box is right (IoU >= 0.5).

The confidence head is trained to predict a box's IoU, and on scenes unlike its training data it is
over- or under-confident, so a threshold or a "sort by score" means different things per model. A
checkpoint can carry a monotone map from the head's raw score to the observed rate of right boxes, fitted
on a held-out split (``scripts/calibrate_scores.py``) and stored as knots in ``meta.json``
(``score_calibration``); ``Predictor`` applies it to every box score it returns. A monotone map never
changes the order of the scores, only what their values mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScoreCalibration:
    """Piecewise-linear monotone map ``raw -> calibrated`` through the knots ``(x[i], y[i])``."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    fitted_on: str = ""
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.x) != len(self.y) or len(self.x) < 2:
            raise ValueError("a score calibration needs at least two knots, as many x as y")
        if any(b < a for a, b in zip(self.x, self.x[1:])) or any(b < a for a, b in zip(self.y, self.y[1:])):
            raise ValueError("score calibration knots must be non-decreasing in x and y")

    def __call__(self, scores):
        return np.clip(np.interp(np.asarray(scores, dtype=np.float64), self.x, self.y), 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"x": list(self.x), "y": list(self.y), "fitted_on": self.fitted_on, "report": self.report}

    @classmethod
    def from_dict(cls, data: dict) -> ScoreCalibration:
        return cls(tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"]),
                   str(data.get("fitted_on", "")), dict(data.get("report", {})))


def fit_calibration(scores: Sequence[float], right: Sequence[bool], *, fitted_on: str = "",
                    max_knots: int = 48) -> ScoreCalibration:
    """Isotonic regression of ``right`` on ``scores`` (scikit-learn), kept as at most ``max_knots`` knots."""
    try:
        from sklearn.isotonic import IsotonicRegression
    except ImportError as exc:  # fitting is offline work; applying a stored map needs only numpy
        raise ImportError("fitting a score calibration needs scikit-learn: pip install 'pixelllm-plugins[eval]'") from exc

    s = np.asarray(scores, dtype=np.float64)
    if len(s) < 20:
        raise ValueError(f"calibration needs at least 20 scored boxes, got {len(s)}")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(s, np.asarray(right, dtype=np.float64))
    grid = np.unique(np.concatenate([[0.0, 1.0], np.quantile(s, np.linspace(0, 1, max_knots - 2))]))
    return ScoreCalibration(tuple(float(v) for v in grid), tuple(float(v) for v in iso.predict(grid)), fitted_on)
