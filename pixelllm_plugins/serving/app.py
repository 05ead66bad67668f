"""The GPU worker: a FastAPI app over one model, with dynamic batching, backpressure, auth and limits.

``create_app(model, settings)`` builds the app; ``run(host, port, model=None, **opts)`` serves it with
uvicorn (``pixelllm serve``). The same app runs inside Ray Serve replicas (``ray_app.py``) with another
engine; everything HTTP (shapes, limits, auth, errors, metrics) lives here once.

Status codes: 400 bad input (image, box, text, adapter), 401 token, 403 URL host not allowed, 404 unknown
adapter or route, 413 body or image too large, 422 schema, 500 model failure, 503 queue full / not ready
(with ``Retry-After``), 504 per-request timeout. Every error body is ``{"error", "type"}``, and no error
message repeats a request's text, URL or image data: messages name the field instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import inspect
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    CheckpointError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidBoxError,
    InvalidImageError,
    InvalidPromptError,
    PixelLLMError,
)
from ..geometry import as_box
from ..tokenizer import validate_text
from . import images as image_io
from .adapters import AdapterNotFoundError
from .batcher import DynamicBatcher, Job, ShuttingDown, make_factory
from .metrics import CONTENT_TYPE_LATEST, WorkerMetrics
from .schemas import (
    CaptionRegionsRequest,
    CaptionRegionsResponse,
    CaptionRequest,
    CaptionResponse,
    DenseCaptionRequest,
    DenseCaptionResponse,
    ErrorResponse,
    ImageRef,
    ReferRequest,
    ReferResponse,
)
from .settings import WorkerSettings

log = logging.getLogger("pixelllm.worker")

ROUTES = ("/v1/refer", "/v1/caption_regions", "/v1/caption", "/v1/dense_caption", "/health", "/ready",
          "/metrics", "/openapi.json", "/docs")


class APIError(Exception):
    """An error answer: status, a type name and a message that says what to do."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def error_status(exc: BaseException) -> int:
    """HTTP status for a project error raised while serving a request."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, image_io.HostNotAllowedError):
        return 403
    if isinstance(exc, AdapterNotFoundError):
        return 404
    if isinstance(exc, ShuttingDown):
        return 503
    if isinstance(exc, (InvalidImageError, ImageFetchError, InvalidBoxError, InvalidPromptError)):
        return 400
    if isinstance(exc, CheckpointError):
        return 500
    if isinstance(exc, PixelLLMError):
        return 400
    return 500


MAX_MESSAGE_CHARS = 2000


def _json_error(status: int, type_: str, message: str, headers: dict | None = None,
                detail: list | None = None) -> JSONResponse:
    # a message is always encodable and bounded, whatever ended up in it
    message = str(message)[:MAX_MESSAGE_CHARS].encode("utf-8", "replace").decode("utf-8") or type_
    body: dict[str, Any] = {"error": message, "type": type_}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the engine seam -----------------------------------------------------------------------------------

def adapter_roots(model: Any, settings: WorkerSettings) -> list[Path]:
    roots = [Path(settings.adapter_dir)] if settings.adapter_dir else []
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        roots.append(Path(model) / "adapters")
    return roots


# ---- auth ----------------------------------------------------------------------------------------------

PROTECTED = ("/v1/", "/metrics")
UNAUTHORIZED = ("missing or wrong bearer token: send 'Authorization: Bearer <token>' with the worker's "
                "PIXELLLM_WORKER_TOKEN")


def token_ok(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def unauthorized() -> JSONResponse:
    return _json_error(401, "Unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})


# ---- guard middleware: auth, body-size limit and per-route metrics ------------------------------------

class _Guard:
    """Pure ASGI: check the token (401) and refuse bodies over the limit (413) before anything reads or
    parses them; count every answer per route and status."""

    def __init__(self, app, settings: WorkerSettings, metrics: WorkerMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status_box = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.settings.token is not None and scope["path"].startswith(PROTECTED) and not token_ok(
                    headers.get(b"authorization", b"").decode("latin-1"), self.settings.token):
                # before the body is read: unauthenticated clients cannot make the worker buffer anything
                return await unauthorized()(scope, receive, send_wrapper)
            limit = self.settings.max_request_bytes
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return await self._too_large(scope, receive, send_wrapper, int(declared))
            if scope["method"] in ("POST", "PUT", "PATCH"):
                chunks, total, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        return await self._too_large(scope, receive, send_wrapper, total)
                    chunks.append(chunk)
                    more = message.get("more_body", False)
                body = b"".join(chunks)
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_wrapper)
            return await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status_box["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _too_large(self, scope, receive, send, size: int):
        response = _json_error(413, "RequestTooLarge",
                               f"request body of {size:,}+ bytes exceeds the limit of "
                               f"{self.settings.max_request_bytes:,} bytes; send a smaller image "
                               "(or raise PIXELLLM_WORKER_MAX_REQUEST_BYTES)", {"Connection": "close"})
        await response(scope, receive, send)


# ---- the app -------------------------------------------------------------------------------------------

def batcher_options(model: Any, settings: WorkerSettings) -> dict:
    """The ``DynamicBatcher`` arguments of a worker with these settings (whichever process runs it)."""
    return {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
            "adapter_roots": adapter_roots(model, settings), "max_adapters": settings.max_adapters,
            "torch_threads": settings.torch_threads, "warmup": settings.warmup}


def build_engine(model: Any, settings: WorkerSettings, metrics: WorkerMetrics | None = None, *,
                 factory: str | None = None):
    """The worker's engine: a ``ProcessEngine`` (model in a child process) when the model is named (folder,
    preset, None for the embedded one, or a ``"module:callable"`` factory) and ``settings.engine`` is
    ``"process"``; else a ``DynamicBatcher`` on a thread of this process (always for predictor instances)."""
    batching = {**batcher_options(model, settings), "metrics": metrics}
    named = factory is not None or model is None or isinstance(model, (str, Path))
    if settings.engine == "process" and named:
        from .process_engine import ProcessEngine

        return ProcessEngine(None if model is None else str(model), factory=factory, device=settings.device,
                             log_level=logging.getLogger().getEffectiveLevel(), **batching)
    return DynamicBatcher(make_factory(model, factory, settings.device), **batching)


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
    state = {"in_flight": 0}
    # decoding threads: an executor's C-level queue wakes a thread for less than anyio's worker pool,
    # which showed up in profiles of the event loop under load
    decode_pool = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="pixelllm-decode")
    # memory all requests' decoding may hold at once; each image reserves its cost from its header first
    budget = image_io.DecodeBudget(settings.decode_budget_bytes)
    limits = settings.image_limits
    announce = getattr(engine, "expect", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        app.state.http = httpx.AsyncClient(trust_env=False)
        log.info("worker settings: %s", settings.public_dict())
        try:
            yield
        finally:
            await app.state.http.aclose()
            await run_in_threadpool(engine.stop)
            decode_pool.shutdown(wait=False, cancel_futures=True)

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
    app.state.decode_budget = budget
    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _json_error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        detail, parts = [], []
        for err in exc.errors():
            loc = [_field_name(p) for p in err.get("loc", ()) if p != "body"]
            where = ".".join(loc) or "body"
            msg = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                where, msg = "body", "is not valid JSON"
            elif err.get("type") == "missing":
                msg = "is required"
            elif err.get("type") == "extra_forbidden":
                msg = "is not a known field"
            parts.append(f"{where}: {msg}")
            detail.append({"loc": loc, "msg": msg, "type": err.get("type", "")})  # no input echo
        return _json_error(422, "ValidationError", "invalid request: " + "; ".join(parts), detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            path = request.url.path
            named = f" {path}" if _PLAIN_PATH.fullmatch(path) else ""  # a plain path, else not repeated
            message = f"no route{named}; see /docs for the API"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = ("the body could not be parsed (JSON nested too deeply or a number too long); send a "
                       "JSON object as in /docs")
        return _json_error(exc.status_code, "HTTPError", message, getattr(exc, "headers", None))

    # async: FastAPI runs a plain ``def`` dependency on a thread-pool hop per request, which under load took
    # a quarter of the event loop's GIL time
    async def require_token(request: Request) -> None:  # also checked by _Guard before the body is read
        if settings.token is not None and not token_ok(request.headers.get("authorization", ""), settings.token):
            raise APIError(401, "Unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    # ---- helpers ------------------------------------------------------------------------------------
    def busy(reason: str, message: str) -> APIError:
        metrics.rejected.labels(reason).inc()
        return APIError(503, "Busy" if reason == "queue_full" else "NotReady", message,
                        {"Retry-After": str(settings.retry_after_s)})

    async def load(ref: ImageRef):
        if ref.b64 is not None:
            data = image_io.decode_b64(ref.b64, limits)
        else:
            data = await image_io.fetch_url(ref.url, app.state.http, allowed_hosts=settings.allowed_hosts,
                                            limits=limits, timeout_s=settings.url_timeout_s)
        loop = asyncio.get_running_loop()
        small_file = len(data) <= settings.inline_decode_bytes
        # the header first: format, size and mode, hence the memory decoding will take; no pixel decoded
        header = (image_io.open_header(data, limits) if small_file
                  else await loop.run_in_executor(decode_pool, image_io.open_header, data, limits))
        cost = budget.check(header)  # 413 when the image alone could never fit
        prepare = getattr(engine.predictor, "prepare", None)  # resize + hash here, off the inference thread

        def decode_and_prepare():  # decode (JPEG at a reduced scale), resize, hash
            return prepare(header, limits) if prepare is not None else image_io.decode(header.data, limits)

        if small_file and header.width * header.height <= settings.inline_decode_pixels:
            # a small image: cheaper than the thread hop. One at a time (the event loop's), so it needs
            # no share of the budget and never waits behind huge ones
            return decode_and_prepare()

        await budget.acquire(cost)  # waits while other requests' images hold the budget
        def in_thread():
            try:
                return decode_and_prepare()
            finally:  # the full-size pixels are garbage now: give their memory back to the OS
                if cost >= image_io.TRIM_AFTER_BYTES:
                    image_io.release_memory()

        def give_back(_):  # when the decode ends, not when the request stops waiting for it
            with contextlib.suppress(RuntimeError):  # a closed loop: the worker is shutting down
                loop.call_soon_threadsafe(budget.release, cost)

        try:
            fut = decode_pool.submit(in_thread)
        except RuntimeError:  # the pool is shut down
            budget.release(cost)
            raise
        fut.add_done_callback(give_back)
        return await asyncio.wrap_future(fut)

    def check_limit(name: str, value: int, limit: int) -> None:
        if value > limit:
            raise APIError(422, "ValidationError", f"{name}={value} exceeds this worker's limit of {limit}")

    async def serve(task: str, req, arg: Any, options: tuple):
        if engine.error:
            raise APIError(500, "ModelLoadError", f"the worker's model failed to load ({engine.error}); "
                           "check the worker's log and --model")
        if not engine.ready:
            raise busy("not_ready", "the model is still loading; retry after Retry-After seconds")
        if state["in_flight"] >= settings.max_queue:
            raise busy("queue_full", f"the worker is at capacity ({settings.max_queue} requests in flight); "
                       "retry after Retry-After seconds")
        timeout = min(req.timeout_s or math.inf, settings.request_timeout_s)
        state["in_flight"] += 1
        metrics.in_flight.inc()
        try:
            async with asyncio.timeout(timeout):
                if announce is None:
                    image = await load(req.image)
                    result = await engine.submit(Job(task, image, arg, req.adapter, options))
                else:  # tell the batcher a job is coming, so a forming batch can wait for it
                    announce()
                    try:
                        image = await load(req.image)
                    except BaseException:
                        engine.unexpect()
                        raise
                    result = await engine.submit(Job(task, image, arg, req.adapter, options), announced=True)
        except TimeoutError:
            metrics.rejected.labels("timeout").inc()
            raise APIError(504, "Timeout", f"no answer within {timeout:g} s; the worker is busy: retry later "
                           "or ask for a longer timeout_s") from None
        except PixelLLMError as exc:
            status = error_status(exc)
            headers = {"Retry-After": str(settings.retry_after_s)} if status == 503 else None
            raise APIError(status, type(exc).__name__, str(exc), headers) from None
        except Exception as exc:
            log.exception("%s failed", task)
            raise APIError(500, "InferenceError", f"inference failed ({type(exc).__name__}); "
                           "see the worker's log") from None
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()
        version = engine.model_version + (f"+{req.adapter}" if req.adapter else "")
        size = list(image.prepared.original_size) if hasattr(image, "prepared") else [image.width, image.height]
        return result, size, version

    # ---- routes -------------------------------------------------------------------------------------
    @app.post("/v1/refer", responses={200: {"model": ReferResponse}}, dependencies=auth,
              summary="text -> box: where is each referring expression")
    async def refer(req: ReferRequest):
        texts = req.all_texts()
        if not texts:
            raise APIError(400, "InvalidPromptError", "texts is empty; give at least one referring expression")
        check_limit("len(texts)", len(texts), settings.max_texts)
        for i, t in enumerate(texts):
            try:  # not Unicode (a lone surrogate), empty or control characters only, too long
                validate_text(t, "text" if req.text is not None else f"texts[{i}]",
                              max_chars=settings.max_text_chars)
            except InvalidPromptError as exc:
                raise APIError(400, "InvalidPromptError", str(exc)) from None
        result, size, version = await serve("refer", req, texts, ())
        per_text = [[d.to_dict() for d in dets] for dets in result]
        return JSONResponse({"model_version": _version(result, version), "image_size": size,
                             "detections": [d for dets in per_text for d in dets], "per_text": per_text})

    @app.post("/v1/caption_regions", responses={200: {"model": CaptionRegionsResponse}}, dependencies=auth,
              summary="box -> text: a caption for each given box")
    async def caption_regions(req: CaptionRegionsRequest):
        if not req.boxes:
            raise APIError(400, "InvalidBoxError", "boxes is empty; give [[x1, y1, x2, y2], ...] in pixels")
        check_limit("len(boxes)", len(req.boxes), settings.max_boxes)
        check_limit("max_new_tokens", req.max_new_tokens, settings.max_new_tokens)
        check_limit("num_beams", req.num_beams, settings.max_beams)
        boxes = []
        for i, b in enumerate(req.boxes):  # checked here so that the message names the box, not its numbers
            if len(b) != 4:
                raise APIError(400, "InvalidBoxError", f"boxes[{i}] must be 4 numbers [x1, y1, x2, y2] in "
                               f"pixels, got {len(b)} numbers")
            if not all(math.isfinite(v) for v in b):
                raise APIError(400, "InvalidBoxError", f"boxes[{i}] has a coordinate that is not a finite "
                               "number; give [x1, y1, x2, y2] in pixels")
            boxes.append(list(as_box(b)))
        options = (("max_new_tokens", req.max_new_tokens), ("num_beams", req.num_beams))
        result, size, version = await serve("caption_regions", req, boxes, options)
        captions = [c.to_dict() for c in result]
        return JSONResponse({"model_version": _version(result, version), "image_size": size, "captions": captions})

    @app.post("/v1/caption", responses={200: {"model": CaptionResponse}}, dependencies=auth,
              summary="a whole-image caption; with trace every word carries a box and points")
    async def caption(req: CaptionRequest):
        check_limit("max_new_tokens", req.max_new_tokens, settings.max_new_tokens)
        check_limit("num_beams", req.num_beams, settings.max_beams)
        options = (("max_new_tokens", req.max_new_tokens), ("num_beams", req.num_beams), ("trace", req.trace))
        result, size, version = await serve("caption", req, None, options)
        return JSONResponse({"model_version": result.model_version or version, "image_size": size,
                             "caption": result.text, "score": result.score,
                             "words": [w.to_dict() for w in result.words]})

    @app.post("/v1/dense_caption", responses={200: {"model": DenseCaptionResponse}}, dependencies=auth,
              summary="dense captioning: proposals, each with a caption and a score")
    async def dense_caption(req: DenseCaptionRequest):
        check_limit("max_regions", req.max_regions, settings.max_regions)
        options = (("max_regions", req.max_regions), ("min_score", req.min_score))
        result, size, version = await serve("dense_caption", req, None, options)
        return JSONResponse({"model_version": _version(result, version), "image_size": size,
                             "regions": [r.to_dict() for r in result]})

    @app.get("/health", summary="liveness: the process answers (no auth)")
    async def health():
        return {"status": "ok", "ready": bool(engine.ready)}

    @app.get("/ready", summary="readiness: 200 once the model is loaded, else 503 (no auth)")
    async def ready():
        if engine.ready:
            body = {"ready": True, "model_version": engine.model_version,
                    "info": jsonable_encoder(engine.info()), "queue_depth": engine.queue_depth(),
                    "in_flight": state["in_flight"], "settings": settings.public_dict()}
            metrics.ready.set(1)
            return body
        metrics.ready.set(0)
        body = {"ready": False, "error": engine.error}
        headers = None if engine.error else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics (text format)")
    async def metrics_route():
        metrics.queue_depth.set(engine.queue_depth())
        metrics.ready.set(1 if engine.ready else 0)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/_.\-]{1,100}")


def _field_name(part: object) -> str:
    """A validation error's location part as shown to the client: an index or a field name; a key the
    client made up that is no plausible field name (long, odd characters) is not repeated back."""
    if isinstance(part, int):
        return str(part)
    if isinstance(part, str) and _FIELD.fullmatch(part):
        return part
    return "<field>"


def _telemetry_kwargs(enabled: bool) -> dict:
    """FastAPI's ``telemetry`` argument (FastAPI >= 0.160) switched off unless asked for; older FastAPI
    has no native telemetry and gets nothing."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _version(results, fallback: str) -> str:
    flat = list(results)
    while flat and isinstance(flat[0], list):
        flat = [x for sub in flat for x in sub]
    return next((r.model_version for r in flat if getattr(r, "model_version", "")), fallback)


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
        from .fronts import run_fronts

        return run_fronts(host, port, model, settings, factory=factory, log_level=log_level)
    app = create_app(model, settings, factory=factory)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
