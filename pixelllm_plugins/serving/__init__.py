"""The GPU worker and its client.

- ``app.create_app(model, settings)`` / ``app.run(host, port, model=None, **opts)``: FastAPI worker with a
  dynamic batcher (``batcher.py``), bearer auth, limits and backpressure (``pixelllm serve``).
- ``client.RemotePredictor``: ``PredictorProtocol`` over HTTP (used when ``PIXELLLM_WORKER_URL`` is set).
- ``ray_app``: the same app on Ray Serve replicas (``pixelllm serve --ray --replicas N``).

Heavy imports (FastAPI, Ray) happen only when those modules are imported.
"""

from .settings import WorkerSettings

__all__ = ["WorkerSettings"]
