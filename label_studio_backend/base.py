"""The upstream ``LabelStudioMLBase`` class shape, without the upstream package.

``label-studio-ml`` on PyPI is a 2023 release that does not import and pins Flask 1.1.2, and master is not
published, so this module re-creates the parts of master's API that backends are written against:

- ``__init__(project_id=None, label_config=None)`` calls ``use_label_config()`` then ``setup()``
  (a new instance per request, as upstream: keep ``setup()`` cheap, load models once per process);
- ``predict(tasks, context=None, **kwargs)`` -> list of predictions or ``ModelResponse``;
- ``fit(event, data, **kwargs)`` driven by ``/webhook``;
- ``get/set/has`` on a sqlite key-value store at ``$MODEL_DIR/cache.db`` keyed by (project, key);
- ``label_config``, ``parsed_label_config``, ``model_version``, ``set_model_version``,
  ``bump_model_version``, ``get_first_tag_occurence``, ``build_label_map``, ``extra_params``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixelllm_plugins.tokenizer import is_valid_unicode

from .label_config import LabelConfig, parse_label_config

_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def project_id_from(value: object) -> str | None:
    """``"<id>.<created_ts>"`` (what Label Studio sends) -> ``"<id>"``; ``None`` if absent or unsafe (only a
    string or a number names a project)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, str) and len(value) > 200:
        return None
    pid = str(value).split(".", 1)[0].strip()
    return pid if _PROJECT_RE.match(pid) else None


@dataclass
class ModelResponse:
    """Upstream ``label_studio_ml.response.ModelResponse``: predictions plus the version that made them."""

    model_version: str | None = None
    predictions: list[Any] = field(default_factory=list)

    def serialize(self) -> list[Any]:
        out = []
        for p in self.predictions:
            if isinstance(p, dict) and self.model_version and not p.get("model_version"):
                p = {**p, "model_version": self.model_version}
            out.append(p)
        return out


class KeyValueStore:
    """sqlite KV at ``<model_dir>/cache.db``: (project, key) -> str. Thread-safe, one file per process."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir) / "cache.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        with self._lock, self._conn:
            self._conn.execute("CREATE TABLE IF NOT EXISTS kv (project TEXT, key TEXT, value TEXT, "
                               "PRIMARY KEY (project, key))")

    def get(self, project: str | None, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE project=? AND key=?",
                                     (project or "", key)).fetchone()
        return row[0] if row else None

    def set(self, project: str | None, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("values of the key-value store must be str (as upstream)")
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO kv (project, key, value) VALUES (?, ?, ?)",
                               (project or "", key, value))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class LabelStudioMLBase:
    """Base class with upstream's shape. Subclasses override ``setup``, ``predict`` and ``fit``.

    ``store`` (a ``KeyValueStore``) is injected by the server as a class attribute
    (``Model.store = ...``), the analogue of upstream's module-level cache.
    """

    INITIAL_MODEL_VERSION = "0.0.1"
    TRAIN_EVENTS: tuple[str, ...] = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                                     "START_TRAINING")
    store: KeyValueStore | None = None

    def __init__(self, project_id: str | None = None, label_config: str | None = None):
        self.project_id = project_id_from(project_id) if project_id is not None else None
        self._parsed: LabelConfig | None = None
        self.use_label_config(label_config)
        self.setup()

    # ---- override points ----
    def setup(self) -> None:
        """Runs on every instantiation (every request): keep it cheap."""

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict] | ModelResponse:
        raise NotImplementedError

    def fit(self, event: str, data: dict, **additional_params) -> Any:
        return None

    # ---- key-value store ----
    def get(self, key: str) -> str | None:
        return self.store.get(self.project_id, key) if self.store else None

    def set(self, key: str, value: str) -> None:
        if self.store:
            self.store.set(self.project_id, key, value)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    # ---- label config ----
    def use_label_config(self, label_config: str | None) -> None:
        self._unstored: str | None = None
        if label_config and not is_valid_unicode(label_config):
            # not valid Unicode (a lone surrogate): kept for this request only, where parsing refuses it
            self._unstored = label_config
        else:
            current = self.get("label_config")
            if label_config and label_config != current:
                self.set("label_config", label_config)
        self._parsed = None

    @property
    def label_config(self) -> str | None:
        return self._unstored if self._unstored is not None else self.get("label_config")

    @property
    def label_interface(self) -> LabelConfig:
        """The parsed config (raises ``LabelConfigError`` when it is missing or malformed)."""
        if self._parsed is None:
            self._parsed = parse_label_config(self.label_config)
        return self._parsed

    @property
    def parsed_label_config(self) -> dict:
        return self.label_interface.to_parsed()

    def get_first_tag_occurence(self, control_type: str, object_type: str, name_filter=None,
                                to_name_filter=None) -> tuple[str, str, str]:
        found = self.label_interface.first_control(control_type, object_type, name_filter=name_filter,
                                                   to_name_filter=to_name_filter)
        if found is None:
            raise ValueError(f"no <{control_type}> pointing at an <{object_type}> in the labeling config")
        return found

    def build_label_map(self, tag_name: str, names: list[str]) -> dict[str, str]:
        return self.label_interface.build_label_map(tag_name, names)

    # ---- model version ----
    @property
    def model_version(self) -> str:
        return self.get("model_version") or self.INITIAL_MODEL_VERSION

    def set_model_version(self, version: str) -> None:
        self.set("model_version", str(version))

    def bump_model_version(self) -> str:
        """Increase the last number of the version (``0.0.1`` -> ``0.0.2``, ``x.ft3`` -> ``x.ft4``)."""
        current = self.model_version
        m = re.search(r"(\d+)(?!.*\d)", current)
        new = (current[:m.start()] + str(int(m.group(1)) + 1) + current[m.end():]) if m else current + ".1"
        self.set_model_version(new)
        return new

    # ---- extra params from /setup ----
    @property
    def extra_params(self) -> dict:
        raw = self.get("extra_params")
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def set_extra_params(self, params: object) -> None:
        if isinstance(params, dict):
            self.set("extra_params", json.dumps(params))
