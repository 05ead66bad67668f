"""Batched runs over a sample collection: ``run_refer``, ``run_caption_regions``, ``run_dense_caption``,
``run_caption_with_trace`` and ``run_segment``.

Results are written in bulk after every batch (an interrupted run keeps what it wrote), samples already
labeled by the same model version for the same request are skipped unless ``overwrite``, and per-sample
errors are recorded in the ``pixelllm_error`` field and the run summary. Every run takes ``adapter``: a
LoRA adapter trained with ``run_finetune`` (its name) or an adapter folder; its labels carry
``model_version`` ``<base>+<adapter version>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import fiftyone.core.collections as foc

from ...bounds import DEFAULT_MIN_SCORE
from ...errors import InvalidParameterError, PixelLLMError, RemoteError
from ...inference.protocol import PredictorProtocol
from ...inference.tasks import run_isolated
from ...io import open_encoded
from .finetune import resolve_adapter, with_adapter
from .params import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CAPTION_ATTRIBUTE,
    DEFAULT_CAPTION_FIELD,
    DEFAULT_DENSE_FIELD,
    DEFAULT_MASK_FIELD,
    DEFAULT_REFER_FIELD,
    DEFAULT_TRACE_FIELD,
    ERROR_FIELD,
    FieldError,
    _check_common,
    _selected_labels,
)
from .predictors import resolve_predictor
from .tasks import _CaptionRegionsTask, _DenseTask, _Item, _ReferTask, _SegmentTask, _Task, _TraceTask

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 50

ProgressCallback = Callable[[int, int, "RunSummary"], None]


@dataclass
class RunSummary:
    """What a run did; ``to_dict()`` is the operator's result."""

    operation: str
    model_version: str = ""
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    labels: int = 0
    fields: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    message: str = ""

    @property
    def done(self) -> int:
        return self.processed + self.skipped + self.failed

    def add_error(self, sample_id: str, filepath: str, message: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"sample_id": sample_id, "filepath": filepath, "error": message})

    def to_dict(self) -> dict:
        return {"operation": self.operation, "model_version": self.model_version, "total": self.total,
                "processed": self.processed, "skipped": self.skipped, "failed": self.failed,
                "labels": self.labels, "fields": list(self.fields), "errors": list(self.errors),
                "message": self.message}


def _infer_isolated(task: _Task, items: list[_Item]) -> None:
    """Run the batch; if it fails, run its samples one by one (``run_isolated``) so one bad sample fails
    alone. Only project errors stay with their sample (anything else stops the run), and a batch whose
    every sample failed on the GPU worker stops the run with ``RemoteError``."""

    def retrying(n: int, exc: BaseException) -> None:
        logger.info("batch of %d failed (%s); retrying one sample at a time", n, exc)

    outcomes = run_isolated(task.infer, items, isolate=PixelLLMError, on_retry=retrying)
    for item, outcome in zip(items, outcomes):
        if isinstance(outcome, BaseException):
            item.error = str(outcome)
        else:
            item.result = outcome
    if len(items) > 1 and all(isinstance(o, RemoteError) for o in outcomes):
        raise RemoteError(f"the GPU worker failed on every sample of a batch: {items[0].error}")


