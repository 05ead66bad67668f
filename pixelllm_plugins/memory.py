"""Memory for decoding images: a byte budget for threads, and giving freed memory back to the OS.

A small file can decode into hundreds of megabytes (an 8 KB 1-bit PNG of 8000x8000 pixels takes about
300 MiB: see ``io.decode_cost``), so whoever decodes several images at once reserves each one's cost
first. The worker's event loop has its own asynchronous budget (``serving.images.DecodeBudget``); threads
(the Label Studio backend's download pool) use ``ThreadDecodeBudget``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Iterator

from .errors import ImageTooLargeError

MIB = 1024 * 1024
TRIM_AFTER_BYTES = 32 * MIB  # decodes at least this big give their memory back when done


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no malloc_trim)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def release_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); False where there is none.

    glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB: PIL allocates an image in
    16 MiB blocks) in per-thread arenas, so without this a process that decoded a few huge images at once
    keeps that much resident memory for good."""
    if _LIBC is None:
        return False
    try:
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - a libc that lost the symbol
        return False
    return True


def too_large(cost: int, total: int, size: tuple[int, int], mode: str, setting: str) -> ImageTooLargeError:
    """The error for an image whose decode alone needs more than the whole budget."""
    return ImageTooLargeError(
        f"image: decoding this {size[0]}x{size[1]} image (mode {mode or '?'}) takes about {cost / MIB:,.0f} MiB "
        f"of memory, more than the decode budget of {total / MIB:,.0f} MiB; send a smaller image or one with "
        f"8-bit RGB pixels (or raise {setting})")


class ThreadDecodeBudget:
    """At most ``total`` bytes of image decoding at once across threads; ``reserve`` blocks until its cost
    fits (or ``timeout_s`` passes: then it raises ``TimeoutError``)."""

    def __init__(self, total: int, setting: str = "the budget"):
        self.total, self.free, self.setting = int(total), int(total), setting
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int, *, size: tuple[int, int] = (0, 0), mode: str = "",
                timeout_s: float | None = None) -> Iterator[None]:
        if cost > self.total:
            raise too_large(cost, self.total, size, mode, self.setting)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while cost > self.free:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no decode budget for {cost / MIB:,.0f} MiB within {timeout_s:g} s")
                self._cond.wait(left)
            self.free -= cost
        try:
            yield
        finally:
            with self._cond:
                self.free += cost
                self._cond.notify_all()
            if cost >= TRIM_AFTER_BYTES:
                release_memory()
