"""``PixelLLMModel``: PixelLLM as a ``fiftyone.core.models.Model`` for ``dataset.apply_model``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import fiftyone.core.labels as fol
import fiftyone.core.models as fom
import numpy as np
from PIL import Image

from ...bounds import DEFAULT_MAX_REGIONS, DEFAULT_MIN_SCORE
from ...errors import InvalidParameterError, PixelLLMError
from ...geometry import xyxy_to_fo_relative
from ...inference.protocol import PredictorProtocol
from ...io import load_image, open_encoded
from .labels import (
    _box_xyxy,
    box_prompts,
    dense_to_detections,
    keypoint_prompts,
    masks_to_labels,
    refer_to_detections,
    trace_to_labels,
)
from .params import (
    DEFAULT_CAPTION_ATTRIBUTE,
    _attribute_name,
    _model_name,
    _number,
    _prompt_list,
    _shown,
    _texts_from,
)
from .predictors import resolve_predictor
from .tasks import _mask_output

OPERATIONS = ("refer", "caption_regions", "dense_caption", "caption_with_trace", "segment")
_SEGMENT_FIELDS = ("prompt_field", "boxes_field", "points_field")


class PixelLLMModel(fom.Model, fom.SamplesMixin):
    """PixelLLM for ``dataset.apply_model``.

    ``operation`` is one of ``refer`` (text -> box; ``prompt=`` or ``apply_model(..., prompt_field=...)``),
    ``caption_regions`` (``apply_model(..., boxes_field=...)``: returns a copy of the boxes with captions),
    ``dense_caption`` and ``caption_with_trace`` (returns a dict, written as ``<label_field>_caption``,
    ``<label_field>_trace`` and ``<label_field>_path``) and ``segment`` (masks for ``prompt=`` or for
    ``apply_model(..., prompt_field= | boxes_field= | points_field=)``; ``output="instance_masks"`` returns
    ``fo.Detections`` with box-cropped masks, ``output="polylines"`` filled ``fo.Polylines``, as
    ``run_segment`` writes them). Batches go to the predictor as one call.
    A sample that cannot be processed gets an empty label carrying a ``pixelllm_error`` attribute.
    """

    def __init__(self, operation: str = "refer", *, prompt: str | None = None, model: str | None = None,
                 predictor: PredictorProtocol | None = None, max_regions: int = DEFAULT_MAX_REGIONS, min_score: float = DEFAULT_MIN_SCORE,
                 caption_attribute: str = DEFAULT_CAPTION_ATTRIBUTE, max_new_tokens: int | None = None,
                 num_beams: int = 1, output: str = "instance_masks"):
        fom.SamplesMixin.__init__(self)
        if not isinstance(operation, str) or operation not in OPERATIONS:
            raise InvalidParameterError(f"operation must be one of {', '.join(OPERATIONS)}, got {_shown(operation)}")
        method = "caption" if operation == "caption_with_trace" else operation
        if predictor is not None and not callable(getattr(predictor, method, None)):
            raise InvalidParameterError(f"predictor must be a Predictor or RemotePredictor (with a {method} method), "
                                        f"got {type(predictor).__name__}; to name a model, pass model=")
        self.operation = operation
        self.prompt = prompt
        self.prompts = _prompt_list(prompt)
        self.model_name = _model_name(model)
        self._predictor = predictor
        self.max_regions = int(_number("max_regions", max_regions, "max_regions"))
        self.min_score = float(_number("min_score", min_score, "min_score"))
        self.caption_attribute = _attribute_name(caption_attribute, "caption_attribute",
                                                 DEFAULT_CAPTION_ATTRIBUTE)
        self.max_new_tokens = None if max_new_tokens is None else _number("max_new_tokens", max_new_tokens,
                                                                          "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        self.output = _mask_output(output)
        self._preprocess = False

    # fom.Model interface
    @property
    def media_type(self):
        return "image"

    @property
    def ragged_batches(self):
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    @property
    def predictor(self) -> PredictorProtocol:
        if self._predictor is None:
            self._predictor = resolve_predictor(None, self.model_name)
        return self._predictor

    @property
    def model_version(self) -> str:
        return str(self.predictor.model_version)

    def predict(self, arg, sample=None):
        return self.predict_all([arg], samples=[sample])[0]

    def _image(self, arg, sample):
        """``apply_model`` hands over FiftyOne's decoded copy. An in-process predictor takes those pixels; a
        worker gets the sample's file as it is rather than a PNG re-encoded from them."""
        if isinstance(arg, (str, os.PathLike)):
            return open_encoded(arg)
        path = getattr(sample, "filepath", None)
        if path and not callable(getattr(self.predictor, "prepare", None)):
            size = arg.size if isinstance(arg, Image.Image) else tuple(np.shape(arg)[1::-1])  # (w, h)
            with contextlib.suppress(PixelLLMError, OSError):
                encoded = open_encoded(path)
                if encoded.size == size and encoded.orientation == 1:  # the same picture FiftyOne read
                    return encoded
        return load_image(arg)

    def predict_all(self, args, samples=None):
        samples = list(samples) if samples is not None else [None] * len(args)
        images, errors = [], []
        for arg, sample in zip(args, samples):
            try:
                images.append(self._image(arg, sample))
                errors.append(None)
            except PixelLLMError as exc:
                images.append(None)
                errors.append(str(exc))
            except OSError as exc:  # e.g. a path too long for the file system
                images.append(None)
                errors.append(f"cannot read the image ({exc.strerror or exc})")
        inputs = [self._inputs(s) if e is None else e for s, e in zip(samples, errors)]
        results: list[Any] = [None] * len(args)
        ready = [k for k, x in enumerate(inputs) if not isinstance(x, str)]
        if ready:
            try:
                out = self._infer([images[k] for k in ready], [inputs[k] for k in ready])
                for k, r in zip(ready, out):
                    results[k] = r
            except PixelLLMError:
                for k in ready:
                    try:
                        results[k] = self._infer([images[k]], [inputs[k]])[0]
                    except PixelLLMError as exc:
                        inputs[k] = str(exc)
        return [self._to_labels(images[k], inputs[k], results[k]) for k in range(len(args))]

    def _inputs(self, sample):
        if self.operation == "refer":
            if self.prompts:
                return list(self.prompts)
            name = self.needs_fields.get("prompt_field")
            if not name:
                return "give prompt= or apply_model(..., prompt_field=<text field>)"
            return _texts_from(sample.get_field(name) if sample is not None and sample.has_field(name)
                               else None, name)
        if self.operation == "caption_regions":
            name = self.needs_fields.get("boxes_field")
            if not name:
                return "give apply_model(..., boxes_field=<Detections field>)"
            value = sample.get_field(name) if sample is not None and sample.has_field(name) else None
            if value is None:
                return fol.Detections()
            if not isinstance(value, fol.Detections):
                return f"boxes_field {name!r} holds {type(value).__name__}, not Detections"
            return fol.Detections.from_dict(value.to_dict())  # a copy that keeps the label ids
        if self.operation == "segment":
            return self._segment_inputs(sample)
        return True

    def _segment_inputs(self, sample):
        """What a sample prompts ``segment`` with: ``{"texts": [...]}``, ``{"boxes_field": value}`` or
        ``{"points_field": value}``; or an error message."""
        if self.prompts:
            return {"texts": list(self.prompts)}
        given = [k for k in _SEGMENT_FIELDS if self.needs_fields.get(k)]
        if len(given) != 1:
            return ("give prompt= or one of apply_model(..., prompt_field= | boxes_field= | points_field=)"
                    if not given else f"give one of {', '.join(given)}, not several")
        kind, name = given[0], self.needs_fields[given[0]]
        value = sample.get_field(name) if sample is not None and sample.has_field(name) else None
        if value is None:
            return f"{kind} {name!r} is empty for this sample"
        if kind == "prompt_field":
            texts = _texts_from(value, name)
            return texts if isinstance(texts, str) else {"texts": texts}
        if kind == "boxes_field" and not isinstance(value, (fol.Detections, fol.Detection)):
            return f"boxes_field {name!r} holds {type(value).__name__}, not Detections"
        if kind == "points_field" and not isinstance(value, (fol.Keypoints, fol.Keypoint)):
            return f"points_field {name!r} holds {type(value).__name__}, not Keypoints"
        return {kind: value, "name": name}

    @staticmethod
    def _segment_prompts(image, inputs) -> tuple[str, list, list[dict], list[str]]:
        """(kind, prompts in pixels or texts, per prompt its label attributes, skipped-prompt messages)."""
        if "texts" in inputs:
            return "texts", inputs["texts"], [{"label": t, "prompt": t} for t in inputs["texts"]], []
        w, h = image.size
        if "boxes_field" in inputs:
            prompts, errors = box_prompts(inputs["boxes_field"], inputs["name"], w, h)
            return "boxes", [list(b) for _, b in prompts], [
                {"label": d.label or "object", "prompt_box": xyxy_to_fo_relative(b, w, h), "source_id": d.id}
                for d, b in prompts], errors
        _, prompts, errors = keypoint_prompts(inputs["points_field"], inputs["name"])
        return "points", [[x * w, y * h] for _, _, (x, y) in prompts], [
            {"label": kp.label or "point", "prompt_point": [x, y], "source_id": kp.id, "point_index": j}
            for kp, j, (x, y) in prompts], errors

    def _infer(self, images, inputs):
        p = self.predictor
        kw = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
        if self.operation == "refer":
            return p.refer(images, inputs)
        if self.operation == "caption_regions":
            boxes = []
            for im, dets in zip(images, inputs):
                w, h = im.size
                boxes.append([_box_xyxy(d, w, h)
                              for d in dets.detections])
            return p.caption_regions(images, boxes, num_beams=self.num_beams, **kw)
        if self.operation == "dense_caption":
            return p.dense_caption(images, max_regions=self.max_regions, min_score=self.min_score)
        if self.operation == "segment":
            asked = [self._segment_prompts(im, x) for im, x in zip(images, inputs)]
            call = [k for k, a in enumerate(asked) if a[1]]
            out: list[list] = [[] for _ in images]
            if call:
                kind = asked[call[0]][0]
                for k, r in zip(call, p.segment([images[k] for k in call],
                                                **{kind: [asked[k][1] for k in call]})):
                    out[k] = r
            return out
        return p.caption(images, trace=True, num_beams=self.num_beams, **kw)

    def _to_labels(self, image, inputs, result):
        error = inputs if isinstance(inputs, str) else None
        version = self.model_version
        if self.operation == "caption_with_trace":
            if error:
                return {"caption": fol.Classification(pixelllm_error=error)}
            caption, trace, path = trace_to_labels(result, *image.size, version)
            return {"caption": caption, "trace": trace, "path": path}
        if self.operation == "segment":
            if error:
                return (fol.Polylines if self.output == "polylines" else fol.Detections)(pixelllm_error=error)
            _, _, meta, errors = self._segment_prompts(image, inputs)
            labels, more = masks_to_labels(result, meta, *image.size, version, self.output)
            if errors or more:
                labels["pixelllm_error"] = "; ".join(errors + more)
            return labels
        if error:
            return fol.Detections(pixelllm_error=error)
        w, h = image.size
        if self.operation == "refer":
            return refer_to_detections(result, inputs, w, h, version)
        if self.operation == "dense_caption":
            return dense_to_detections(result, w, h, version)
        for det, region in zip(inputs.detections, result):
            det[self.caption_attribute] = region.text
            det[f"{self.caption_attribute}_score"] = float(region.score)
            det[f"{self.caption_attribute}_model_version"] = region.model_version or version
        inputs.model_version = version
        return inputs
