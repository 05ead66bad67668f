"""The ``pixelllm`` command.

Inference subcommands share one request/result shape with ``--batch FILE.jsonl``: one JSON request per
line in, one JSON result per line out, in order; a failed request gets an ``error`` field and the
others go on. Every request field is checked here before it reaches the model, so a malformed line (a
number as ``text``, ``"boxes": 5``, a lone surrogate, a folder as ``image``, bytes that are not UTF-8)
fails only itself.

Bad input is never a traceback: the command prints one ``error: ...`` line on stderr (after the usage
line for a bad flag) and exits with

====  ==========================================================================================
0     done; with ``--batch``, every request line was answered (a failed one carries ``error``)
1     the one request (IMAGE ...) failed, or its ``--draw`` picture could not be saved
2     usage or bad input: an unknown flag or a value out of range (argparse), an unreadable
      ``--batch`` file, a model, adapter, device or ``--draw`` target that cannot be used, an
      argument that is not UTF-8, or any other error the project reports
3     internal error (a bug): ``error: internal error (<type>)``; ``-v`` prints the traceback
4     an optional extra is missing: ``error: ... needs the optional extra 'serve': pip install ...``
130   interrupted (Ctrl-C)
141   stdout was closed before every result was written (e.g. ``| head``)
====  ==========================================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .argtypes import device_arg, int_arg, short_repr
from .bounds import BOUNDS, DEFAULT_MIN_SCORE
from .bounds import argtype as bound_arg
from .errors import (
    InvalidBoxError,
    InvalidImageError,
    InvalidParameterError,
    InvalidPromptError,
    PixelLLMError,
)
from .extras import MissingExtraError, missing_extra, require_extra

log = logging.getLogger("pixelllm")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_MISSING_EXTRA = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141

DRAW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_DRAW_EXTENSIONS = ".png, .jpg, .webp, .bmp, .tif or .gif"


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {short_repr(value, 20)}"
    if isinstance(value, str):
        return f"the string {short_repr(value, 40)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ---- requests ---------------------------------------------------------------------------------------

@dataclass
class Request:
    """One request after its fields were checked: what the model gets, or the error that stops it."""

    echo: dict  # request fields echoed into the result
    image: str = ""
    texts: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] | None = None
    error: str | None = None


def check_image_field(raw: dict) -> str:
    value = raw.get("image")
    if value is None:
        raise InvalidImageError("request has no 'image' (a file path)")
    if not isinstance(value, str):
        raise InvalidImageError(f"'image' must be a file path (a string), got {_kind(value)}")
    if not value.strip():
        raise InvalidImageError("'image' is empty; give an image file path")
    if "\x00" in value:
        raise InvalidImageError(f"'image' {short_repr(value)} contains a NUL character; give an image file path")
    if _has_surrogate(value):
        raise InvalidImageError(f"'image' {short_repr(value)} is not valid Unicode (a lone surrogate); give the "
                                "path as UTF-8 text")
    return value


def check_texts_field(raw: dict) -> list[str]:
    """The referring expressions of a request (``texts``, else ``text``), each through ``validate_text``."""
    from .tokenizer import validate_text

    key, value = "texts", raw.get("texts")
    if value is None:
        key, value = "text", raw.get("text")
    if value is None:
        raise InvalidPromptError("request needs 'text' (a string) or 'texts' (a list of strings)")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise InvalidPromptError(f"'{key}' must be a string or a non-empty list of strings, "
                                 f"got {_kind(value)}")
    limit = int(BOUNDS["max_texts"].high)
    if len(items) > limit:
        raise InvalidParameterError(f"'{key}' has {len(items)} texts, more than the limit of {limit} "
                                    "per image")
    max_chars = int(BOUNDS["max_text_chars"].high)
    single = isinstance(value, str)
    return [validate_text(t, key if single else f"{key}[{i}]", max_chars=max_chars)
            for i, t in enumerate(items)]


def check_boxes_field(raw: dict) -> list[tuple[float, float, float, float]]:
    """The boxes of a request: a non-empty list of [x1, y1, x2, y2] lists of finite numbers."""
    from .geometry import as_box

    value = raw.get("boxes")
    if value is None:
        raise InvalidBoxError("request needs 'boxes': [[x1, y1, x2, y2], ...] in image pixels")
    if not isinstance(value, list) or not value:
        raise InvalidBoxError(f"'boxes' must be a non-empty list of [x1, y1, x2, y2] boxes in image pixels, "
                              f"got {_kind(value)}")
    limit = int(BOUNDS["max_boxes"].high)
    if len(value) > limit:
        raise InvalidParameterError(f"'boxes' has {len(value)} boxes, more than the limit of {limit} "
                                    "per image")
    boxes = []
    for i, box in enumerate(value):
        numbers = isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        if not numbers:
            raise InvalidBoxError(f"boxes[{i}] must be 4 numbers [x1, y1, x2, y2], got {short_repr(box)}")
        try:
            boxes.append(as_box(box))
        except OverflowError:
            raise InvalidBoxError(f"boxes[{i}] has a coordinate too large for a number: "
                                  f"{short_repr(box)}") from None
    return boxes


def check_points_field(raw: dict) -> tuple[list[tuple[float, float]], list[int] | None]:
    """The points of a request (a non-empty list of [x, y] in image pixels, one prompt each) and their
    ``point_labels`` (1 the object, 0 not the object; None: all 1)."""
    value = raw.get("points")
    if not isinstance(value, list) or not value:
        raise InvalidPromptError(f"'points' must be a non-empty list of [x, y] points in image pixels, "
                                 f"got {_kind(value)}")
    limit = int(BOUNDS["max_boxes"].high)
    if len(value) > limit:
        raise InvalidParameterError(f"'points' has {len(value)} points, more than the limit of {limit} "
                                    "per image")
    points = []
    for i, point in enumerate(value):
        numbers = isinstance(point, (list, tuple)) and len(point) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
        if not numbers or not all(math.isfinite(v) for v in point):
            raise InvalidPromptError(f"points[{i}] must be 2 finite numbers [x, y], got {short_repr(point)}")
        points.append((float(point[0]), float(point[1])))
    labels = raw.get("point_labels")
    if labels is None:
        return points, None
    if not isinstance(labels, list) or len(labels) != len(points):
        raise InvalidPromptError(f"'point_labels' must be a list of one label per point ({len(points)}), "
                                 f"got {_kind(labels)}")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or label not in (0, 1):
            raise InvalidPromptError(f"point_labels[{i}] must be 1 (the object) or 0 (not the object), "
                                     f"got {short_repr(label)}")
    return points, [int(v) for v in labels]


SEGMENT_PROMPTS = ("text/texts", "boxes", "points")


def check_segment_fields(raw: dict, request: Request) -> None:
    """A segment request's one kind of prompt: ``text``/``texts``, ``boxes`` or ``points``
    (+ ``point_labels``)."""
    given = [name for name, keys in zip(SEGMENT_PROMPTS, (("text", "texts"), ("boxes",), ("points",)))
             if any(raw.get(k) is not None for k in keys)]
    if not given:
        raise InvalidPromptError("request needs one of 'text'/'texts', 'boxes' or 'points'")
    if len(given) > 1:
        raise InvalidPromptError(f"give only one kind of prompt, not {' and '.join(repr(g) for g in given)}")
    if raw.get("point_labels") is not None and given != ["points"]:
        raise InvalidPromptError("'point_labels' go with 'points'")
    if given == ["text/texts"]:
        request.texts = check_texts_field(raw)
    elif given == ["boxes"]:
        request.boxes = check_boxes_field(raw)
    else:
        request.points, request.point_labels = check_points_field(raw)


def _echo(raw: dict, keys: tuple[str, ...]) -> dict:
    """The request fields echoed into its result: those that are plain, small JSON."""
    echo = {}
    for key in keys:
        if key in raw:
            try:
                text = json.dumps(raw[key], allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                continue
            if len(text) <= 10_000:
                echo[key] = raw[key]
    return echo


# ---- inference subcommands ------------------------------------------------------------------------

@dataclass
class Command:
    """An inference subcommand: the registry task it runs (``inference.tasks``), and how its requests
    become that task's call and its results JSON."""

    task: str  # the registry name: refer / caption_regions / caption / dense_caption
    inputs: tuple[str, ...]  # request keys echoed into the result
    options: Callable  # (args) -> the task's keyword options
    to_json: Callable  # (one result of the task) -> the result dict of its request
    draw: Callable  # (image, result dict) -> PIL image
    check: Callable | None = None  # (raw request dict, Request) -> None: fills the task's fields or raises
    item_arg: Callable | None = None  # (Request) -> its per-image argument (texts, boxes, segment's prompts)


