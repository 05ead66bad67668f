"""The worker's routes: one per task of the registry (``/v1/<task>``, ``inference.tasks.TASKS``) plus
``/health``, ``/ready`` and ``/metrics``, over a ``Worker`` holding the engine, the settings and the count
of requests in flight.

Each task route checks its request's fields against the worker's limits, then ``Worker.serve`` admits it
(500 model failed to load, 503 not ready or at capacity), loads its image, submits one job to the engine
within the request's deadline (504) and maps a failure to its status.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidPromptError, PixelLLMError
from ..geometry import as_box
from ..inference.tasks import TASKS
from ..tokenizer import validate_text
from .batcher import Job
from .errors import APIError, error_status
from .guard import token_dependency
from .loader import ImageLoader
from .metrics import CONTENT_TYPE_LATEST, WorkerMetrics
from .schemas import (
    CaptionRegionsRequest,
    CaptionRegionsResponse,
    CaptionRequest,
    CaptionResponse,
    DenseCaptionRequest,
    DenseCaptionResponse,
    ReferRequest,
    ReferResponse,
    SegmentRequest,
    SegmentResponse,
)
from .settings import WorkerSettings

log = logging.getLogger("pixelllm.worker")

ROUTES = (*(spec.route for spec in TASKS.values()), "/health", "/ready", "/metrics", "/openapi.json", "/docs")


class Worker:
    """The state behind the routes: the engine, its image loader and the requests in flight."""

    def __init__(self, engine: Any, settings: WorkerSettings, metrics: WorkerMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.loader = ImageLoader(settings, engine)
        self.in_flight = 0
        self.announce = getattr(engine, "expect", None)

    async def start(self) -> None:
        self.engine.start()
        self.loader.start()
        log.info("worker settings: %s", self.settings.public_dict())

    async def stop(self) -> None:
        await self.loader.close()
        await run_in_threadpool(self.engine.stop)
        self.loader.shutdown()

    # ---- serving one request ---------------------------------------------------------------------------
    def busy(self, reason: str, message: str) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return APIError(503, "Busy" if reason == "queue_full" else "NotReady", message,
                        {"Retry-After": str(self.settings.retry_after_s)})

    def admit(self) -> None:
        """Raise the answer for a request the worker cannot take now."""
        engine, settings = self.engine, self.settings
        if engine.error:
            raise APIError(500, "ModelLoadError", f"the worker's model failed to load ({engine.error}); "
                           "check the worker's log and --model")
        if not engine.ready:
            raise self.busy("not_ready", "the model is still loading; retry after Retry-After seconds")
        if self.in_flight >= settings.max_queue:
            raise self.busy("queue_full", f"the worker is at capacity ({settings.max_queue} requests in "
                            "flight); retry after Retry-After seconds")

    async def serve(self, task: str, req, arg: Any, options: tuple, *,
                    prepare: bool | None = None) -> tuple[Any, list, str]:
        """(result, image size, model version) of one request's job on the engine; ``prepare``: load the image
        resized for the model (default: every task but segment, whose masks are in the full image's pixels)."""
        self.admit()
        timeout = min(req.timeout_s or math.inf, self.settings.request_timeout_s)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            async with asyncio.timeout(timeout):
                image, result = await self._run(task, req, arg, options, task != "segment" if prepare is None
                                                else prepare)
        except TimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise APIError(504, "Timeout", f"no answer within {timeout:g} s; the worker is busy: retry later "
                           "or ask for a longer timeout_s") from None
        except PixelLLMError as exc:
            status = error_status(exc)
            headers = {"Retry-After": str(self.settings.retry_after_s)} if status == 503 else None
            raise APIError(status, type(exc).__name__, str(exc), headers) from None
        except Exception as exc:
            log.exception("%s failed", task)
            raise APIError(500, "InferenceError", f"inference failed ({type(exc).__name__}); "
                           "see the worker's log") from None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        version = self.engine.model_version + (f"+{req.adapter}" if req.adapter else "")
        size = list(image.prepared.original_size) if hasattr(image, "prepared") else [image.width, image.height]
        return result, size, version

    async def _run(self, task: str, req, arg: Any, options: tuple, prepare: bool):
        """Load the request's image (resized for the model, or in full: ``prepare``) and submit its job:
        (image, result)."""
        engine = self.engine
        if self.announce is None:
            image = await self.loader.load(req.image, prepare=prepare)
            return image, await engine.submit(Job(task, image, arg, req.adapter, options))
        self.announce()  # tell the batcher a job is coming, so a forming batch can wait for it
        try:
            image = await self.loader.load(req.image, prepare=prepare)
        except BaseException:
            engine.unexpect()
            raise
        return image, await engine.submit(Job(task, image, arg, req.adapter, options), announced=True)

    def _checked_points(self, points: list[list[float]]) -> list[list[float]]:
        """A request's points: not empty, within the worker's limit, each 2 finite numbers."""
        if not points:
            raise APIError(400, "InvalidPromptError", "points is empty; give [[x, y], ...] in pixels")
        self.check_limit("len(points)", len(points), self.settings.max_boxes)
        for i, p in enumerate(points):
            if len(p) != 2 or not all(math.isfinite(v) for v in p):
                raise APIError(400, "InvalidPromptError", f"points[{i}] must be 2 finite numbers [x, y] in pixels")
        return [list(p) for p in points]

    def check_limit(self, name: str, value: int, limit: int) -> None:
        if value > limit:
            raise APIError(422, "ValidationError", f"{name}={value} exceeds this worker's limit of {limit}")

    # ---- the task routes -------------------------------------------------------------------------------
    async def refer(self, req: ReferRequest):
        texts = req.all_texts()
        if not texts:
            raise APIError(400, "InvalidPromptError", "texts is empty; give at least one referring expression")
        self.check_limit("len(texts)", len(texts), self.settings.max_texts)
        for i, t in enumerate(texts):
            try:  # not Unicode (a lone surrogate), empty or control characters only, too long
                validate_text(t, "text" if req.text is not None else f"texts[{i}]",
                              max_chars=self.settings.max_text_chars)
            except InvalidPromptError as exc:
                raise APIError(400, "InvalidPromptError", str(exc)) from None
        result, size, version = await self.serve("refer", req, texts, ())
        per_text = [[d.to_dict() for d in dets] for dets in result]
        return JSONResponse({"model_version": _version(result, version), "image_size": size,
                             "detections": [d for dets in per_text for d in dets], "per_text": per_text})

    async def caption_regions(self, req: CaptionRegionsRequest):
        settings = self.settings
        if req.boxes is not None and req.points is not None:
            raise APIError(400, "InvalidPromptError", "give boxes or points, not both (each point is a prompt "
                           "of its own)")
        if req.points is not None:
            arg: Any = {"points": self._checked_points(req.points)}
        else:
            if not req.boxes:
                what = "boxes is empty" if req.boxes is not None else "caption_regions needs boxes or points"
                raise APIError(400, "InvalidBoxError", f"{what}; give [[x1, y1, x2, y2], ...] (or points "
                               "[[x, y], ...]) in pixels")
            self.check_limit("len(boxes)", len(req.boxes), settings.max_boxes)
            arg = [_checked_box(i, b) for i, b in enumerate(req.boxes)]
        self.check_limit("max_new_tokens", req.max_new_tokens, settings.max_new_tokens)
        self.check_limit("num_beams", req.num_beams, settings.max_beams)
        options = (("max_new_tokens", req.max_new_tokens), ("num_beams", req.num_beams))
        # a point may become a box through a mask engine, which reads the full image (as segment does)
        result, size, version = await self.serve("caption_regions", req, arg, options,
                                                 prepare=req.points is None)
        captions = [c.to_dict() for c in result]
        return JSONResponse({"model_version": _version(result, version), "image_size": size, "captions": captions})

    async def caption(self, req: CaptionRequest):
        self.check_limit("max_new_tokens", req.max_new_tokens, self.settings.max_new_tokens)
        self.check_limit("num_beams", req.num_beams, self.settings.max_beams)
        options = (("max_new_tokens", req.max_new_tokens), ("num_beams", req.num_beams), ("trace", req.trace),
                   ("from_regions", req.from_regions))
        result, size, version = await self.serve("caption", req, None, options)
        return JSONResponse({"model_version": result.model_version or version, "image_size": size,
                             "caption": result.text, "score": result.score,
                             "words": [w.to_dict() for w in result.words]})

    async def dense_caption(self, req: DenseCaptionRequest):
        self.check_limit("max_regions", req.max_regions, self.settings.max_regions)
        options = (("max_regions", req.max_regions), ("min_score", req.min_score))
        result, size, version = await self.serve("dense_caption", req, None, options)
        return JSONResponse({"model_version": _version(result, version), "image_size": size,
                             "regions": [r.to_dict() for r in result]})

    async def segment(self, req: SegmentRequest):
        settings = self.settings
        texts = req.all_texts()
        given = [name for name, value in (("text/texts", texts), ("boxes", req.boxes), ("points", req.points))
                 if value is not None]
        if not given:
            raise APIError(400, "InvalidPromptError", "segment needs one of text/texts, boxes or points")
        if len(given) > 1 or (req.text is not None and req.texts is not None):
            what = " and ".join(given) if len(given) > 1 else "text and texts"
            raise APIError(400, "InvalidPromptError", f"give only one kind of prompt, not {what}")
        if req.point_labels is not None and req.points is None:
            raise APIError(400, "InvalidPromptError", "point_labels go with points")
        if texts is not None:
            if not texts:
                raise APIError(400, "InvalidPromptError", "texts is empty; give at least one referring expression")
            self.check_limit("len(texts)", len(texts), settings.max_texts)
            for i, t in enumerate(texts):
                try:
                    validate_text(t, "text" if req.text is not None else f"texts[{i}]",
                                  max_chars=settings.max_text_chars)
                except InvalidPromptError as exc:
                    raise APIError(400, "InvalidPromptError", str(exc)) from None
            arg: dict = {"texts": texts}
        elif req.boxes is not None:
            if not req.boxes:
                raise APIError(400, "InvalidBoxError", "boxes is empty; give [[x1, y1, x2, y2], ...] in pixels")
            self.check_limit("len(boxes)", len(req.boxes), settings.max_boxes)
            arg = {"boxes": [_checked_box(i, b) for i, b in enumerate(req.boxes)]}
        else:
            points = self._checked_points(req.points or [])
            labels = req.point_labels
            if labels is not None and (len(labels) != len(points) or any(v not in (0, 1) for v in labels)):
                raise APIError(400, "InvalidPromptError", "point_labels must hold one label per point: 1 (the "
                               "object) or 0 (not the object)")
            arg = {"points": points, "point_labels": labels}
        result, size, version = await self.serve("segment", req, arg, ())
        detections = [_mask_dict(m) for m in result]
        return JSONResponse({"model_version": _version(result, version), "image_size": size,
                             "detections": detections})

    # ---- health, readiness, metrics --------------------------------------------------------------------
    async def health(self):
        return {"status": "ok", "ready": bool(self.engine.ready)}

    async def ready(self):
        engine, metrics = self.engine, self.metrics
        if engine.ready:
            body = {"ready": True, "model_version": engine.model_version,
                    "info": jsonable_encoder(engine.info()), "queue_depth": engine.queue_depth(),
                    "in_flight": self.in_flight, "settings": self.settings.public_dict()}
            metrics.ready.set(1)
            return body
        metrics.ready.set(0)
        body = {"ready": False, "error": engine.error}
        headers = None if engine.error else {"Retry-After": str(self.settings.retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    async def metrics_route(self):
        self.metrics.queue_depth.set(self.engine.queue_depth())
        self.metrics.ready.set(1 if self.engine.ready else 0)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# task -> (response model, summary) of its route
_TASK_ROUTES = {
    "refer": (ReferResponse, "text -> box: where is each referring expression"),
    "caption_regions": (CaptionRegionsResponse, "box / point -> text: a caption for each given box or point"),
    "caption": (CaptionResponse, "a whole-image caption; with trace every word carries a box and points"),
    "dense_caption": (DenseCaptionResponse, "dense captioning: proposals, each with a caption and a score"),
    "segment": (SegmentResponse, "text / box / point -> mask (COCO RLE and polygons): the model's own mask "
                                 "decoder, or the worker's --mask-engine sam:PATH"),
}


def add_routes(app: FastAPI, worker: Worker) -> None:
    """The task routes (bearer auth when a token is set) and ``/health``, ``/ready``, ``/metrics``."""
    auth = [Depends(token_dependency(worker.settings))]
    for spec in TASKS.values():
        model, summary = _TASK_ROUTES[spec.name]
        app.add_api_route(spec.route, getattr(worker, spec.name), methods=["POST"], dependencies=auth,
                          responses={200: {"model": model}}, summary=summary)
    app.add_api_route("/health", worker.health, methods=["GET"],
                      summary="liveness: the process answers (no auth)")
    app.add_api_route("/ready", worker.ready, methods=["GET"],
                      summary="readiness: 200 once the model is loaded, else 503 (no auth)")
    app.add_api_route("/metrics", worker.metrics_route, methods=["GET"], dependencies=auth,
                      summary="Prometheus metrics (text format)")


def _checked_box(i: int, b: list[float]) -> list[float]:
    """A request's box as 4 finite numbers (the message names the box, not its numbers)."""
    if len(b) != 4:
        raise APIError(400, "InvalidBoxError", f"boxes[{i}] must be 4 numbers [x1, y1, x2, y2] in pixels, "
                       f"got {len(b)} numbers")
    if not all(math.isfinite(v) for v in b):
        raise APIError(400, "InvalidBoxError", f"boxes[{i}] has a coordinate that is not a finite number; give "
                       "[x1, y1, x2, y2] in pixels")
    return list(as_box(b))


def _mask_dict(mask) -> dict:
    out = mask.to_dict()
    if out.get("text") is None:
        out.pop("text", None)
    return out


def _version(results, fallback: str) -> str:
    flat = list(results)
    while flat and isinstance(flat[0], list):
        flat = [x for sub in flat for x in sub]
    return next((r.model_version for r in flat if getattr(r, "model_version", "")), fallback)
