"""Bearer auth and the guard middleware: the token (401) and the body-size limit (413) are checked before
anything reads or parses a body, and every answer is counted per route and status."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import APIError, json_error
from .metrics import WorkerMetrics
from .settings import WorkerSettings

PROTECTED = ("/v1/", "/metrics")
UNAUTHORIZED = ("missing or wrong bearer token: send 'Authorization: Bearer <token>' with the worker's "
                "PIXELLLM_WORKER_TOKEN")


def token_ok(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def unauthorized() -> JSONResponse:
    return json_error(401, "Unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})


def token_dependency(settings: WorkerSettings) -> Callable[[Request], Awaitable[None]]:
    """The routes' auth dependency (also checked by ``Guard`` before the body is read). Async: FastAPI
    runs a plain ``def`` dependency on a thread-pool hop per request, which under load took a quarter of
    the event loop's GIL time."""

    async def require_token(request: Request) -> None:
        if settings.token is not None and not token_ok(request.headers.get("authorization", ""), settings.token):
            raise APIError(401, "Unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    return require_token


class Guard:
    """Pure ASGI: check the token (401) and refuse bodies over the limit (413) before anything reads or
    parses them; count every answer per route (one of ``routes``, else ``other``) and status."""

    def __init__(self, app, settings: WorkerSettings, metrics: WorkerMetrics, routes: tuple[str, ...]):
        self.app, self.settings, self.metrics, self.routes = app, settings, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
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
        response = json_error(413, "RequestTooLarge",
                              f"request body of {size:,}+ bytes exceeds the limit of "
                              f"{self.settings.max_request_bytes:,} bytes; send a smaller image "
                              "(or raise PIXELLLM_WORKER_MAX_REQUEST_BYTES)", {"Connection": "close"})
        await response(scope, receive, send)