def _check_refer(raw: dict, request: Request) -> None:
    request.texts = check_texts_field(raw)


def _check_regions(raw: dict, request: Request) -> None:
    """A caption-regions request's prompts: ``boxes``, or ``points`` (each point a prompt of its own)."""
    has_boxes, has_points = raw.get("boxes") is not None, raw.get("points") is not None
    if has_boxes and has_points:
        raise InvalidPromptError("give 'boxes' or 'points', not both (each point is a prompt of its own)")
    if raw.get("point_labels") is not None:
        raise InvalidPromptError("'point_labels' go with segment; caption-regions takes points on the object only")
    if has_points:
        request.points = check_points_field(raw)[0]
    elif not has_boxes:
        raise InvalidBoxError("request needs 'boxes': [[x1, y1, x2, y2], ...] or 'points': [[x, y], ...] in image "
                              "pixels")
    else:
        request.boxes = check_boxes_field(raw)


def _region_prompts(request: Request):
    """caption_regions' per-image argument: the boxes (a list, as before points), or ``{"points": ...}``."""
    if request.points:
        return {"points": [list(p) for p in request.points]}
    return request.boxes


def _segment_prompts(request: Request) -> dict:
    if request.texts:
        return {"texts": request.texts}
    if request.boxes:
        return {"boxes": [list(b) for b in request.boxes]}
    return {"points": [list(p) for p in request.points], "point_labels": request.point_labels}


