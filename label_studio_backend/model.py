"""The PixelLLM backend model, in the upstream class shape (``setup`` / ``predict`` / ``fit``).

Batch pre-annotation ("Retrieve predictions"), per task, by the config's task (see ``label_config``):

- ``refer``: the referring text comes from the task field the config's ``<Text>`` names (a string or a
  list of strings), else the box control's ``model_default_prompt`` / ``PIXELLLM_LS_DEFAULT_PROMPT``; a task
  with no text gets dense captions. Each box carries its per-region caption (same region id).
- ``caption_regions``: boxes already on the task (latest annotation, else prediction) are captioned;
  a task with none gets dense captions.
- ``dense_caption``: proposals, each with a caption.
- ``caption_trace``: the whole-image caption, each word as a box with its word (the registry's ``caption``
  task with ``trace``).

Tasks are batched through the model (``PIXELLLM_LS_BATCH_SIZE`` images per call, images downloaded in
parallel); a failing batch is retried task by task (``inference.tasks.run_isolated``) so one bad task never
costs the others. Work stops at ``PIXELLLM_LS_PREDICT_BUDGET`` seconds (keep it under Label Studio's
``ML_TIMEOUT_PREDICT``); tasks left over get a per-task error and a ``-failed`` version, so the next
"Retrieve predictions" asks again.

Interactive (``context`` set): a typed prompt gives box suggestions; a drawn rectangle gives a caption
for that region (the TextArea result reuses the rectangle's id).

Limits (``pixelllm_plugins.bounds``): the config's numeric ``model_*`` attributes are checked (a bad value is
every task's error); texts go through ``validate_text`` (a lone surrogate is the task's error, text of only
blanks and control characters counts as no text); at most ``MAX_TEXTS`` texts per task; at most
``MAX_BOXES`` boxes are captioned per image: the first ones of an annotation in batch, the most recently
drawn ones (last in Label Studio's context) interactively, with a ``warning`` in that task's prediction.
"""

from __future__ import annotations

import logging
import os
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pixelllm_plugins.bounds import BOUNDS, DEFAULT_MIN_SCORE
from pixelllm_plugins.errors import InvalidPromptError, PixelLLMError
from pixelllm_plugins.inference.tasks import TASKS, run_isolated
from pixelllm_plugins.tokenizer import validate_text

from . import convert
from .base import LabelStudioMLBase, ModelResponse
from .errors import InvalidRegionError, TaskError, printable
from .label_config import LabelConfig, LabelConfigError, ModelOptions
from .runtime import Runtime

if TYPE_CHECKING:
    from pixelllm_plugins.inference.predictor import PreparedInput
    from pixelllm_plugins.io import EncodedImage

log = logging.getLogger(__name__)

MAX_BOXES = int(BOUNDS["max_boxes"].high)  # boxes captioned per image
MAX_TEXTS = int(BOUNDS["max_texts"].high)  # referring expressions per task / prompt texts per call

# the config's task (``model_task``, see ``label_config``) -> the registry task it runs (``inference.tasks``):
# the one place Label Studio's names meet the registry's
REGISTRY_TASK = {"refer": "refer", "caption_regions": "caption_regions", "dense_caption": "dense_caption",
                 "caption_trace": "caption", "segment": "segment"}
# the order batches run in: segment last, so a task whose masks are prompted by its dense-caption regions
# (segmentation config, no text, no boxes) is segmented in the same request
ORDER = ("refer", "caption_regions", "dense_caption", "caption", "segment")

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_CREATED",
                "ANNOTATIONS_DELETED", "START_TRAINING")