def _run(task: _Task, samples, *, overwrite: bool, batch_size: int | None, model: str | None,
         predictor: PredictorProtocol | None, progress: ProgressCallback | None,
         adapter: str | None = None) -> RunSummary:
    """Check the request (parameters, then fields), load the model, then label batch after batch.

    Nothing is read from the images or written to the dataset before every check passed; from then on a
    sample that fails (missing or unreadable image, bad per-sample input) gets its error recorded and the
    others go on."""
    batch_size, overwrite, model = _check_common(batch_size, overwrite, model)
    if progress is not None and not callable(progress):
        raise InvalidParameterError(f"progress must be a callable, got {type(progress).__name__}")
    if not isinstance(samples, foc.SampleCollection):
        raise FieldError(f"PixelLLM runs on a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type != "image":
        raise FieldError(f"PixelLLM works on image collections, not {samples.media_type!r}")
    task.check(samples)
    resolve_adapter(adapter)  # an unknown adapter is refused before the model loads
    task.attach(with_adapter(resolve_predictor(predictor, model), adapter))
    summary = RunSummary(task.name, model_version=task.version)
    summary.fields = task.output_fields()
    ids = samples.values("id")
    summary.total = len(ids)
    if not ids:
        summary.message = "the target view has no samples; nothing to do"
        if progress:
            progress(0, 0, summary)
        return summary
    dataset = samples._dataset
    read = [f for f in dict.fromkeys(task.read_fields()) if samples.has_field(f)]
    extra = [ERROR_FIELD] if samples.has_field(ERROR_FIELD) else []
    prefix = f"{task.name}: "
    for start in range(0, len(ids), batch_size):
        chunk = samples.select(ids[start:start + batch_size], ordered=True)
        columns = chunk.values(["id", "filepath", *read, *extra])
        items = []
        for k in range(len(columns[0])):
            values = {name: columns[2 + j][k] for j, name in enumerate(read)}  # absent fields: None
            err = columns[-1][k] if extra else None
            items.append(_Item(columns[0][k], columns[1][k], values, err))
        for item in items:
            task.prepare(item, overwrite)
        todo = [i for i in items if not i.skip and not i.error]
        for item in todo:
            try:
                item.image = open_encoded(item.filepath)  # decoded by the predictor, or sent to a worker as is
            except PixelLLMError as exc:
                item.error = str(exc)
            except OSError as exc:  # e.g. a path too long for the file system, a file that may not be read
                item.error = f"{item.filepath}: cannot read the file ({exc.strerror or exc})"
        todo = [i for i in todo if not i.error]
        if todo:
            _infer_isolated(task, todo)
        ok = [i for i in todo if i.result is not None and not i.error]
        if ok:
            summary.labels += task.write(dataset, ok)
        errors: dict[str, str | None] = {}
        for item in items:
            if item.skip:
                summary.skipped += 1
                continue
            if item.error:
                summary.add_error(item.id, item.filepath, item.error)
                errors[item.id] = prefix + item.error
                continue
            summary.processed += 1
            box_errors = (item.payload or {}).get("errors") if isinstance(item.payload, dict) else None
            if box_errors:
                if len(summary.errors) < MAX_REPORTED_ERRORS:
                    summary.errors.append({"sample_id": item.id, "filepath": item.filepath,
                                           "error": "; ".join(box_errors)})
                errors[item.id] = prefix + "; ".join(box_errors)
            elif item.error_value and item.error_value.startswith(prefix):
                errors[item.id] = None  # this operation now succeeded: clear its old error
        if errors:
            dataset.set_values(ERROR_FIELD, errors, key_field="id")
            extra = [ERROR_FIELD] if samples.has_field(ERROR_FIELD) else []
        if progress:
            progress(summary.done, summary.total, summary)
    if summary.failed:
        summary.message = (f"{summary.failed} of {summary.total} samples failed; see the {ERROR_FIELD!r} field "
                           "and 'errors'")
    return summary


def run_refer(samples, *, prompt: str | Sequence[str] | None = None, prompt_field: str | None = None,
              label_field: str = DEFAULT_REFER_FIELD, overwrite: bool = False,
              batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
              predictor: PredictorProtocol | None = None, progress: ProgressCallback | None = None,
              adapter: str | None = None) -> RunSummary:
    """Find the box a referring expression names, on every sample of ``samples``.

    ``prompt`` applies to every sample; otherwise ``prompt_field`` names a text field (a string, a list of
    strings or a Classification) holding each sample's expression(s). Writes ``fo.Detections`` to
    ``label_field``: one box per expression with ``confidence``, ``prompt`` and ``model_version``.
    """
    task = _ReferTask(prompt, prompt_field, label_field)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress, adapter=adapter)