def mask_json(result) -> dict:
    """A ``MaskResult`` as a result's detection (``text`` only for text prompts)."""
    out = result.to_dict()
    if out.get("text") is None:
        out.pop("text", None)
    return out


def _masks_json(masks) -> dict:
    return {"detections": [mask_json(m) for m in masks]}


def _detections_json(per_text) -> dict:
    return {"detections": [d.to_dict() for dets in per_text for d in dets]}


def _captions_json(regions) -> dict:
    return {"captions": [c.to_dict() for c in regions]}


def _caption_json(r) -> dict:
    return {"caption": r.text, "score": r.score, "words": [w.to_dict() for w in r.words],
            "model_version": r.model_version}


def _regions_json(regions) -> dict:
    return {"regions": [c.to_dict() for c in regions]}


def _draw_boxes(image, result):
    from .inference.results import Detection, RegionCaption
    from .visualize import draw_boxes

    items = [Detection.from_dict(d) for d in result.get("detections", [])]
    items += [RegionCaption.from_dict(d) for d in result.get("captions", []) + result.get("regions", [])]
    return draw_boxes(image, items)


def _draw_masks(image, result):
    from .inference.results import MaskResult
    from .visualize import draw_masks

    return draw_masks(image, [MaskResult.from_dict(d) for d in result.get("detections", [])])


def _draw_trace(image, result):
    from .inference.results import TracedCaption, Word
    from .visualize import draw_trace

    words = [Word.from_dict(w) for w in result.get("words", [])]
    return draw_trace(image, TracedCaption(result["caption"], words))


# subcommand -> registry task: the one place the CLI's names meet the registry's
COMMANDS = {
    "refer": Command("refer", ("text", "texts"), lambda a: {"adapter": a.adapter}, _detections_json,
                     _draw_boxes, _check_refer, item_arg=lambda r: r.texts),
    "caption-regions": Command("caption_regions", ("boxes", "points"),
                               lambda a: {"adapter": a.adapter, "num_beams": a.beams},
                               _captions_json, _draw_boxes, _check_regions, item_arg=_region_prompts),
    "caption": Command("caption", (), lambda a: {"trace": a.trace, "adapter": a.adapter, "num_beams": a.beams,
                                                 "from_regions": False if a.free else None},
                       _caption_json, _draw_trace),
    "dense-caption": Command("dense_caption", (), lambda a: {"max_regions": a.max_regions,
                                                             "min_score": a.min_score, "adapter": a.adapter},
                             _regions_json, _draw_boxes),
    "segment": Command("segment", ("text", "texts", "boxes", "points", "point_labels"),
                       lambda a: {"adapter": a.adapter}, _masks_json, _draw_masks, check_segment_fields,
                       item_arg=_segment_prompts),
}


def _check_request(task: Command, raw: dict | None, error: str | None = None) -> Request:
    """A raw request (a parsed line, or the command line's) checked field by field; never raises."""
    if raw is None:
        return Request({}, error=error or "not a request")
    request = Request(_echo(raw, ("image", *task.inputs)))
    try:
        request.image = check_image_field(raw)
        if task.check is not None:
            task.check(raw, request)
        _check_known_fields(task, raw)  # after the subcommand's own checks, whose messages say more
    except PixelLLMError as exc:
        request.error = _message(exc)
    return request


# Fields some subcommand, flag or the worker reads. On a line whose subcommand does not read one (a per-line
# "adapter", "points" on a refer line) it is an error of that line rather than silently dropped; any other
# key ("id", "note") is the user's own and ignored.
REQUEST_FIELDS = ("image", "text", "texts", "boxes", "points", "point_labels", "adapter", "timeout_s", "trace",
                  "from_regions", "max_new_tokens", "num_beams", "max_regions", "min_score")


def _check_known_fields(task: Command, raw: dict) -> None:
    """Refuse a request field that this subcommand does not read (see ``REQUEST_FIELDS``)."""
    unread = [k for k in REQUEST_FIELDS if k in raw and k not in ("image", *task.inputs)]
    if unread:
        known = ", ".join(f"'{k}'" for k in ("image", *task.inputs))
        names = ", ".join(f"'{k}'" for k in unread)
        raise InvalidPromptError(f"this subcommand does not read {names} on a line; its lines have {known} "
                                 "(flags such as --adapter apply to every line)")


