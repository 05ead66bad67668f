"""A predictor whose model work all runs on one thread of its own.

torch's CPU kernels run on GNU OpenMP thread pools, one per thread that calls them, and idle pool threads
stop spinning and sleep as soon as the process holds more pool threads than cores; a kernel then waits for
its helpers to wake. A server that answers each request on whichever thread its framework picks ends up
with a pool per thread: measured on a 2-core Xeon (benchmarks/bench_threads.py), `refer` on one image took
54-67 ms on such a thread and 31-34 ms from any thread when one thread did all the model work.
:class:`OnModelThread` loads the predictor on its own thread and runs every call there (calls were one at a
time anyway: a Predictor holds a lock around its model). Work that needs no model (``prepare``: decoding
and resizing with numpy) stays on the caller's thread, so request threads still prepare images in parallel.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_CALLER_SIDE = frozenset({"prepare"})  # methods that touch no model


class OnModelThread:
    """Wraps the predictor ``make()`` builds (on the new thread): every method call runs on that thread,
    attributes read through. ``close()`` stops the thread (the predictor is unusable afterwards)."""

    def __init__(self, make: Callable[[], Any], name: str = "pixelllm-model"):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._thread: threading.Thread | None = None
        self._predictor = self._executor.submit(self._start, make).result()

    def _start(self, make: Callable[[], Any]) -> Any:
        self._thread = threading.current_thread()
        return make()

    @property
    def wrapped(self) -> Any:
        """The predictor itself (for code that must run on the model thread already)."""
        return self._predictor

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` on the model thread (directly when already there)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._predictor, name)
        if not inspect.ismethod(value) or name in _CALLER_SIDE or name.startswith("__"):
            return value  # attributes (the torch model and tokenizer too) read through

        @functools.wraps(value)
        def on_model_thread(*args, **kwargs):
            return self.run(value, *args, **kwargs)

        return on_model_thread

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"OnModelThread({self._predictor!r})"
