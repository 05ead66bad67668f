"""The PixelLLM backend model, in the upstream class shape (``setup`` / ``predict`` / ``fit``).

Batch pre-annotation ("Retrieve predictions"), per task, by the config's task (see ``label_config``):

- ``refer``: the referring text comes from the task field the config's ``<Text>`` names (a string or a
  list of strings), else the box control's ``model_default_prompt`` / ``PIXELLLM_LS_DEFAULT_PROMPT``; a task
  with no text gets dense captions. Each box carries its per-region caption (same region id).
- ``caption_regions``: boxes already on the task (latest annotation, else prediction) are captioned;
  a task with none gets dense captions.
- ``dense_caption``: proposals, each with a caption.
- ``caption_trace``: the whole-image caption, each word as a box with its word.

Tasks are batched through the model (``PIXELLLM_LS_BATCH_SIZE`` images per call, images downloaded in
parallel); a failing batch is retried task by task so one bad task never costs the others. Work stops
at ``PIXELLLM_LS_PREDICT_BUDGET`` seconds (keep it under Label Studio's ``ML_TIMEOUT_PREDICT``); tasks
left over get a per-task error and a ``-failed`` version, so the next "Retrieve predictions" asks again.

Interactive (``context`` set): a typed prompt gives box suggestions; a drawn rectangle gives a caption
for that region (the TextArea result reuses the rectangle's id).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pixelllm_plugins.errors import PixelLLMError

from . import convert
from .base import LabelStudioMLBase, ModelResponse
from .errors import TaskError
from .label_config import LabelConfig, LabelConfigError
from .runtime import Runtime

if TYPE_CHECKING:
    from pixelllm_plugins.inference.predictor import PreparedInput
    from pixelllm_plugins.io import EncodedImage

log = logging.getLogger(__name__)

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_CREATED",
                "ANNOTATIONS_DELETED", "START_TRAINING")


@dataclass
class _Job:
    """One task of a batch on its way through the model."""

    index: int
    task_id: object
    op: str = ""  # refer / caption_regions / dense_caption / caption_trace
    ref: object = None
    image: EncodedImage | PreparedInput | None = None  # both have .size, the original (width, height)
    texts: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    boxes_pct: list[dict] = field(default_factory=list)  # boxes_pct[i]: the LS region they came from
    error: str | None = None
    results: list[dict] | None = None


def _message(exc: BaseException) -> str:
    if isinstance(exc, PixelLLMError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class PixelLLMBackend(LabelStudioMLBase):
    """PixelLLM for Label Studio: text -> box, box -> caption, dense captions, traced captions."""

    TRAIN_EVENTS = TRAIN_EVENTS
    runtime: Runtime  # set by server.create_app on a per-app subclass

    def setup(self) -> None:
        # Cheap on purpose: a new instance is made per request (as upstream). The model is loaded once
        # per process by the runtime.
        pass

    # ------------------------------------------------------------------ versions
    @property
    def model_version(self) -> str:
        return self.runtime.version_for(self.project_id)

    def set_model_version(self, version: str) -> None:  # versions follow the project's adapters
        self.set("model_version", str(version))

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> ModelResponse:
        rt = self.runtime
        version = self.model_version
        if not isinstance(tasks, list):
            raise TaskError("'tasks' must be a list of task objects")
        try:
            cfg = self.label_interface
            if cfg.image is None:
                raise LabelConfigError("label config has no <Image> for the boxes")
            if cfg.box_control is None:
                raise LabelConfigError(f'label config has no <RectangleLabels> (or <Rectangle>) with toName="'
                                       f'{cfg.image.name}"; add one for the boxes (see the shipped configs)')
            task_kind = cfg.task
        except LabelConfigError as exc:
            rt.count("task_errors", len(tasks))
            return ModelResponse(version, [convert.error_prediction(str(exc), version) for _ in tasks])
        if isinstance(context, dict) and isinstance(context.get("result"), list) and context["result"]:
            return ModelResponse(version, self._interactive(tasks, context, cfg, kwargs, version))
        return ModelResponse(version, self._batch(tasks, cfg, task_kind, kwargs, version))

    # ---- batch ----
    def _batch(self, tasks: list, cfg: LabelConfig, kind: str, params: dict, version: str) -> list[dict]:
        rt, s = self.runtime, self.runtime.settings
        deadline = time.monotonic() + s.predict_budget_s
        jobs = [self._plan(i, t, cfg, kind) for i, t in enumerate(tasks)]
        adapter = None
        try:
            adapter = rt.adapter_for(self.project_id)
        except Exception as exc:  # noqa: BLE001 - e.g. an adapter file damaged after training
            message = f"cannot load this project's fine-tuned adapter: {_message(exc)}"
            for j in jobs:
                j.error = j.error or message
        self._load_images([j for j in jobs if j.error is None], params, deadline)
        box = cfg.box_control
        max_boxes = _int_attr(box, "model_max_boxes", 1)
        threshold = _float_attr(box, "model_score_threshold", None)
        for op in ("refer", "caption_regions", "dense_caption", "caption_trace"):
            ready = [j for j in jobs if j.error is None and j.op == op]
            for start in range(0, len(ready), s.batch_size):
                chunk = ready[start:start + s.batch_size]
                if time.monotonic() > deadline:
                    for j in chunk:
                        j.error = (f"not predicted within the {s.predict_budget_s:g} s budget of this request; "
                                   "retrieve predictions again (finished tasks are skipped), select fewer tasks, "
                                   "or raise ML_TIMEOUT_PREDICT on Label Studio and PIXELLLM_LS_PREDICT_BUDGET here")
                    continue
                try:
                    self._run(op, chunk, cfg, adapter, max_boxes, threshold)
                except Exception as exc:  # noqa: BLE001 - isolate the bad task(s)
                    if len(chunk) == 1:
                        chunk[0].error = _message(exc)
                        continue
                    log.info("batch of %d %s tasks failed (%s); retrying one by one", len(chunk), op, _message(exc))
                    for j in chunk:
                        try:
                            self._run(op, [j], cfg, adapter, max_boxes, threshold)
                        except Exception as exc1:  # noqa: BLE001
                            j.error = _message(exc1)
        out = []
        for j in jobs:
            if j.error is not None:
                log.warning("task %s: %s", j.task_id, j.error)
                rt.count("task_errors")
                out.append(convert.error_prediction(j.error, version))
            else:
                rt.count("tasks_predicted")
                out.append(convert.prediction(j.results or [], version))
        return out

    def _plan(self, index: int, task: object, cfg: LabelConfig, kind: str) -> _Job:
        job = _Job(index, task.get("id") if isinstance(task, dict) else None)
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise TaskError("task has no 'data' object")
            data = task["data"]
            key = cfg.image.value
            if not key or key not in data:
                raise TaskError(f"task data has no '{key}' field for <Image name=\"{cfg.image.name}\">; "
                                f"task data keys: {sorted(map(str, data))[:10]}")
            job.ref = data[key]
            job.op = kind
            if kind == "refer":
                job.texts = self._task_texts(data, cfg)
                if not job.texts:
                    job.op = "dense_caption"
            elif kind == "caption_regions":
                job.boxes_pct = _existing_regions(task)
                if not job.boxes_pct:
                    job.op = "dense_caption"
        except (TaskError, PixelLLMError) as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001
            job.error = _message(exc)
        return job

    def _task_texts(self, data: dict, cfg: LabelConfig) -> list[str]:
        obj = cfg.expression_object
        raw = data.get(obj.value) if obj is not None else None
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            box = cfg.box_control
            raw = (box.attr("model_default_prompt") if box else None) or os.environ.get("PIXELLLM_LS_DEFAULT_PROMPT")
        if raw is None:
            return []
        items = raw if isinstance(raw, list) else [raw]
        texts = []
        for t in items:
            if not isinstance(t, str):
                raise TaskError(f"referring expression must be text, got {type(t).__name__}")
            texts += [line.strip() for line in t.splitlines() if line.strip()]
        limit = self.runtime.settings.max_prompt_chars
        for t in texts:
            if len(t) > limit:
                raise TaskError(f"referring expression is {len(t):,} characters; the limit is {limit:,} "
                                "(PIXELLLM_LS_MAX_PROMPT_CHARS)")
        if len(texts) > 50:
            raise TaskError(f"task has {len(texts)} referring expressions; at most 50 per task")
        return texts

    def _load_images(self, jobs: list[_Job], params: dict, deadline: float) -> None:
        if not jobs:
            return
        fetcher = self.runtime.fetcher
        login, password = params.get("login"), params.get("password")
        # An in-process Predictor decodes and resizes here, in the download threads, outside its lock;
        # a worker's RemotePredictor gets the file's bytes as they are.
        try:
            prepare = getattr(self.runtime.predictor, "prepare", None)
        except Exception:  # noqa: BLE001 - a predictor that fails to load is reported per task by _run
            prepare = None

        def load(job: _Job) -> None:
            if time.monotonic() > deadline:
                job.error = "image not fetched within this request's time budget; retrieve predictions again"
                return
            try:
                encoded = fetcher.open(job.ref, task_id=job.task_id,
                                       login=login if isinstance(login, str) else None,
                                       password=password if isinstance(password, str) else None)
                job.image = prepare(encoded) if callable(prepare) else encoded
            except Exception as exc:  # noqa: BLE001
                job.error = _message(exc)

        workers = min(self.runtime.settings.fetch_workers, len(jobs))
        if workers <= 1:
            for j in jobs:
                load(j)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="ls-fetch") as pool:
                list(pool.map(load, jobs))
        for j in jobs:
            if j.error is None and j.op == "caption_regions":
                w, h = j.image.size
                j.boxes = [r.box_xyxy for r in convert.regions_from_results(j.boxes_pct, w, h)]
                if not j.boxes:
                    j.op = "dense_caption"

    def _run(self, op: str, jobs: list[_Job], cfg: LabelConfig, adapter: str | None, max_boxes: int,
             threshold: float | None) -> None:
        p = self.runtime.predictor
        images = [j.image for j in jobs]
        kw = {"adapter": adapter} if adapter else {}
        box = cfg.box_control
        if op == "refer":
            found = p.refer(images, [j.texts for j in jobs], **kw)
            for j, per_text in zip(jobs, found):
                dets = [d for dets in per_text for d in dets[:max_boxes]
                        if threshold is None or d.score >= threshold]
                j.results = convert.boxes_to_results(cfg, dets, *j.image.size)
        elif op == "caption_regions":
            caps = p.caption_regions(images, [j.boxes for j in jobs], **kw)
            for j, regions in zip(jobs, caps):
                j.results = convert.boxes_to_results(cfg, regions, *j.image.size)
        elif op == "dense_caption":
            regions = p.dense_caption(images, max_regions=_int_attr(box, "model_max_regions", 20),
                                      min_score=0.3 if threshold is None else threshold, **kw)
            for j, r in zip(jobs, regions):
                j.results = convert.boxes_to_results(cfg, r, *j.image.size)
        elif op == "caption_trace":
            caps = p.caption(images, trace=True, **kw)
            for j, c in zip(jobs, caps):
                j.results = convert.traced_caption_to_results(cfg, c, *j.image.size)
        else:  # pragma: no cover
            raise TaskError(f"unknown operation {op}")
        if any(j.results is None for j in jobs):
            raise PixelLLMError("the model returned fewer results than images")

    # ---- interactive ----
    def _interactive(self, tasks: list, context: dict, cfg: LabelConfig, params: dict, version: str) -> list[dict]:
        out = []
        for task in tasks or [None]:
            try:
                out.append(self._interactive_one(task, context, cfg, params, version))
                self.runtime.count("interactive")
            except Exception as exc:  # noqa: BLE001
                log.warning("interactive task %s: %s", task.get("id") if isinstance(task, dict) else None,
                            _message(exc))
                self.runtime.count("task_errors")
                out.append(convert.error_prediction(_message(exc), version))
        return out

    def _interactive_one(self, task: object, context: dict, cfg: LabelConfig, params: dict, version: str) -> dict:
        job = self._plan(0, task, cfg, "dense_caption")  # only the image: the text comes from the context
        if job.error:
            raise TaskError(job.error)
        image_name = cfg.image.name
        results = [r for r in context["result"] if isinstance(r, dict) and r.get("to_name", image_name) == image_name]
        prompt = cfg.prompt_control
        names = [prompt.name] if prompt is not None else []
        texts = convert.texts_from_results(results, names)
        drawn = _uncaptioned_rects(results)
        if not texts and not drawn:
            if not any(isinstance(r, dict) and str(r.get("type", "")).lower() in convert.RECT_TYPES
                       for r in results):
                raise TaskError("interactive context has neither a prompt text nor a rectangle")
            return convert.prediction([], version)  # e.g. a captioned box was moved: never overwrite a caption
        limit = self.runtime.settings.max_prompt_chars
        for t in texts:
            if len(t) > limit:
                raise TaskError(f"prompt is {len(t):,} characters; the limit is {limit:,}")
        self._load_images([job], params, time.monotonic() + self.runtime.settings.fetch_timeout_s)
        if job.error:
            raise TaskError(job.error)
        image = job.image
        w, h = image.size
        p = self.runtime.predictor
        adapter = self.runtime.adapter_for(self.project_id)
        kw = {"adapter": adapter} if adapter else {}
        out: list[dict] = []
        if texts:
            max_boxes = _int_attr(cfg.box_control, "model_max_boxes", 1)
            found = p.refer([image], [texts], **kw)[0]
            out += convert.boxes_to_results(cfg, [d for dets in found for d in dets[:max_boxes]], w, h)
        if drawn:
            pairs = [(src, convert.regions_from_results([src], w, h)) for src in drawn]
            pairs = [(src, found[0]) for src, found in pairs if found]
            if not pairs:
                raise TaskError("the drawn rectangle has no area inside the image")
            caps = p.caption_regions([image], [[r.box_xyxy for _, r in pairs]], **kw)[0]
            cap_ctl = cfg.caption_control or cfg.image_caption_control
            if cap_ctl is None:
                raise LabelConfigError("the config has no <TextArea> on the image to put the caption in")
            for (src, _region), cap in zip(pairs, caps):
                geometry = {k: src["value"][k] for k in ("x", "y", "width", "height")} if cap_ctl.per_region else None
                rid = str(src["id"]) if src.get("id") and cap_ctl.per_region else None
                if rid is not None:
                    # echo the drawn rectangle (same id, label, geometry): a TextArea alone would replace the
                    # region by an unlabelled one when the suggestion is accepted (seen in Label Studio 1.23.2)
                    out.append(_echo_rect(src, w, h))
                res = convert.text_result(cap_ctl, cfg.image.name, cap.text, w, h, region_id=rid,
                                          geometry=geometry)
                res["score"] = round(float(cap.score), 6)
                out.append(res)
        return convert.prediction(out, version)

    # ------------------------------------------------------------------ fit
    def fit(self, event: str, data: dict, **additional_params) -> dict:
        """Record annotations and enqueue a background fine-tune; returns at once (LS waits 1 s)."""
        project = data.get("project") if isinstance(data, dict) else None
        pid = self.project_id
        label_config = None
        if isinstance(project, dict):
            pid = pid or (str(project.get("id")) if project.get("id") is not None else None)
            label_config = project.get("label_config")
        if not pid:
            raise TaskError("webhook payload names no project")
        return self.runtime.training.handle_event(pid, event, data, label_config or self.label_config)


def _echo_rect(src: dict, width: int, height: int) -> dict:
    keep = ("id", "from_name", "to_name", "type", "value")
    rect = {k: src[k] for k in keep if k in src}
    rect.update(original_width=src.get("original_width", width), original_height=src.get("original_height", height),
                image_rotation=src.get("image_rotation", 0))
    return rect


def _uncaptioned_rects(results: list) -> list[dict]:
    """Rectangles of an interactive context that need a caption. Label Studio sends the drawn region plus
    the other regions of the same kind (e.g. accepted predictions, which already carry their caption):
    a rectangle whose id already has a TextArea result is left alone."""
    captioned = {str(r.get("id")) for r in results if isinstance(r, dict)
                 and str(r.get("type", "")).lower() == "textarea" and r.get("id") is not None}
    return [r for r in results if isinstance(r, dict) and str(r.get("type", "")).lower() in convert.RECT_TYPES
            and not (r.get("id") is not None and str(r["id"]) in captioned)]


def _existing_regions(task: dict) -> list[dict]:
    """Rectangle results of the task's latest annotation (else latest prediction)."""
    for key in ("annotations", "predictions"):
        items = [a for a in task.get(key) or [] if isinstance(a, dict) and isinstance(a.get("result"), list)]
        for item in reversed(items):
            rects = [r for r in item["result"] if isinstance(r, dict)
                     and str(r.get("type", "")).lower() in convert.RECT_TYPES]
            if rects:
                return rects
    return []


def _int_attr(control, name: str, default: int) -> int:
    try:
        return max(1, int(control.attr(name))) if control is not None and control.attr(name) else default
    except ValueError:
        return default


def _float_attr(control, name: str, default: float | None) -> float | None:
    try:
        return float(control.attr(name)) if control is not None and control.attr(name) else default
    except ValueError:
        return default

