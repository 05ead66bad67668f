"""The four operations as tasks: which fields each reads, how it checks, prepares, infers and writes a batch.

A task's constructor checks its parameters (no database); ``check`` checks the fields against a collection.
``runs`` drives the tasks over a collection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fiftyone.core.labels as fol

from ...errors import InvalidParameterError, InvalidPromptError, PixelLLMError
from ...geometry import xyxy_to_fo_relative
from ...inference.protocol import PredictorProtocol
from .labels import (
    MASK_OUTPUTS,
    _box_xyxy,
    _refer_key,
    box_prompts,
    dense_to_detections,
    keypoint_prompts,
    masks_to_labels,
    path_field_for,
    refer_to_detections,
    trace_to_labels,
)
from .params import (
    DEFAULT_CAPTION_ATTRIBUTE,
    DEFAULT_CAPTION_FIELD,
    DEFAULT_DENSE_FIELD,
    DEFAULT_MASK_FIELD,
    DEFAULT_REFER_FIELD,
    DEFAULT_TRACE_FIELD,
    FieldError,
    _attribute_name,
    _field_name,
    _number,
    _output_field_name,
    _prompt_list,
    _selected_labels,
    _shown,
    _tag,
    _texts_from,
)


@dataclass
class _Item:
    id: str
    filepath: str
    values: dict[str, Any]
    error_value: str | None = None
    payload: Any = None
    image: Any = None
    error: str | None = None
    skip: bool = False
    result: Any = None


class _Task:
    """One operation: which fields it reads, how it prepares, infers and writes a batch.

    The constructor checks every parameter without touching a dataset or a model (raising a
    ``PixelLLMError``); ``check`` then checks the fields against the collection; ``attach`` gives the model.
    """

    name = ""
    label_kind = "labels"
    predictor: PredictorProtocol
    version = ""

    def attach(self, predictor: PredictorProtocol) -> None:
        self.predictor = predictor
        self.version = str(predictor.model_version)

    def read_fields(self) -> list[str]:
        return []

    def check(self, samples) -> None:
        """Request-level checks against the collection (raise ``FieldError``): nothing is written."""

    def prepare(self, item: _Item, overwrite: bool) -> None:
        """Set ``item.skip`` / ``item.error`` / ``item.payload`` before any image is loaded."""

    def infer(self, items: list[_Item]) -> list[Any]:
        raise NotImplementedError

    def write(self, dataset, items: list[_Item]) -> int:
        """Bulk-write the results of ``items``; return the number of labels written."""
        raise NotImplementedError

    def output_fields(self) -> list[str]:
        return []


def _check_output_field(samples, name: str, expected: type) -> None:
    name = _output_field_name(name, "output field", name)  # a no-op for the names the tasks checked
    schema = samples._dataset.get_field_schema()
    if name in schema:
        f = schema[name]
        doc_type = getattr(f, "document_type", None)
        if doc_type is not expected:
            kind = doc_type.__name__ if doc_type else type(f).__name__
            raise FieldError(f"field {name!r} already holds {kind}, not {expected.__name__}; choose another "
                             f"field name or delete the field first")


def _check_input_field(samples, name: str, what: str) -> None:
    if not name:
        raise _tag(FieldError(f"no {what} given"), what)
    if not samples.has_field(name):
        choices = ", ".join(sorted(samples.get_field_schema())) or "(none)"
        raise _tag(FieldError(f"the dataset has no field {name!r} ({what}); available fields: {choices}"),
                   what)


def _made_by(label, version: str, request: str | None = None) -> bool | None:
    """True: ours, same version (and request); False: ours but stale; None: not ours."""
    if label is None:
        return False
    try:
        made = label.get_field("model_version") if label.has_field("model_version") else None
    except AttributeError:
        return None
    if made is None:
        return None
    if made != version:
        return False
    if request is not None:
        stored = label.get_field("pixelllm_request") if label.has_field("pixelllm_request") else None
        return stored == request
    return True


def _check_writable(item: _Item, label, field_name: str, version: str, request: str | None,
                    overwrite: bool) -> None:
    """Skip labels made by this model version for this request; refuse to clobber foreign labels."""
    ours = _made_by(label, version, request)
    if overwrite:
        return
    if ours is True:
        item.skip = True
    elif ours is None:
        item.error = (f"field {field_name!r} already holds labels not written by PixelLLM; choose another "
                      "field or set overwrite")


class _ReferTask(_Task):
    name = "refer"

    def __init__(self, prompt, prompt_field, label_field):
        self.prompts = _prompt_list(prompt)
        self.prompt_field = _field_name(prompt_field, "prompt_field", path=True)
        self.label_field = _output_field_name(label_field, "label_field", DEFAULT_REFER_FIELD)
        if not self.prompts and not self.prompt_field:
            raise _tag(InvalidPromptError("give a prompt (a referring expression for every sample) or a "
                                          "prompt_field (a text field holding one per sample)"), "prompt")

    def check(self, samples):
        if not self.prompts:
            _check_input_field(samples, self.prompt_field, "prompt_field")
        _check_output_field(samples, self.label_field, fol.Detections)

    def read_fields(self):
        return [self.label_field] + ([self.prompt_field] if not self.prompts else [])

    def output_fields(self):
        return [self.label_field]

    def prepare(self, item, overwrite):
        if self.prompts:
            prompts = self.prompts
        else:
            prompts = _texts_from(item.values.get(self.prompt_field), self.prompt_field)
            if isinstance(prompts, str):
                item.error = prompts
                return
        item.payload = prompts
        _check_writable(item, item.values.get(self.label_field), self.label_field, self.version,
                        _refer_key(prompts), overwrite)

    def infer(self, items):
        return self.predictor.refer([i.image for i in items], [i.payload for i in items])

    def write(self, dataset, items):
        values = {}
        for i in items:
            w, h = i.image.size
            values[i.id] = refer_to_detections(i.result, i.payload, w, h, self.version)
        dataset.set_values(self.label_field, values, key_field="id", dynamic=True)
        return sum(len(v.detections) for v in values.values())


class _CaptionRegionsTask(_Task):
    name = "caption_regions"

    def __init__(self, boxes_field, caption_attribute, selected_labels, max_new_tokens, num_beams,
                 points_field=None):
        self.boxes_field = _field_name(boxes_field, "boxes_field", path=True)
        # points mode: every point of a Keypoints field is a prompt (boxes_field and the selection of other
        # fields are then ignored)
        self.points_field = _field_name(points_field, "points_field", path=True)
        self.attr = _attribute_name(caption_attribute, "caption_attribute", DEFAULT_CAPTION_ATTRIBUTE)
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        selected_labels = _selected_labels(selected_labels)
        # field -> set of label ids, or None for every box of boxes_field
        self.selected: dict[str, set[str]] | None = None
        if selected_labels:
            self.selected = {}
            for s in selected_labels:
                self.selected.setdefault(s["field"], set()).add(s["label_id"])

    def fields(self) -> list[str]:
        if self.points_field:
            return [self.points_field]
        return sorted(self.selected) if self.selected is not None else [self.boxes_field]

    def check(self, samples):
        if self.points_field:
            _check_input_field(samples, self.points_field, "points_field")
            return
        if self.selected is None and not self.boxes_field:
            self.boxes_field = _first_detections_field(samples)
            if self.boxes_field is None:
                raise _tag(FieldError("the dataset has no Detections field; give boxes_field or select "
                                      "boxes"), "boxes_field")
        for name in self.fields():
            _check_input_field(samples, name, "boxes_field")

    def read_fields(self):
        return self.fields()

    def output_fields(self):
        return self.fields()

    def _prepare_points(self, item, overwrite):
        name = self.points_field
        targets, errors = [], []
        value = item.values.get(name)
        if value is not None:  # a sample without keypoints has nothing to caption (skipped, as for boxes)
            wanted = self.selected.get(name) if self.selected is not None and name in self.selected else None
            path, prompts, errors = keypoint_prompts(value, name, wanted)
            done = set()
            for kp, j, xy in prompts:
                if not overwrite and kp.has_field(self.attr) and kp.get_field(self.attr) and \
                        kp.has_field(f"{self.attr}_model_version") and \
                        kp.get_field(f"{self.attr}_model_version") == self.version:
                    done.add(kp.id)
                    continue
                targets.append((path, kp, j, xy))
        if errors and not targets:
            item.error = "; ".join(errors)
        elif not targets:
            item.skip = True
        item.payload = {"targets": targets, "errors": errors}

    def prepare(self, item, overwrite):
        if self.points_field:
            self._prepare_points(item, overwrite)
            return
        targets, errors = [], []
        for name in self.fields():
            value = item.values.get(name)
            if value is None:
                continue
            if isinstance(value, fol.Detections):
                dets, path = value.detections, f"{name}.detections"
            elif isinstance(value, fol.Detection):
                dets, path = [value], name
            else:
                errors.append(f"boxes_field {name!r} holds {type(value).__name__}, not Detections")
                continue
            wanted = self.selected.get(name) if self.selected is not None else None
            for det in dets:
                if wanted is not None and det.id not in wanted:
                    continue
                if not overwrite and det.has_field(self.attr) and det.get_field(self.attr) and \
                        det.has_field(f"{self.attr}_model_version") and \
                        det.get_field(f"{self.attr}_model_version") == self.version:
                    continue
                targets.append((path, det))
        if errors and not targets:
            item.error = "; ".join(errors)
        elif not targets:
            item.skip = True
        item.payload = {"targets": targets, "errors": errors}

    def _boxes(self, item) -> list:
        w, h = item.image.size
        kept, boxes = [], []
        for path, det in item.payload["targets"]:
            try:
                boxes.append(_box_xyxy(det, w, h))
                kept.append((path, det))
            except PixelLLMError as exc:
                item.payload["errors"].append(f"box {det.id}: {exc}")
        item.payload["targets"] = kept
        return boxes

    def infer(self, items):
        if self.points_field:
            points = []
            for i in items:
                w, h = i.image.size
                points.append([[x * w, y * h] for _, _, _, (x, y) in i.payload["targets"]])
            return self.predictor.caption_regions([i.image for i in items], points=points,
                                                  max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        boxes = [self._boxes(i) for i in items]
        return self.predictor.caption_regions([i.image for i in items], boxes,
                                              max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def _write_points(self, dataset, items) -> int:
        """Each keypoint gets ``<attr>`` (one caption per point, "" for a point that was skipped),
        ``<attr>_score``, ``<attr>_box`` (the region each caption is of, relative ``[x, y, w, h]``) and
        ``<attr>_model_version``."""
        per_path: dict[str, dict[tuple[str, str], dict]] = {}
        for i in items:
            w, h = i.image.size
            for (path, kp, j, _), region in zip(i.payload["targets"], i.result):
                n = len(kp.points)
                # lists hold one type (FiftyOne's schema): a skipped point has "", 0.0 and []
                row = per_path.setdefault(path, {}).setdefault((i.id, kp.id), {
                    "": [""] * n, "_score": [0.0] * n, "_box": [[] for _ in range(n)],
                    "_model_version": region.model_version or self.version})
                row[""][j] = region.text
                row["_score"][j] = float(region.score)
                row["_box"][j] = xyxy_to_fo_relative(region.box_xyxy, w, h)
        n = 0
        for path, rows in per_path.items():
            for suffix in ("", "_score", "_box", "_model_version"):
                dataset.set_label_values(
                    f"{path}.{self.attr}{suffix}",
                    [{"sample_id": sid, "label_id": lid, "value": v[suffix]} for (sid, lid), v in rows.items()],
                    dynamic=True)
            n += sum(sum(bool(b) for b in v["_box"]) for v in rows.values())
        return n

    def write(self, dataset, items):
        if self.points_field:
            return self._write_points(dataset, items)
        per_path: dict[str, list[tuple]] = {}
        for i in items:
            for (path, det), region in zip(i.payload["targets"], i.result):
                per_path.setdefault(path, []).append((i.id, det.id, region))
        n = 0
        for path, rows in per_path.items():
            for suffix, get in (("", lambda r: r.text), ("_score", lambda r: float(r.score)),
                                ("_model_version", lambda r: r.model_version or self.version)):
                dataset.set_label_values(
                    f"{path}.{self.attr}{suffix}",
                    [{"sample_id": sid, "label_id": lid, "value": get(r)} for sid, lid, r in rows],
                    dynamic=True)
            n += len(rows)
        return n


def _first_detections_field(samples) -> str | None:
    for name, f in samples.get_field_schema().items():
        if getattr(f, "document_type", None) is fol.Detections and not name.startswith("pixelllm"):
            return name
    for name, f in samples.get_field_schema().items():
        if getattr(f, "document_type", None) is fol.Detections:
            return name
    return None


class _DenseTask(_Task):
    name = "dense_caption"

    def __init__(self, label_field, max_regions, min_score):
        self.label_field = _output_field_name(label_field, "label_field", DEFAULT_DENSE_FIELD)
        self.max_regions = int(_number("max_regions", max_regions, "max_regions"))
        self.min_score = float(_number("min_score", min_score, "min_score"))
        self.request = f"max_regions={self.max_regions};min_score={self.min_score:g}"

    def check(self, samples):
        _check_output_field(samples, self.label_field, fol.Detections)

    def read_fields(self):
        return [self.label_field]

    def output_fields(self):
        return [self.label_field]

    def prepare(self, item, overwrite):
        _check_writable(item, item.values.get(self.label_field), self.label_field, self.version,
                        self.request, overwrite)

    def infer(self, items):
        return self.predictor.dense_caption([i.image for i in items], max_regions=self.max_regions,
                                            min_score=self.min_score)

    def write(self, dataset, items):
        values = {}
        for i in items:
            w, h = i.image.size
            values[i.id] = dense_to_detections(i.result, w, h, self.version, self.request)
        dataset.set_values(self.label_field, values, key_field="id", dynamic=True)
        return sum(len(v.detections) for v in values.values())


class _TraceTask(_Task):
    name = "caption_with_trace"

    def __init__(self, caption_field, trace_field, max_new_tokens, num_beams):
        self.caption_field = _output_field_name(caption_field, "caption_field", DEFAULT_CAPTION_FIELD)
        self.trace_field = _output_field_name(trace_field, "trace_field", DEFAULT_TRACE_FIELD)
        self.path_field = _output_field_name(path_field_for(self.trace_field), "trace_field",
                                             path_field_for(self.trace_field))
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        if len({self.caption_field, self.trace_field, self.path_field}) < 3:
            raise _tag(FieldError(f"caption_field and trace_field must differ, and caption_field must not "
                                  f"be trace_field + '_path' (got {self.caption_field!r} and "
                                  f"{self.trace_field!r})"), "caption_field")

    def check(self, samples):
        _check_output_field(samples, self.caption_field, fol.Classification)
        _check_output_field(samples, self.trace_field, fol.Keypoints)
        _check_output_field(samples, self.path_field, fol.Polylines)

    def read_fields(self):
        return self.output_fields()

    def output_fields(self):
        return [self.caption_field, self.trace_field, self.path_field]

    def prepare(self, item, overwrite):
        """All three fields are written together: a sample is skipped when all hold this version's labels,
        and refused when any holds labels PixelLLM did not write (the user's own keypoints, say)."""
        if overwrite:
            return
        made = {name: _made_by(item.values.get(name), self.version) for name in self.output_fields()}
        foreign = [name for name, ours in made.items() if ours is None]
        if foreign:
            item.error = (f"field {foreign[0]!r} already holds labels not written by PixelLLM; choose another "
                          "field or set overwrite")
        elif all(made.values()):
            item.skip = True

    def infer(self, items):
        return self.predictor.caption([i.image for i in items], trace=True,
                                      max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def write(self, dataset, items):
        captions, traces, paths = {}, {}, {}
        for i in items:
            w, h = i.image.size
            captions[i.id], traces[i.id], paths[i.id] = trace_to_labels(i.result, w, h, self.version)
        dataset.set_values(self.caption_field, captions, key_field="id", dynamic=True)
        dataset.set_values(self.trace_field, traces, key_field="id", dynamic=True)
        dataset.set_values(self.path_field, paths, key_field="id", dynamic=True)
        return sum(len(t.keypoints) for t in traces.values())


def _mask_output(value: object) -> str:
    """``output`` of a segment run: ``instance_masks`` (default) or ``polylines``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return MASK_OUTPUTS[0]
    if isinstance(value, str) and value in MASK_OUTPUTS:
        return value
    raise _tag(InvalidParameterError(f"output must be one of {', '.join(MASK_OUTPUTS)}, got {_shown(value)}"),
               "output")


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class _SegmentTask(_Task):
    """Masks for prompts: a text for every sample (``prompt``), each sample's texts (``prompt_field``), the
    boxes of a Detections field (``boxes_field``) or the points of a Keypoints field (``points_field``)."""

    name = "segment"
    SOURCES = ("prompt", "prompt_field", "boxes_field", "points_field")

    def __init__(self, prompt, prompt_field, boxes_field, points_field, label_field, output):
        self.prompts = _prompt_list(prompt)
        self.prompt_field = _field_name(prompt_field, "prompt_field", path=True)
        self.boxes_field = _field_name(boxes_field, "boxes_field", path=True)
        self.points_field = _field_name(points_field, "points_field", path=True)
        self.label_field = _output_field_name(label_field, "label_field", DEFAULT_MASK_FIELD)
        self.output = _mask_output(output)
        given = [name for name, value in zip(self.SOURCES, (self.prompts, self.prompt_field, self.boxes_field,
                                                             self.points_field)) if value]
        if not given:
            raise _tag(InvalidPromptError("give a prompt (a text for every sample), a prompt_field (a text "
                                          "field), a boxes_field (a Detections field) or a points_field (a "
                                          "Keypoints field)"), "prompt")
        if len(given) > 1:
            raise _tag(InvalidPromptError(f"give one of prompt, prompt_field, boxes_field or points_field, not "
                                          f"{' and '.join(given)}"), given[1])
        self.source = given[0]
        self.source_field = None if self.source == "prompt" else getattr(self, self.source)
        if self.source_field is not None and self.source_field.split(".")[0] == self.label_field:
            raise _tag(FieldError(f"label_field {self.label_field!r} is the {self.source} the prompts come "
                                  "from; choose another output field"), "label_field")
        self.label_type = fol.Polylines if self.output == "polylines" else fol.Detections

    def check(self, samples):
        if self.source_field is not None:
            _check_input_field(samples, self.source_field, self.source)
        _check_output_field(samples, self.label_field, self.label_type)

    def read_fields(self):
        return [self.label_field] + ([self.source_field] if self.source_field else [])

    def output_fields(self):
        return [self.label_field]

    def prepare(self, item, overwrite):
        payload = {"errors": [], "value": None, "texts": None}
        item.payload = payload
        if self.source == "prompt":
            payload["texts"] = list(self.prompts)
            key = payload["texts"]
        else:
            value = item.values.get(self.source_field)
            if value is None:
                item.error = f"{self.source} {self.source_field!r} is empty for this sample"
                return
            if self.source == "prompt_field":
                texts = _texts_from(value, self.source_field)
                if isinstance(texts, str):
                    item.error = texts
                    return
                payload["texts"] = key = texts
            elif self.source == "boxes_field":
                if not isinstance(value, (fol.Detections, fol.Detection)):
                    item.error = f"boxes_field {self.source_field!r} holds {type(value).__name__}, not Detections"
                    return
                dets = value.detections if isinstance(value, fol.Detections) else [value]
                payload["value"] = value
                key = [[d.id, repr(getattr(d, "bounding_box", None))] for d in dets]
            else:
                path, prompts, errors = keypoint_prompts(value, self.source_field)
                if path is None or (errors and not prompts):
                    item.error = "; ".join(errors)
                    return
                payload["value"] = value
                payload["errors"] = errors
                key = [[kp.id, j, list(xy)] for kp, j, xy in prompts]
        request = f"{self.output};{self.source};{_digest(key)}"
        payload["request"] = request
        _check_writable(item, item.values.get(self.label_field), self.label_field, self.version, request,
                        overwrite)

    def _prompts(self, item) -> tuple[str, list, list[dict]]:
        """(kind, pixel prompts or texts, per prompt its label attributes); recomputed on every call (a
        failed batch is retried one sample at a time) and the late errors with it."""
        p = item.payload
        if p["texts"] is not None:
            return "texts", list(p["texts"]), [{"label": t, "prompt": t} for t in p["texts"]]
        w, h = item.image.size
        if self.source == "boxes_field":
            prompts, errors = box_prompts(p["value"], self.source_field, w, h)
            p["errors"] = errors
            return "boxes", [list(b) for _, b in prompts], [
                {"label": d.label or "object", "prompt_box": xyxy_to_fo_relative(b, w, h), "source_id": d.id}
                for d, b in prompts]
        _, prompts, errors = keypoint_prompts(p["value"], self.source_field)
        p["errors"] = errors
        return "points", [[x * w, y * h] for _, _, (x, y) in prompts], [
            {"label": kp.label or "point", "prompt_point": [x, y], "source_id": kp.id, "point_index": j}
            for kp, j, (x, y) in prompts]

    def infer(self, items):
        asked = [self._prompts(i) for i in items]
        for i, (_, _, meta) in zip(items, asked):
            i.payload["meta"] = meta
        call = [k for k, (_, prompts, _) in enumerate(asked) if prompts]
        out: list[list] = [[] for _ in items]
        if call:
            kind = asked[call[0]][0]
            found = self.predictor.segment([items[k].image for k in call], **{kind: [asked[k][1] for k in call]})
            for k, r in zip(call, found):
                out[k] = r
        return out

    def write(self, dataset, items):
        values = {}
        for i in items:
            w, h = i.image.size
            values[i.id], errors = masks_to_labels(i.result, i.payload.get("meta", []), w, h, self.version,
                                                   self.output, i.payload["request"])
            i.payload["errors"] = list(i.payload["errors"]) + errors
        dataset.set_values(self.label_field, values, key_field="id", dynamic=True)
        if self.output == "polylines":
            return sum(len(v.polylines) for v in values.values())
        return sum(len(v.detections) for v in values.values())
