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
                  worker_url: str | None = None, own_thread: bool = True) -> PredictorProtocol:
    """Shared predictor for this process (plugins call this instead of loading models themselves).

    An in-process one runs its model work on a thread of its own (``inference.model_thread``: servers
    answer requests on many threads, and torch on CPU slows down when several threads use it);
    ``own_thread=False`` for a single-threaded caller that runs torch itself."""
    url = worker_url if worker_url is not None else os.environ.get("PIXELLLM_WORKER_URL", "")
    key = ("remote", url, model) if url else ("local", model, device, own_thread)
    with _lock:
        if key not in _predictors:
            if url:
                from .serving.client import RemotePredictor

                _predictors[key] = RemotePredictor(url, token=os.environ.get("PIXELLLM_WORKER_TOKEN"),
                                                   model=model)
            else:
                from .inference.predictor import Predictor

                if own_thread:
                    from .inference.model_thread import OnModelThread

                    _predictors[key] = OnModelThread(lambda: Predictor(model, device=device))
                else:
                    _predictors[key] = Predictor(model, device=device)
        return _predictors[key]


def release_predictors() -> int:
    """Drop every cached predictor (frees GPU memory); returns how many were released."""
    with _lock:
        n = len(_predictors)
        dropped = list(_predictors.values())
        _predictors.clear()
    from .inference.model_thread import OnModelThread

    for predictor in dropped:
        if isinstance(predictor, OnModelThread):
            predictor.close()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return n
