"""The worker's error answers: ``APIError``, the status of a project error, the JSON error body and the
app's exception handlers.

Every error body is ``{"error", "type"}`` (422 adds ``detail``), and no message repeats a request's text,
URL or image data: messages name the field instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
from .adapters import AdapterNotFoundError
from .batcher import ShuttingDown
from .images import HostNotAllowedError

MAX_MESSAGE_CHARS = 2000

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/_.\-]{1,100}")


class APIError(Exception):
    """An error answer: status, a type name and a message that says what to do."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def error_status(exc: BaseException) -> int:
    """HTTP status for a project error raised while serving a request."""
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, HostNotAllowedError):
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


def json_error(status: int, type_: str, message: str, headers: dict | None = None,
               detail: list | None = None) -> JSONResponse:
    """The JSON error answer; its message is always encodable and bounded, whatever ended up in it."""
    message = str(message)[:MAX_MESSAGE_CHARS].encode("utf-8", "replace").decode("utf-8") or type_
    body: dict[str, Any] = {"error": message, "type": type_}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return json_error(exc.status, exc.type, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail, parts = [], []
    as_json = "json" in request.headers.get("content-type", "").lower()
    for err in exc.errors():
        loc = [_field_name(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            where, msg = "body", "is not valid JSON"
        elif not loc and not as_json:  # the body was not read as JSON at all
            msg = "must be a JSON object sent with Content-Type: application/json"
        elif err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "extra_forbidden":
            msg = "is not a known field"
        parts.append(f"{where}: {msg}")
        detail.append({"loc": loc, "msg": msg, "type": err.get("type", "")})  # no input echo
    return json_error(422, "ValidationError", "invalid request: " + "; ".join(parts), detail=detail)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        path = request.url.path
        named = f" {path}" if _PLAIN_PATH.fullmatch(path) else ""  # a plain path, else not repeated
        message = f"no route{named}; see /docs for the API"
    elif exc.status_code == 400 and message == "There was an error parsing the body":
        message = ("the body could not be read as JSON: send a UTF-8 JSON object, not compressed, as in /docs "
                   "(JSON nested too deeply or a number too long fails the same way)")
    return json_error(exc.status_code, "HTTPError", message, getattr(exc, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    """``APIError``, request validation (422) and Starlette's HTTP errors, all as ``{"error", "type"}``."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def _field_name(part: object) -> str:
    """A validation error's location part as shown to the client: an index or a field name; a key the
    client made up that is no plausible field name (long, odd characters) is not repeated back."""
    if isinstance(part, int):
        return str(part)
    if isinstance(part, str) and _FIELD.fullmatch(part):
        return part
    return "<field>"
