"""Worker settings: one dataclass, filled from ``PIXELLLM_*`` environment variables or keyword overrides.

The bearer token is kept out of ``repr`` so it never reaches a log line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from ..bounds import check
from ..errors import InvalidParameterError, InvalidSettingError
from ..io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits

# environment variable -> settings field
ENV_VARS: dict[str, str] = {
    "PIXELLLM_WORKER_TOKEN": "token",
    "PIXELLLM_WORKER_MAX_BATCH": "max_batch_size",
    "PIXELLLM_WORKER_MAX_WAIT_MS": "max_wait_ms",
    "PIXELLLM_WORKER_MAX_QUEUE": "max_queue",
    "PIXELLLM_WORKER_TIMEOUT_S": "request_timeout_s",
    "PIXELLLM_WORKER_RETRY_AFTER_S": "retry_after_s",
    "PIXELLLM_WORKER_MAX_REQUEST_BYTES": "max_request_bytes",
    "PIXELLLM_MAX_IMAGE_BYTES": "max_image_bytes",
    "PIXELLLM_MAX_PIXELS": "max_pixels",
    "PIXELLLM_WORKER_ALLOWED_HOSTS": "allowed_hosts",
    "PIXELLLM_WORKER_URL_TIMEOUT_S": "url_timeout_s",
    "PIXELLLM_WORKER_MAX_ADAPTERS": "max_adapters",
    "PIXELLLM_WORKER_ADAPTER_DIR": "adapter_dir",
    "PIXELLLM_WORKER_DEVICE": "device",
    "PIXELLLM_WORKER_TORCH_THREADS": "torch_threads",
    "PIXELLLM_WORKER_WARMUP": "warmup",
    "PIXELLLM_WORKER_ENGINE": "engine",
    "PIXELLLM_WORKER_OTEL": "otel",
    "PIXELLLM_WORKER_FRONTS": "fronts",
    "PIXELLLM_WORKER_INLINE_DECODE_BYTES": "inline_decode_bytes",
    "PIXELLLM_WORKER_INLINE_DECODE_PIXELS": "inline_decode_pixels",
    "PIXELLLM_WORKER_DECODE_BUDGET_BYTES": "decode_budget_bytes",
    "PIXELLLM_MASK_ENGINE": "mask_engine",
}

# request-field limits of the worker -> the knob of ``bounds.BOUNDS`` they may lower, never raise
FIELD_BOUNDS = {"max_texts": "max_texts", "max_text_chars": "max_text_chars", "max_boxes": "max_boxes",
                "max_new_tokens": "max_new_tokens", "max_beams": "num_beams", "max_regions": "max_regions"}


@dataclass
class WorkerSettings:
    """Everything the worker can be tuned with. Defaults suit one GPU behind a few annotation tools."""

    # dynamic batching: a batch closes when it holds max_batch_size images or its oldest request has
    # waited max_wait_ms; max_batch_size=1 turns batching off
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    # admission: requests admitted but not yet answered (decoding, queued or running); beyond -> 503
    max_queue: int = 64
    retry_after_s: int = 1
    # per-request deadline (image decode + queue + inference); a request may ask for less, never more
    request_timeout_s: float = 60.0
    # bearer auth on /v1/* and /metrics when set (compared in constant time, never logged)
    token: str | None = field(default=None, repr=False)
    # limits on what a request may carry
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_texts: int = 32
    max_text_chars: int = 512
    max_boxes: int = 128
    max_new_tokens: int = 128
    max_beams: int = 8
    max_regions: int = 256
    # image URLs are fetched only from these hosts ("host", "host:port" or "*.domain"); empty = never
    allowed_hosts: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    # LoRA adapters kept loaded at once (least recently used is unloaded first)
    max_adapters: int = 4
    # folder of peft adapters, one sub-folder per name (the checkpoint's own adapters/ is searched too)
    adapter_dir: str | None = None
    # torch device for the model (None: the Predictor's default, cuda when available)
    device: str | None = None
    # torch intra-op CPU threads (None: torch's default, one per core); 1 is best on a shared CPU box
    torch_threads: int | None = None
    # run every batch size once before reporting ready, so that the first real batches of each size don't
    # pay for loading GPU kernels and growing the allocator: "auto" (on CUDA only), "on" or "off"
    warmup: str = "auto"
    # where the model runs: "process" (a child process, so HTTP work and the model do not share one GIL)
    # or "thread" (in the worker's process); predictor instances always run on a thread
    engine: str = "process"
    # FastAPI's native OpenTelemetry (traces and metrics to a configured provider). Off by default: even
    # with no provider it looks one up on every request, about 4 % of the event loop's time under load
    otel: bool = False
    # HTTP front processes on the one port, all feeding the one model process (engine "process" only):
    # one front runs on one GIL; a host with cores to spare serves more requests a second with several
    fronts: int = 1
    # images of at most this many bytes are decoded on the event loop: for them (under about 2 ms of work)
    # the hop to a decode thread costs more than it saves. Larger ones go to the thread pool, so the loop
    # keeps answering. 0: every image goes to the pool
    inline_decode_bytes: int = 64 * 1024
    # ... and only when the header says it has at most this many pixels: a tiny PNG of a huge canvas (an
    # 8000x8000 1-bit PNG is 8 KB) takes as long to decode as a photo of that size. 0: every image to the pool
    inline_decode_pixels: int = 512 * 512
    # memory that decoding may hold at once in this process (each image's decoded pixels and RGB copy,
    # from its header): requests beyond it wait for their turn; an image costing more alone gets a 413
    decode_budget_bytes: int = 1024 * 1024 * 1024
    # the mask engine of /v1/segment, "sam:PATH" (a local SAM checkpoint folder); None: the model's own mask
    # decoder (a model without one answers that it has none)
    mask_engine: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            self.allowed_hosts = _split_hosts(self.allowed_hosts)
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts if h.strip())
        if self.token == "":
            self.token = None
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_queue": self.max_queue >= 1,
            "retry_after_s": self.retry_after_s >= 0,
            "request_timeout_s": self.request_timeout_s > 0,
            "max_request_bytes": self.max_request_bytes > 0,
            "max_image_bytes": self.max_image_bytes > 0,
            "max_pixels": self.max_pixels > 0,
            "url_timeout_s": self.url_timeout_s > 0,
            "max_adapters": self.max_adapters >= 1,
            "torch_threads": self.torch_threads is None or self.torch_threads >= 1,
            "warmup": self.warmup in ("auto", "on", "off"),
            "engine": self.engine in ("process", "thread"),
            "fronts": self.fronts >= 1 and (self.fronts == 1 or self.engine == "process"),
            "inline_decode_bytes": self.inline_decode_bytes >= 0,
            "inline_decode_pixels": self.inline_decode_pixels >= 0,
            "decode_budget_bytes": self.decode_budget_bytes > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidSettingError(f"invalid worker settings: {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}"
                             "; sizes and counts must be positive, waits non-negative, warmup auto|on|off, engine process|thread; fronts > 1 needs engine process")
        for name, knob in FIELD_BOUNDS.items():  # the worker may lower the shared bounds, never raise them
            try:
                check(knob, getattr(self, name), label=name)
            except InvalidParameterError as exc:
                raise InvalidSettingError(f"invalid worker settings: {exc}") from None

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_pixels, max_bytes=min(self.max_image_bytes, self.max_request_bytes))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> WorkerSettings:
        """Settings from ``PIXELLLM_*`` variables (see ``ENV_VARS``); keyword overrides win (None is ignored)."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for var, name in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse(var, raw.strip(), types[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(types)
        if unknown:
            raise TypeError(f"unknown worker setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes) -> WorkerSettings:
        return replace(self, **changes)

    def public_dict(self) -> dict:
        """Settings safe to show (``/ready``, logs): the token is reduced to whether one is set."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token"}
        out["allowed_hosts"] = list(self.allowed_hosts)
        out["auth"] = self.token is not None
        return out


def _split_hosts(raw: str) -> tuple[str, ...]:
    return tuple(h for h in (p.strip() for p in raw.replace(";", ",").split(",")) if h)


def _parse(var: str, raw: str, type_name: str):
    try:
        if type_name.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("tuple"):
            return _split_hosts(raw)
        return raw
    except ValueError:
        raise InvalidSettingError(f"environment variable {var}={raw!r} is not a valid {type_name.split()[0]}; fix it "
                                  "or unset it for the default") from None
