"""The one URL parser for image references: every malformed URL becomes an ``ImageFetchError``.

``urllib`` raises ``ValueError`` for some malformed URLs (``[::1``) and only when a part is read for
others (a port of ``99999`` or ``abc``); both the worker and the Label Studio backend parse here, so a bad
URL is a clear error for its own request instead of a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from .errors import ImageFetchError

MAX_URL_CHARS = 4096


@dataclass(frozen=True)
class ImageURL:
    """A parsed http(s) URL: lower-case host, a port always set, no credentials."""

    url: str
    scheme: str
    host: str
    port: int
    parts: SplitResult

    @property
    def path(self) -> str:
        return self.parts.path


def parse_image_url(url: object, what: str = "image URL", *, schemes: tuple[str, ...] = ("http", "https"),
                    allow_dot_segments: bool = False) -> ImageURL:
    """Parse and check an image URL, or raise ``ImageFetchError`` with a message a user can act on (it
    does not repeat the URL: ``what`` says which one).

    Refused: non-strings, over-long URLs, control characters or spaces, other schemes, a missing host, a
    port outside 1-65535, credentials in the URL, and (unless ``allow_dot_segments``) ``.``/``..`` path
    segments, which an HTTP client would normalise into another path on the same host.
    """
    if not isinstance(url, str) or not url:
        raise ImageFetchError(f"{what} must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise ImageFetchError(f"{what} is {len(url):,} characters long, more than {MAX_URL_CHARS:,}")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ImageFetchError(f"{what} contains spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise ImageFetchError(f"{what} is malformed: check its host (IPv6 in brackets) and its port "
                              "(a number from 1 to 65535)") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        named = "http(s)" if set(schemes) == {"http", "https"} else "/".join(schemes)
        raise ImageFetchError(f"{what} must be an {named} URL; other schemes are refused")
    if not host:
        raise ImageFetchError(f"{what} has no host")
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise ImageFetchError(f"{what}: port 0 is not a port; use 1-65535")
    if parts.username is not None or parts.password is not None:
        raise ImageFetchError(f"{what} must not carry credentials")
    if not allow_dot_segments and has_dot_segments(parts.path):
        raise ImageFetchError(f"{what} has '.' or '..' path segments; give the path without them")
    return ImageURL(url, scheme, host, port, parts)


def has_dot_segments(path: str) -> bool:
    """Whether a URL path holds a ``.`` or ``..`` segment, percent-encoded or not."""
    return any(seg in (".", "..") for seg in unquote(path).replace("\\", "/").split("/"))
