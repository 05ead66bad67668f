"""The worker's engine seam: which engine runs the model (a child process or a thread) and its batching
arguments, shared by the app, the multi-front supervisor (``fronts.py``) and Ray Serve (``ray_app.py``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batcher import DynamicBatcher, make_factory
from .settings import WorkerSettings

if TYPE_CHECKING:
    from .metrics import WorkerMetrics


def adapter_roots(model: Any, settings: WorkerSettings) -> list[Path]:
    """Folders adapters are looked up in: ``settings.adapter_dir``, then the model folder's ``adapters``."""
    roots = [Path(settings.adapter_dir)] if settings.adapter_dir else []
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        roots.append(Path(model) / "adapters")
    return roots


def batcher_options(model: Any, settings: WorkerSettings) -> dict:
    """The ``DynamicBatcher`` arguments of a worker with these settings (whichever process runs it)."""
    return {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
            "adapter_roots": adapter_roots(model, settings), "max_adapters": settings.max_adapters,
            "torch_threads": settings.torch_threads, "warmup": settings.warmup}


def build_engine(model: Any, settings: WorkerSettings, metrics: WorkerMetrics | None = None, *,
                 factory: str | None = None):
    """The worker's engine: a ``ProcessEngine`` (model in a child process) when the model is named (folder,
    preset, None for the embedded one, or a ``"module:callable"`` factory) and ``settings.engine`` is
    ``"process"``; else a ``DynamicBatcher`` on a thread of this process (always for predictor instances)."""
    batching = {**batcher_options(model, settings), "metrics": metrics}
    named = factory is not None or model is None or isinstance(model, (str, Path))
    if settings.engine == "process" and named:
        from .process_engine import ProcessEngine

        return ProcessEngine(None if model is None else str(model), factory=factory, device=settings.device,
                             mask_engine=settings.mask_engine, log_level=logging.getLogger().getEffectiveLevel(),
                             **batching)
    return DynamicBatcher(make_factory(model, factory, settings.device, settings.mask_engine), **batching)
