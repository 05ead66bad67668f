"""Backend settings, read from the environment (same variable names as the upstream ML backends)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from pixelllm_plugins.bounds import from_env as _number
from pixelllm_plugins.io import ImageLimits


def _env(name: str, *fallbacks: str, default: str = "") -> str:
    for key in (name, *fallbacks):
        value = os.environ.get(key)
        if value:
            return value
    return default


def _default_model_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "pixelllm" / "label-studio")


@dataclass
class Settings:
    """Everything the backend reads from its environment. ``Settings.from_env(**overrides)``."""

    label_studio_url: str = ""  # LABEL_STUDIO_URL (or LABEL_STUDIO_HOST)
    label_studio_api_key: str = field(default="", repr=False)  # LABEL_STUDIO_API_KEY (legacy token or PAT)
    basic_auth_user: str = ""  # BASIC_AUTH_USER
    basic_auth_pass: str = field(default="", repr=False)  # BASIC_AUTH_PASS
    model_dir: str = ""  # MODEL_DIR: sqlite cache, per-project data and adapters
    model: str | None = None  # PIXELLLM_MODEL: checkpoint path or preset; None = the embedded model
    device: str | None = None  # PIXELLLM_DEVICE
    allowed_hosts: tuple[str, ...] = ()  # PIXELLLM_LS_ALLOWED_HOSTS: extra image hosts ("*.example.com")
    local_roots: tuple[str, ...] = ()  # PIXELLLM_LS_LOCAL_ROOTS + LOCAL_FILES_DOCUMENT_ROOT
    fetch_timeout_s: float = 15.0  # PIXELLLM_LS_FETCH_TIMEOUT: per image download
    predict_budget_s: float = 80.0  # PIXELLLM_LS_PREDICT_BUDGET: keep under LS's ML_TIMEOUT_PREDICT (100 s)
    batch_size: int = 8  # PIXELLLM_LS_BATCH_SIZE: images per model call
    fetch_workers: int = 4  # PIXELLLM_LS_FETCH_WORKERS: parallel image downloads
    # PIXELLLM_LS_TRAIN_STEPS: LoRA fine-tune steps per round; 0: chosen from the number of annotations
    train_steps: int = 0
    train_gate: bool = True  # PIXELLLM_LS_TRAIN_GATE=0: ungated rounds (no held-out slice, no replay)
    train_replay: float = 0.5  # PIXELLLM_LS_TRAIN_REPLAY: share of synthetic base scenes in a gated round
    train_min_annotations: int = 1  # PIXELLLM_LS_TRAIN_MIN_ANNOTATIONS: new annotations before a round
    max_request_bytes: int = 32 * 1024 * 1024  # PIXELLLM_LS_MAX_REQUEST_BYTES
    max_prompt_chars: int = 1000  # PIXELLLM_LS_MAX_PROMPT_CHARS: longer prompts are refused per task
    # PIXELLLM_LS_DECODE_BUDGET_BYTES: memory that images being decoded at once may take (io.decode_cost)
    decode_budget_bytes: int = 1024 ** 3
    log_level: str = "INFO"  # LOG_LEVEL
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        roots = [r for r in os.environ.get("PIXELLLM_LS_LOCAL_ROOTS", "").split(os.pathsep) if r]
        if os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"):
            roots.append(os.environ["LOCAL_FILES_DOCUMENT_ROOT"])
        values = dict(
            label_studio_url=_env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST").rstrip("/"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=_env("BASIC_AUTH_PASS"),
            model_dir=_env("MODEL_DIR", default=_default_model_dir()),
            model=_env("PIXELLLM_MODEL") or None,
            device=_env("PIXELLLM_DEVICE") or None,
            allowed_hosts=tuple(h.strip().lower() for h in os.environ.get("PIXELLLM_LS_ALLOWED_HOSTS", "")
                                .split(",") if h.strip()),
            local_roots=tuple(roots),
            fetch_timeout_s=float(_number("PIXELLLM_LS_FETCH_TIMEOUT", "fetch_timeout_s", 15.0)),
            predict_budget_s=float(_number("PIXELLLM_LS_PREDICT_BUDGET", "predict_budget_s", 80.0)),
            batch_size=int(_number("PIXELLLM_LS_BATCH_SIZE", "batch_size", 8)),
            fetch_workers=int(_number("PIXELLLM_LS_FETCH_WORKERS", "fetch_workers", 4)),
            train_steps=int(_number("PIXELLLM_LS_TRAIN_STEPS", "train_steps", 0)),
            train_gate=_env("PIXELLLM_LS_TRAIN_GATE", default="1").strip().lower() not in ("0", "false", "no", "off"),
            train_replay=float(_number("PIXELLLM_LS_TRAIN_REPLAY", "train_replay", 0.5)),
            train_min_annotations=int(_number("PIXELLLM_LS_TRAIN_MIN_ANNOTATIONS", "train_min_annotations", 1)),
            max_request_bytes=int(_number("PIXELLLM_LS_MAX_REQUEST_BYTES", "max_request_bytes", 32 * 1024 * 1024)),
            max_prompt_chars=int(_number("PIXELLLM_LS_MAX_PROMPT_CHARS", "max_prompt_chars", 1000)),
            decode_budget_bytes=int(_number("PIXELLLM_LS_DECODE_BUDGET_BYTES", "decode_budget_bytes", 1024 ** 3)),
            log_level=_env("LOG_LEVEL", default="INFO").upper(),
        )
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown backend settings {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("allowed_hosts"), str):
            values["allowed_hosts"] = tuple(h.strip().lower() for h in values["allowed_hosts"].split(",")
                                            if h.strip())
        if isinstance(values.get("local_roots"), (str, os.PathLike)):
            values["local_roots"] = (str(values["local_roots"]),)
        values["local_roots"] = tuple(str(r) for r in values["local_roots"])
        values["model_dir"] = str(values["model_dir"])
        values["label_studio_url"] = str(values["label_studio_url"]).rstrip("/")
        return cls(**values)

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user or self.basic_auth_pass)
