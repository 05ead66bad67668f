"""The worker on Ray Serve: the same FastAPI app (``create_app``) in every replica, batched by ``@serve.batch``.

One replica per GPU (``num_gpus=1``; on a machine without GPUs, ``num_cpus`` per replica instead). Each
replica loads the model once, on its single inference thread, before it takes traffic; ``@serve.batch``
collects concurrent requests (up to ``max_batch_size``, waiting at most ``max_wait_ms``) and the batch is
split by (task, adapter, options) into Predictor calls exactly as the single-process batcher does.
Everything HTTP (auth, limits, 503 backpressure per replica, timeouts, errors) is the shared app's.

Start it with ``pixelllm serve --ray --replicas N`` (``run``), from Python with ``build_app``, or from a
Serve config file with the application builder ``pixelllm_plugins.serving.ray_app:app_builder``.
Needs the ``ray`` extra (``pip install 'pixelllm-plugins[ray]'``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import asdict
from typing import Any

from ray import serve

from .app import create_app
from .batcher import (
    EngineInfo,
    Job,
    group_jobs,
    make_factory,
    run_jobs,
    set_torch_threads,
    wants_warmup,
    warm_up,
)
from .engines import adapter_roots
from .metrics import WorkerMetrics
from .settings import WorkerSettings

log = logging.getLogger("pixelllm.worker.ray")

APP_NAME = "pixelllm"


@serve.deployment(name="PixelLLMWorker", max_ongoing_requests=256, health_check_period_s=10)
@serve.ingress()
class PixelLLMDeployment(EngineInfo):
    """A Serve replica: one model, one inference thread, the shared FastAPI app as its ingress."""

    async def __init__(self, model: str | None = None, settings: dict | None = None,
                       factory: str | None = None):
        self.settings = WorkerSettings(**(settings or {}))
        self.metrics = WorkerMetrics()
        self.error: str | None = None
        self.predictor = None
        self.adapters = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pixelllm-inference")
        self._waiting = 0
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000.0)
        make = make_factory(model, factory, self.settings.device, self.settings.mask_engine)
        roots = adapter_roots(model, self.settings)
        loop = asyncio.get_running_loop()
        # load before taking traffic: Serve routes to a replica only once its constructor has returned
        await loop.run_in_executor(self._executor, self._load, make, roots)

    def _load(self, make, roots) -> None:
        from .adapters import AdapterLRU

        try:
            set_torch_threads(self.settings.torch_threads)
            self.predictor = make()
            self.adapters = AdapterLRU(self.predictor, roots, self.settings.max_adapters)
            if wants_warmup(self.settings.warmup, self.predictor):
                warm_up(self.predictor, self.settings.max_batch_size)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and check_health
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")

    def __serve_build_asgi_app__(self):
        return create_app(settings=self.settings, engine=self, metrics=self.metrics)

    def check_health(self) -> None:
        if self.error:
            raise RuntimeError(f"model failed to load: {self.error}")

    # ---- the engine seam used by create_app ----------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def info(self) -> dict:
        from ray import get_runtime_context

        ctx = serve.get_replica_context()
        return {**super().info(), "engine": "ray-serve", "replica": ctx.replica_tag if ctx else None,
                "node": get_runtime_context().get_node_id()}

    def start(self) -> None:  # the model was loaded by the constructor
        pass

    def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def queue_depth(self) -> int:
        return self._waiting

    async def submit(self, job: Job):
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        try:
            ok, value = await self._batched(job)
        finally:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
        if not ok:
            raise value
        return value

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, jobs: list[Job]) -> list[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        out: list[Any] = [None] * len(jobs)
        for idxs in group_jobs(jobs):
            group = [jobs[i] for i in idxs]
            results = await loop.run_in_executor(self._executor, run_jobs, self.predictor, group, self.adapters,
                                                 self.metrics.observe_batch)
            for i, r in zip(idxs, results):
                out[i] = (not isinstance(r, BaseException), r)
        return out


def _resources(num_gpus: float | None, num_cpus: float | None) -> dict:
    """One GPU per replica when the cluster has GPUs, else one CPU (both overridable)."""
    if num_gpus is None and num_cpus is None:
        import ray

        has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        return {"num_gpus": 1} if has_gpu else {"num_cpus": 1}
    out: dict = {}
    if num_gpus is not None:
        out["num_gpus"] = num_gpus
    if num_cpus is not None:
        out["num_cpus"] = num_cpus
    return out


def build_app(model: str | None = None, *, replicas: int = 1, settings: WorkerSettings | None = None,
              factory: str | None = None, num_gpus: float | None = None, num_cpus: float | None = None,
              autoscaling_config: dict | None = None):
    """A bound Serve application (pass to ``serve.run``). ``autoscaling_config`` replaces ``replicas``,
    e.g. ``{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}``."""
    settings = settings or WorkerSettings.from_env()
    options: dict[str, Any] = {"ray_actor_options": _resources(num_gpus, num_cpus),
                               "max_ongoing_requests": max(settings.max_queue * 2, settings.max_batch_size)}
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    return PixelLLMDeployment.options(**options).bind(model, asdict(settings), factory)


def app_builder(args: dict) -> Any:
    """Serve config file entry point (``import_path: pixelllm_plugins.serving.ray_app:app_builder``).

    ``args``: ``model``, ``replicas``, ``num_gpus``, ``num_cpus``, ``factory``, ``autoscaling_config`` and any
    ``WorkerSettings`` field; unset settings come from the ``PIXELLLM_*`` environment of the replica.
    """
    args = dict(args or {})
    keys = ("model", "replicas", "factory", "num_gpus", "num_cpus", "autoscaling_config")
    kwargs = {k: args.pop(k) for k in keys if k in args}
    return build_app(settings=WorkerSettings.from_env(**args), **kwargs)


def run(host: str = "127.0.0.1", port: int = 8000, model: str | None = None, *, replicas: int = 1,
        factory: str | None = None, num_gpus: float | None = None, num_cpus: float | None = None,
        autoscaling_config: dict | None = None, ray_address: str | None = None, blocking: bool = True,
        **opts) -> Any:
    """Deploy the worker on Ray Serve and serve HTTP on ``host:port`` (``pixelllm serve --ray``).

    Connects to the Ray cluster at ``ray_address`` / ``RAY_ADDRESS`` if given, else starts a local one.
    ``opts`` are ``WorkerSettings`` fields. With ``blocking`` it serves until interrupted; otherwise it
    returns the application's handle.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    settings = WorkerSettings.from_env(**opts)
    serve.start(http_options={"host": host, "port": port})
    app = build_app(model, replicas=replicas, settings=settings, factory=factory, num_gpus=num_gpus,
                    num_cpus=num_cpus, autoscaling_config=autoscaling_config)
    log.info("deploying %s replica(s) on Ray Serve at http://%s:%d", replicas, host, port)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
