"""Per-project LoRA adapters: loaded on demand by name, at most ``max_loaded`` kept (least recently used out).

A request names an adapter (``"adapter": "project-42"``); the worker looks for a peft folder
``<root>/<name>/adapter_config.json`` under its adapter roots (``PIXELLLM_WORKER_ADAPTER_DIR`` and the
checkpoint's own ``adapters/``). Names are plain identifiers, never paths, so a request cannot make the
worker read an arbitrary folder. All calls happen on the inference thread (no locking needed).

Needs ``predictor.load_adapter(path, name)``; eviction needs ``predictor.unload_adapter(name)`` (without it
adapters stay loaded once loaded). A predictor without ``load_adapter`` gets adapter names passed through.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

from ..errors import PixelLLMError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class AdapterNotFoundError(PixelLLMError):
    """The request named an adapter this worker does not have."""


class AdapterLRU:
    def __init__(self, predictor, roots: list[str | Path] | None = None, max_loaded: int = 4):
        self.predictor = predictor
        self.roots = [Path(r) for r in (roots or []) if r]
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Path] = OrderedDict()
        info = predictor.info() if callable(getattr(predictor, "info", None)) else {}
        self.pinned = set(info.get("adapters", []) or [])  # loaded before the worker started: never evicted
        self.loads = 0
        self.evictions = 0
        self._warned = False

    @property
    def loaded(self) -> list[str]:
        return sorted(self.pinned | set(self._loaded))

    def find(self, name: str) -> Path:
        if not NAME_RE.match(name) or ".." in name:
            raise AdapterNotFoundError(f"adapter name {name!r} is not valid: use letters, digits, '_', '-', '.'")
        for root in self.roots:
            path = root / name
            if (path / "adapter_config.json").is_file():
                return path
        where = ", ".join(str(r) for r in self.roots) or "no adapter folder configured"
        raise AdapterNotFoundError(f"unknown adapter {name!r}; the worker looks in {where} "
                                   "(set PIXELLLM_WORKER_ADAPTER_DIR to a folder of peft adapters)")

    def activate(self, name: str | None) -> None:
        """Make sure ``name`` is loaded (loading and evicting as needed); None means the base model."""
        load = getattr(self.predictor, "load_adapter", None)
        if name is None or name in self.pinned or load is None:  # no load_adapter: the predictor resolves names
            return
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        path = self.find(name)
        unload = getattr(self.predictor, "unload_adapter", None)
        if unload is None:  # cannot free memory: load once and keep it
            load(path, name)
            self.pinned.add(name)
            self.loads += 1
            if len(self.pinned) > self.max_loaded and not self._warned:
                log.warning("the predictor has no unload_adapter(): %d adapters stay loaded (limit %d)",
                            len(self.pinned), self.max_loaded)
                self._warned = True
            return
        while len(self._loaded) >= self.max_loaded:
            old, _ = self._loaded.popitem(last=False)
            unload(old)
            self.evictions += 1
            log.info("adapter %s unloaded (least recently used)", old)
        load(path, name)
        self._loaded[name] = path
        self.loads += 1
        log.info("adapter %s loaded from %s (%d loaded)", name, path, len(self._loaded))
