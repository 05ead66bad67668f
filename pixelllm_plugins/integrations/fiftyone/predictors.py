"""The predictor behind runs and ``PixelLLMModel``: the one given, else the process's cached one.

``get_predictor`` is looked up in this module only, at call time: replacing ``predictors.get_predictor``
swaps the model for every run and every ``PixelLLMModel`` of the process.
"""

from __future__ import annotations

from ...inference.protocol import PredictorProtocol
from ...predictors import get_predictor, release_predictors


def resolve_predictor(predictor: PredictorProtocol | None, model: str | None) -> PredictorProtocol:
    """``predictor`` if given, else the cached predictor of ``model`` (None or blank: the default model)."""
    return predictor if predictor is not None else get_predictor(model or None)


def free_model() -> int:
    """Release every cached predictor of this process (frees GPU memory); returns how many."""
    return release_predictors()
