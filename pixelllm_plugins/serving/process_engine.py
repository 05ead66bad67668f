"""The model in its own process: HTTP and image decoding stay in the worker's process, the
``DynamicBatcher`` and the model run in a child, and a pipe joins the two.

Why: in one process the event loop (HTTP, JSON, decoding) and the inference thread share one GIL, and a
small model's forward pass is hundreds of short torch calls that each take the GIL back. Under load on a
2-core CPU, a ``tiny`` batch of 8 took 32 ms inside the worker against 15 ms on its own. vLLM splits its
API server from its engine core for the same reason.

The pipe links these two processes only and carries pickles of this package's own objects (jobs, prepared
images, results, errors); no file or request body is ever unpickled. The child exits when the pipe
closes, so killing the worker also ends its model process. With several fronts (``fronts.py``) one model
process serves them all over an authenticated Unix socket, with the same messages (``serve_link``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client

from ..errors import PixelLLMError
from .batcher import DynamicBatcher, Job, ShuttingDown, make_factory

log = logging.getLogger(__name__)

Message = tuple  # (kind, *fields); kinds are listed in ProcessEngine._read and _child_loop


class ModelProcessError(PixelLLMError):
    """The model process exited, so the request could not be answered."""


class FrontPreparer:
    """Resizes and hashes images in the worker's process for the child's model: it needs only the
    model's vision config, not its weights."""

    def __init__(self, vision):
        self.vision = vision

    def prepare(self, image, limits=None):
        from ..inference.predictor import prepare_input

        return prepare_input(image, self.vision, limits)


