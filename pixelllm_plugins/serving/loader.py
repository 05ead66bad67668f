"""A request's image, from base64 or a URL to what the engine takes, within the decode memory budget.

The header is read first (format, size, mode: the memory decoding will take, no pixel decoded); an image
that could never fit the budget is a 413. A small image is decoded on the event loop (cheaper than the
thread hop); a bigger one waits for its share of the budget and is decoded on a thread of the decode pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

import httpx

from . import images as image_io
from .schemas import ImageRef
from .settings import WorkerSettings


class ImageLoader:
    """Loads the images of one worker: its HTTP client for URLs, its decode threads and memory budget."""

    def __init__(self, settings: WorkerSettings, engine: Any):
        self.settings, self.engine = settings, engine
        self.limits = settings.image_limits
        # memory all requests' decoding may hold at once; each image reserves its cost from its header first
        self.budget = image_io.DecodeBudget(settings.decode_budget_bytes)
        # decoding threads: an executor's C-level queue wakes a thread for less than anyio's worker pool,
        # which showed up in profiles of the event loop under load
        self.pool = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="pixelllm-decode")
        self.http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self.http = httpx.AsyncClient(trust_env=False)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def load(self, ref: ImageRef, *, prepare: bool = True):
        """The image of ``ref``, prepared by the engine's predictor when it can (resize + hash here, off
        the inference thread), else decoded; ``prepare=False``: decoded at full size (``segment``: masks
        are in the original image's pixels)."""
        settings, limits = self.settings, self.limits
        if ref.b64 is not None:
            data = image_io.decode_b64(ref.b64, limits)
        else:
            data = await image_io.fetch_url(ref.url, self.http, allowed_hosts=settings.allowed_hosts,
                                            limits=limits, timeout_s=settings.url_timeout_s)
        loop = asyncio.get_running_loop()
        small_file = len(data) <= settings.inline_decode_bytes
        header = (image_io.open_header(data, limits) if small_file
                  else await loop.run_in_executor(self.pool, image_io.open_header, data, limits))
        cost = self.budget.check(header)  # 413 when the image alone could never fit
        prepare = getattr(self.engine.predictor, "prepare", None) if prepare else None

        def decode_and_prepare():  # decode (JPEG at a reduced scale), resize, hash
            return prepare(header, limits) if prepare is not None else image_io.decode(header.data, limits)

        if small_file and header.width * header.height <= settings.inline_decode_pixels:
            # a small image: one at a time (the event loop's), so it needs no share of the budget and
            # never waits behind huge ones
            return decode_and_prepare()
        return await self._in_thread(decode_and_prepare, cost)

    async def _in_thread(self, decode_and_prepare, cost: int):
        await self.budget.acquire(cost)  # waits while other requests' images hold the budget
        loop = asyncio.get_running_loop()

        def in_thread():
            try:
                return decode_and_prepare()
            finally:  # the full-size pixels are garbage now: give their memory back to the OS
                if cost >= image_io.TRIM_AFTER_BYTES:
                    image_io.release_memory()

        def give_back(_):  # when the decode ends, not when the request stops waiting for it
            with contextlib.suppress(RuntimeError):  # a closed loop: the worker is shutting down
                loop.call_soon_threadsafe(self.budget.release, cost)

        try:
            fut = self.pool.submit(in_thread)
        except RuntimeError:  # the pool is shut down
            self.budget.release(cost)
            raise
        fut.add_done_callback(give_back)
        return await asyncio.wrap_future(fut)
