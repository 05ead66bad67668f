"""The GPU worker: a FastAPI app over one model, with dynamic batching, backpressure, auth and limits.

``create_app(model, settings)`` builds the app; ``run.run(host, port, model=None, **opts)`` serves it with
uvicorn (``pixelllm serve``). The same app runs inside Ray Serve replicas (``ray_app.py``) with another
engine; everything HTTP (shapes, limits, auth, errors, metrics) is built here once, from

- ``engines``: which engine runs the model (``build_engine``);
- ``guard``: bearer auth and the body-size limit, before any body is read; per-route metrics;
- ``errors``: ``APIError``, the error statuses and the exception handlers;
- ``routes``: the routes over a ``Worker`` (admission, image loading via ``loader``, one job per request).

Status codes: 400 bad input (image, box, text, adapter), 401 token, 403 URL host not allowed, 404 unknown
adapter or route, 413 body or image too large, 422 schema, 500 model failure, 503 queue full / not ready
(with ``Retry-After``), 504 per-request timeout. Every error body is ``{"error", "type"}``, and no error
message repeats a request's text, URL or image data: messages name the field instead.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from fastapi import FastAPI

from .engines import build_engine
from .errors import add_error_handlers
from .guard import Guard
from .metrics import WorkerMetrics
from .routes import ROUTES, Worker, add_routes
from .schemas import ErrorResponse
from .settings import WorkerSettings


def create_app(model: Any = None, settings: WorkerSettings | None = None, *, engine: Any = None,
               metrics: WorkerMetrics | None = None, factory: str | None = None) -> FastAPI:
    """Build the worker app.

    ``model``: a checkpoint folder or preset name (None: the embedded model), a zero-argument factory
    returning a predictor, or a predictor instance; ``factory``: ``"module:callable"`` instead of ``model``.
    ``engine``: replaces the one ``build_engine`` picks (the Ray deployment passes itself). The model is
    loaded in the background at startup; ``/ready`` answers 200 once it is loaded.
    """
    settings = settings or WorkerSettings.from_env()
    metrics = metrics or WorkerMetrics()
    if engine is None:
        engine = build_engine(model, settings, metrics, factory=factory)
    worker = Worker(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(
        **_telemetry_kwargs(settings.otel),
        title="pixelllm worker",
        version="1",
        description="PixelLLM inference worker shared by the Label Studio backend and the FiftyOne plugin. "
                    "Boxes are [x1, y1, x2, y2] in pixels of the original image.",
        lifespan=lifespan,
        responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                   422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.worker, app.state.decode_budget = worker, worker.loader.budget
    app.add_middleware(Guard, settings=settings, metrics=metrics, routes=ROUTES)
    add_error_handlers(app)
    add_routes(app, worker)
    return app


def _telemetry_kwargs(enabled: bool) -> dict:
    """FastAPI's ``telemetry`` argument (FastAPI >= 0.160) switched off unless asked for; older FastAPI
    has no native telemetry and gets nothing."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