class ProcessEngine:
    """The engine seam of ``create_app`` (as ``DynamicBatcher``), with the batcher and model in a child.

    ``model``: checkpoint folder or preset (None: the embedded model); or ``factory``:
    ``"module:callable"`` returning a predictor, imported in the child. The other arguments are the
    ``DynamicBatcher``'s.
    """

    def __init__(self, model: str | None = None, *, factory: str | None = None, device: str | None = None,
                 mask_engine: str | None = None, max_batch_size: int = 8, max_wait_ms: float = 5.0, adapter_roots: list | None = None,
                 max_adapters: int = 4, metrics=None, torch_threads: int | None = None, warmup: str = "auto",
                 log_level: int | str = logging.WARNING, connect: tuple[str, bytes] | None = None):
        self.spec = engine_spec(model, factory=factory, device=device, mask_engine=mask_engine,
                                max_batch_size=max_batch_size,
                                max_wait_ms=max_wait_ms, adapter_roots=adapter_roots, max_adapters=max_adapters,
                                torch_threads=torch_threads, warmup=warmup, log_level=log_level)
        # (socket path, key): join a model process that serves several fronts (``fronts.py``) instead of
        # starting one; the model arguments above are then the model process's business
        self.connect = connect
        self.metrics = metrics
        self.predictor: FrontPreparer | None = None  # what create_app's image loading asks for ``prepare``
        self.error: str | None = None
        self.model_version = ""
        self._info: dict = {}
        self._ready = threading.Event()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one writer on the pipe at a time; guards _futures
        self._conn = None
        self._proc = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._incoming = 0  # requests admitted and still preparing their image (event-loop thread only)

    # ---- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def start(self) -> None:
        if self._proc is not None or self._reader is not None:
            return
        if self.connect is not None:
            self._reader = threading.Thread(target=self._connect_and_read, name="pixelllm-model-reader",
                                            daemon=True)
            self._reader.start()
            return
        ctx = multiprocessing.get_context("spawn")  # no forked copies of the event loop's threads and locks
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=child_main, args=(child_end, self.spec), name="pixelllm-model",
                                 daemon=True)
        self._proc.start()
        child_end.close()
        self._reader = threading.Thread(target=self._read, name="pixelllm-model-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the child fail its queued jobs with ``ShuttingDown`` and exit; kill it if it does not."""
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))  # a shared model process closes only this front's link
        if self.connect is not None and self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.warning("model process did not stop in %.0f s; killing it", timeout)
                self._proc.kill()
                self._proc.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._fail_all(ShuttingDown("the worker is shutting down; retry on another worker"))

    # ---- what create_app reads ---------------------------------------------------------------------
    def info(self) -> dict:
        pid = self._proc.pid if self._proc else self._info.get("model_pid")
        return {**self._info, "engine": "process", "model_pid": pid, "front_pid": os.getpid()}

    def queue_depth(self) -> int:
        """Jobs sent to the model process and not answered yet."""
        return len(self._futures)

    # ---- submitting --------------------------------------------------------------------------------
    def expect(self) -> None:
        """A request is preparing its image. Counted here and sent along with the next job (one message
        per request, not three); the child's batcher waits for them while a batch forms."""
        self._incoming += 1

    def unexpect(self) -> None:
        self._incoming -= 1

    def submit_threadsafe(self, job: Job, announced: bool = False) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            raise ShuttingDown("the worker is shutting down; retry on another worker")
        if self.error:
            raise ModelProcessError(self.error)
        if announced:
            self._incoming -= 1
        job_id = next(self._ids)
        data = pickle.dumps(("submit", job_id, job, max(self._incoming, 0)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._lock:
                self._futures[job_id] = fut
                self._conn.send_bytes(data)
        except (OSError, ValueError):
            self._futures.pop(job_id, None)
            raise ModelProcessError("the model process is gone; restart the worker") from None
        fut.add_done_callback(lambda f: f.cancelled() and self._cancel(job_id))
        return fut

    async def submit(self, job: Job, announced: bool = False):
        """Await the job's result; cancelling the await drops a job the child has not started yet."""
        return await asyncio.wrap_future(self.submit_threadsafe(job, announced))

    def _cancel(self, job_id: int) -> None:
        with self._lock:
            self._futures.pop(job_id, None)
        with contextlib.suppress(OSError, ValueError):
            self._send(("cancel", job_id))

    def _send(self, message: Message) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.send(message)

    # ---- answers from the child --------------------------------------------------------------------
    def _connect_and_read(self, timeout_s: float = 120.0) -> None:
        """Connect to a shared model process (it may still be starting), then read its answers."""
        address, authkey = self.connect
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = Client(address, family="AF_UNIX", authkey=authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self._stopping:
                    return
                if time.monotonic() > deadline:
                    self.error = f"could not reach the model process at {address} in {timeout_s:g} s"
                    log.error("%s", self.error)
                    return
                time.sleep(0.05)  # the model process creates its socket within a second or two
        with self._lock:
            self._conn = conn
        self._read()

    def _read(self) -> None:
        try:
            while True:
                kind, *fields = self._conn.recv()
                if kind == "done":
                    job_id, ok, value = fields
                    with self._lock:
                        fut = self._futures.pop(job_id, None)
                    if fut is not None and fut.set_running_or_notify_cancel():
                        (fut.set_result if ok else fut.set_exception)(value)
                elif kind == "batch" and self.metrics is not None:
                    self.metrics.observe_batch(*fields)
                elif kind == "ready":
                    self.model_version, self._info, vision = fields
                    self.predictor = FrontPreparer(vision) if vision is not None else None
                    self._ready.set()
                elif kind == "info":
                    self._info = fields[0]
                elif kind == "error":
                    self.error = fields[0]
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be read: fail loudly, not hang requests
            log.exception("lost the link to the model process")
            self.error = "lost the link to the model process; see the worker's log and restart the worker"
            if self._proc is not None:
                self._proc.kill()
        self._ready.clear()
        if not self._stopping:
            code = "unknown"
            if self._proc is not None:
                self._proc.join(5)
                code = self._proc.exitcode
            self.error = self.error or (f"the model process exited (code {code}); "
                                        "see the worker's log and restart the worker")
            log.error("%s", self.error)
            self._fail_all(ModelProcessError(self.error))

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            pending, self._futures = list(self._futures.values()), {}
        for fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)


# ---- the child ----------------------------------------------------------------------------------------

def engine_spec(model: str | None = None, *, factory: str | None = None, device: str | None = None,
                mask_engine: str | None = None, max_batch_size: int = 8, max_wait_ms: float = 5.0, adapter_roots: list | None = None,
                max_adapters: int = 4, torch_threads: int | None = None, warmup: str = "auto",
                log_level: int | str = logging.WARNING) -> dict:
    """What a model process needs to build its predictor and batcher (plain, picklable values)."""
    return {"model": None if model is None else str(model), "factory": factory, "device": device,
            "mask_engine": mask_engine, "log_level": log_level,
            "batcher": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                        "adapter_roots": [str(r) for r in adapter_roots or []],
                        "max_adapters": max_adapters, "torch_threads": torch_threads, "warmup": warmup}}


class Links:
    """The fronts connected to a model process: one for ``ProcessEngine``'s own child, N for ``fronts.py``.

    Each front reports how many of its requests are still preparing their image; the batcher waits for
    the sum of them while a batch forms."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sends: dict[int, Callable[[Message], None]] = {}
        self._incoming: dict[int, int] = {}
        self._ids = itertools.count()

    def add(self, send: Callable[[Message], None]) -> int:
        with self._lock:
            link = next(self._ids)
            self._sends[link], self._incoming[link] = send, 0
            return link

    def remove(self, link: int) -> None:
        with self._lock:
            self._sends.pop(link, None)
            self._incoming.pop(link, None)

    def incoming(self, link: int, count: int) -> int:
        """Record one front's count; the total over all fronts."""
        with self._lock:
            self._incoming[link] = max(count, 0)
            return sum(self._incoming.values())

    def send_one(self, message: Message) -> None:
        """To one front (batch observations: the fronts share their Prometheus metrics)."""
        with self._lock:
            sends = list(self._sends.values())[:1]
        for send in sends:
            with contextlib.suppress(OSError, ValueError):
                send(message)

    def send_all(self, message: Message) -> None:
        with self._lock:
            sends = list(self._sends.values())
        for send in sends:
            with contextlib.suppress(OSError, ValueError):
                send(message)


class _ReportBatches:
    """The child batcher's ``metrics``: batch sizes and times go to the front's Prometheus metrics."""

    class _NoGauge:
        def set(self, value) -> None:
            pass

    def __init__(self, send):
        self.send = send
        self.queue_depth = self._NoGauge()

    def observe_batch(self, task: str, size: int, seconds: float) -> None:
        self.send(("batch", task, size, seconds))


def _picklable(exc: BaseException) -> BaseException:
    """The exception itself when it survives a pickle round trip, else one of the same family that does."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - custom constructors, unpicklable attributes
        family = PixelLLMError if isinstance(exc, PixelLLMError) else RuntimeError
        return family(f"{type(exc).__name__}: {exc}")


def start_batcher(spec: dict, links: Links) -> DynamicBatcher:
    """Configure logging and start loading the model of a model process (``wait_settled`` to know)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front stops us
    logging.basicConfig(level=spec["log_level"], format="%(levelname)s %(name)s [model]: %(message)s")
    factory = make_factory(spec["model"], spec["factory"], spec["device"],  # imported without the HTTP app
                           spec.get("mask_engine"))
    batcher = DynamicBatcher(factory, metrics=_ReportBatches(links.send_one), **spec["batcher"])
    batcher.start()
    return batcher


def serve_link(conn, batcher: DynamicBatcher, links: Links, on_end: Callable[[], None] | None = None) -> None:
    """Serve one front over ``conn`` until it stops or goes away: ready (or the load error), then jobs.
    ``on_end`` runs before the link closes (a front's own model process stops its batcher there, so the
    call in progress is still answered)."""
    send_lock = threading.Lock()

    def send(message: Message) -> None:
        with send_lock:
            conn.send(message)

    try:
        batcher.wait_settled()
        if batcher.error:
            send(("error", batcher.error))
            return
        link = links.add(send)
        try:
            config = getattr(batcher.predictor, "config", None)
            send(("ready", batcher.model_version, {**batcher.info(), "model_pid": os.getpid()},
                  getattr(config, "vision", None)))
            _child_loop(conn, batcher, send, links, link)
            if on_end is not None:
                on_end()
        finally:
            links.remove(link)
    except (OSError, ValueError):  # the front went away
        pass
    finally:
        conn.close()


def child_main(conn, spec: dict) -> None:
    """Entry point of the model process of one front."""
    links = Links()
    batcher = start_batcher(spec, links)
    try:
        serve_link(conn, batcher, links, on_end=batcher.stop)
    finally:
        batcher.stop()


def _child_loop(conn, batcher: DynamicBatcher, send, links: Links, link: int) -> None:
    futures: dict[int, concurrent.futures.Future] = {}
    adapters: list[str] = []

    def answer(job_id: int, fut: concurrent.futures.Future) -> None:
        futures.pop(job_id, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        try:
            send(("done", job_id, exc is None, fut.result() if exc is None else _picklable(exc)))
        except (OSError, ValueError):  # the front is gone; the receive loop ends too
            return
        except Exception as err:  # noqa: BLE001 - an unpicklable result must still answer the request
            send(("done", job_id, False, RuntimeError(f"result could not be sent back: {err}")))
        loaded = batcher.adapters.loaded if batcher.adapters else []
        if loaded != adapters:
            adapters[:] = loaded
            links.send_all(("info", {**batcher.info(), "model_pid": os.getpid()}))

    while True:
        try:
            kind, *fields = conn.recv()
        except (EOFError, OSError):  # the worker's process exited
            return
        if kind == "submit":
            job_id, job, incoming = fields
            try:
                fut = batcher.submit_threadsafe(job, incoming=links.incoming(link, incoming))
            except ShuttingDown as exc:
                send(("done", job_id, False, exc))
                continue
            futures[job_id] = fut
            fut.add_done_callback(lambda f, i=job_id: answer(i, f))
        elif kind == "cancel":
            fut = futures.get(fields[0])
            if fut is not None:
                fut.cancel()
        elif kind == "stop":
            return


__all__ = ["ProcessEngine", "ModelProcessError", "FrontPreparer", "Links", "child_main", "engine_spec",
           "serve_link", "start_batcher"]
