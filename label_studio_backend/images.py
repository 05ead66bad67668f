"""Fetching task images from wherever Label Studio points, within limits.

Accepted sources (``task["data"][<image field>]``):

- Label Studio paths: ``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...`` (or the
  same as absolute URLs on the Label Studio host): downloaded from ``LABEL_STUDIO_URL`` with the API key.
  Local-storage files are read from disk instead when they lie under ``LOCAL_FILES_DOCUMENT_ROOT``.
- Cloud storage ``s3://``, ``gs://``, ``azure-blob://``: resolved by Label Studio's presign endpoint for the
  task (``/tasks/<id>/presign/?fileuri=...``); the redirect Label Studio issues is followed without the key.
- Plain ``http(s)://``: only hosts in ``PIXELLLM_LS_ALLOWED_HOSTS`` (``*.example.com`` or ``*``), plus the
  Label Studio host. The task's ``params.login/password`` go as Basic auth to such hosts.
- Local paths / ``file://``: only under ``PIXELLLM_LS_LOCAL_ROOTS`` or ``LOCAL_FILES_DOCUMENT_ROOT``.
- ``data:image/...;base64,...`` URIs.

Every URL is parsed by ``pixelllm_plugins.urls.parse_image_url`` before any request: a malformed one (bad
port, ``[::1``, no host, credentials, control characters) is the task's ``ImageFetchError``, and so is a
``.``/``..`` path segment (raw or percent-encoded) in any Label Studio path or ``?d=`` local-files path, which
an HTTP client would otherwise normalise into another path on the Label Studio host, with the API key.

Every download is streamed with a byte limit and one deadline for the whole download
(``PIXELLLM_LS_FETCH_TIMEOUT``, redirects included; not per read); the image is opened through
``pixelllm_plugins.io`` (format allow-list, pixel limits). The API key is sent only to the Label Studio host.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from PIL import Image

from pixelllm_plugins.errors import ImageFetchError, ImageTooLargeError
from pixelllm_plugins.io import EncodedImage, load_image, open_encoded
from pixelllm_plugins.urls import ImageURL, has_dot_segments, parse_image_url

from .errors import printable
from .ls_client import LabelStudioAuth
from .settings import Settings

_CLOUD = ("s3://", "gs://", "azure-blob://", "azure-spi://")
_LS_PATHS = ("/data/upload/", "/data/local-files", "/storage-data/", "/tasks/")
_MAX_REDIRECTS = 5


class ImageFetcher:
    """Resolves a task's image reference to bytes, an ``EncodedImage`` or a PIL image, enforcing the host
    and folder policy."""

    def __init__(self, settings: Settings, *, cache_entries: int = 16, cache_ttl_s: float = 300.0):
        self.settings = settings
        self.limits = settings.image_limits
        self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)
        self._roots = [Path(r).resolve() for r in settings.local_roots if r]
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_ttl = cache_ttl_s
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=httpx.Timeout(settings.fetch_timeout_s, connect=5.0),
                                    follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- public
    def load(self, ref: object, *, task_id: object = None, login: str | None = None,
             password: str | None = None) -> Image.Image:
        """The task's image as RGB, or ``ImageFetchError`` / ``InvalidImageError`` with a reason."""
        data = self.fetch(ref, task_id=task_id, login=login, password=password)
        return load_image(data, self.limits)

    def open(self, ref: object, *, task_id: object = None, login: str | None = None,
             password: str | None = None) -> EncodedImage:
        """The task's image bytes, header checked but not decoded: the predictor decodes them (a large JPEG
        at a reduced scale) and a worker gets them as they are, never re-encoded."""
        data = self.fetch(ref, task_id=task_id, login=login, password=password)
        return open_encoded(data, self.limits)

    def fetch(self, ref: object, *, task_id: object = None, login: str | None = None,
              password: str | None = None) -> bytes:
        if not isinstance(ref, str) or not ref.strip():
            raise ImageFetchError(f"image reference must be a non-empty string, got {_short(ref)}")
        ref = ref.strip()
        if len(ref) > 8192 and not ref.startswith("data:"):
            raise ImageFetchError("image URL is longer than 8192 characters")
        key = f"{ref}|{task_id}"
        cached = self._cache_get(key)
        if cached is not None:
            return cached
        data = self._fetch(ref, task_id=task_id, login=login, password=password)
        self._cache_put(key, data)
        return data

    # ---------------------------------------------------------------- routing
    def _fetch(self, ref: str, *, task_id, login, password) -> bytes:
        if ref.startswith("data:"):
            return self._data_uri(ref)
        lower = ref.lower()
        if lower.startswith(_CLOUD):
            return self._presigned(ref, task_id)
        if ref.startswith("/") and ref.startswith(_LS_PATHS):
            return self._from_label_studio(ref)
        if lower.startswith(("http://", "https://")):
            url = parse_image_url(ref, "image URL")
            if self.auth.applies_to(ref):
                path = url.parts
                return self._from_label_studio(path.path + (f"?{path.query}" if path.query else ""))
            if not self._host_allowed(url):
                raise ImageFetchError(
                    f"image host {printable(url.host)!r} is not allowed; add it to PIXELLLM_LS_ALLOWED_HOSTS "
                    "(comma-separated, '*.example.com' wildcards) or serve the image through Label Studio")
            auth = (login, password) if login and password else None
            return self._download(ref, ls_auth=False, basic=auth)
        if lower.startswith("file://"):
            return self._local(unquote(urlsplit(ref).path))
        if ref.startswith("/") or (len(ref) > 2 and ref[1] == ":"):
            return self._local(ref)
        raise ImageFetchError(f"unsupported image reference {_short(ref)}: use a Label Studio upload, local "
                              "storage, cloud storage or an http(s) URL")

    def _from_label_studio(self, path: str) -> bytes:
        """A path on the Label Studio host (``/data/upload/...``, ``/data/local-files/?d=...``, ...): refused
        with ``.``/``..`` segments before any request, as the key would go with it."""
        try:
            parts = urlsplit(path)
        except ValueError:
            raise ImageFetchError(f"Label Studio image path {_short(path)} is malformed") from None
        if has_dot_segments(parts.path):
            raise ImageFetchError(f"Label Studio image path {_short(path)} has '.' or '..' segments; give the path "
                                  "without them")
        if path.startswith("/data/local-files"):
            rel = (parse_qs(parts.query).get("d") or [""])[0]
            if not rel:
                raise ImageFetchError("local-files URL has no ?d=<path> parameter")
            if has_dot_segments(rel):
                raise ImageFetchError(f"local-files path ?d={_short(rel)} has '.' or '..' segments; give the path "
                                      "relative to the storage root without them")
            for root in self._roots:
                candidate = (root / rel).resolve()
                if candidate.is_relative_to(root) and candidate.is_file():
                    return self._read_file(candidate)
            if self._roots and not self.settings.label_studio_url:  # looked for here, and nowhere else to ask
                found = [root / rel for root in self._roots if (root / rel).resolve().is_relative_to(root)
                         and (root / rel).exists()]
                what = "is a folder, not an image file" if found and all(f.is_dir() for f in found) else (
                    "is not a regular file" if found else "was not found")
                raise ImageFetchError(f"local file ?d={_short(rel)} {what} under the backend's local roots "
                                      "(PIXELLLM_LS_LOCAL_ROOTS / LOCAL_FILES_DOCUMENT_ROOT); check the path, or "
                                      "set LABEL_STUDIO_URL so the backend asks Label Studio for it")
        if not self.settings.label_studio_url:
            raise ImageFetchError(f"{_short(path)} is a Label Studio path but LABEL_STUDIO_URL is not set; set "
                                  "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) in the backend's environment")
        # spaces in an upload's or a local file's name are sent percent-encoded, as a browser would
        url = self.settings.label_studio_url + path.replace(" ", "%20")
        return self._download(url, ls_auth=True)

    def _presigned(self, uri: str, task_id) -> bytes:
        try:
            tid = int(task_id)
        except (TypeError, ValueError):
            raise ImageFetchError(f"cloud image {_short(uri)} needs the task id to be presigned by Label "
                                  "Studio; the task has none") from None
        if not self.settings.label_studio_url:
            raise ImageFetchError("cloud-storage images are presigned by Label Studio; set LABEL_STUDIO_URL "
                                  "and LABEL_STUDIO_API_KEY")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        url = f"{self.settings.label_studio_url}/tasks/{tid}/presign/?fileuri={fileuri}"
        return self._download(url, ls_auth=True)

    def _local(self, path: str) -> bytes:
        if not self._roots:
            raise ImageFetchError(f"local image paths are disabled ({_short(path)}); set PIXELLLM_LS_LOCAL_ROOTS "
                                  "to the folders the backend may read")
        try:
            resolved = Path(path).resolve()
        except (OSError, ValueError) as exc:
            raise ImageFetchError(f"bad local path {_short(path)}") from exc
        if not any(resolved.is_relative_to(root) for root in self._roots):
            raise ImageFetchError(f"local path {_short(path)} is outside the allowed folders "
                                  "(PIXELLLM_LS_LOCAL_ROOTS / LOCAL_FILES_DOCUMENT_ROOT)")
        if not resolved.is_file():
            raise ImageFetchError(f"local image {_short(path)} does not exist")
        return self._read_file(resolved)

    def _read_file(self, path: Path) -> bytes:
        size = path.stat().st_size
        if size > self.limits.max_bytes:
            raise ImageTooLargeError(f"{path.name}: {size:,} bytes exceeds the limit of {self.limits.max_bytes:,}")
        return path.read_bytes()

    def _data_uri(self, ref: str) -> bytes:
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise ImageFetchError("data: URIs must be base64-encoded images")
        if len(payload) * 3 // 4 > self.limits.max_bytes:
            raise ImageTooLargeError(f"data: URI exceeds the limit of {self.limits.max_bytes:,} bytes")
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError("data: URI is not valid base64") from exc

    # ---------------------------------------------------------------- policy + download
    def _host_allowed(self, url: ImageURL | str) -> bool:
        host = url.host if isinstance(url, ImageURL) else (urlsplit(url).hostname or "").lower()
        if not host:
            return False
        return any(pattern == "*" or fnmatch.fnmatchcase(host, pattern) for pattern in self.settings.allowed_hosts)

    def _download(self, url: str, *, ls_auth: bool, basic: tuple[str, str] | None = None) -> bytes:
        """Download within one deadline for the whole transfer (``fetch_timeout_s``): httpx's timeout is per
        read, so a host trickling bytes could hold the request far longer. The transfer runs in its own
        thread; when the deadline passes the caller gets ``ImageFetchError`` at once and the thread stops at
        its next chunk (or its next read timeout)."""
        timeout = self.settings.fetch_timeout_s
        deadline = time.monotonic() + timeout
        where = _redact(url)
        cancel = threading.Event()
        done = threading.Event()
        outcome: dict[str, object] = {}

        def work() -> None:
            try:
                outcome["data"] = self._transfer(url, ls_auth=ls_auth, basic=basic, deadline=deadline,
                                                 cancel=cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="ls-download", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            cancel.set()
            raise ImageFetchError(_late(where, timeout))
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["data"]  # type: ignore[return-value]

    def _transfer(self, url: str, *, ls_auth: bool, basic: tuple[str, str] | None, deadline: float,
                  cancel: threading.Event) -> bytes:
        timeout = self.settings.fetch_timeout_s
        trusted_redirect = False
        first = True
        for _hop in range(_MAX_REDIRECTS + 1):
            # a redirect's target is parsed too; '..' is refused on the first URL and wherever the key goes
            parsed = parse_image_url(url, "image URL" if first else "redirect target", allow_dot_segments=True)
            is_ls = self.auth.applies_to(url)
            if (first or is_ls) and has_dot_segments(parsed.path):
                raise ImageFetchError(f"image URL {_redact(url)} has '.' or '..' path segments; give the path "
                                      "without them")
            first = False
            if not (is_ls or trusted_redirect or self._host_allowed(parsed)):
                raise ImageFetchError(f"redirect to a host that is not allowed: {printable(parsed.host)!r}")
            headers = {"User-Agent": "pixelllm-label-studio-backend"}
            if is_ls and ls_auth:
                headers.update(self.auth.headers())
            auth = httpx.BasicAuth(*basic) if basic and not is_ls else None
            try:
                with self._client.stream("GET", url, headers=headers, auth=auth) as r:
                    if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                        # Label Studio's own redirects (presign) are trusted; others follow the host policy.
                        trusted_redirect = is_ls
                        try:
                            url = urljoin(url, r.headers["location"])
                        except ValueError:
                            raise ImageFetchError(f"{_redact(url)} redirects to a malformed URL") from None
                        continue
                    if r.status_code == 401 and is_ls and self.auth.is_pat:
                        self.auth.invalidate()
                    if r.status_code != 200:
                        raise ImageFetchError(_status_message(r.status_code, url, is_ls))
                    length = r.headers.get("content-length")
                    if length and length.isdigit() and int(length) > self.limits.max_bytes:
                        raise ImageTooLargeError(f"image at {_redact(url)} is {int(length):,} bytes; the limit is "
                                                 f"{self.limits.max_bytes:,} (PIXELLLM_MAX_IMAGE_BYTES)")
                    chunks, total = [], 0
                    for chunk in r.iter_bytes():
                        total += len(chunk)
                        if total > self.limits.max_bytes:
                            raise ImageTooLargeError(f"image at {_redact(url)} exceeds the limit of "
                                                     f"{self.limits.max_bytes:,} bytes")
                        if cancel.is_set() or time.monotonic() > deadline:
                            raise ImageFetchError(_late(_redact(url), timeout))
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException as exc:
                raise ImageFetchError(_late(_redact(url), timeout)) from exc
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"cannot download image from {_redact(url)} ({type(exc).__name__})") from exc
        raise ImageFetchError(f"too many redirects fetching {_redact(url)}")

    # ---------------------------------------------------------------- cache
    def _cache_get(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            if time.monotonic() - hit[0] > self._cache_ttl:
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return hit[1]

    def _cache_put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._cache[key] = (time.monotonic(), data)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)


def _redact(url: str) -> str:
    """A URL without its query string (presigned URLs carry credentials there), safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return printable(url)
    return printable(f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path, 200)


def _short(value: object, n: int = 80) -> str:
    return printable(value, n)


def _late(where: str, timeout: float) -> str:
    return (f"image at {where}: no answer within {timeout:g} s (PIXELLLM_LS_FETCH_TIMEOUT, for the whole "
            "download); check that the host is up, or raise the timeout")


def _status_message(status: int, url: str, is_ls: bool) -> str:
    where = _redact(url)
    if is_ls and status in (401, 403):
        return (f"Label Studio refused the image download (HTTP {status}) at {where}; set LABEL_STUDIO_API_KEY "
                "to a valid token (legacy tokens must be enabled in the organization) or a personal access token")
    if is_ls and status == 404:
        return (f"image not found on Label Studio (HTTP 404) at {where}; for uploads check LABEL_STUDIO_API_KEY "
                "(uploads answer 404 without auth); for local files a Local Storage must cover the folder")
    return f"image download failed with HTTP {status} at {where}"

