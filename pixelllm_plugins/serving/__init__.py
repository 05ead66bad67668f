"""The GPU worker and its client.

- ``app.create_app(model, settings)``: the FastAPI worker with a dynamic batcher (``batcher.py``), bearer
  auth and the body limit (``guard.py``), error answers (``errors.py``), routes over one ``Worker``
  (``routes.py``, images through ``loader.py``) and its engine (``engines.py``, ``process_engine.py``);
- ``run.run(host, port, model=None, **opts)``: serves it with uvicorn (``pixelllm serve``), one front or
  several over one model process (``fronts.py``);
- ``client.RemotePredictor``: ``PredictorProtocol`` over HTTP (used when ``PIXELLLM_WORKER_URL`` is set);
- ``ray_app``: the same app on Ray Serve replicas (``pixelllm serve --ray --replicas N``).

Heavy imports (FastAPI, Ray) happen only when those modules are imported.
"""

from .settings import WorkerSettings

__all__ = ["WorkerSettings"]
