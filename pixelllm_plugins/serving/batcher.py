"""Dynamic batching: concurrent requests of the same task, adapter and options become one Predictor call.

One model per process, driven by one inference thread. HTTP handlers (asyncio) ``submit`` a ``Job`` and
await its future; the thread takes the oldest waiting job, gathers the other waiting jobs with the same
key (up to ``max_batch_size`` images), waits at most ``max_wait_ms`` after the oldest job arrived for
more, then calls the Predictor once with the combined lists and hands each job its own result. If the
combined call fails, each job is retried alone (``inference.tasks.run_isolated``) so one bad request
cannot fail its neighbours. A job's task is a registry name (``inference.tasks.TASKS``), as is its route.

``run_jobs`` (grouped execution with that fallback) is shared with the Ray Serve deployment, which
batches with ``@serve.batch`` instead of this thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PixelLLMError
from ..inference.tasks import run_isolated, task_spec
from .adapters import AdapterLRU

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One image's worth of work. ``task``: a registry name (``inference.tasks.TASKS``); ``arg``: texts
    (refer), boxes (caption_regions) or a mapping of prompts (segment); ``options``: keyword arguments of the Predictor call as sorted
    (name, value) pairs (they must match to share a batch)."""

    task: str
    image: Any
    arg: Any = None
    adapter: str | None = None
    options: tuple = ()
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return (self.task, self.adapter, self.options)


def predictor_factory(model: Any = None, device: str | None = None,
                      mask_engine: str | None = None) -> Callable[[], Any]:
    """A zero-argument callable that builds the predictor: from a factory, an instance, or a model name
    (with ``mask_engine``, ``"sam:PATH"``, for ``segment``; factories and instances bring their own)."""
    if model is not None and not isinstance(model, (str, Path)):
        if isinstance(model, type) or not hasattr(model, "refer"):  # a class or a factory function
            return model
        return lambda: model  # a predictor instance

    def make():
        from ..inference.predictor import Predictor

        return Predictor(model, device=device, **({"mask_engine": mask_engine} if mask_engine else {}))

    return make


def load_factory(spec: str) -> Callable[[], Any]:
    """``"package.module:callable"`` -> the callable (for custom predictors and tests)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"factory {spec!r} must look like 'package.module:callable'")
    return getattr(importlib.import_module(module), attr)


def make_factory(model: Any = None, factory: str | None = None, device: str | None = None,
                 mask_engine: str | None = None) -> Callable[[], Any]:
    """The predictor builder of a worker: ``factory`` (``"module:callable"``) when given, else ``model``."""
    return predictor_factory(load_factory(factory) if factory else model, device, mask_engine)


def run_jobs(predictor, jobs: list[Job], adapters: AdapterLRU | None = None,
             observe: Callable[[str, int, float], None] | None = None) -> list:
    """Run jobs that share one key as one call; per job its result or the exception it raised."""
    if not jobs:
        return []
    task, adapter, options = jobs[0].key

    def call(group: list[Job]) -> list:
        spec = task_spec(task)  # an unknown task (the app builds known ones only) fails its jobs
        if adapters is not None:
            adapters.activate(adapter)
        start = time.perf_counter()
        results = spec.call(predictor, [j.image for j in group],
                            [j.arg for j in group] if spec.item_arg else None, adapter=adapter, **dict(options))
        if observe is not None:
            observe(task, len(group), time.perf_counter() - start)
        return results

    def retrying(n: int, exc: BaseException) -> None:
        log.info("%s batch of %d failed (%s); running its jobs one by one", task, n, exc)

    outcomes = run_isolated(call, jobs, on_retry=retrying)
    for outcome in outcomes:
        if isinstance(outcome, Exception) and not isinstance(outcome, PixelLLMError):
            log.error("%s failed", task, exc_info=outcome)
    return outcomes


def group_jobs(jobs: list[Job]) -> list[list[int]]:
    """Indices of jobs grouped by key, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.key, []).append(i)
    return list(groups.values())


def set_torch_threads(n: int | None) -> None:
    """Limit torch's intra-op CPU threads (process-wide); None leaves torch's default."""
    if n:
        import torch

        torch.set_num_threads(n)


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes a warm-up runs: the powers of two below ``max_batch_size``, then the maximum itself."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size]


def wants_warmup(mode: str, predictor) -> bool:
    """``"on"``/``"off"``, or ``"auto"``: only for a predictor on a CUDA device (kernels load lazily there)."""
    if mode != "auto":
        return mode == "on"
    device = getattr(predictor, "device", None)
    return str(getattr(device, "type", device)).split(":")[0] == "cuda"


def warm_up(predictor, max_batch_size: int) -> list[int]:
    """Run ``refer`` once per warm-up batch size on distinct synthetic images (so the embedding cache does
    not shrink the batch), then drop them from the cache. Failures are logged: a cold worker still serves."""
    from PIL import Image

    done = []
    try:
        for n in warmup_sizes(max_batch_size):
            images = [Image.new("RGB", (256, 192), (i * 37 % 256, i * 91 % 256, 128)) for i in range(n)]
            predictor.refer(images, [["the object"]] * n)
            done.append(n)
    except Exception:  # noqa: BLE001
        log.warning("warm-up stopped after batch sizes %s", done, exc_info=True)
    clear = getattr(predictor, "clear_cache", None)
    if callable(clear):
        clear()
    log.info("warmed up batch sizes %s", done)
    return done