def run_caption_regions(samples, *, boxes_field: str | None = None,
                        caption_attribute: str = DEFAULT_CAPTION_ATTRIBUTE,
                        selected_labels: Sequence[dict] | None = None, points_field: str | None = None,
                        overwrite: bool = False,
                        batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
                        max_new_tokens: int = 20, num_beams: int = 1,
                        predictor: PredictorProtocol | None = None,
                        progress: ProgressCallback | None = None, adapter: str | None = None) -> RunSummary:
    """Caption existing boxes in place: each box of ``boxes_field`` (or each of ``selected_labels``, the
    App's selection format) gets ``<caption_attribute>``, ``<caption_attribute>_score`` and
    ``<caption_attribute>_model_version`` attributes. Label ids are kept.

    ``points_field``: caption points instead of boxes. Every point of each ``fo.Keypoint`` of that
    Keypoints field (relative coordinates) is a prompt; each keypoint gets ``<caption_attribute>`` (a list:
    one caption per point, "" for a point that could not be used), ``<caption_attribute>_score``,
    ``<caption_attribute>_box`` (the region each caption is of, relative ``[x, y, w, h]``) and
    ``<caption_attribute>_model_version``. Non-finite points (FiftyOne's missing keypoints) and points
    outside the image are skipped and named in the sample's ``pixelllm_error``; ``boxes_field`` is then
    ignored."""
    task = _CaptionRegionsTask(boxes_field, caption_attribute, selected_labels, max_new_tokens, num_beams,
                               points_field)
    selected_labels = _selected_labels(selected_labels)
    if selected_labels and isinstance(samples, foc.SampleCollection):
        samples = samples.select(sorted({s["sample_id"] for s in selected_labels}))
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress, adapter=adapter)


def run_dense_caption(samples, *, label_field: str = DEFAULT_DENSE_FIELD, max_regions: int = 20,
                      min_score: float = DEFAULT_MIN_SCORE, overwrite: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                      model: str | None = None, predictor: PredictorProtocol | None = None,
                      progress: ProgressCallback | None = None, adapter: str | None = None) -> RunSummary:
    """Propose regions and caption each: ``fo.Detections`` with a short ``label`` and a ``caption``."""
    task = _DenseTask(label_field, max_regions, min_score)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress, adapter=adapter)


def run_caption_with_trace(samples, *, caption_field: str = DEFAULT_CAPTION_FIELD,
                           trace_field: str = DEFAULT_TRACE_FIELD, overwrite: bool = False,
                           batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
                           max_new_tokens: int = 40, num_beams: int = 1,
                           predictor: PredictorProtocol | None = None,
                           progress: ProgressCallback | None = None, adapter: str | None = None) -> RunSummary:
    """Caption every image and trace its words: a ``Classification`` in ``caption_field``, one
    ``Keypoint`` per word in ``trace_field`` and the word path as a ``Polyline`` in ``<trace_field>_path``."""
    task = _TraceTask(caption_field, trace_field, max_new_tokens, num_beams)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress, adapter=adapter)


def run_segment(samples, *, prompt: str | Sequence[str] | None = None, prompt_field: str | None = None,
                boxes_field: str | None = None, points_field: str | None = None,
                label_field: str = DEFAULT_MASK_FIELD, output: str = "instance_masks", overwrite: bool = False,
                batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
                predictor: PredictorProtocol | None = None, progress: ProgressCallback | None = None,
              adapter: str | None = None) -> RunSummary:
    """Masks on every sample of ``samples``, for exactly one kind of prompt: ``prompt`` (a text, or texts,
    for every sample), ``prompt_field`` (each sample's texts), ``boxes_field`` (every box of a Detections
    field) or ``points_field`` (every point of a Keypoints field, relative coordinates; one mask per point).

    ``output="instance_masks"`` writes ``fo.Detections`` to ``label_field``: per prompt a Detection whose
    ``bounding_box`` is the mask's tight box and ``mask`` the boolean mask cropped to that box (FiftyOne's
    convention). ``output="polylines"`` writes ``fo.Polylines``: per prompt one filled, closed Polyline whose
    shapes are the mask's polygons, holes as extra shapes (a shape inside another is a hole: FiftyOne's
    ``Polyline.to_segmentation`` fills them that way). Every label has ``confidence``, ``mask_score``,
    ``model_version`` and its prompt (``prompt``, ``prompt_box`` or ``prompt_point``, ``source_id``).
    """
    task = _SegmentTask(prompt, prompt_field, boxes_field, points_field, label_field, output)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress, adapter=adapter)


RUNNERS: dict[str, Callable[..., RunSummary]] = {
    "refer": run_refer, "caption_regions": run_caption_regions, "dense_caption": run_dense_caption,
    "caption_with_trace": run_caption_with_trace, "segment": run_segment,
}
