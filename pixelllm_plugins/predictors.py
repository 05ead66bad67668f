"""The shared predictor of a process: what the plugins call instead of loading models themselves.

``get_predictor()`` returns a ``RemotePredictor`` (``serving.client``) when ``PIXELLLM_WORKER_URL`` is set,
otherwise one in-process ``Predictor`` per (model, device), loaded once per process. It lives here, above
both ``inference`` and ``serving``, so that the core inference package never imports the worker's client.
"""

from __future__ import annotations

import os
import threading

from .inference.protocol import PredictorProtocol

__all__ = ["get_predictor", "release_predictors"]

_lock = threading.Lock()
_predictors: dict[tuple, PredictorProtocol] = {}


def get_predictor(model: str | None = None, *, device: str | None = None,
                  worker_url: str | None = None) -> PredictorProtocol:
    """Shared predictor for this process (plugins call this instead of loading models themselves)."""
    url = worker_url if worker_url is not None else os.environ.get("PIXELLLM_WORKER_URL", "")
    key = ("remote", url, model) if url else ("local", model, device)
    with _lock:
        if key not in _predictors:
            if url:
                from .serving.client import RemotePredictor

                _predictors[key] = RemotePredictor(url, token=os.environ.get("PIXELLLM_WORKER_TOKEN"),
                                                   model=model)
            else:
                from .inference.predictor import Predictor

                _predictors[key] = Predictor(model, device=device)
        return _predictors[key]


def release_predictors() -> int:
    """Drop every cached predictor (frees GPU memory); returns how many were released."""
    with _lock:
        n = len(_predictors)
        _predictors.clear()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return n
