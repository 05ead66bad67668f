"""Process-wide state of one backend: settings, the predictor (loaded once), the image fetcher, the
key-value store, the training queue and counters. The model class gets it as a class attribute."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from pixelllm_plugins.inference.protocol import PredictorProtocol
from pixelllm_plugins.memory import ThreadDecodeBudget

from .base import KeyValueStore
from .images import ImageFetcher
from .ls_client import LabelStudioClient
from .settings import Settings
from .training import Trainer, TrainingManager

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, *, predictor: PredictorProtocol | None = None,
                 predictor_factory: Callable[[], PredictorProtocol] | None = None, trainer: Trainer | None = None):
        self.settings = settings
        self.store = KeyValueStore(settings.model_dir)
        self.fetcher = ImageFetcher(settings)
        self.decode_budget = ThreadDecodeBudget(settings.decode_budget_bytes, "PIXELLLM_LS_DECODE_BUDGET_BYTES")
        self._predictor = predictor
        self._factory = predictor_factory
        self._predictor_lock = threading.Lock()
        self._loaded_adapters: set[str] = set()
        self.started_at = time.time()
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.training = TrainingManager(
            settings.model_dir, trainer=trainer, base_model=settings.model, steps=settings.train_steps,
            min_annotations=settings.train_min_annotations, image_loader=self.fetcher.load,
            client_factory=self.ls_client, validate_adapter=self.load_adapter,
            gate=None if settings.train_gate else False, replay=settings.train_replay)

    # ---- predictor -----------------------------------------------------------------------------------
    @property
    def predictor_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self) -> PredictorProtocol:
        if self._predictor is None:
            with self._predictor_lock:
                if self._predictor is None:
                    started = time.monotonic()
                    if self._factory is not None:
                        self._predictor = self._factory()
                    else:
                        from pixelllm_plugins.predictors import get_predictor

                        self._predictor = get_predictor(self.settings.model, device=self.settings.device)
                    # no worker call here: a RemotePredictor's model_version asks the worker's /ready, and a
                    # worker still loading (or not up yet) must not make the backend's startup fail
                    p = self._predictor
                    log.info("predictor %s ready in %.1f s", getattr(p, "base_version", None) or repr(p),
                             time.monotonic() - started)
        return self._predictor

    @property
    def base_version(self) -> str:
        p = self.predictor
        return str(getattr(p, "base_version", None) or p.model_version)

    def health_fields(self) -> dict:
        """What ``/health`` reports about the model, without waiting on a worker that is down.

        In-process: the loaded model's version. Remote: the worker's version once known, and whether
        its ``/health`` answers now (quick probes, no retries).
        """
        p = self._predictor
        if p is None:
            return {"model_loaded": False}
        probe = getattr(p, "probe_model_version", None)
        if probe is None:  # in-process predictor
            return {"model_loaded": True, "model_version": self.base_version}
        out: dict = {"model_loaded": True, "worker_reachable": bool(p.health())}
        version = probe() if out["worker_reachable"] else None
        if version:
            out["model_version"] = version
        return out

    def adapter_for(self, project_id: str | None) -> str | None:
        """The adapter name to pass to the predictor for this project (loading it once if in-process)."""
        found = self.training.adapter(project_id)
        if found is None:
            return None
        self.load_adapter(*found)
        return found[0]

    def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter into an in-process predictor once (a remote worker finds it by name in
        ``PIXELLLM_WORKER_ADAPTER_DIR``, i.e. ``MODEL_DIR/adapters``)."""
        load = getattr(self.predictor, "load_adapter", None)
        if load is None or name in self._loaded_adapters:
            return
        with self._predictor_lock:
            if name not in self._loaded_adapters:
                load(path, name)
                self._loaded_adapters.add(name)

    def version_for(self, project_id: str | None) -> str:
        """``<base>`` or ``<base>+ls-p<id>-ft<N>`` once the project has a fine-tuned adapter."""
        found = self.training.adapter(project_id)
        return f"{self.base_version}+{found[0]}" if found else self.base_version

    # ---- Label Studio API ----------------------------------------------------------------------------
    def ls_client(self) -> LabelStudioClient | None:
        s = self.settings
        if not (s.label_studio_url and s.label_studio_api_key):
            return None
        return LabelStudioClient(s.label_studio_url, s.label_studio_api_key)

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n

    def close(self) -> None:
        self.training.close()
        self.fetcher.close()
        self.store.close()