@dataclass
class _Job:
    """One task of a batch on its way through the model."""

    index: int
    task_id: object
    op: str = ""  # the registry task: refer / caption_regions / dense_caption / caption (traced)
    ref: object = None
    image: EncodedImage | PreparedInput | None = None  # both have .size, the original (width, height)
    texts: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    boxes_pct: list[dict] = field(default_factory=list)  # boxes_pct[i]: the LS region they came from
    prompts: dict | None = None  # segment: {"texts": [...]} or {"boxes": [...]} (the registry's item)
    captions: list[str] | None = None  # segment: a caption per box prompt (from dense captions)
    then_segment: bool = False  # dense captions first, then a mask per region (segmentation config, no prompt)
    error: str | None = None
    warning: str | None = None  # e.g. only the first MAX_BOXES boxes captioned
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
            if cfg.box_control is None and cfg.mask_control is None:
                raise LabelConfigError(f'label config has no <RectangleLabels> (or <Rectangle>), <PolygonLabels> or '
                                       f'<BrushLabels> with toName="{cfg.image.name}"; add one for the regions (see '
                                       'the shipped configs)')
            task_kind = cfg.task
            options = cfg.model_options()
        except LabelConfigError as exc:
            rt.count("task_errors", len(tasks))
            return ModelResponse(version, [convert.error_prediction(str(exc), version) for _ in tasks])
        if isinstance(context, dict) and isinstance(context.get("result"), list) and context["result"]:
            return ModelResponse(version, self._interactive(tasks, context, cfg, options, kwargs, version))
        return ModelResponse(version, self._batch(tasks, cfg, task_kind, options, kwargs, version))

    # ---- batch ----
    def _batch(self, tasks: list, cfg: LabelConfig, kind: str, options: ModelOptions, params: dict,
               version: str) -> list[dict]:
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
        for op in ORDER:
            ready = [j for j in jobs if j.error is None and j.op == op]
            for start in range(0, len(ready), s.batch_size):
                chunk = ready[start:start + s.batch_size]
                if time.monotonic() > deadline:
                    for j in chunk:
                        j.error = (f"not predicted within the {s.predict_budget_s:g} s budget of this request; "
                                   "retrieve predictions again (finished tasks are skipped), select fewer tasks, "
                                   "or raise ML_TIMEOUT_PREDICT on Label Studio and PIXELLLM_LS_PREDICT_BUDGET here")
                    continue
                self._run(op, chunk, cfg, adapter, options)
        out = []
        for j in jobs:
            if j.error is not None:
                log.warning("task %s: %s", j.task_id, j.error)
                rt.count("task_errors")
                out.append(convert.error_prediction(j.error, version))
            else:
                rt.count("tasks_predicted")
                pred = convert.prediction(j.results or [], version)
                if j.warning:
                    log.warning("task %s: %s", j.task_id, j.warning)
                    pred["warning"] = j.warning
                out.append(pred)
        return out

    def _plan(self, index: int, task: object, cfg: LabelConfig, kind: str) -> _Job:
        task_id = task.get("id") if isinstance(task, dict) else None
        # only an int or a short string is an id (it goes into logs, cache keys and presign URLs)
        if isinstance(task_id, bool) or not isinstance(task_id, (int, str)) or len(str(task_id)) > 64:
            task_id = None
        job = _Job(index, task_id)
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise TaskError("task has no 'data' object")
            data = task["data"]
            key = cfg.image.value
            if not key or key not in data:
                keys = ", ".join(printable(k, 40) for k in sorted(map(str, data))[:10])
                raise TaskError(f"task data has no '{key}' field for <Image name=\"{cfg.image.name}\">; "
                                f"task data keys: [{keys}]")
            job.ref = data[key]
            job.op = REGISTRY_TASK[kind]
            if kind == "refer":
                job.texts = self._task_texts(data, cfg)
                if not job.texts:
                    job.op = "dense_caption"
            elif kind == "caption_regions":
                job.boxes_pct = _existing_regions(task)
                if not job.boxes_pct:
                    job.op = "dense_caption"
            elif kind == "segment":
                # the task's expressions, else its rectangles, else its dense-caption regions prompt the masks
                job.texts = self._task_texts(data, cfg)
                if job.texts:
                    job.prompts = {"texts": job.texts}
                else:
                    job.boxes_pct = _existing_regions(task)
                    if not job.boxes_pct:
                        job.op, job.then_segment = "dense_caption", True
        except (TaskError, PixelLLMError) as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001
            job.error = _message(exc)
        return job

    def _task_texts(self, data: dict, cfg: LabelConfig) -> list[str]:
        """The task's referring expressions (its ``<Text>`` field: a string, one per line, or a list of
        strings); without any, the box control's ``model_default_prompt`` / ``PIXELLLM_LS_DEFAULT_PROMPT``."""
        obj = cfg.expression_object
        texts = self._clean_texts(data.get(obj.value) if obj is not None else None, "referring expression")
        if not texts:
            box = cfg.box_control or cfg.mask_control
            texts = self._clean_texts((box.attr("model_default_prompt") if box else None)
                                      or os.environ.get("PIXELLLM_LS_DEFAULT_PROMPT"),
                                      "default prompt (model_default_prompt / PIXELLLM_LS_DEFAULT_PROMPT)")
        return texts

    def _clean_texts(self, raw: object, what: str) -> list[str]:
        """Texts through ``validate_text``, one per line: ``TaskError`` / ``InvalidPromptError`` for a
        non-string, a lone surrogate, a text over ``PIXELLLM_LS_MAX_PROMPT_CHARS`` or more than
        ``MAX_TEXTS`` texts; lines of only blanks and control characters (NUL) are skipped, like empty ones."""
        if raw is None:
            return []
        items = raw if isinstance(raw, list) else [raw]
        limit = self.runtime.settings.max_prompt_chars
        texts: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise TaskError(f"{what} must be text, got {type(item).__name__}")
            for line in item.splitlines():
                try:
                    text = validate_text(line, what)
                except InvalidPromptError:
                    if _blank(line):
                        continue  # empty, spaces or control characters only: no text, as an empty field
                    raise
                if len(text) > limit:
                    raise TaskError(f"{what} is {len(text):,} characters; the limit is {limit:,} "
                                    "(PIXELLLM_LS_MAX_PROMPT_CHARS)")
                texts.append(text)
                if len(texts) > MAX_TEXTS:
                    raise TaskError(f"more than {MAX_TEXTS} texts ({what}) for one image; give at most "
                                    f"{MAX_TEXTS}, one per line")
        return texts

    def _load_images(self, jobs: list[_Job], params: dict, deadline: float) -> None:
        if not jobs:
            return
        fetcher = self.runtime.fetcher
        login, password = _credential(params.get("login")), _credential(params.get("password"))
        if login is False or password is False:
            for j in jobs:
                j.error = "params.login / params.password must be valid Unicode text"
            return
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
                encoded = fetcher.open(job.ref, task_id=job.task_id, login=login, password=password)
                if not callable(prepare):
                    job.image = encoded
                    return
                # a tiny file may decode into hundreds of MB: decode within the budget
                with self.runtime.decode_budget.reserve(encoded.decode_bytes, size=encoded.size, mode=encoded.mode,
                                                        timeout_s=max(0.0, deadline - time.monotonic())):
                    job.image = prepare(encoded)
            except TimeoutError:
                job.error = "image not decoded within this request's time budget; retrieve predictions again"
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
                pairs, dropped = _regions_capped(j.boxes_pct, w, h, keep="first")
                j.boxes = [r.box_xyxy for _, r in pairs]
                if dropped:
                    j.warning = (f"captioned the first {MAX_BOXES} of {len(pairs) + dropped:,} boxes of the task's "
                                 f"annotation; at most {MAX_BOXES} boxes per image are captioned")
                if not j.boxes:
                    j.op = "dense_caption"
            if j.error is None and j.op == "segment" and j.prompts is None:
                w, h = j.image.size
                pairs, dropped = _regions_capped(j.boxes_pct, w, h, keep="first")
                if dropped:
                    j.warning = (f"segmented the first {MAX_BOXES} of {len(pairs) + dropped:,} boxes of the task's "
                                 f"annotation; at most {MAX_BOXES} boxes per image are segmented")
                if pairs:
                    j.prompts = {"boxes": [r.box_xyxy for _, r in pairs]}
                else:
                    j.op, j.then_segment = "dense_caption", True

    def _run(self, op: str, jobs: list[_Job], cfg: LabelConfig, adapter: str | None,
             options: ModelOptions) -> None:
        """The jobs' results (``j.results``) in one model call; when it fails, each job alone, so one bad
        task never costs the others (its ``j.error``)."""
        spec = TASKS[op]
        kw: dict = {"adapter": adapter} if adapter else {}
        max_boxes, threshold = options.max_boxes, options.score_threshold
        if op == "dense_caption":
            kw |= {"max_regions": options.max_regions, "min_score": DEFAULT_MIN_SCORE if threshold is None else threshold}
        elif op == "caption":  # the config's caption_trace
            kw["trace"] = True

        def results(job: _Job, found) -> list[dict]:
            if op == "segment":
                caps = job.captions or []
                return [x for k, m in enumerate(found) if threshold is None or m.score >= threshold
                        for x in convert.mask_to_results(cfg, m, *job.image.size,
                                                         caption=caps[k] if k < len(caps) else None)]
            if op == "dense_caption" and job.then_segment:
                # the regions prompt the masks in the segment pass that follows (ORDER); none: no masks
                regions = list(found)
                job.prompts = {"boxes": [r.box_xyxy for r in regions]} if regions else None
                job.captions = [r.text for r in regions]
                job.op = "segment" if regions else op
                return []
            if op == "refer":
                found = [d for dets in found for d in dets[:max_boxes] if threshold is None or d.score >= threshold]
            if op == "caption":
                return convert.traced_caption_to_results(cfg, found, *job.image.size)
            return convert.boxes_to_results(cfg, found, *job.image.size)

        def call(chunk: list[_Job]) -> list[list[dict]]:
            item_args = [getattr(j, spec.item_arg) for j in chunk] if spec.item_arg else None  # texts, boxes
            found = spec.call(self.runtime.predictor, [j.image for j in chunk], item_args, **kw)
            return [results(j, f) for j, f in zip(chunk, found)]

        def retrying(n: int, exc: BaseException) -> None:
            log.info("batch of %d %s tasks failed (%s); retrying one by one", n, op, _message(exc))

        for j, outcome in zip(jobs, run_isolated(call, jobs, on_retry=retrying)):
            if isinstance(outcome, Exception):
                j.error = _message(outcome)
            else:
                j.results = outcome

    # ---- interactive ----
    def _interactive(self, tasks: list, context: dict, cfg: LabelConfig, options: ModelOptions, params: dict,
                     version: str) -> list[dict]:
        out = []
        for task in tasks or [None]:
            try:
                out.append(self._interactive_one(task, context, cfg, options, params, version))
                self.runtime.count("interactive")
            except Exception as exc:  # noqa: BLE001
                log.warning("interactive task %s: %s", _short_id(task), _message(exc))
                self.runtime.count("task_errors")
                out.append(convert.error_prediction(_message(exc), version))
        return out

    def _interactive_one(self, task: object, context: dict, cfg: LabelConfig, options: ModelOptions, params: dict,
                         version: str) -> dict:
        job = self._plan(0, task, cfg, "dense_caption")  # only the image: the text comes from the context
        if job.error:
            raise TaskError(job.error)
        image_name = cfg.image.name
        results = [r for r in context["result"] if isinstance(r, dict)
                   and _same(r.get("to_name", image_name), image_name)]
        if cfg.mask_control is not None:
            return self._interactive_segment(job, task, results, cfg, options, params, version)
        prompt = cfg.prompt_control
        names = [prompt.name] if prompt is not None else []
        texts = self._clean_texts(convert.texts_from_results(results, names), "prompt")
        drawn = _uncaptioned_rects(results)
        if not texts and not drawn:
            if not any(_kind(r) in convert.RECT_TYPES for r in results):
                raise TaskError("interactive context has neither a prompt text nor a rectangle")
            return convert.prediction([], version)  # e.g. a captioned box was moved: never overwrite a caption
        self._load_images([job], params, time.monotonic() + self.runtime.settings.fetch_timeout_s)
        if job.error:
            raise TaskError(job.error)
        image = job.image
        w, h = image.size
        p = self.runtime.predictor
        adapter = self.runtime.adapter_for(self.project_id)
        kw = {"adapter": adapter} if adapter else {}
        out: list[dict] = []
        warning = None
        if texts:
            found = p.refer([image], [texts], **kw)[0]
            out += convert.boxes_to_results(cfg, [d for dets in found for d in dets[:options.max_boxes]], w, h)
        if drawn:
            pairs, dropped = _regions_capped(drawn, w, h, keep="last")
            if not pairs:
                raise TaskError("the drawn rectangle has no area inside the image")
            if dropped:
                warning = (f"captioned the {MAX_BOXES} most recently drawn of {len(pairs) + dropped:,} uncaptioned "
                           f"boxes; at most {MAX_BOXES} boxes per image are captioned at once")
                log.warning("interactive task %s: %s", _short_id(task), warning)
            caps = p.caption_regions([image], [[r.box_xyxy for _, r in pairs]], **kw)[0]
            cap_ctl = cfg.caption_control or cfg.image_caption_control
            if cap_ctl is None:
                raise LabelConfigError("the config has no <TextArea> on the image to put the caption in")
            for (src, _region), cap in zip(pairs, caps):
                geometry = _geometry(src["value"]) if cap_ctl.per_region else None
                rid = _region_id(src) if cap_ctl.per_region else None
                if rid is not None:
                    # echo the drawn rectangle (same id, label, geometry): a TextArea alone would replace the
                    # region by an unlabelled one when the suggestion is accepted (seen in Label Studio 1.23.2)
                    out.append(_echo_rect(src, w, h))
                res = convert.text_result(cap_ctl, cfg.image.name, cap.text, w, h, region_id=rid,
                                          geometry=geometry)
                res["score"] = round(float(cap.score), 6)
                out.append(res)
        pred = convert.prediction(out, version)
        if warning:
            pred["warning"] = warning
        return pred

    def _interactive_segment(self, job: _Job, task: object, results: list, cfg: LabelConfig, options: ModelOptions,
                             params: dict, version: str) -> dict:
        """Segmentation configs: the clicks of the context (``keypointlabels``; Label Studio sends the new
        click with the other smart clicks) give one mask, the union of the masks at the positive clicks minus
        those at Alt-clicks, plus its caption; the most recent drawn rectangle gives its mask (and caption); a
        typed prompt gives the mask of what it describes. Masks are brush regions when the config has a
        ``<BrushLabels>``, else polygons."""
        prompt = cfg.prompt_control
        texts = self._clean_texts(convert.texts_from_results(results, [prompt.name] if prompt else []), "prompt")
        clicks = [r for r in results if _kind(r) in ("keypointlabels", "keypoint")]
        rects = _uncaptioned_rects(results)
        if not texts and not clicks and not rects:
            if any(_kind(r) in convert.RECT_TYPES for r in results):
                return convert.prediction([], version)  # a captioned box was moved: nothing new to segment
            raise TaskError("interactive context has no click (keypoint), rectangle or prompt text to segment")
        if len(clicks) > MAX_BOXES:
            raise InvalidRegionError(f"{len(clicks):,} clicks in one request; at most {MAX_BOXES} per object")
        self._load_images([job], params, time.monotonic() + self.runtime.settings.fetch_timeout_s)
        if job.error:
            raise TaskError(job.error)
        image = job.image
        w, h = image.size
        parsed = [convert.click_from_result(r, w, h) for r in clicks]  # InvalidRegionError for a bad click
        boxes = []
        if rects:
            pairs, _dropped = _regions_capped(rects[-1:], w, h, keep="last")
            if not pairs:
                raise InvalidRegionError("the drawn rectangle has no area inside the image")
            boxes = [pairs[0][1].box_xyxy]
        p = self.runtime.predictor
        adapter = self.runtime.adapter_for(self.project_id)
        kw = {"adapter": adapter} if adapter else {}
        brush = cfg.brush_control is not None
        out: list[dict] = []
        if texts:
            for m in p.segment([image], texts=[texts], **kw)[0]:
                out += convert.mask_to_results(cfg, m, w, h, brush=brush)
        if boxes:
            m = p.segment([image], boxes=[boxes], **kw)[0][0]
            cap = p.caption_regions([image], [boxes], **kw)[0][0]
            out += convert.mask_to_results(cfg, m, w, h, brush=brush, caption=cap.text)
        if parsed:
            out += self._segment_clicks(parsed, image, w, h, cfg, brush, kw)
        return convert.prediction(out, version)

    def _segment_clicks(self, clicks: list, image, w: int, h: int, cfg: LabelConfig, brush: bool, kw: dict) -> list[dict]:
        """One mask for a set of clicks: the union of the masks at the positive clicks minus the masks of the
        objects at the Alt-clicks (each click prompts the model on its own), and the caption of the last
        positive click (``caption_regions`` with a point; the mask's box when the model reads no points)."""
        import numpy as np

        from pixelllm_plugins.inference.results import MaskResult
        from pixelllm_plugins.masks import mask_to_box, mask_to_polygons, mask_to_rle, rle_to_mask

        positive = [c for c in clicks if c.positive]
        negative = [c for c in clicks if not c.positive]
        if not positive:
            raise InvalidRegionError("only Alt-clicks (not the object): click on the object first")
        p = self.runtime.predictor
        found = p.segment([image], points=[[[c.x, c.y] for c in positive + negative]],
                          point_labels=[[1] * len(clicks)], **kw)[0]
        masks = [rle_to_mask(m.mask) for m in found]
        mask = np.logical_or.reduce(masks[:len(positive)])
        if negative:
            mask &= ~np.logical_or.reduce(masks[len(positive):])
        if not mask.any():
            raise TaskError("the Alt-clicks remove the whole mask of the clicked object; undo one of them")
        box = mask_to_box(mask)
        last = positive[-1]
        try:
            caption = p.caption_regions([image], points=[[[last.x, last.y]]], **kw)[0][0].text
        except PixelLLMError:  # a model that reads no points: caption the mask's box
            caption = p.caption_regions([image], [[box]], **kw)[0][0].text
        score = float(np.mean([m.score for m in found[:len(positive)]]))
        merged = MaskResult(box, score, mask_to_rle(mask), [] if brush else mask_to_polygons(mask),
                            float(np.mean([m.mask_score for m in found[:len(positive)]])))
        return convert.mask_to_results(cfg, merged, w, h, brush=brush, caption=caption)

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
    """The drawn rectangle as it came (id, names, label, geometry), rebuilt from checked fields only: nothing
    of the context is echoed that is not a short string or a finite number."""
    value = src["value"]
    echo = _geometry(value)
    if _finite(value.get("rotation")):
        echo["rotation"] = value["rotation"]
    for key in convert.RECT_TYPES:
        labels = value.get(key)
        if isinstance(labels, list) and all(isinstance(t, str) for t in labels) and len(labels) <= MAX_BOXES:
            echo[key] = labels
    rect = {"id": _region_id(src), "value": echo}
    for key in ("from_name", "to_name", "type"):
        if isinstance(src.get(key), str):
            rect[key] = src[key]
    ow, oh = src.get("original_width"), src.get("original_height")
    rect.update(original_width=ow if _finite(ow) else width, original_height=oh if _finite(oh) else height,
                image_rotation=src["image_rotation"] if _finite(src.get("image_rotation")) else 0)
    return rect


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300