def _request_from_args(args) -> dict:
    if not args.image:
        raise PixelLLMError("give an IMAGE or --batch FILE.jsonl")
    req: dict = {"image": args.image}
    if args.command == "refer":
        if not args.text:
            raise PixelLLMError("give a referring TEXT after the image, e.g. "
                                "pixelllm refer img.png 'the red circle'")
        if len(args.text) == 1:
            req["text"] = args.text[0]
        else:
            req["texts"] = list(args.text)
    if args.command == "caption-regions":
        from .geometry import parse_box

        if not args.box and not args.point:
            raise PixelLLMError("give at least one --box x1,y1,x2,y2 or --point x,y (image pixels)")
        if args.box:
            req["boxes"] = [list(parse_box(b)) for b in args.box]
        if args.point:
            req["points"] = [_region_point(p) for p in args.point]
    if args.command == "segment":
        req.update(_segment_request_from_args(args))
    return req


def _segment_request_from_args(args) -> dict:
    from .geometry import parse_box

    req: dict = {}
    if args.text:
        req["texts"] = list(args.text)
    if args.box:
        req["boxes"] = [list(parse_box(b)) for b in args.box]
    if args.point:
        points = [parse_point(p) for p in args.point]
        req["points"] = [[x, y] for x, y, _ in points]
        if any(label != 1 for _, _, label in points):
            req["point_labels"] = [label for _, _, label in points]
    if not req:
        raise PixelLLMError("give a referring TEXT, --box x1,y1,x2,y2 or --point x,y after the image, e.g. "
                            "pixelllm segment img.png 'the red circle' --mask-engine sam:PATH")
    return req


