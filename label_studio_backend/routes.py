"""The routes of the Label Studio ML backend protocol (an ``APIRouter``), and how they read a request body
and write a response. ``server.create_app`` includes the router; each route finds what it needs on
``request.app.state``: ``runtime`` (predictor, store, training, counters), ``model_class`` (the
``PixelLLMBackend`` subclass bound to that runtime) and ``max_request_bytes``.

A route's own blocking work (the model, the store) runs in the thread pool; a malformed request raises
``_BadRequest`` (answered by ``server``'s exception handler as a 4xx with ``{"error": ...}``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pixelllm_plugins.errors import PixelLLMError

from .base import ModelResponse, project_id_from
from .convert import error_prediction
from .errors import printable
from .label_config import LabelConfigError, parse_label_config

log = logging.getLogger("label_studio_backend")


# params keys that would clash with predict()'s own arguments (Label Studio sends login, password, context)
_RESERVED_PARAMS = ("self", "tasks")


# ---- responses and request bodies ----------------------------------------------------------------------

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


async def _body(request: Request, *, required: bool = True) -> dict:
    """The request's JSON object, within the app's ``max_request_bytes``."""
    return await _json_body(request, request.app.state.max_request_bytes, required=required)


def _version_or_unknown(runtime) -> str:
    try:
        return runtime.base_version
    except Exception:  # noqa: BLE001 - e.g. the model failed to load
        return "unknown"


# ---- the routes --------------------------------------------------------------------------------------------

router = APIRouter(default_response_class=SafeJSONResponse)


@router.get("/health")
@router.get("/")
async def health(request: Request):
    runtime = request.app.state.runtime
    out = {"status": "UP", "model_class": request.app.state.model_class.__name__,
           **await run_in_threadpool(runtime.health_fields)}
    training = runtime.training.status()
    if training:
        out["training"] = training
        failed = {p: s["last_error"] for p, s in training.items() if s.get("status") == "failed"}
        if failed:
            out["training_errors"] = failed
    return out


@router.post("/setup")
async def setup(request: Request):
    body = await _body(request)
    # body["access_token"] / body["hostname"] are deliberately ignored and never logged.
    project = body.get("project")
    schema = body.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise _BadRequest("'schema' must be the labeling config XML as a string")
    Model = request.app.state.model_class

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


@router.post("/predict")
async def predict(request: Request):
    body = await _body(request)
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
    runtime, Model = request.app.state.runtime, request.app.state.model_class

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
        version = await run_in_threadpool(_version_or_unknown, runtime)
        message = (f"the backend failed on this request ({type(exc).__name__}: {printable(str(exc), 200)}); "
                   "see its log")
        results = [error_prediction(message, version) for _ in tasks]
    runtime.count("predict_requests")
    return SafeJSONResponse({"results": results, "model_version": version})


@router.post("/webhook")
async def webhook(request: Request):
    body = await _body(request)
    runtime, Model = request.app.state.runtime, request.app.state.model_class
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


@router.post("/train")
async def train(request: Request):
    """Legacy training call (Label Studio without the webhook feature flag): tasks with annotations."""
    body = await _body(request)
    pid = project_id_from(body.get("project"))
    tasks = body.get("annotations")
    if pid is None or not isinstance(tasks, list):
        raise _BadRequest("'/train' needs 'project' and 'annotations' (tasks with their annotations)")
    label_config = _text(body.get("label_config"))
    runtime = request.app.state.runtime

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


@router.api_route("/versions", methods=["GET", "POST"])
async def versions(request: Request):
    body = await _body(request, required=False)
    pid = project_id_from(body.get("project") or request.query_params.get("project"))
    runtime = request.app.state.runtime

    def work():
        base = runtime.base_version
        return {"versions": [base] + [f"{base}+{a}" for a in runtime.training.versions(pid)],
                "model_version": runtime.version_for(pid)}

    return await run_in_threadpool(work)


@router.post("/validate")
async def validate(request: Request):
    body = await _body(request)
    try:
        task = parse_label_config(body.get("config")).check()
    except LabelConfigError as exc:
        return SafeJSONResponse({"status": "error", "errors": [str(exc)]}, status_code=422)
    return {"status": "ok", "task": task}


@router.get("/metrics")
async def metrics(request: Request):
    runtime = request.app.state.runtime
    return {"uptime_s": round(time.time() - runtime.started_at, 1), "counters": dict(runtime.counters),
            "training": runtime.training.status()}
