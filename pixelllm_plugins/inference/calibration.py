"""Box-score calibration: the refer score as the probability that the box is right (IoU >= 0.5).

The confidence head is trained to predict a box's IoU, and on scenes unlike its training data it is
over- or under-confident, so a threshold or a "sort by score" means different things per model. A
checkpoint can carry a monotone map from the head's raw score to the observed rate of right boxes, fitted
on a held-out split (``scripts/calibrate_scores.py``) and stored as knots in ``meta.json``
(``score_calibration``); ``Predictor`` applies it to every box score it returns. A monotone map never
changes the order of the scores, only what their values mean.

A model is sure of itself on words it never learned (it finds "the red pentagon" half the time, at the
confidence it has for "the red hexagon"), so a calibration can carry a second map for **texts with an
unknown word**: ``known_words`` are the words of the expressions it was fitted on, and ``unknown`` is
fitted on expressions that name shapes the model never saw (``scripts/calibrate_scores.py
--unknown-shapes``). A text with a word outside ``known_words`` gets the ``unknown`` map.
"""

from __future__ import annotations

import re
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
    known_words: frozenset[str] = frozenset()
    unknown: ScoreCalibration | None = None  # the map for texts with a word outside known_words

    def __post_init__(self):
        if len(self.x) != len(self.y) or len(self.x) < 2:
            raise ValueError("a score calibration needs at least two knots, as many x as y")
        if any(b < a for a, b in zip(self.x, self.x[1:])) or any(b < a for a, b in zip(self.y, self.y[1:])):
            raise ValueError("score calibration knots must be non-decreasing in x and y")

    def __call__(self, scores):
        return np.clip(np.interp(np.asarray(scores, dtype=np.float64), self.x, self.y), 0.0, 1.0)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside ``known_words`` (none when the calibration has no word list)."""
        if not self.known_words:
            return []
        return [w for w in words(text) if w not in self.known_words]

    def for_text(self, text: str) -> ScoreCalibration:
        """The map for ``text``'s score: ``unknown`` when the text has an unknown word, else this one."""
        return self.unknown if self.unknown is not None and self.unknown_words(text) else self

    def to_dict(self) -> dict:
        out = {"x": list(self.x), "y": list(self.y), "fitted_on": self.fitted_on, "report": self.report}
        if self.known_words:
            out["known_words"] = sorted(self.known_words)
        if self.unknown is not None:
            out["unknown"] = self.unknown.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ScoreCalibration:
        unknown = data.get("unknown")
        return cls(tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"]),
                   str(data.get("fitted_on", "")), dict(data.get("report", {})),
                   frozenset(str(w) for w in data.get("known_words", ())),
                   cls.from_dict(unknown) if unknown is not None else None)


def words(text: str) -> list[str]:
    """Lower-case letter runs of ``text``: the words ``known_words`` is made of."""
    return re.findall(r"[a-z]+", text.lower())


def fit_calibration(scores: Sequence[float], right: Sequence[bool], *, fitted_on: str = "",
                    max_knots: int = 48, method: str = "isotonic") -> ScoreCalibration:
    """A monotone map from ``scores`` to ``right`` (scikit-learn), kept as at most ``max_knots`` knots:
    ``"isotonic"`` regression (any monotone shape; wants a thousand or more boxes) or ``"platt"`` scaling
    (a logistic curve, two parameters: steady on a few hundred)."""
    try:
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # fitting is offline work; applying a stored map needs only numpy
        raise ImportError("fitting a score calibration needs scikit-learn: pip install 'pixelllm-plugins[eval]'") from exc

    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(right, dtype=np.float64)
    if len(s) < 20:
        raise ValueError(f"calibration needs at least 20 scored boxes, got {len(s)}")
    grid = np.unique(np.concatenate([[0.0, 1.0], np.quantile(s, np.linspace(0, 1, max_knots - 2))]))
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(s, r)
        values = iso.predict(grid)
    elif method == "platt":
        if r.min() == r.max():
            values = np.full_like(grid, r[0])
        else:
            values = LogisticRegression(C=1e4).fit(s[:, None], r).predict_proba(grid[:, None])[:, 1]
            values = np.maximum.accumulate(values)  # a negative slope (noise) would reverse the order: flatten
    else:
        raise ValueError(f"unknown calibration method {method!r}; use 'isotonic' or 'platt'")
    return ScoreCalibration(tuple(float(v) for v in grid), tuple(float(v) for v in values), fitted_on)