def _geometry(value: dict) -> dict:
    return {k: float(value[k]) for k in ("x", "y", "width", "height")}


def _region_id(src: dict) -> str | None:
    rid = src.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "" or len(str(rid)) > 128:
        return None
    return str(rid)


def _kind(result: object) -> str:
    """A result's ``type``, lower-case ("" when it is not a string)."""
    kind = result.get("type") if isinstance(result, dict) else None
    return kind.lower() if isinstance(kind, str) else ""


def _same(a: object, b: str) -> bool:
    return isinstance(a, str) and a == b


def _short_id(task: object) -> object:
    tid = task.get("id") if isinstance(task, dict) else None
    return tid if isinstance(tid, (int, str)) and len(str(tid)) <= 64 else None


def _blank(text: str) -> bool:
    """Only whitespace and control characters (what ``validate_text`` calls empty)."""
    return all(c.isspace() or unicodedata.category(c) == "Cc" for c in text)


def _credential(value: object) -> str | None | bool:
    """``params.login`` / ``params.password``: a string, ``None`` when absent or not text, ``False`` when
    it is text that cannot be sent (a lone surrogate)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value


def _regions_capped(results: list, width: int, height: int, *, keep: str) -> tuple[list[tuple[dict, object]], int]:
    """(source result, ``Region``) for the rectangles with an area inside the image, at most ``MAX_BOXES``:
    the first ones (``keep="first"``) or the last ones (``"last"``), and how many more there were."""
    items = results if keep == "first" else list(reversed(results))
    pairs, dropped = [], 0
    for src in items:
        found = convert.regions_from_results([src], width, height)
        if not found:
            continue
        if len(pairs) < MAX_BOXES:
            pairs.append((src, found[0]))
        else:
            dropped += 1
    return (pairs if keep == "first" else pairs[::-1]), dropped


def _uncaptioned_rects(results: list) -> list[dict]:
    """Rectangles of an interactive context that need a caption. Label Studio sends the drawn region plus
    the other regions of the same kind (e.g. accepted predictions, which already carry their caption):
    a rectangle whose id already has a TextArea result is left alone."""
    captioned = {_region_id(r) for r in results if _kind(r) == "textarea"} - {None}
    return [r for r in results if _kind(r) in convert.RECT_TYPES and _region_id(r) not in captioned]


def _existing_regions(task: dict) -> list[dict]:
    """Rectangle results of the task's latest annotation (else latest prediction)."""
    for key in ("annotations", "predictions"):
        found = task.get(key)
        items = [a for a in found if isinstance(a, dict) and isinstance(a.get("result"), list)] \
            if isinstance(found, list) else []
        for item in reversed(items):
            rects = [r for r in item["result"] if _kind(r) in convert.RECT_TYPES]
            if rects:
                return rects
    return []
