"""Talking back to Label Studio: the API key (legacy token or personal access token) and the few API
calls the backend makes (pulling labeled tasks for training, fixing the webhook's auth header).

The key is attached **only** to requests whose origin is the Label Studio URL, and is never logged.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from .errors import BackendError

log = logging.getLogger(__name__)


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL; ``None`` when it cannot be parsed (a bad port, ``[::1``)."""
    try:
        parts = urlsplit(url)
        scheme = (parts.scheme or "").lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, (parts.hostname or "").lower(), port
    except (ValueError, TypeError):
        return None


def _jwt_payload(token: str) -> dict | None:
    """The payload of a JWT (not verified: only to read ``exp``/``token_type``); ``None`` if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        head = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        body = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or "alg" not in head or not isinstance(body, dict):
        return None
    return body


class LabelStudioAuth:
    """Builds the ``Authorization`` header for Label Studio.

    A legacy token goes as ``Token <key>``. A personal access token (a JWT *refresh* token) is exchanged
    at ``/api/token/refresh/`` for a short-lived access token, sent as ``Bearer``; it is refreshed
    before it expires and after a 401.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self._key = api_key or ""
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp = 0.0
        payload = _jwt_payload(self._key) if self._key else None
        self.is_pat = payload is not None

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioAuth({self.base_url!r}, key={'set' if self._key else 'unset'})"

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self._key)

    def applies_to(self, url: str) -> bool:
        mine = origin(url)
        return bool(self.base_url) and mine is not None and mine == origin(self.base_url)

    def invalidate(self) -> None:
        with self._lock:
            self._access, self._access_exp = None, 0.0

    def headers(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_exp - 30:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        try:
            r = httpx.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self._key},
                           timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach Label Studio at {self.base_url} to refresh the personal access "
                               f"token ({type(exc).__name__}); check LABEL_STUDIO_URL") from exc
        if r.status_code != 200:
            raise BackendError(f"Label Studio refused the personal access token (HTTP {r.status_code}); "
                               "create a new one in Account & Settings and set LABEL_STUDIO_API_KEY")
        access = r.json().get("access", "")
        payload = _jwt_payload(access) or {}
        self._access = access
        self._access_exp = float(payload.get("exp", time.time() + 240))


class LabelStudioClient:
    """Minimal Label Studio API client (plain httpx; the SDK is not a runtime dependency)."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0):
        if not base_url:
            raise BackendError("LABEL_STUDIO_URL is not set; the backend needs it to pull labeled tasks "
                               "and images from Label Studio")
        self.base_url = base_url.rstrip("/")
        self.auth = LabelStudioAuth(self.base_url, api_key)
        self.timeout = timeout_s

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        url = f"{self.base_url}{path}"
        for attempt in range(2):
            r = httpx.request(method, url, headers=self.auth.headers(), timeout=self.timeout,
                              follow_redirects=False, **kwargs)
            if r.status_code == 401 and self.auth.is_pat and attempt == 0:
                self.auth.invalidate()
                continue
            break
        if r.status_code >= 400:
            raise BackendError(f"Label Studio answered HTTP {r.status_code} to {method} {path}; check "
                               "LABEL_STUDIO_API_KEY and that its user can access the project")
        return r

    def labeled_tasks(self, project_id: str | int) -> list[dict]:
        """Every task of the project that has at least one annotation, with its annotations."""
        r = self.request("GET", f"/api/projects/{int(project_id)}/export",
                         params={"exportType": "JSON", "download_all_tasks": "false"})
        tasks = r.json()
        if not isinstance(tasks, list):
            raise BackendError("unexpected export format from Label Studio (expected a JSON list of tasks)")
        return [t for t in tasks if isinstance(t, dict) and t.get("annotations")]

    def patch_webhook_auth(self, project_id: str | int, backend_url: str, user: str, password: str) -> int:
        """Add the backend's Basic credentials to the project's auto webhook(s) pointing at
        ``<backend_url>/webhook`` (Label Studio creates them without headers, so annotation events get
        401). Returns how many webhooks were patched."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        target = backend_url.rstrip("/") + "/webhook"
        hooks = self.request("GET", "/api/webhooks/", params={"project": int(project_id)}).json()
        n = 0
        for hook in hooks if isinstance(hooks, list) else []:
            if str(hook.get("url", "")).rstrip("/") == target.rstrip("/"):
                headers = dict(hook.get("headers") or {})
                headers["Authorization"] = f"Basic {token}"
                self.request("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
                n += 1
        return n
