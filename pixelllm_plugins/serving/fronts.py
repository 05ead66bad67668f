"""Several HTTP front processes sharing one model process: ``pixelllm serve --fronts N``.

One front (event loop, JSON, image decoding) runs on one GIL and tops out at a few hundred requests a
second, while a GPU runs far more images a second in batches. vLLM scales its API server out the same way.

This process (the supervisor) starts the model process, which listens on a Unix socket in a private
folder (mode 0700) and admits only clients that know a random key (``multiprocessing``'s HMAC
handshake). It then runs uvicorn with N worker processes on the one port. Each front's ``ProcessEngine``
connects to the model process, whose single ``DynamicBatcher`` batches the requests of all fronts
together. Prometheus metrics are aggregated over the fronts (prometheus_client's multiprocess mode), so
``/metrics`` on any front describes the whole worker. When the supervisor exits, the model process does too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from multiprocessing.connection import Listener

from .engines import batcher_options
from .process_engine import Links, ProcessEngine, engine_spec, serve_link, start_batcher
from .settings import WorkerSettings

log = logging.getLogger("pixelllm.worker")

FRONT_ENV = "PIXELLLM_WORKER_FRONT_CONFIG"  # how the supervisor tells each front where the model is
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def model_server_main(address: str, authkey: bytes, spec: dict, lifeline) -> None:
    """Entry point of the shared model process: accept fronts until the supervisor goes away."""
    links = Links()
    batcher = start_batcher(spec, links)
    listener = Listener(address, family="AF_UNIX", authkey=authkey)

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except multiprocessing.AuthenticationError:
                log.warning("refused a connection to the model process: wrong key")
                continue
            except OSError:  # the listener was closed: shutting down
                return
            threading.Thread(target=serve_link, args=(conn, batcher, links), name="pixelllm-front-link",
                             daemon=True).start()

    threading.Thread(target=accept, name="pixelllm-accept", daemon=True).start()
    try:
        lifeline.recv()  # nothing is ever sent: returns (EOFError) when the supervisor exits
    except (EOFError, OSError):
        pass
    finally:
        listener.close()
        batcher.stop()


def front_app():
    """The app of one front (uvicorn calls this in each worker process)."""
    from .app import create_app
    from .metrics import WorkerMetrics

    config = json.loads(os.environ[FRONT_ENV])
    settings = WorkerSettings.from_env(**config["settings"])  # the token comes from the environment
    metrics = WorkerMetrics(multiprocess=True)
    engine = ProcessEngine(connect=(config["address"], bytes.fromhex(config["authkey"])), metrics=metrics)
    return create_app(settings=settings, engine=engine, metrics=metrics)


def run_fronts(host: str, port: int, model: str | None, settings: WorkerSettings, *, factory: str | None = None,
               log_level: str = "info") -> None:
    """Serve ``settings.fronts`` HTTP processes on ``host:port`` over one model process."""
    import uvicorn

    folder = tempfile.mkdtemp(prefix="pixelllm-worker-")  # 0700: only this user reaches the socket
    address, authkey = os.path.join(folder, "model.sock"), os.urandom(32)
    metrics_dir = os.path.join(folder, "metrics")
    os.mkdir(metrics_dir)
    spec = engine_spec(model, factory=factory, device=settings.device, mask_engine=settings.mask_engine,
                       log_level=logging.getLogger().getEffectiveLevel(), **batcher_options(model, settings))
    ctx = multiprocessing.get_context("spawn")
    keep, lifeline = ctx.Pipe()
    server = ctx.Process(target=model_server_main, args=(address, authkey, spec, lifeline),
                         name="pixelllm-model", daemon=True)
    server.start()
    lifeline.close()
    public = {k: v for k, v in dataclasses.asdict(settings).items() if k != "token"}
    public["allowed_hosts"] = ",".join(settings.allowed_hosts)
    saved = {k: os.environ.get(k) for k in (FRONT_ENV, MULTIPROC_ENV, "PIXELLLM_WORKER_TOKEN")}
    os.environ[FRONT_ENV] = json.dumps({"address": address, "authkey": authkey.hex(), "settings": public})
    os.environ[MULTIPROC_ENV] = metrics_dir
    if settings.token is not None:
        os.environ["PIXELLLM_WORKER_TOKEN"] = settings.token
    log.info("serving %d fronts on http://%s:%d over model process %d", settings.fronts, host, port, server.pid)
    try:
        uvicorn.run("pixelllm_plugins.serving.fronts:front_app", factory=True, host=host, port=port,
                    workers=settings.fronts, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        keep.close()  # the model process sees EOF on its lifeline and stops
        server.join(15)
        if server.is_alive():
            server.kill()
            server.join(5)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["run_fronts", "front_app", "model_server_main", "FRONT_ENV"]
