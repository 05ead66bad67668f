"""Images in worker requests: base64 (or a data URL) decoded through ``io``, or a URL fetched from an allowed host.

Every image still goes through ``pixelllm_plugins.io.decode_image_bytes`` (the one loader with the pixel and
byte limits). URL fetches follow no redirect to a host outside the allow-list, stream with a byte limit and
a timeout, and accept only http(s).
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from ..errors import ImageFetchError, ImageTooLargeError, InvalidImageError
from ..io import ImageLimits, decode_image_bytes

MAX_REDIRECTS = 3


class HostNotAllowedError(ImageFetchError):
    """The image URL's host is not in the worker's allow-list."""


def decode_b64(data: str, limits: ImageLimits) -> bytes:
    """Base64 (standard or URL-safe alphabet, optional ``data:image/...;base64,`` prefix) -> bytes."""
    if not isinstance(data, str) or not data:
        raise InvalidImageError("image.b64 is empty; send the image file's bytes base64-encoded")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise InvalidImageError("image.b64 data URL must be base64-encoded (data:image/png;base64,...)")
    data = "".join(data.split())  # tolerate line-wrapped base64
    if len(data) * 3 // 4 > limits.max_bytes:
        raise ImageTooLargeError(f"image: about {len(data) * 3 // 4:,} bytes exceeds the limit of "
                                 f"{limits.max_bytes:,} bytes; downscale or recompress the image")
    try:
        data = data.replace("-", "+").replace("_", "/")  # URL-safe alphabet
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image.b64 is not valid base64 ({exc}); encode the image file's bytes "
                                "with standard base64") from None
    if not raw:
        raise InvalidImageError("image.b64 decodes to no bytes")
    return raw


def host_allowed(url: str, allowed_hosts: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allowed_hosts:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif ":" in entry and not entry.startswith("["):
            h, _, p = entry.rpartition(":")
            if host == h and str(port) == p:
                return True
        elif host == entry.strip("[]"):
            return True
    return False


def check_url(url: str, allowed_hosts: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageFetchError(f"image.url must be an http(s) URL, got scheme {parts.scheme!r}")
    if parts.username or parts.password:
        raise ImageFetchError("image.url must not carry credentials")
    if not allowed_hosts:
        raise HostNotAllowedError("this worker fetches no image URLs; send the image as base64 "
                                  "(image.b64) or have the operator set PIXELLLM_WORKER_ALLOWED_HOSTS")
    if not host_allowed(url, allowed_hosts):
        raise HostNotAllowedError(f"image.url host {parts.hostname!r} is not allowed; allowed hosts: "
                                  f"{', '.join(allowed_hosts)} (PIXELLLM_WORKER_ALLOWED_HOSTS)")


async def fetch_url(url: str, client: httpx.AsyncClient, *, allowed_hosts: tuple[str, ...],
                    limits: ImageLimits, timeout_s: float) -> bytes:
    """GET an image from an allowed host, refusing redirects elsewhere and bodies over the byte limit."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, allowed_hosts)
        try:
            async with client.stream("GET", url, timeout=timeout_s, follow_redirects=False) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise ImageFetchError(f"image.url {url}: redirect without a Location")
                    url = urljoin(url, location)
                    continue
                if resp.status_code != 200:
                    raise ImageFetchError(f"image.url {url}: the image host answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageTooLargeError(f"image.url {url}: {int(declared):,} bytes exceeds the limit of "
                                             f"{limits.max_bytes:,} bytes")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise ImageTooLargeError(f"image.url {url}: more than {limits.max_bytes:,} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise ImageFetchError(f"image.url {url}: no answer within {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"image.url {url}: could not fetch ({type(exc).__name__})") from None
    raise ImageFetchError(f"image.url: more than {MAX_REDIRECTS} redirects")


def decode(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode through the project's one loader (pixel limit checked before any pixel is decoded)."""
    return decode_image_bytes(data, limits, "image")
