"""The HTTP server: the Label Studio ML backend protocol, spoken directly (FastAPI).

Routes (what Label Studio 1.23.2 calls): ``GET /health``, ``POST /setup``, ``POST /predict``,
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
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pixelllm_plugins.errors import PixelLLMError

from .base import ModelResponse, project_id_from
from .convert import error_prediction
from .errors import printable
from .label_config import LabelConfigError, parse_label_config
from .model import PixelLLMBackend
from .runtime import Runtime
from .settings import Settings

log = logging.getLogger("label_studio_backend")


# params keys that would clash with predict()'s own arguments (Label Studio sends login, password, context)
_RESERVED_PARAMS = ("self", "tasks")


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: text from the request with lone surrogates is escaped (``\\ud800``) and a
    non-finite number becomes ``null`` instead of the encoder raising (a 500, and a reset connection)."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except (UnicodeEncodeError, ValueError, TypeError):
            pass
        try:
            return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":"),
                              default=lambda o: f"<{type(o).__name__}>").encode("ascii")
        except (ValueError, TypeError, RecursionError):
            log.exception("response could not be encoded")
            return b'{"error":"the response could not be encoded; see the backend log"}'


def _finite(value: Any, depth: int = 0) -> Any:
    if depth > 200:
        return None
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def _text(value: object) -> str | None:
    """A string that can be stored and sent (valid Unicode), else ``None``."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: Request, limit: int, *, required: bool = True) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _BadRequest(f"request body is larger than {limit:,} bytes (PIXELLLM_LS_MAX_REQUEST_BYTES)", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _BadRequest(f"request body is larger than {limit:,} bytes (PIXELLLM_LS_MAX_REQUEST_BYTES)", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise _BadRequest("request body is empty; send a JSON object")
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"request body is not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    except RecursionError:
        raise _BadRequest("request body JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise _BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(settings: Settings | None = None, *, predictor=None, predictor_factory=None, trainer=None,
               model_class: type[PixelLLMBackend] = PixelLLMBackend, preload: bool = True,
               **setting_overrides: Any) -> FastAPI:
    """Build the ASGI app.

    ``settings`` defaults to ``Settings.from_env(**setting_overrides)`` (e.g. ``model_dir=``,
    ``basic_auth_user=``, ``model=``). ``predictor`` injects a ``PredictorProtocol`` (tests); otherwise
    ``pixelllm_plugins.inference.get_predictor`` is used (in-process, or the GPU worker when
    ``PIXELLLM_WORKER_URL`` is set). ``trainer`` replaces the LoRA fine-tune function. ``preload`` loads
    the model at startup so the first ``/setup`` (3 s timeout in Label Studio) does not wait for it.
    """
    settings = settings or Settings.from_env(**setting_overrides)
    runtime = Runtime(settings, predictor=predictor, predictor_factory=predictor_factory, trainer=trainer)
    Model = type(model_class.__name__, (model_class,), {"runtime": runtime, "store": runtime.store})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if preload:
            await run_in_threadpool(lambda: runtime.predictor)
        yield
        runtime.close()

    app = FastAPI(title="PixelLLM Label Studio ML backend", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, default_response_class=SafeJSONResponse)
    app.state.runtime = runtime
    app.state.model_class = Model
    limit = settings.max_request_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
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

    @app.exception_handler(_BadRequest)
    async def bad_request(_request: Request, exc: _BadRequest):
        runtime.count("bad_requests")
        return SafeJSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error: %s", exc)
        return SafeJSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/health")
    @app.get("/")
    async def health():
        out = {"status": "UP", "model_class": model_class.__name__,
               **await run_in_threadpool(runtime.health_fields)}
        training = runtime.training.status()
        if training:
            out["training"] = training
            failed = {p: s["last_error"] for p, s in training.items() if s.get("status") == "failed"}
            if failed:
                out["training_errors"] = failed
        return out

    @app.post("/setup")
    async def setup(request: Request):
        body = await _json_body(request, limit)
        # body["access_token"] / body["hostname"] are deliberately ignored and never logged.
        project = body.get("project")
        schema = body.get("schema")
        if schema is not None and not isinstance(schema, str):
            raise _BadRequest("'schema' must be the labeling config XML as a string")

        def work():
            model = Model(project_id=project, label_config=schema)
            model.set_extra_params(body.get("extra_params"))
            cfg = None
            try:
                if schema:
                    cfg = parse_label_config(schema)
            except LabelConfigError as exc:  # e.g. a config still without its image: not an error yet
                log.warning("project %s: labeling config not usable yet: %s", model.project_id, exc)
            if cfg is not None:
                try:  # an attribute meant for this backend with a bad value is: say so when connecting
                    cfg.check()
                except LabelConfigError as exc:
                    raise _BadRequest(str(exc)) from None
            return {"model_version": model.model_version}

        log.info("setup project=%s", project_id_from(project))
        return await run_in_threadpool(work)

    @app.post("/predict")
    async def predict(request: Request):
        body = await _json_body(request, limit)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise _BadRequest("'tasks' must be a list of Label Studio tasks")
        label_config = body.get("label_config")
        config_error = None
        if label_config is not None and not isinstance(label_config, str):
            config_error = "'label_config' must be the labeling config XML as a string"
            label_config = None
        params = dict(body["params"]) if isinstance(body.get("params"), dict) else {}
        context = params.pop("context", None)
        if context is not None and not isinstance(context, dict):
            context = None
        clash = [k for k in _RESERVED_PARAMS if k in params]
        if clash:
            raise _BadRequest(f"'params' must not contain {clash}: the tasks go in the body's 'tasks' "
                              "(Label Studio sends params login, password and context)")
        project = body.get("project")

        def work():
            model = Model(project_id=project, label_config=label_config)
            if config_error:
                return [error_prediction(config_error, model.model_version) for _ in tasks], model.model_version
            started = time.monotonic()
            response = model.predict(tasks, context=context, **params)
            if isinstance(response, ModelResponse):
                results, version = response.serialize(), response.model_version
            elif isinstance(response, dict):
                results, version = response.get("predictions", []), model.model_version
            else:
                results, version = list(response or []), model.model_version
            log.info("predict project=%s tasks=%d interactive=%s in %.2f s", model.project_id, len(tasks),
                     bool(context), time.monotonic() - started)
            return results, version

        try:
            results, version = await run_in_threadpool(work)
        except PixelLLMError as exc:
            raise _BadRequest(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug must not cost the batch: one error per task, logged
            log.exception("predict failed: %s", exc)
            runtime.count("predict_failures")
            version = await run_in_threadpool(_version_or_unknown)
            message = (f"the backend failed on this request ({type(exc).__name__}: {printable(str(exc), 200)}); "
                       "see its log")
            results = [error_prediction(message, version) for _ in tasks]
        runtime.count("predict_requests")
        return SafeJSONResponse({"results": results, "model_version": version})

    def _version_or_unknown() -> str:
        try:
            return runtime.base_version
        except Exception:  # noqa: BLE001 - e.g. the model failed to load
            return "unknown"

    @app.post("/webhook")
    async def webhook(request: Request):
        body = await _json_body(request, limit)
        action = body.get("action")
        if not isinstance(action, str) or action not in Model.TRAIN_EVENTS:
            return SafeJSONResponse({"status": "Unknown event"}, status_code=200)
        project = body.get("project")
        pid = project.get("id") if isinstance(project, dict) else project
        label_config = _text(project.get("label_config")) if isinstance(project, dict) else None
        if project_id_from(pid) is None:
            raise _BadRequest("webhook payload has no valid 'project'")

        def work():
            model = Model(project_id=str(pid), label_config=label_config)
            return model.fit(action, body)

        try:
            result = await run_in_threadpool(work)
        except PixelLLMError as exc:
            raise _BadRequest(str(exc)) from None
        runtime.count(f"webhook_{action.lower()}")
        log.info("webhook %s project=%s -> %s", action, project_id_from(pid), result)
        return SafeJSONResponse({"result": result, "status": "ok"}, status_code=201)

    @app.post("/train")
    async def train(request: Request):
        """Legacy training call (Label Studio without the webhook feature flag): tasks with annotations."""
        body = await _json_body(request, limit)
        pid = project_id_from(body.get("project"))
        tasks = body.get("annotations")
        if pid is None or not isinstance(tasks, list):
            raise _BadRequest("'/train' needs 'project' and 'annotations' (tasks with their annotations)")
        label_config = _text(body.get("label_config"))

        def work():
            tm = runtime.training
            tm.handle_event(pid, "PROJECT_UPDATED", {}, label_config)
            stored = 0
            for t in tasks:
                anns = [a for a in (t.get("annotations") or []) if isinstance(a, dict)] if isinstance(t, dict) else []
                if anns:
                    stored += tm.record(pid, t, anns[-1], label_config)
            return {"stored": stored, "queued": tm.request(pid) if stored else False}

        return SafeJSONResponse({"status": "ok", "result": await run_in_threadpool(work)}, status_code=201)

    @app.api_route("/versions", methods=["GET", "POST"])
    async def versions(request: Request):
        body = await _json_body(request, limit, required=False)
        pid = project_id_from(body.get("project") or request.query_params.get("project"))

        def work():
            base = runtime.base_version
            return {"versions": [base] + [f"{base}+{a}" for a in runtime.training.versions(pid)],
                    "model_version": runtime.version_for(pid)}

        return await run_in_threadpool(work)

    @app.post("/validate")
    async def validate(request: Request):
        body = await _json_body(request, limit)
        try:
            task = parse_label_config(body.get("config")).check()
        except LabelConfigError as exc:
            return SafeJSONResponse({"status": "error", "errors": [str(exc)]}, status_code=422)
        return {"status": "ok", "task": task}

    @app.get("/metrics")
    async def metrics():
        return {"uptime_s": round(time.time() - runtime.started_at, 1), "counters": dict(runtime.counters),
                "training": runtime.training.status()}

    return app


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
