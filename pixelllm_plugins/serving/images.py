"""Images in worker requests: base64 (or a data URL) decoded through ``io``, or a URL fetched from an allowed host.

Every image still goes through ``pixelllm_plugins.io`` (the one loader with the pixel and byte limits): its
header is read first (``open_header``), and the memory decoding it takes is reserved from the worker's
``DecodeBudget`` before any pixel is decoded. URL fetches follow no redirect to a host outside the
allow-list, stream with a byte limit and one deadline for the whole download, and accept only http(s).
Error messages name the request field, never repeat its value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
from urllib.parse import urljoin

import httpx
from PIL import Image

from .. import memory
from ..errors import ImageFetchError, ImageTooLargeError, InvalidImageError
from ..io import EncodedImage, ImageLimits, decode_image_bytes, open_encoded
from ..urls import ImageURL, parse_image_url

MAX_REDIRECTS = 3
# after decoding an image that took at least this much memory, hand freed memory back to the OS
TRIM_AFTER_BYTES = 32 * 1024 * 1024


class HostNotAllowedError(ImageFetchError):
    """The image URL's host is not in the worker's allow-list."""


# ---- the decode budget ---------------------------------------------------------------------------------

class DecodeBudget:
    """Bytes of memory that image decoding may hold at once, across the requests of one worker process.

    A request reserves its image's decode cost (``EncodedImage.decode_bytes``, from the header) before decoding
    and gives it back once the image is decoded and prepared. Requests that do not fit wait in arrival
    order (the request's own deadline bounds the wait), except that a small one (at most 1/16 of the
    budget: a 12-megapixel photo of the default budget) that fits goes ahead, so that a queue of huge
    images does not hold up ordinary ones. An image that alone costs more than the whole budget is
    refused. Not thread-safe: used from the event loop; ``release`` from elsewhere through
    ``loop.call_soon_threadsafe``.
    """

    def __init__(self, total: int):
        self.total = int(total)
        self.free = self.total
        self.small = self.total // 16
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def check(self, image: EncodedImage) -> int:
        """The bytes to reserve for ``image``; ``ImageTooLargeError`` when it could never fit."""
        cost = image.decode_bytes
        if cost > self.total:
            raise memory.too_large(cost, self.total, image.size, image.mode,
                                   "PIXELLLM_WORKER_DECODE_BUDGET_BYTES on the worker")
        return cost

    async def acquire(self, cost: int) -> None:
        """Wait until ``cost`` bytes are free and take them (first come, first served; small ones may pass)."""
        if cost <= self.free and (not self._waiters or cost <= self.small):
            self.free -= cost
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(cost)  # granted just as the waiter was cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._grant()  # the head may have left: later, smaller requests may now fit
            raise

    def release(self, cost: int) -> None:
        self.free = min(self.total, self.free + cost)
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            cost, fut = self._waiters.popleft()
            if not fut.done():
                self.free -= cost
                fut.set_result(None)
        for entry in [e for e in self._waiters if e[0] <= self.small]:  # the head still waits
            cost, fut = entry
            if cost <= self.free and not fut.done():
                self._waiters.remove(entry)
                self.free -= cost
                fut.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


release_memory = memory.release_memory  # the worker's name for it


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


def host_allowed(url: str | ImageURL, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether the URL's host (and port) is in the allow-list; a malformed URL is never allowed."""
    try:
        parsed = url if isinstance(url, ImageURL) else parse_image_url(url, "image.url")
    except ImageFetchError:
        return False
    host, port = parsed.host, parsed.port
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


def check_url(url: object, allowed_hosts: tuple[str, ...], *, redirect: bool = False) -> ImageURL:
    """Parse an image URL (``urls.parse_image_url``) and check its host against the allow-list.

    Messages name the field, never its value: the URL a client sent is not repeated back. Only a redirect
    target's host is named (the image host sent it, not the client).
    """
    what = "image.url's redirect" if redirect else "image.url"
    parsed = parse_image_url(url, what)
    if not allowed_hosts:
        raise HostNotAllowedError("this worker fetches no image URLs; send the image as base64 "
                                  "(image.b64) or have the operator set PIXELLLM_WORKER_ALLOWED_HOSTS")
    if not host_allowed(parsed, allowed_hosts):
        where = f"'s redirect host {parsed.host[:100]!r}" if redirect else "'s host"
        raise HostNotAllowedError(f"image.url{where} is not allowed; allowed hosts: "
                                  f"{', '.join(allowed_hosts)} (PIXELLLM_WORKER_ALLOWED_HOSTS)")
    return parsed



async def fetch_url(url: str, client: httpx.AsyncClient, *, allowed_hosts: tuple[str, ...],
                    limits: ImageLimits, timeout_s: float) -> bytes:
    """GET an image from an allowed host, refusing redirects elsewhere and bodies over the byte limit.

    ``timeout_s`` bounds the whole download, redirects included (httpx's own timeout is per read, which a
    host sending a byte every few seconds would never reach).
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, client, allowed_hosts, limits, timeout_s)
    except TimeoutError:
        raise ImageFetchError(f"image.url: no answer within {timeout_s:g} s (PIXELLLM_WORKER_URL_TIMEOUT_S); "
                              "check the image host or send the image as base64") from None


async def _fetch(url: str, client: httpx.AsyncClient, allowed_hosts: tuple[str, ...], limits: ImageLimits,
                 timeout_s: float) -> bytes:
    for hop in range(MAX_REDIRECTS + 1):
        check_url(url, allowed_hosts, redirect=hop > 0)
        try:
            async with client.stream("GET", url, timeout=timeout_s, follow_redirects=False) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise ImageFetchError("image.url: the image host redirected without a Location")
                    try:
                        url = urljoin(url, location)
                    except ValueError:
                        raise ImageFetchError("image.url: the image host redirected to a malformed URL") from None
                    continue
                if resp.status_code != 200:
                    raise ImageFetchError(f"image.url: the image host answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageTooLargeError(f"image.url: {int(declared):,} bytes exceeds the limit of "
                                             f"{limits.max_bytes:,} bytes")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise ImageTooLargeError(f"image.url: more than {limits.max_bytes:,} bytes, the "
                                                 "limit (PIXELLLM_MAX_IMAGE_BYTES)")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise ImageFetchError(f"image.url: no answer within {timeout_s:g} s (PIXELLLM_WORKER_URL_TIMEOUT_S); "
                                  "check the image host or send the image as base64") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"image.url: could not fetch ({type(exc).__name__})") from None
        except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError: a host name IDNA cannot encode
            raise ImageFetchError(f"image.url could not be used ({type(exc).__name__}); check the host name") from None
    raise ImageFetchError(f"image.url: more than {MAX_REDIRECTS} redirects")


def open_header(data: bytes, limits: ImageLimits) -> EncodedImage:
    """Check an image's header (format, size, mode) without decoding a pixel: ``io.open_encoded``."""
    return open_encoded(data, limits, "image")


def decode(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode through the project's one loader (pixel limit checked before any pixel is decoded)."""
    return decode_image_bytes(data, limits, "image")