def _region_point(text: str) -> list[float]:
    x, y, label = parse_point(text)
    if label != 1:
        raise InvalidPromptError(f"--point {text}: caption-regions takes points on the object only (x,y)")
    return [x, y]


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` (label 1 the object, 0 not the object) -> (x, y, label)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values) or (
            len(values) == 3 and values[2] not in (0.0, 1.0)):
        raise InvalidPromptError(f"--point {text}: give x,y in image pixels (or x,y,0 for a point off the object)")
    return values[0], values[1], int(values[2]) if len(values) == 3 else 1


def _requests_from_args(args, task: Command) -> list[Request]:
    if args.batch:
        from .batch_io import read_batch

        if args.image or getattr(args, "text", None) or getattr(args, "box", None) or getattr(args, "point", None):
            raise PixelLLMError("give an IMAGE (with its text, boxes or points) or --batch FILE.jsonl, not both")
        return [_check_request(task, line.request, line.error) for line in read_batch(args.batch)]
    return [_check_request(task, _request_from_args(args))]


def _load_predictor(model: str | None, device: str | None, **options):
    """The in-process Predictor for ``--model``/``--device`` (tests replace this to reuse one); ``options``:
    more ``Predictor`` arguments (``mask_engine`` for ``segment``)."""
    from .errors import CheckpointError
    from .inference.predictor import Predictor

    if model is not None and not model.strip():
        raise CheckpointError("--model is empty; give a checkpoint folder or a preset name, or leave --model out "
                              "for the embedded model")
    try:
        return Predictor(model, device=device, **options)
    except OSError as exc:
        raise CheckpointError(f"cannot read the model {short_repr(model)}: {exc.strerror or exc}") from exc


def _load_adapter(predictor, adapter: str) -> None:
    try:
        folder = Path(adapter).is_dir()
    except OSError:
        folder = False
    if not folder:
        raise PixelLLMError(f"--adapter {adapter}: not a folder; give a LoRA adapter folder "
                            "(pixelllm finetune writes one)")
    try:
        predictor.load_adapter(adapter)
    except PixelLLMError:
        raise
    except Exception as exc:
        raise PixelLLMError(f"--adapter {adapter}: not a usable LoRA adapter folder "
                            f"({type(exc).__name__}: {short_repr(str(exc), 200)})") from exc


def check_draw_target(target: str) -> Path:
    """The ``--draw`` file, refused up front when it cannot be written: a folder, a name whose extension is
    no picture type, a parent that is a file or cannot be written to."""
    from PIL import Image

    if not target.strip():
        raise PixelLLMError("--draw is empty; give a picture file name such as result.png")
    out = Path(target)
    try:
        if out.is_dir() or target.endswith(("/", os.sep)):
            raise PixelLLMError(f"--draw {target} is a folder; give a picture file name such as "
                                f"{out / 'result.png'}")
        Image.init()
        fmt = Image.registered_extensions().get(out.suffix.lower())
        if fmt not in DRAW_FORMATS or fmt not in Image.SAVE:
            what = f"the extension {out.suffix!r}" if out.suffix else "a name without an extension"
            raise PixelLLMError(f"--draw {target}: cannot save a picture with {what}; end the name with "
                                f"{_DRAW_EXTENSIONS}")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise PixelLLMError(f"--draw {target}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PixelLLMError(f"--draw {target}: cannot write in {parent} (permission denied)")
    except OSError as exc:
        raise PixelLLMError(f"--draw {target}: {exc.strerror or exc}") from None
    return out


def _run_inference(args) -> int:
    task = COMMANDS[args.command]
    draw_target = check_draw_target(args.draw) if args.draw is not None else None
    if args.adapter is not None and not args.adapter.strip():
        raise PixelLLMError("--adapter is empty; give a LoRA adapter folder (pixelllm finetune writes one), "
                            "or leave --adapter out for the base model")
    requests = _requests_from_args(args, task)
    as_json = bool(args.json or args.batch)
    if all(r.error is not None for r in requests):  # nothing left to run: no model to load
        for r in requests:
            _emit(args.command, {**r.echo, "error": r.error}, as_json)
        return EXIT_OK if args.batch else EXIT_FAILED
    if task.task == "segment":
        predictor = _load_segment_predictor(args)
    elif getattr(args, "mask_engine", None):
        predictor = _load_predictor(args.model, args.device, mask_engine=args.mask_engine)
    else:
        predictor = _load_predictor(args.model, args.device)
    if args.adapter is not None:
        _load_adapter(predictor, args.adapter)
    size = max(1, int(getattr(predictor, "batch_size", 32) or 1))
    results: list[dict] = []
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        answered = _answer(task, predictor, chunk, args)
        for n, (result, image) in enumerate(answered, start):
            if "error" not in result:
                if draw_target is not None:
                    out = draw_target
                    if len(requests) > 1:
                        out = out.with_name(f"{out.stem}_{n:04d}{out.suffix}")
                    _save_drawing(task, image, result, out, args)
                result.setdefault("model_version", predictor.model_version)
            _emit(args.command, result, as_json)
            results.append(result)
    if args.batch:
        return EXIT_OK
    (result,) = results
    if "error" in result:
        return EXIT_INTERNAL if result.get("_internal") else EXIT_FAILED
    return EXIT_FAILED if "drawing_error" in result else EXIT_OK


def _load_segment_predictor(args):
    """The Predictor with the mask engine of ``--mask-engine`` (else ``PIXELLLM_MASK_ENGINE``, else the model's
    own mask decoder); refused up front when it has none of them."""
    from .inference.predictor import NO_MASK_ENGINE

    options = {"mask_engine": args.mask_engine} if args.mask_engine else {}
    predictor = _load_predictor(args.model, args.device, **options)
    if hasattr(predictor, "mask_source"):
        source = predictor.mask_source
    else:  # a predictor of another kind (tests): its engine
        source = getattr(predictor, "mask_engine", None)
    if source is None:
        raise PixelLLMError(NO_MASK_ENGINE)
    return predictor


def _answer(task: Command, predictor, chunk: list[Request], args) -> list[tuple[dict, object]]:
    """(result, loaded image or None) for each request of a chunk, in order; never raises but
    KeyboardInterrupt. Images are loaded first so a bad one fails only its own request."""
    from .geometry import clip_box
    from .io import load_image

    results: list[dict] = []
    images: list = []
    for request in chunk:
        result = dict(request.echo)
        image = None
        if request.error is not None:
            result["error"] = request.error
        else:
            try:
                image = _load_image(load_image, request.image, predictor.limits)
                for box in request.boxes:  # a box with no area inside the image fails here, not in the model
                    clip_box(box, image.width, image.height)
                for j, (x, y) in enumerate(request.points):  # so does a point outside it
                    if not (0 <= x <= image.width and 0 <= y <= image.height):
                        raise InvalidPromptError(f"points[{j}] ({x:g}, {y:g}) lies outside the "
                                                 f"{image.width}x{image.height} image")
                result["image_size"] = list(image.size)
            except Exception as exc:
                image = None
                result.update(_error_result(exc, args))
        results.append(result)
        images.append(image)
    good = [i for i, image in enumerate(images) if image is not None]
    if good:
        outs = _call(task, predictor, [images[i] for i in good], [chunk[i] for i in good], args)
        for i, out in zip(good, outs):
            results[i].update(out)
    return [(result, image if "error" not in result else None) for result, image in zip(results, images)]


def _load_image(load_image, path: str, limits):
    try:
        return load_image(path, limits)
    except PixelLLMError:
        raise
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InvalidImageError(f"{path}: cannot read the file ({exc})") from exc


def _call(task: Command, predictor, images: list, requests: list[Request], args) -> list[dict]:
    """The result fields of each request of a chunk: one predictor call for the chunk and, when it fails,
    each request alone (``run_isolated``), so a failure stays with the request that caused it."""
    from .inference.tasks import TASKS, run_isolated

    spec, options = TASKS[task.task], task.options(args)
    items = list(zip(images, requests))

    def call(chunk: list) -> list:
        item_args = [task.item_arg(r) for _, r in chunk] if task.item_arg is not None else None
        return [task.to_json(r) for r in spec.call(predictor, [image for image, _ in chunk], item_args, **options)]

    def retrying(n: int, exc: BaseException) -> None:
        log.debug("a chunk of %d requests failed (%s); answering them one by one", n, _message(exc))

    outcomes = run_isolated(call, items, on_retry=retrying)
    return [_error_result(o, args) if isinstance(o, Exception) else o for o in outcomes]


def _error_result(exc: Exception, args) -> dict:
    """The result fields for a failed request: a project error's message, or a short internal error."""
    if isinstance(exc, PixelLLMError):
        return {"error": _message(exc)}
    if getattr(args, "verbose", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return {"error": f"internal error ({type(exc).__name__}: {short_repr(str(exc), 200)}); rerun with -v for the "
                     "traceback", "_internal": True}


def _save_drawing(task: Command, image, result: dict, out: Path, args) -> None:
    """Save the picture of one result; a failure is the result's ``drawing_error`` and a warning."""
    from PIL import Image

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fmt = Image.registered_extensions().get(out.suffix.lower())
        task.draw(image, result).save(out, format=fmt)
        result["drawing"] = str(out)
    except Exception as exc:
        if getattr(args, "verbose", False):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else short_repr(_message(exc), 200)
        result["drawing_error"] = f"could not save the drawing {out}: {reason}"
        print(f"warning: {result['drawing_error']}", file=sys.stderr)


def _emit(command: str, result: dict, as_json: bool) -> None:
    if as_json:
        print(_dumps({k: v for k, v in result.items() if not k.startswith("_")}), flush=True)
    elif "error" in result:
        print(_human_error(result), file=sys.stderr)
    else:
        print(_human(command, result), flush=True)


def _dumps(result: dict) -> str:
    """One JSON line; a non-finite number becomes null (JSON has no NaN)."""
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_finite(result), allow_nan=False, default=str)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _human_error(r: dict) -> str:
    """``error: IMAGE: message``, without the path when the message already names it."""
    image, message = r.get("image"), r["error"]
    if isinstance(image, str) and image and not message.startswith(image):
        return f"error: {image}: {message}"
    return f"error: {message}"


def _human(command: str, r: dict) -> str:
    if "error" in r:
        return _human_error(r)
    lines = [f"{r.get('image')} ({r['image_size'][0]}x{r['image_size'][1]})"]
    fmt = "  [{:.0f}, {:.0f}, {:.0f}, {:.0f}]"
    for d in r.get("detections", []):
        label = repr(d["text"]) if d.get("text") is not None else "mask"
        line = f"  {label}: " + fmt.format(*d["box_xyxy"]).strip() + f" score {d['score']:.2f}"
        if "mask" in d:
            line += f" mask score {d.get('mask_score', 0):.2f}, {len(d.get('polygons', []))} polygon(s)"
        lines.append(line)
    for c in r.get("captions", []) + r.get("regions", []):
        box = fmt.format(*c["box_xyxy"])
        if c.get("point"):
            box = f"  point ({c['point'][0]:g}, {c['point'][1]:g}) -> {box.strip()}"
        lines.append(box + f" {c['text']!r} score {c['score']:.2f}")
    if "caption" in r:
        lines.append(f"  {r['caption']}")
        for w in r.get("words", []):
            lines.append(f"    {w['text']:<14}" + fmt.format(*w["box_xyxy"]).strip())
    if "drawing" in r:
        lines.append(f"  drawing: {r['drawing']}")
    return "\n".join(lines)


# ---- other subcommands ----------------------------------------------------------------------------

def _info(args) -> int:
    info = _load_predictor(args.model, args.device).info()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>14}: {v}")
    return 0


def _synth(args) -> int:
    from .data.formats import write_synthetic_dataset

    extra = tuple(s for s in (args.extra_shapes or "").split(",") if s)
    try:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise PixelLLMError(f"--out {args.out} is a file; give a folder for the dataset")
        for split in args.split:
            write_synthetic_dataset(args.out, split, args.num_images, seed=args.seed, extra_shapes=extra,
                                    num_workers=args.workers, look=args.look)
            print(f"wrote the {split} split ({args.num_images} images) to {args.out}")
    except OSError as exc:
        raise PixelLLMError(f"cannot write the dataset to {args.out}: {exc.strerror or exc}") from exc
    return 0


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelllm",
        description="Pixel-aligned language model: text->box, box->text, dense captions, per-word traces.",
        epilog="exit codes: 0 ok, 1 the request failed, 2 usage or bad input, 3 internal error, "
               "4 optional extra missing, 130 interrupted, 141 stdout closed early",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p):
        p.add_argument("--model", default=None,
                       help="checkpoint folder or preset (tiny, synth-small, base); "
                            "default: the embedded model")
        p.add_argument("--device", default=None, type=device_arg(),
                       help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--json", action="store_true", help="print one JSON object per result")

    def infer_args(p, image_required_text: str):
        p.add_argument("image", nargs="?", help=image_required_text)
        model_args(p)
        p.add_argument("--draw", metavar="OUT.png",
                       help=f"save a picture of the result ({_DRAW_EXTENSIONS}); "
                            "with --batch, OUT_0000.png ...")
        p.add_argument("--batch", metavar="FILE.jsonl",
                       help="one JSON request per line ({\"image\": path, ...}), UTF-8; one JSON result per "
                            "line, in order, with \"error\" when that request failed")
        p.add_argument("--adapter", default=None, help="LoRA adapter folder (from pixelllm finetune)")

    def beams_arg(p):  # only where text is generated
        p.add_argument("--beams", type=bound_arg("num_beams"), default=1,
                       help="beam size for generated text, 1 to 8 (default 1: greedy)")

    p = sub.add_parser("refer", help="find the box a text refers to (one forward pass)",
                       description="Referring localization: text -> box.")
    infer_args(p, "image file")
    p.add_argument("text", nargs="*", help="referring expression(s), e.g. 'the red circle left of the star'")

    p = sub.add_parser("caption", help="caption the whole image; --trace adds a box per word",
                       description="Whole-image caption, optionally with a location for every word. A model "
                                   "with a proposal head composes it from the objects it finds (left to right, "
                                   "each object's words pointing at its box); --free lets the language model "
                                   "write it from the whole image instead.")
    infer_args(p, "image file")
    beams_arg(p)
    p.add_argument("--trace", action="store_true", help="give every word a box (pointer trace)")
    p.add_argument("--free", action="store_true",
                   help="the language model's own caption of the whole image, not one composed from regions")

    p = sub.add_parser("caption-regions", help="caption given boxes or points (box / point -> text)",
                       description="Location-conditioned captioning: box -> text, or point -> text. A point is "
                                   "captioned as the region the mask engine (--mask-engine, else the model's "
                                   "own mask decoder) finds there, and a model built with prompt.points also "
                                   "reads the point itself; each result names its point.")
    infer_args(p, "image file")
    beams_arg(p)
    p.add_argument("--box", action="append", metavar="x1,y1,x2,y2", help="a box in image pixels (repeatable)")
    p.add_argument("--point", action="append", metavar="x,y",
                   help="a point on an object in image pixels, one caption each (repeatable; not with --box)")
    p.add_argument("--mask-engine", default=None, metavar="sam:PATH",
                   help="turns each --point into the box of its mask: sam:PATH, a local SAM checkpoint folder; "
                        "default: env PIXELLLM_MASK_ENGINE, else the model's own mask decoder")

    p = sub.add_parser("dense-caption", help="find regions and caption each",
                       description="Dense captioning: proposals, each captioned.")
    infer_args(p, "image file")
    p.add_argument("--max-regions", type=bound_arg("max_regions"), default=20, help="1 to 256 (default 20)")
    p.add_argument("--min-score", type=bound_arg("min_score"), default=DEFAULT_MIN_SCORE,
                   help=f"0 to 1 (default {DEFAULT_MIN_SCORE})")

    p = sub.add_parser("segment", help="masks for texts, boxes or points (text/box/point -> mask)",
                       description="Referring segmentation: each text is referred to a box, and the box (or a "
                                   "given box, or a point) prompts the model's own mask decoder (a checkpoint "
                                   "trained with heads.mask_decoder > 0; points need prompt.points) or a mask "
                                   "engine, which wins when given. The embedded model has a decoder; for real "
                                   "photographs give --mask-engine sam:PATH, a local SAM checkpoint folder (or "
                                   "set PIXELLLM_MASK_ENGINE).")
    infer_args(p, "image file")
    p.add_argument("text", nargs="*", help="referring expression(s), each -> one mask")
    p.add_argument("--box", action="append", metavar="x1,y1,x2,y2", help="a box in image pixels (repeatable)")
    p.add_argument("--point", action="append", metavar="x,y",
                   help="a point on the object in image pixels, one mask each (repeatable; x,y,0 for a point "
                        "off the object)")
    p.add_argument("--mask-engine", default=None, metavar="sam:PATH",
                   help="the mask engine: sam:PATH, a local SAM checkpoint folder (config.json + "
                        "model.safetensors); default: env PIXELLLM_MASK_ENGINE, else the model's own mask "
                        "decoder")

    p = sub.add_parser("info", help="describe a model", description="Show a model's version, size, device.")
    model_args(p)

    p = sub.add_parser("synth", help="write a procedural grounded-scene dataset in the public formats",
                       description="Write synthetic scenes as Localized Narratives, MDETR RefCOCO, GRiT VG "
                                   "and COCO captions files.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", nargs="+", default=["train"], choices=["train", "val", "test", "val_shift", "test_shift"],
                   help="splits to write; *_shift splits are drawn by a second renderer in styles never used "
                        "in training (the style-shift test)")
    p.add_argument("--look", choices=["classic", "varied"], default="classic",
                   help="classic: one pose and style per shape; varied: turned shapes, jittered proportions, "
                        "outlines, photo-like backgrounds, lighting, blur, noise, JPEG (domain randomisation)")
    p.add_argument("--num-images", type=int_arg(1), default=100)
    p.add_argument("--seed", type=int_arg(), default=0)
    p.add_argument("--extra-shapes", default="", help="comma-separated shapes beyond the default vocabulary")
    p.add_argument("--workers", type=int_arg(0, 256), default=0,
                   help="processes for rendering (0: in this process)")

    p = sub.add_parser("serve", help="run the inference worker (HTTP) that both plugins can share",
                       description="GPU worker: dynamic batching, bearer auth (PIXELLLM_WORKER_TOKEN). "
                                   "Needs the extra 'serve' (or 'ray' for --ray).")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int_arg(0, 65535), default=8000)
    p.add_argument("--model", default=None, help="checkpoint folder or preset; default: the embedded model")
    p.add_argument("--device", default=None, type=device_arg())
    p.add_argument("--mask-engine", default=None, metavar="sam:PATH",
                   help="mask engine for /v1/segment: sam:PATH, a local SAM checkpoint folder "
                        "(env PIXELLLM_MASK_ENGINE)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of a single process")
    p.add_argument("--replicas", type=int_arg(1), default=1, help="Ray Serve replicas (one per GPU)")
    p.add_argument("--warmup", choices=["auto", "on", "off"], default=None,
                   help="run each batch size once before reporting ready (auto: on CUDA only; "
                        "env PIXELLLM_WORKER_WARMUP)")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="run the model in a child process (default: HTTP work and the model then do not "
                        "share one GIL) or on a thread of the worker's process (env PIXELLLM_WORKER_ENGINE)")
    p.add_argument("--fronts", type=int_arg(1, 256), default=None,
                   help="HTTP front processes on the port, all feeding the one model process (default 1; "
                        "env PIXELLLM_WORKER_FRONTS): more requests a second on a host with spare cores")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("ls-backend", help="run the Label Studio ML backend",
                       description="Label Studio ML backend (env: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
                                   "BASIC_AUTH_USER/PASS, MODEL_DIR, PIXELLLM_WORKER_URL). Needs the extra "
                                   "'serve'.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; use --host 0.0.0.0 to "
                        "let a Label Studio on another machine or container reach it, with "
                        "BASIC_AUTH_USER/PASS set)")
    p.add_argument("--port", type=int_arg(0, 65535), default=9090)
    p.add_argument("--model", default=None, help="checkpoint folder or preset; default: the embedded model")
    p.set_defaults(handler=_ls_backend)
    _add_training_parsers(sub)
    for command in sub.choices.values():  # -v also after the subcommand; SUPPRESS keeps the top-level -v
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging; tracebacks of internal errors")
    return parser


def _serve(args) -> int:
    if args.ray and args.fronts not in (None, 1):
        raise PixelLLMError("--fronts is for the plain worker; on Ray Serve, scale with --replicas")
    if args.ray:
        require_extra("ray", "ray", "ray.serve", "fastapi", "uvicorn", "httpx",
                      feature="pixelllm serve --ray")
        from .serving.ray_app import run as run_ray

        run_ray(host=args.host, port=args.port, model=args.model, replicas=args.replicas)
    else:
        require_extra("serve", "fastapi", "uvicorn", "starlette", "httpx", "prometheus_client",
                      feature="pixelllm serve")
        from .serving.run import run

        run(args.host, args.port, model=args.model, device=args.device, warmup=args.warmup,
            engine=args.engine, fronts=args.fronts, mask_engine=args.mask_engine)
    return 0


def _ls_backend(args) -> int:
    require_extra("serve", "fastapi", "uvicorn", "starlette", "httpx", feature="pixelllm ls-backend")
    from label_studio_backend.server import run

    run(args.host, args.port, model=args.model)
    return 0


def _add_training_parsers(sub) -> None:
    """``train``, ``eval`` and ``finetune`` (their arguments and handlers live in training/cli.py)."""
    from .training.cli import add_training_parsers

    add_training_parsers(sub)


def _undecodable_argument(argv: list[str]) -> str | None:
    """The first command-line argument that is not valid UTF-8 (Python hands undecodable bytes over as
    lone surrogates), or None."""
    for arg in argv:
        if isinstance(arg, str) and _has_surrogate(arg):
            return arg
    return None


def _internal_error(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: internal error ({type(exc).__name__}); please report it with the traceback above",
              file=sys.stderr)
    else:
        print(f"error: internal error ({type(exc).__name__}); rerun with -v for the traceback",
              file=sys.stderr)
    return EXIT_INTERNAL


def _dispatch(args) -> int:
    if args.command in COMMANDS:
        return _run_inference(args)
    if args.command == "info":
        return _info(args)
    if args.command == "synth":
        return _synth(args)
    return args.handler(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit code (see above)."""
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else a
            for a in (sys.argv[1:] if argv is None else argv)]
    bad = _undecodable_argument(argv)
    if bad is not None:
        print(f"error: the argument {short_repr(bad)} is not valid UTF-8 (bytes the shell passed that do not "
              "decode); give file names and texts as UTF-8", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    logging.captureWarnings(True)
    try:
        return _dispatch(args)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except PixelLLMError as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        extra = missing_extra(exc, f"pixelllm {args.command}")
        if extra is None:
            return _internal_error(exc, verbose)
        if verbose:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: {extra}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:  # nobody reads stdout any more: point it at devnull so the exit's flush does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        return _internal_error(exc, verbose)


if __name__ == "__main__":
    sys.exit(main())
