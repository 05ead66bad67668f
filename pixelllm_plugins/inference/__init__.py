"""Inference: the Predictor, its result types, the protocol both plugins use and the task registry.

- ``protocol.PredictorProtocol``: the one seam (``Predictor`` in-process, ``serving.client.RemotePredictor``);
- ``results``: ``Detection``, ``RegionCaption``, ``TracedCaption``, ``Word``, ``MaskResult``;
- ``tasks``: the five tasks (``refer``, ``caption_regions``, ``caption``, ``dense_caption``, ``segment``) and
  ``run_isolated``, the batch-then-one-by-one rule of every caller.

The process's shared predictor (``get_predictor`` / ``release_predictors``) is in ``pixelllm_plugins.predictors``.
"""

from __future__ import annotations

from .protocol import PredictorProtocol
from .results import Detection, RegionCaption, TracedCaption, Word

__all__ = ["PredictorProtocol", "Detection", "RegionCaption", "TracedCaption", "Word"]
