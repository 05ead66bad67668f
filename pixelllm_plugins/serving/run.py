"""``run``: serve the worker with uvicorn (``pixelllm serve``, ``python -m pixelllm_plugins.serving``).

One front process over the model (``app.create_app``), or ``fronts=N`` front processes over one shared
model process (``fronts.run_fronts``).
"""

from __future__ import annotations

import logging

from .app import create_app
from .fronts import run_fronts
from .settings import WorkerSettings

log = logging.getLogger("pixelllm.worker")


def run(host: str = "127.0.0.1", port: int = 8000, model: str | None = None, *, factory: str | None = None,
        log_level: str = "info", **opts) -> None:
    """Serve the worker with uvicorn (one model, one inference thread; the model runs in a child process
    unless ``engine="thread"``; ``fronts=N`` runs N HTTP processes over that one model process).

    ``opts`` are ``WorkerSettings`` fields (``device``, ``max_batch_size``, ``max_wait_ms``, ``max_queue``,
    ``request_timeout_s``, ...; None means "from the environment"). ``factory``: ``"module:callable"``
    returning a predictor, instead of ``model``.
    """
    import uvicorn

    settings = WorkerSettings.from_env(**opts)
    if settings.token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without PIXELLLM_WORKER_TOKEN: anyone who can reach it can use it", host)
    if settings.fronts > 1:
        return run_fronts(host, port, model, settings, factory=factory, log_level=log_level)
    app = create_app(model, settings, factory=factory)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