class ShuttingDown(PixelLLMError):
    """The worker is stopping; the request was not run."""


class EngineInfo:
    """``model_version`` and ``info()`` of an engine holding ``self.predictor`` and ``self.adapters``
    (shared by the thread batcher and the Ray Serve deployment)."""

    predictor: Any
    adapters: AdapterLRU | None

    @property
    def model_version(self) -> str:
        p = self.predictor
        return str(getattr(p, "base_version", None) or getattr(p, "model_version", "")) if p else ""

    def info(self) -> dict:
        p = self.predictor
        info = p.info() if p is not None and callable(getattr(p, "info", None)) else {}
        return {"model_version": self.model_version, **info,
                "adapters_loaded": self.adapters.loaded if self.adapters else []}


class DynamicBatcher(EngineInfo):
    """The single-process engine: a bounded wait list and one inference thread that owns the model."""

    def __init__(self, factory: Callable[[], Any], *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 adapter_roots: list | None = None, max_adapters: int = 4, metrics=None,
                 torch_threads: int | None = None, warmup: str = "auto"):
        self.factory = factory
        self.torch_threads = torch_threads
        self.warmup = warmup
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.adapter_roots = adapter_roots or []
        self.max_adapters = max_adapters
        self.metrics = metrics
        self.predictor = None
        self.adapters: AdapterLRU | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._settled = threading.Event()  # ready, or the model failed to load
        self._cond = threading.Condition()
        self._queue: deque[tuple[Job, concurrent.futures.Future]] = deque()
        self._stop = False
        self._incoming = 0  # admitted requests still preparing their job (see expect)
        self._thread: threading.Thread | None = None
        self.batches = 0  # model calls made (for tests and /ready)

    # ---- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()


    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="pixelllm-inference", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait until the model is ready or failed to load (``error`` says which)."""
        return self._settled.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ShuttingDown("the worker is shutting down; retry on another worker"))
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- submitting --------------------------------------------------------------------------------
    def expect(self) -> None:
        """A request was admitted and will submit a job soon (its image is being decoded): a waiting
        batch may wait for it. Balanced by ``submit(..., announced=True)`` or ``unexpect()``."""
        with self._cond:
            self._incoming += 1

    def unexpect(self) -> None:
        with self._cond:
            self._incoming -= 1
            self._cond.notify_all()

    def submit_threadsafe(self, job: Job, announced: bool = False,
                          incoming: int | None = None) -> concurrent.futures.Future:
        """Queue a job. ``incoming``: how many more requests are being prepared right now, replacing the
        count kept by ``expect``/``unexpect`` (the process engine sends it along with each job)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if incoming is not None:
                self._incoming = incoming
            elif announced:
                self._incoming -= 1
            if self._stop:
                raise ShuttingDown("the worker is shutting down; retry on another worker")
            self._queue.append((job, fut))
            self._cond.notify_all()
        self._gauge()
        return fut

    async def submit(self, job: Job, announced: bool = False):
        """Await the job's result; cancelling the await drops a job that has not started yet."""
        return await asyncio.wrap_future(self.submit_threadsafe(job, announced))

    # ---- the inference thread ----------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _main(self) -> None:
        try:
            set_torch_threads(self.torch_threads)
            self.predictor = self.factory()
            self.adapters = AdapterLRU(self.predictor, self.adapter_roots, self.max_adapters)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and to every request
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            self._settled.set()
            return
        if wants_warmup(self.warmup, self.predictor):
            warm_up(self.predictor, self.max_batch_size)
        self._ready.set()
        self._settled.set()
        log.info("model %s ready (max batch %d, max wait %.1f ms)", self.model_version, self.max_batch_size,
                 self.max_wait_s * 1000)
        observe = self.metrics.observe_batch if self.metrics is not None else None
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._gauge()
            live = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            outcomes = run_jobs(self.predictor, [job for job, _ in live], self.adapters, observe)
            for (_, fut), outcome in zip(live, outcomes):
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)

    def _next_batch(self) -> list[tuple[Job, concurrent.futures.Future]] | None:
        with self._cond:
            while True:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return None
                # drop jobs whose requests gave up while waiting
                self._queue = deque(item for item in self._queue if not item[1].cancelled())
                if not self._queue:
                    continue
                first = self._queue[0][0]
                deadline = first.enqueued + self.max_wait_s
                while True:
                    same = [item for item in self._queue if item[0].key == first.key][:self.max_batch_size]
                    remaining = deadline - time.monotonic()
                    # wait for company only while more requests are on their way: a lone request
                    # (interactive use) goes at once, under load the batch fills while the model runs
                    if len(same) >= self.max_batch_size or remaining <= 0 or self._stop or self._incoming <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stop:
                    return None
                taken = {id(item[1]) for item in same}
                self._queue = deque(item for item in self._queue if id(item[1]) not in taken)
                return same
