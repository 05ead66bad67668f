"""``RemotePredictor``: the ``PredictorProtocol`` over HTTP to a running worker (``pixelllm serve``).

Plugins get one from ``get_predictor()`` when ``PIXELLLM_WORKER_URL`` is set (token from
``PIXELLLM_WORKER_TOKEN``). Each image becomes one request; the images of one call are sent concurrently
so the worker can batch them. Requests are retried with exponential backoff and jitter on connection
errors, timeouts and 502/503/504 (``Retry-After`` honoured, capped by ``max_backoff_s``), until
``max_retries`` attempts or ``retry_deadline_s`` seconds. Errors the worker reports for the input (bad
image, bad box, ...) come back as the same exception classes the in-process ``Predictor`` raises.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
from PIL import Image

from .. import errors as errors_module
from ..bounds import DEFAULT_MAX_REGIONS, DEFAULT_MIN_SCORE
from ..bounds import check as check_bound
from ..errors import (
    InvalidPromptError,
    PixelLLMError,
    RemoteError,
)
from ..geometry import as_box
from ..inference.arguments import check_generation, check_labels, image_list, per_image
from ..inference.results import Detection, MaskResult, RegionCaption, TracedCaption, Word
from ..io import ImageInput, ImageLimits, load_image, read_image_bytes

log = logging.getLogger(__name__)

RETRY_STATUS = (502, 503, 504)


def encode_image(image: ImageInput, limits: ImageLimits | None = None) -> dict:
    """An image as the worker's ``image`` field: ``{"url": ...}`` for http(s) URLs, else ``{"b64": ...}``.

    Files, bytes and ``EncodedImage`` are sent as they are (no re-encoding); PIL images and arrays as PNG.
    """
    limits = limits or ImageLimits()
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"url": image}
    if isinstance(image, (Image.Image, np.ndarray)):
        buf = io.BytesIO()
        load_image(image, limits).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
    else:
        data = read_image_bytes(image, limits)
    return {"b64": base64.b64encode(data).decode("ascii")}


def _prompt_list(i: int, kind: str, value) -> list:
    """One image's prompts as a list (a lone text is one text); the project's error for anything else."""
    if isinstance(value, str):
        return [value]
    if value is None:
        raise InvalidPromptError(f"image {i}: {kind} must be a list, got None")
    try:
        return list(value)
    except TypeError:
        raise InvalidPromptError(f"image {i}: {kind} must be a list, got {type(value).__name__}") from None


def _point(i: int, j: int, point) -> list[float]:
    """A point prompt as JSON: 2 numbers (the worker checks that they are finite and inside the image)."""
    try:
        x, y = (float(v) for v in point)
    except (TypeError, ValueError):
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InvalidPromptError(f"image {i} point {j}: must be 2 finite numbers [x, y] in image pixels")
    return [x, y]


def _error_class(name: str) -> type[PixelLLMError]:
    aliases = {"HostNotAllowedError": "ImageFetchError", "AdapterNotFoundError": "PixelLLMError"}
    cls = getattr(errors_module, aliases.get(name, name), None)
    if isinstance(cls, type) and issubclass(cls, PixelLLMError) and cls is not RemoteError:
        return cls
    return RemoteError


class RemotePredictor:
    """Implements ``PredictorProtocol`` by calling a worker over HTTP. Thread-safe; reuse one per process."""

    _sleep = staticmethod(time.sleep)  # the backoff wait (tests record it instead of sleeping)

    def __init__(self, url: str, *, token: str | None = None, model: str | None = None,
                 timeout: float = 60.0, connect_timeout: float = 5.0, max_retries: int = 8,
                 retry_deadline_s: float = 120.0, backoff_s: float = 0.1, max_backoff_s: float = 10.0,
                 concurrency: int = 8, max_connections: int = 64, limits: ImageLimits | None = None,
                 transport: httpx.BaseTransport | None = None):
        if not url or not url.startswith(("http://", "https://")):
            raise RemoteError(f"worker URL {url!r} must start with http:// or https:// (PIXELLLM_WORKER_URL)")
        self.url = url.rstrip("/")
        self.model = model  # informational: the worker serves the model it was started with
        self.timeout = timeout
        self.max_retries = max(1, max_retries)
        self.retry_deadline_s = retry_deadline_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = max(1, concurrency)
        self.limits = limits or ImageLimits()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=self.url, headers=headers, transport=transport, trust_env=False,
            # the worker is told timeout_s=timeout and answers 504 by then; read a little longer than that
            timeout=httpx.Timeout(timeout + 5.0, connect=connect_timeout, pool=timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._model_version: str | None = None
        self.stats = {"requests": 0, "retries": 0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"RemotePredictor({self.url!r})"

    # ---- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._client.close()

    def __enter__(self) -> RemotePredictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- identity ----------------------------------------------------------------------------------
    def info(self) -> dict:
        """The worker's ``/ready`` answer (model version, device, batching settings)."""
        return self._request("GET", "/ready")

    def health(self) -> bool:
        try:
            return self._client.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def probe_model_version(self) -> str | None:
        """The worker's model_version, asking ``/ready`` once (no retries) when not yet known; None when the
        worker is down or still loading. For health pages, which must not wait on a worker."""
        if self._model_version is None:
            try:
                resp = self._client.get("/ready", timeout=5.0)
            except httpx.HTTPError:
                return None
            if resp.status_code != 200:
                return None
            self._model_version = str(resp.json().get("model_version", ""))
        return self._model_version

    @property
    def model_version(self) -> str:
        if self._model_version is None:
            self._model_version = str(self.info().get("model_version", ""))
        return self._model_version

    # ---- HTTP with retries -------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s) * random.uniform(1.0, 1.2)
            except ValueError:
                pass
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        started = time.monotonic()
        deadline = started + self.retry_deadline_s
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            self._count("requests")
            try:
                resp = self._client.request(method, path, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out: the worker may be restarting
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code not in RETRY_STATUS:
                    raise self._error(resp)
                retry_after = resp.headers.get("retry-after")
                problem = f"HTTP {resp.status_code} ({self._message(resp)})"
            delay = self._delay(attempt, retry_after)
            if attempt >= self.max_retries or time.monotonic() + delay > deadline:
                raise RemoteError(f"worker at {self.url} did not answer {path} after {attempt} attempt(s) over "
                                  f"{time.monotonic() - started:.1f} s: {problem}; check that it runs "
                                  "(pixelllm serve) and PIXELLLM_WORKER_URL")
            self._count("retries")
            log.debug("%s %s: %s; retrying in %.2f s", method, path, problem, delay)
            self._sleep(delay)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    @staticmethod
    def _message(resp: httpx.Response) -> str:
        """The worker's reason: its ``error`` field, else FastAPI's ``detail`` or a ``status``, else the text."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            for key in ("error", "detail", "status"):
                if body.get(key):
                    return str(body[key])
        return resp.text[:200] or resp.reason_phrase

    def _error(self, resp: httpx.Response) -> PixelLLMError:
        try:
            body = resp.json()
            type_name, message = str(body.get("type", "")), str(body.get("error", ""))
        except ValueError:
            type_name, message = "", resp.text[:200]
        cls = _error_class(type_name)
        if cls is RemoteError:
            return RemoteError(f"worker at {self.url} answered {resp.status_code} {type_name}: {message}")
        return cls(message)

    def _post_each(self, path: str, bodies: list[dict | None]) -> list[dict | None]:
        """POST each body (None: nothing to ask, answer None), concurrently so the worker can batch them."""
        todo = [i for i, b in enumerate(bodies) if b is not None]
        out: list[dict | None] = [None] * len(bodies)
        if len(todo) <= 1 or self.concurrency == 1:
            for i in todo:
                out[i] = self._request("POST", path, bodies[i])
            return out
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, "pixelllm-remote")
        futures = {i: self._pool.submit(self._request, "POST", path, bodies[i]) for i in todo}
        for i, f in futures.items():
            out[i] = f.result()
        return out

    def _body(self, image: ImageInput, adapter: str | None, **fields: Any) -> dict:
        body = {"image": encode_image(image, self.limits), **fields, "timeout_s": self.timeout}
        if adapter is not None:
            body["adapter"] = adapter
        return body

    # ---- PredictorProtocol -------------------------------------------------------------------------
    def refer(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str]], *,
              adapter: str | None = None) -> list[list[list[Detection]]]:
        images = image_list(images, "refer")
        texts = [_prompt_list(i, "texts", ts) for i, ts in enumerate(per_image(texts, len(images), "text lists",
                                                                                "refer"))]
        bodies = [self._body(im, adapter, texts=ts) if ts else None for im, ts in zip(images, texts)]
        answers = self._post_each("/v1/refer", bodies)
        return [[[Detection.from_dict(d) for d in dets] for dets in a["per_text"]] if a else [] for a in answers]

    def caption_regions(self, images: Sequence[ImageInput],
                        boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                        points: Sequence[Sequence[Sequence[float]] | None] | None = None, *,
                        adapter: str | None = None, max_new_tokens: int = 20,
                        num_beams: int = 1) -> list[list[RegionCaption]]:
        images = image_list(images, "caption_regions")
        n = len(images)
        if boxes is None and points is None:
            raise InvalidPromptError("caption_regions needs boxes or points: one list per image")
        if boxes is not None:
            boxes = per_image(boxes, n, "box lists (None for an image with points)", "caption_regions")
        if points is not None:
            points = per_image(points, n, "point lists (None for an image with boxes)", "caption_regions")
        max_new_tokens, num_beams = check_generation(max_new_tokens, num_beams)
        bodies: list[dict | None] = []
        for i, image in enumerate(images):
            bs = boxes[i] if boxes is not None else None
            ps = points[i] if points is not None else None
            if bs is not None and ps is not None:
                raise InvalidPromptError(f"image {i}: give boxes or points, not both (each point is a prompt of "
                                         "its own)")
            if bs is None and ps is None:
                raise InvalidPromptError(f"image {i}: caption_regions needs boxes or points")
            options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
            if ps is not None:
                fields: dict[str, Any] = {"points": [_point(i, j, p) for j, p in enumerate(_prompt_list(i, "points", ps))]}
            else:
                fields = {"boxes": [list(as_box(b)) for b in _prompt_list(i, "boxes", bs)]}
            prompts = next(iter(fields.values()))
            bodies.append(self._body(image, adapter, **fields, **options) if prompts else None)
        answers = self._post_each("/v1/caption_regions", bodies)
        return [[RegionCaption.from_dict(c) for c in a["captions"]] if a else [] for a in answers]

    def caption(self, images: Sequence[ImageInput], *, trace: bool = True, adapter: str | None = None,
                max_new_tokens: int = 40, num_beams: int = 1,
                from_regions: bool | None = None) -> list[TracedCaption]:
        images = image_list(images, "caption")
        max_new_tokens, num_beams = check_generation(max_new_tokens, num_beams)
        extra = {} if from_regions is None else {"from_regions": from_regions}
        bodies = [self._body(im, adapter, trace=trace, max_new_tokens=max_new_tokens, num_beams=num_beams, **extra)
                  for im in images]
        answers = self._post_each("/v1/caption", bodies)
        return [TracedCaption(text=a["caption"], words=[Word.from_dict(w) for w in a.get("words", [])],
                              score=float(a.get("score", 1.0)), model_version=a.get("model_version", ""))
                for a in answers]

    def dense_caption(self, images: Sequence[ImageInput], *, max_regions: int = DEFAULT_MAX_REGIONS, min_score: float = DEFAULT_MIN_SCORE,
                      adapter: str | None = None) -> list[list[RegionCaption]]:
        images = image_list(images, "dense_caption")
        max_regions = int(check_bound("max_regions", max_regions))
        min_score = float(check_bound("min_score", min_score))
        bodies = [self._body(im, adapter, max_regions=max_regions, min_score=min_score) for im in images]
        answers = self._post_each("/v1/dense_caption", bodies)
        return [[RegionCaption.from_dict(r) for r in a["regions"]] for a in answers]

    def segment(self, images: Sequence[ImageInput], texts: Sequence[Sequence[str] | None] | None = None,
                boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
                points: Sequence[Sequence[Sequence[float]] | None] | None = None,
                point_labels: Sequence[Sequence[int] | None] | None = None, *,
                adapter: str | None = None) -> list[list[MaskResult]]:
        images = image_list(images, "segment")
        n = len(images)
        given = {name: None if value is None else per_image(value, n, f"entries of {name} (None for an image "
                                                             "prompted another way)", "segment")
                 for name, value in (("texts", texts), ("boxes", boxes), ("points", points),
                                     ("point_labels", point_labels))}
        bodies: list[dict | None] = []
        for i, image in enumerate(images):
            present = [name for name in ("texts", "boxes", "points")
                       if given[name] is not None and given[name][i] is not None]
            if len(present) != 1:
                raise InvalidPromptError(f"image {i}: segment needs texts, boxes or points" if not present else
                                         f"image {i}: give only one of texts, boxes or points, not "
                                         f"{' and '.join(present)}")
            kind = present[0]
            labels = point_labels[i] if point_labels is not None else None
            if labels is not None and kind != "points":
                raise InvalidPromptError(f"image {i}: point_labels go with points, not {kind}")
            items = _prompt_list(i, kind, given[kind][i])
            if not items:
                bodies.append(None)
            elif kind == "texts":
                bodies.append(self._body(image, adapter, texts=items))
            elif kind == "boxes":
                bodies.append(self._body(image, adapter, boxes=[list(as_box(b)) for b in items]))
            else:
                fields: dict[str, Any] = {"points": [[float(v) for v in p] for p in items]}
                if labels is not None:
                    fields["point_labels"] = check_labels(i, labels, len(items))
                bodies.append(self._body(image, adapter, **fields))
        answers = self._post_each("/v1/segment", bodies)
        return [[MaskResult.from_dict(d) for d in a["detections"]] if a else [] for a in answers]
