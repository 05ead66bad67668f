"""The HTTP server: the Label Studio ML backend protocol, spoken directly (FastAPI).

Routes (``routes.py``; what Label Studio 1.23.2 calls): ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook``, ``GET|POST /versions``, ``GET /metrics``, plus the legacy ``POST /train`` and
``POST /validate``. With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` every route needs HTTP Basic auth,
compared in constant time. Request bodies are never logged (``/setup`` carries the project creator's
API token).

Start it with ``pixelllm ls-backend --host H --port P``, ``python -m label_studio_backend``, or
``run(host, port, **opts)``; ``create_app(**opts)`` gives the ASGI app.

Bad input is never a 5xx: a malformed request is a 4xx with ``{"error": ...}``; anything wrong with one task
(its data, image, text, or the config's attributes) is that task's ``error`` in a 200, one result per task.
Responses are encoded so that text from the request (a lone surrogate) cannot break them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .model import PixelLLMBackend
from .routes import (  # noqa: F401 - the private helpers stay importable from here, as before
    _RESERVED_PARAMS,
    SafeJSONResponse,
    _BadRequest,
    _finite,
    _json_body,
    _reject_constant,
    _text,
    router,
)
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger("label_studio_backend")


def create_app(settings: Settings | None = None, *, predictor=None, predictor_factory=None, trainer=None,
               model_class: type[PixelLLMBackend] = PixelLLMBackend, preload: bool = True,
               **setting_overrides: Any) -> FastAPI:
    """Build the ASGI app.

    ``settings`` defaults to ``Settings.from_env(**setting_overrides)`` (e.g. ``model_dir=``,
    ``basic_auth_user=``, ``model=``). ``predictor`` injects a ``PredictorProtocol`` (tests); otherwise
    ``pixelllm_plugins.predictors.get_predictor`` is used (in-process, or the GPU worker when
    ``PIXELLLM_WORKER_URL`` is set). ``trainer`` replaces the LoRA fine-tune function. ``preload`` loads
    the model at startup so the first ``/setup`` (3 s timeout in Label Studio) does not wait for it.
    """
    settings = settings or Settings.from_env(**setting_overrides)
    runtime = Runtime(settings, predictor=predictor, predictor_factory=predictor_factory, trainer=trainer)
    Model = type(model_class.__name__, (model_class,), {"runtime": runtime, "store": runtime.store})

    app = FastAPI(title="PixelLLM Label Studio ML backend", lifespan=_lifespan(runtime, preload),
                  docs_url=None, redoc_url=None, openapi_url=None, default_response_class=SafeJSONResponse)
    app.state.runtime = runtime
    app.state.model_class = Model
    app.state.max_request_bytes = settings.max_request_bytes
    app.middleware("http")(_guard)
    app.add_exception_handler(_BadRequest, _bad_request)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    return app


def _lifespan(runtime: Runtime, preload: bool):
    """Load the model at startup (``preload``) and close the runtime at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if preload:
            await run_in_threadpool(lambda: runtime.predictor)
        yield
        runtime.close()

    return lifespan


# ---- auth and errors, around every route ---------------------------------------------------------------

def _auth_ok(header: str | None, user: str, password: str) -> bool:
    """Constant-time check of an ``Authorization: Basic`` header."""
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_pass = decoded.partition(b":")
    user_ok = hmac.compare_digest(given_user, user.encode())
    pass_ok = hmac.compare_digest(given_pass, password.encode())
    return bool(sep) and user_ok and pass_ok


async def _guard(request: Request, call_next):
    """HTTP middleware: Basic auth (when configured), a JSON answer to any error, counters and a debug log."""
    started = time.monotonic()
    runtime = request.app.state.runtime
    settings = runtime.settings
    if settings.basic_auth_enabled and not _auth_ok(request.headers.get("authorization"),
                                                    settings.basic_auth_user, settings.basic_auth_pass):
        runtime.count("unauthorized")
        return SafeJSONResponse({"error": "unauthorized"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="pixelllm-ls-backend"'})
    try:
        response = await call_next(request)
    except _BadRequest as exc:  # pragma: no cover - handled by the exception handler below
        response = SafeJSONResponse({"error": str(exc)}, status_code=exc.status)
    except Exception as exc:  # noqa: BLE001 - a bug: answered here, so the connection stays usable
        log.exception("unexpected error on %s: %s", request.url.path, exc)
        response = SafeJSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
    runtime.count(f"http_{response.status_code}")
    log.debug("%s %s -> %d in %.3f s", request.method, request.url.path, response.status_code,
              time.monotonic() - started)
    return response


async def _bad_request(request: Request, exc: _BadRequest):
    request.app.state.runtime.count("bad_requests")
    return SafeJSONResponse({"error": str(exc)}, status_code=exc.status)


async def _unexpected(_request: Request, exc: Exception):
    log.exception("unexpected error: %s", exc)
    return SafeJSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def run(host: str = "127.0.0.1", port: int = 9090, *, log_level: str | None = None, **opts: Any) -> None:
    """Serve the backend with uvicorn (blocking). ``opts`` go to ``create_app`` (e.g. ``model=``,
    ``model_dir=``, ``basic_auth_user=``, ``basic_auth_pass=``, ``predictor=``, ``trainer=``)."""
    import uvicorn

    settings = opts.pop("settings", None) or Settings.from_env(
        **{k: opts.pop(k) for k in list(opts) if k in Settings.__dataclass_fields__})
    level = (log_level or settings.log_level or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.basic_auth_enabled and not (settings.basic_auth_user and settings.basic_auth_pass):
        raise SystemExit("set both BASIC_AUTH_USER and BASIC_AUTH_PASS (or neither)")
    if not settings.basic_auth_enabled and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone who can reach this port "
                    "can run the model", host)
    app = create_app(settings, **opts)
    uvicorn.run(app, host=host, port=int(port), log_level=level.lower(), access_log=level == "DEBUG")
