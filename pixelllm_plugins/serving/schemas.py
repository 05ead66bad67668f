"""JSON shapes of the worker (request bodies and responses); they are also the OpenAPI schema.

Fields follow the CLI's ``--batch`` lines: ``text``/``texts``, ``boxes``, ``points`` + ``point_labels``;
results carry ``detections`` / ``captions`` / ``caption`` + ``words`` / ``regions``, ``image_size``
``[w, h]`` and ``model_version``.
Boxes are ``[x1, y1, x2, y2]`` in pixels of the original image.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..bounds import BOUNDS, DEFAULT_MIN_SCORE, check
from ..errors import InvalidParameterError

ADAPTER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "must be a number, not true or false")
    return value


def _knob(name: str):
    """Validators of a numeric request field against the shared ``bounds.BOUNDS`` table (the worker's
    settings may lower the upper end further; the routes check that)."""

    def in_bounds(value):
        try:
            return check(name, value)
        except InvalidParameterError as exc:
            raise PydanticCustomError("out_of_bounds", str(exc).removeprefix(f"{name} ")) from None

    bound = BOUNDS[name]
    return (BeforeValidator(_not_bool), AfterValidator(in_bounds),
            Field(description=bound.describe(), json_schema_extra={"minimum": bound.low, "maximum": bound.high}))


# a coordinate or label is a number, not true or false (which pydantic would read as 1 and 0)
Coordinate = Annotated[float, BeforeValidator(_not_bool)]
Label = Annotated[int, BeforeValidator(_not_bool)]
MaxNewTokens = Annotated[(int, *_knob("max_new_tokens"))]
NumBeams = Annotated[(int, *_knob("num_beams"))]
MaxRegions = Annotated[(int, *_knob("max_regions"))]
MinScore = Annotated[(float, *_knob("min_score"))]


class ImageRef(BaseModel):
    """Exactly one of ``b64`` (the image file's bytes, base64; a ``data:`` URL is fine) or ``url``."""

    model_config = ConfigDict(extra="forbid")
    b64: str | None = Field(None, description="image file bytes, base64 (standard or URL-safe alphabet)")
    url: str | None = Field(None, max_length=4096,
                            description="http(s) URL on a host in PIXELLLM_WORKER_ALLOWED_HOSTS")

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.b64 is None) == (self.url is None):
            raise ValueError("image needs exactly one of 'b64' (base64 file bytes) or 'url'")
        return self


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: ImageRef
    adapter: str | None = Field(None, pattern=ADAPTER_PATTERN,
                                description="name of a LoRA adapter known to the worker (per project)")
    timeout_s: Annotated[float, BeforeValidator(_not_bool)] | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="give up after this many seconds (capped by the worker's PIXELLLM_WORKER_TIMEOUT_S)")


class ReferRequest(_Request):
    text: str | None = Field(None, description="one referring expression")
    texts: list[str] | None = Field(None, description="several referring expressions for the same image")

    @model_validator(mode="after")
    def _has_text(self) -> ReferRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("refer needs exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class CaptionRegionsRequest(_Request):
    """Exactly one of ``boxes`` or ``points`` (one caption per point: the region the worker's mask source
    finds there, and the point itself on a model built with ``prompt.points``)."""

    boxes: list[list[Coordinate]] | None = Field(None, description="[[x1, y1, x2, y2], ...] in image pixels")
    points: list[list[Coordinate]] | None = Field(None, description="[[x, y], ...] in image pixels, one caption each")
    max_new_tokens: MaxNewTokens = 20
    num_beams: NumBeams = 1


class CaptionRequest(_Request):
    trace: bool = True
    from_regions: bool | None = Field(None, description="compose the caption from the objects the model finds "
                                                        "(default when it has a proposal head); false: the "
                                                        "language model's own caption")
    max_new_tokens: MaxNewTokens = 40
    num_beams: NumBeams = 1


class DenseCaptionRequest(_Request):
    max_regions: MaxRegions = 20
    min_score: MinScore = DEFAULT_MIN_SCORE


class SegmentRequest(_Request):
    """Exactly one kind of prompt: ``text``/``texts`` (each referred to a box, the box prompts the mask),
    ``boxes`` or ``points`` (one mask per point; ``point_labels`` 1 the object / 0 not, default 1)."""

    text: str | None = Field(None, description="one referring expression")
    texts: list[str] | None = Field(None, description="several referring expressions, one mask each")
    boxes: list[list[Coordinate]] | None = Field(None, description="[[x1, y1, x2, y2], ...] in image pixels")
    points: list[list[Coordinate]] | None = Field(None, description="[[x, y], ...] in image pixels, one mask each")
    point_labels: list[Label] | None = Field(None, description="one per point: 1 the object, 0 not the object")

    def all_texts(self) -> list[str] | None:
        if self.text is None and self.texts is None:
            return None
        return ([self.text] if self.text is not None else []) + list(self.texts or [])


class DetectionOut(BaseModel):
    box_xyxy: list[float]
    score: float
    text: str
    model_version: str = ""


class RegionCaptionOut(BaseModel):
    box_xyxy: list[float]
    text: str
    score: float
    model_version: str = ""
    point: list[float] | None = Field(None, description="[x, y]: the point prompt this caption answers "
                                      "(point prompts only; box_xyxy is then the point's region)")


class WordOut(BaseModel):
    text: str
    box_xyxy: list[float]
    points: list[list[float]]


class RLEOut(BaseModel):
    size: list[int] = Field(..., description="[height, width] of the image")
    counts: str = Field(..., description="COCO compressed RLE counts (pycocotools)")


class PolygonOut(BaseModel):
    exterior: list[list[float]] = Field(..., description="[[x, y], ...] pixel corners, not closed")
    holes: list[list[list[float]]] = Field(default_factory=list)


class MaskOut(BaseModel):
    text: str | None = Field(None, description="the referring expression (text prompts only)")
    box_xyxy: list[float]
    score: float
    mask: RLEOut
    polygons: list[PolygonOut]
    mask_score: float
    model_version: str = ""


class _Response(BaseModel):
    model_version: str
    image_size: list[int] = Field(..., description="[width, height] of the decoded image")


class ReferResponse(_Response):
    detections: list[DetectionOut] = Field(..., description="all texts' detections (each names its text)")
    per_text: list[list[DetectionOut]] = Field(..., description="detections grouped per requested text")


class CaptionRegionsResponse(_Response):
    captions: list[RegionCaptionOut]


class CaptionResponse(_Response):
    caption: str
    score: float
    words: list[WordOut]


class DenseCaptionResponse(_Response):
    regions: list[RegionCaptionOut]


class SegmentResponse(_Response):
    detections: list[MaskOut] = Field(..., description="one mask per prompt, in prompt order")


class ErrorResponse(BaseModel):
    error: str = Field(..., description="what went wrong and what to do about it")
    type: str = Field(..., description="error class, e.g. InvalidImageError, QueueFull, ValidationError")
    detail: list[dict] | None = None
